"""Reading Hugging Face model directories lazily, one tensor at a time.

Merging streams tensor by tensor so peak memory stays O(models x largest tensor);
the reader therefore never materialises a whole state dict. Safetensors headers
are validated up front, so a corrupt or truncated file is reported when the model
is opened, not halfway through a merge.

Each safetensors tensor is read with ``pread`` from its byte range straight into a
freshly allocated tensor the caller owns; the process holds that tensor and nothing
else. A memory map (``safe_open``) instead keeps every page it touched in the
process's resident set while the map is open, so reading three models cost RSS
equal to all three. Mapping and then releasing pages (``madvise(MADV_DONTNEED)``)
after each copy fixes that too, but measured on three 125M-parameter fp32 models
(reading every tensor, 1.4 GB) it was slower (1.2-1.5 s vs 0.9-1.0 s: a page fault
per few pages plus a user-space copy, against one kernel copy per tensor) and
peaked one tensor higher (mapped pages and copy coexist). ``pread`` also turns a
file truncated under a running merge into an error instead of a SIGBUS. Reads are
served from the OS page cache, so repeating them is cheap. ``.bin`` files are loaded
with ``torch.load(mmap=True)``, which maps rather than reads them.
"""

from __future__ import annotations

import json
import math
import os
import threading
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any

import torch

from hm3.checkpoint.layers import LAYER_COUNT_KEYS, is_vocabulary_tensor, layer_index
from hm3.checkpoint.safetensors_format import SAFETENSORS_DTYPES, tensor_bytes
from hm3.errors import CheckpointError, IncompatibleModelsError

SAFETENSORS_INDEX = "model.safetensors.index.json"
BIN_INDEX = "pytorch_model.bin.index.json"
LM_HEAD = "lm_head.weight"

# Names of the input embedding across common architectures; the first present one is what a tied lm_head reads.
_EMBEDDING_NAMES = (
    "model.embed_tokens.weight",
    "transformer.wte.weight",
    "wte.weight",
    "gpt_neox.embed_in.weight",
    "model.decoder.embed_tokens.weight",
    "embed_tokens.weight",
)
_HIDDEN_SIZE_KEYS = ("hidden_size", "n_embd", "d_model")

# A real header is a few MB at most; anything far larger is a misread length field, not a header.
_MAX_HEADER_BYTES = 100_000_000


@dataclass(frozen=True)
class TensorInfo:
    """Where one tensor lives and what it is, known without reading its data."""

    shard: Path
    shape: tuple[int, ...]
    dtype: torch.dtype
    offset: int  # byte offset in the shard's data section (file order); 0 for .bin
    data_start: int = 0  # where the data section starts in the file (8 + header length); 0 for .bin


def read_safetensors_header(path: Path) -> dict[str, TensorInfo]:
    """Parse and validate a safetensors header, in file order.

    Checks what a cut-off download or a garbage file breaks: the length prefix, the
    JSON, each entry's dtype/shape/offsets, and that the data section is as long as
    the largest ``data_offsets`` end says.
    """
    size = path.stat().st_size
    if size < 8:
        raise CheckpointError(f"{path}: not a safetensors file ({size} bytes, too short for a header)")
    with open(path, "rb") as f:
        header_len = int.from_bytes(f.read(8), "little")
        if header_len == 0 or header_len > min(size - 8, _MAX_HEADER_BYTES):
            raise CheckpointError(
                f"{path}: corrupt or truncated safetensors file (header length field says {header_len} "
                f"bytes, file has {size})"
            )
        raw = f.read(header_len)
    try:
        header = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{path}: corrupt safetensors file (header is not valid JSON: {e})") from None
    if not isinstance(header, dict):
        raise CheckpointError(f"{path}: corrupt safetensors file (header is not a JSON object)")
    data_len = size - 8 - header_len
    infos = {
        name: _tensor_info(path, name, entry, 8 + header_len)
        for name, entry in header.items()
        if name != "__metadata__"
    }
    ends = {name: _entry_end(entry) for name, entry in header.items() if name != "__metadata__"}
    if ends and max(ends.values()) > data_len:
        worst = max(ends, key=ends.__getitem__)
        raise CheckpointError(
            f"{path}: truncated safetensors file: tensor {worst} ends at byte {ends[worst]} of the data "
            f"section but the file holds only {data_len} data bytes (incomplete download or copy?)"
        )
    ordered = sorted(infos, key=lambda n: (infos[n].offset, ends[n]))
    _check_tiling(path, ordered, infos, ends, data_len)
    return {name: infos[name] for name in ordered}


def _check_tiling(path: Path, ordered: list[str], infos: dict[str, TensorInfo], ends: dict[str, int],
                  data_len: int) -> None:
    """The tensors' byte ranges tile the data section: no overlap, no gap, nothing after the last.

    The format's own rule, which the safetensors library enforces on load: overlapping ranges
    would make two tensors read the same bytes, so a hand-edited or crafted header gives wrong
    weights silently where the library refuses the file.
    """
    previous, at = None, 0
    for name in ordered:
        begin = infos[name].offset
        if begin != at:
            what = "overlaps" if begin < at else "leaves a gap after"
            after = f"tensor {previous}, which ends at byte {at}" if previous else "the start of the data section"
            raise CheckpointError(f"{path}: corrupt safetensors header: tensor {name} starts at byte "
                                  f"{begin} and so {what} {after}")
        previous, at = name, ends[name]
    if at != data_len:
        raise CheckpointError(f"{path}: corrupt safetensors file: the tensors end at byte {at} of the data section "
                              f"but it holds {data_len} bytes")


def _entry_end(entry: dict[str, Any]) -> int:
    return int(entry["data_offsets"][1])


def _tensor_info(path: Path, name: str, entry: Any, data_start: int) -> TensorInfo:
    """One validated header entry: known dtype, non-negative shape, offsets matching the byte size."""
    bad = f"{path}: corrupt safetensors header entry for tensor {name}"
    if not isinstance(entry, dict):
        raise CheckpointError(f"{bad}: {entry!r}")
    dtype = SAFETENSORS_DTYPES.get(entry.get("dtype"))  # type: ignore[arg-type]
    shape, offsets = entry.get("shape"), entry.get("data_offsets")
    if dtype is None:
        raise CheckpointError(f"{bad}: unsupported dtype {entry.get('dtype')!r}")
    if not (isinstance(shape, list) and all(isinstance(d, int) and d >= 0 for d in shape)):
        raise CheckpointError(f"{bad}: invalid shape {shape!r}")
    if not (isinstance(offsets, list) and len(offsets) == 2 and all(isinstance(o, int) for o in offsets)):
        raise CheckpointError(f"{bad}: invalid data_offsets {offsets!r}")
    begin, end = offsets
    expected = math.prod(shape) * dtype.itemsize
    if begin < 0 or end - begin != expected:
        raise CheckpointError(f"{bad}: data_offsets {offsets} do not span {expected} bytes for shape {shape}")
    return TensorInfo(shard=path, shape=tuple(shape), dtype=dtype, offset=begin, data_start=data_start)


class Checkpoint:
    """A model directory opened for lazy, per-tensor reading. Use :func:`open_checkpoint` to create one."""

    def __init__(self, path: Path, config: dict[str, Any], tensors: dict[str, TensorInfo], fmt: str):
        self.path = path
        self.config = config
        self.format = fmt  # "safetensors" or "bin"
        self._tensors = tensors
        self._handles: dict[Path, Any] = {}  # shard -> _ShardFile or mmapped .bin state dict
        self._lock = threading.Lock()  # the engine may read from a prefetch thread
        #: the files store a head equal to the tied embedding, read as not stored (mergekit merges it apart)
        self.stored_head_read_as_tied = False
        self._hide_a_head_stored_beside_its_tie()

    def _hide_a_head_stored_beside_its_tie(self) -> None:
        """A config that ties the head to the embedding, and files that also store the head, equal to it: the
        head is read as not stored, as a tied model's usually is not.

        transformers ties such a model (one tensor in the live model, both stored values loaded into it), so
        every consumer (merges on disk and in memory, Fisher, layer paths) must see one tensor: merged apart,
        two copies could differ (DARE draws each tensor's own mask) and a merged head would have nowhere to go
        in the live model. A stored head that differs from the embedding is left visible, and merges as any
        tensor. The check reads both tensors once, when the checkpoint is opened, only in this case.
        """
        embedding = self.input_embedding_name
        if self.config.get("tie_word_embeddings") is not True or LM_HEAD not in self._tensors or embedding is None:
            return
        if self.shape(LM_HEAD) == self.shape(embedding) and torch.equal(self.get(LM_HEAD), self.get(embedding)):
            del self._tensors[LM_HEAD]
            self.stored_head_read_as_tied = True

    def __repr__(self) -> str:
        return f"Checkpoint({str(self.path)!r}, {len(self._tensors)} tensors, {self.format})"

    def __enter__(self) -> Checkpoint:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        """Drop the open file handles and memory maps (tensors already returned stay valid)."""
        with self._lock:
            handles, self._handles = self._handles, {}
        for handle in handles.values():
            if isinstance(handle, _ShardFile):
                handle.close()

    def tensor_names(self) -> list[str]:
        """All tensor names, in file order (index order for sharded checkpoints)."""
        return list(self._tensors)

    def has(self, name: str) -> bool:
        """Whether the tensor is stored in the files (a tied lm_head is not)."""
        return name in self._tensors

    def shape(self, name: str) -> tuple[int, ...]:
        return self._info(name).shape

    def dtype(self, name: str) -> torch.dtype:
        return self._info(name).dtype

    def shard_of(self, name: str) -> str:
        """File name of the shard holding ``name``, so callers can read shard by shard."""
        return self._info(name).shard.name

    def get(self, name: str) -> torch.Tensor:
        """Read one tensor. ``lm_head.weight`` of a tied model resolves to the input embedding."""
        info = self._info(name)
        handle, stored = self._handle(info.shard), self._stored_name(name)
        if self.format == "safetensors":
            return handle.read(name, info)
        try:
            return handle[stored]
        except (OSError, RuntimeError, KeyError) as e:
            raise CheckpointError(f"{info.shard}: cannot read tensor {name}: {e}") from None

    @property
    def num_layers(self) -> int:
        """Transformer block count: from the config, else counted from the tensor names."""
        for cfg in (self.config, self.config.get("text_config") or {}):
            for key in LAYER_COUNT_KEYS:
                if isinstance(cfg.get(key), int):
                    return cfg[key]
        indices = [i for i in map(layer_index, self._tensors) if i is not None]
        return max(indices) + 1 if indices else 0

    @property
    def hidden_size(self) -> int | None:
        return next((self.config[k] for k in _HIDDEN_SIZE_KEYS if isinstance(self.config.get(k), int)), None)

    @property
    def vocab_size(self) -> int | None:
        v = self.config.get("vocab_size")
        return v if isinstance(v, int) else None

    @property
    def input_embedding_name(self) -> str | None:
        """The token embedding tensor (what a tied lm_head shares), or None if none is recognised."""
        found = next((n for n in _EMBEDDING_NAMES if n in self._tensors), None)
        return found or next((n for n in self._tensors if n.endswith("embed_tokens.weight")), None)

    @property
    def tied_embeddings(self) -> bool:
        """lm_head shares the input embedding: the config says so, or lm_head.weight is absent."""
        if self.config.get("tie_word_embeddings") is True:
            return True
        return LM_HEAD not in self._tensors and self.input_embedding_name is not None

    def _stored_name(self, name: str) -> str:
        if name == LM_HEAD and name not in self._tensors and self.tied_embeddings:
            return self.input_embedding_name  # type: ignore[return-value]
        return name

    def _info(self, name: str) -> TensorInfo:
        stored = self._stored_name(name)
        if stored not in self._tensors:
            raise CheckpointError(f"model {self.path} has no tensor {name}")
        return self._tensors[stored]

    def _handle(self, shard: Path) -> Any:
        with self._lock:
            if shard not in self._handles:
                self._handles[shard] = self._open_shard(shard)
            return self._handles[shard]

    def _open_shard(self, shard: Path) -> Any:
        if self.format == "bin":
            return _load_bin(shard)
        return _ShardFile(shard)


class SafetensorsFile:
    """A lone safetensors file (e.g. a Fisher side file) read tensor by tensor with the same bounded memory.

    ``safe_open`` would keep every page read resident until closed, i.e. O(file) for a pass over it.
    """

    def __init__(self, path: str | Path):
        self.path = Path(path)
        if not self.path.is_file():
            raise CheckpointError(f"safetensors file not found: {self.path}")
        self._tensors = read_safetensors_header(self.path)
        self._file = _ShardFile(self.path)

    def __enter__(self) -> SafetensorsFile:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self._file.close()

    def keys(self) -> list[str]:
        return list(self._tensors)

    def get(self, name: str) -> torch.Tensor:
        if name not in self._tensors:
            raise CheckpointError(f"{self.path} has no tensor {name}")
        return self._file.read(name, self._tensors[name])


class _ShardFile:
    """One safetensors file, each tensor read with ``pread`` straight into a new tensor.

    Positional reads need no lock, so the engine's prefetch thread and the caller can share a shard.
    """

    def __init__(self, path: Path):
        self.path = path
        try:
            self._file = open(path, "rb", buffering=0)  # noqa: SIM115 (lives as long as the Checkpoint)
        except OSError as e:
            raise CheckpointError(f"{path}: cannot open safetensors file: {e}") from None

    def close(self) -> None:
        self._file.close()

    def read(self, name: str, info: TensorInfo) -> torch.Tensor:
        out = torch.empty(info.shape, dtype=info.dtype)
        dst = tensor_bytes(out)  # a view: bytes read into it land in out
        begin, done = info.data_start + info.offset, 0
        while done < len(dst):  # one call may return less than asked (above 2 GiB, signals)
            try:
                n = os.preadv(self._file.fileno(), [dst[done:]], begin + done)
            except (OSError, ValueError) as e:  # ValueError: read after close()
                raise CheckpointError(f"{self.path}: cannot read tensor {name}: {e}") from None
            if n == 0:
                raise CheckpointError(
                    f"{self.path}: truncated while reading tensor {name}: the file ends before byte "
                    f"{begin + len(dst)} (changed after it was opened?)"
                )
            done += n
        return out


def _load_bin(path: Path) -> dict[str, torch.Tensor]:
    """A .bin state dict, memory-mapped where the file format allows it (torch >= 1.6 zip files)."""
    try:
        try:
            state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        except RuntimeError as e:
            if "mmap" not in str(e):
                raise
            state = torch.load(path, map_location="cpu", weights_only=True)  # legacy format: no mmap
    except Exception as e:  # unpickling errors come in many types; all mean "unreadable file"
        raise CheckpointError(f"{path}: cannot load PyTorch weights file: {e}") from None
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise CheckpointError(f"{path}: not a state dict of tensors")
    return state


def open_checkpoint(path: str | Path) -> Checkpoint:
    """Open a Hugging Face model directory, validating config, index and every shard header up front."""
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"model path does not exist: {path}")
    if not path.is_dir():
        raise CheckpointError(f"model path is not a directory: {path}")
    config = _read_json(path / "config.json", what="model config")
    if not isinstance(config, dict):
        raise CheckpointError(f"{path / 'config.json'}: not a JSON object")
    if (path / SAFETENSORS_INDEX).exists():
        return Checkpoint(
            path, config, _indexed_tensors(path / SAFETENSORS_INDEX, read_safetensors_header), "safetensors"
        )
    st_files = _weight_files(path, ("model.safetensors", "*.safetensors"))
    if st_files:
        return Checkpoint(
            path, config, _merged_tensors([read_safetensors_header(f) for f in st_files]), "safetensors"
        )
    if (path / BIN_INDEX).exists():
        return Checkpoint(path, config, _indexed_tensors(path / BIN_INDEX, _bin_header), "bin")
    bin_files = _weight_files(path, ("pytorch_model.bin", "pytorch_model*.bin"))
    if bin_files:
        return Checkpoint(path, config, _merged_tensors([_bin_header(f) for f in bin_files]), "bin")
    raise CheckpointError(
        f"not a model directory: no weight files (*.safetensors or pytorch_model*.bin) in {path}"
    )


def _read_json(path: Path, *, what: str) -> Any:
    if not path.is_file():
        raise CheckpointError(f"not a model directory: {what} {path} is missing")
    try:
        return json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{path}: cannot read {what}: {e}") from None


def _weight_files(directory: Path, patterns: tuple[str, str]) -> list[Path]:
    """The single canonical file if present, else every match of the glob (sorted, hidden files skipped)."""
    exact, glob = patterns
    if (directory / exact).is_file():
        return [directory / exact]
    return sorted(p for p in directory.glob(glob) if p.is_file() and not p.name.startswith("."))


def _bin_header(path: Path) -> dict[str, TensorInfo]:
    state = _load_bin(path)
    return {
        k: TensorInfo(shard=path, shape=tuple(v.shape), dtype=v.dtype, offset=0) for k, v in state.items()
    }


def _merged_tensors(headers: list[dict[str, TensorInfo]]) -> dict[str, TensorInfo]:
    """Union of unindexed shard files; a tensor stored twice is ambiguous, so refused."""
    merged: dict[str, TensorInfo] = {}
    for header in headers:
        for name, info in header.items():
            if name in merged:
                raise CheckpointError(
                    f"tensor {name} is stored in both {merged[name].shard} and {info.shard}"
                )
            merged[name] = info
    return merged


def _inside_model_dir(shard: str) -> bool:
    """Whether an index's shard name stays in the model directory: relative, no ``..``, no drive.
    Checked by name rather than by resolving symlinks, since hub caches link shards to blobs elsewhere;
    a crafted index must not make hm3 read (and merge, or export) any file the user can read."""
    parts = PurePosixPath(shard.replace("\\", "/")).parts
    return bool(parts) and not PurePosixPath(shard).is_absolute() and ".." not in parts and ":" not in shard


def _indexed_tensors(index_path: Path, read_header: Any) -> dict[str, TensorInfo]:
    """Tensors in index order, each checked against its shard's own header."""
    index = _read_json(index_path, what="weight index")
    weight_map = index.get("weight_map") if isinstance(index, dict) else None
    if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
        raise CheckpointError(f"{index_path}: no valid 'weight_map' (tensor name -> shard file)")
    shards = dict.fromkeys(weight_map.values())
    escaping = [s for s in shards if not _inside_model_dir(s)]
    if escaping:
        raise CheckpointError(
            f"{index_path} names shard file(s) outside the model directory: {', '.join(escaping[:5])}; "
            "a weight index may only name files in its own directory (no absolute paths, no '..')"
        )
    missing = [s for s in shards if not (index_path.parent / s).is_file()]
    if missing:
        raise CheckpointError(f"{index_path} names shard file(s) that do not exist: {', '.join(missing[:5])}")
    headers = {s: read_header(index_path.parent / s) for s in shards}
    absent = [(n, s) for n, s in weight_map.items() if n not in headers[s]]
    if absent:
        listed = ", ".join(f"{n} (in {s})" for n, s in absent[:5])
        raise CheckpointError(
            f"{index_path} lists {len(absent)} tensor(s) missing from their shard: {listed}"
        )
    return {n: headers[s][n] for n, s in weight_map.items()}


def check_compatible(
    checkpoints: Sequence[Checkpoint], *, reference: int = 0, same_depth: bool = True, same_vocab: bool = True
) -> None:
    """Refuse models that cannot be merged with ``checkpoints[reference]``, naming both and every difference.

    ``same_depth=False`` compares only what lies outside the layers (config widths, embeddings, final
    norm, LM head): layer-range merges stack layers of models of different depths, and check each
    layer they take where they take it. ``same_vocab=False`` lets the vocabularies differ (the
    ``vocab_size`` and the row counts of the token embedding and LM head): a merge that maps every
    model onto one vocabulary rearranges those rows, whose width must still agree.
    """
    if not checkpoints:
        return
    ref = checkpoints[reference]
    for i, other in enumerate(checkpoints):
        if i == reference:
            continue
        problems = (_config_differences(ref, other, same_depth, same_vocab)
                    + _tensor_differences(ref, other, same_depth, same_vocab))
        if problems:
            raise IncompatibleModelsError(
                f"models {ref.path} and {other.path} are incompatible: " + "; ".join(problems)
            )


def _config_differences(a: Checkpoint, b: Checkpoint, same_depth: bool = True, same_vocab: bool = True) -> list[str]:
    fields = {
        "architectures": (a.config.get("architectures"), b.config.get("architectures")),
        "model_type": (a.config.get("model_type"), b.config.get("model_type")),
        "hidden_size": (a.hidden_size, b.hidden_size),
        "num_hidden_layers": (a.num_layers, b.num_layers) if same_depth else (None, None),
        "vocab_size": (a.vocab_size, b.vocab_size) if same_vocab else (None, None),
    }
    return [
        f"{k} {x!r} vs {y!r}" for k, (x, y) in fields.items() if x is not None and y is not None and x != y
    ]


def _tensor_differences(a: Checkpoint, b: Checkpoint, same_depth: bool = True, same_vocab: bool = True) -> list[str]:
    """Missing/extra tensors and shape mismatches; a tied model's absent lm_head is not "missing"."""

    def compared_shape(ckpt: Checkpoint, name: str) -> tuple[int, ...] | None:
        shape = _safe_shape(ckpt, name)
        return shape[1:] if shape is not None and not same_vocab and is_vocabulary_tensor(name) else shape


    def compared(ckpt: Checkpoint) -> list[str]:
        return [n for n in ckpt.tensor_names() if same_depth or layer_index(n) is None]

    names_a, names_b = set(compared(a)), set(compared(b))
    optional = {LM_HEAD} if (a.tied_embeddings or b.tied_embeddings) else set()
    problems = []
    missing = [n for n in compared(a) if n not in names_b and n not in optional]
    extra = [n for n in compared(b) if n not in names_a and n not in optional]
    if missing:
        problems.append(f"{len(missing)} tensor(s) missing from {b.path}: {_first(missing)}")
    if extra:
        problems.append(f"{len(extra)} extra tensor(s) in {b.path}: {_first(extra)}")
    mismatched = [
        f"{n} {list(a.shape(n))} vs {list(b.shape(n))}"
        for n in compared(a)
        if (n in names_b or n == LM_HEAD and n in optional) and compared_shape(b, n) != compared_shape(a, n)
    ]
    if mismatched:
        problems.append(f"{len(mismatched)} shape mismatch(es): {_first(mismatched)}")
    return problems


def _safe_shape(ckpt: Checkpoint, name: str) -> tuple[int, ...] | None:
    try:
        return ckpt.shape(name)
    except CheckpointError:
        return None


def _first(items: list[str], n: int = 5) -> str:
    return ", ".join(items[:n]) + (f", ... ({len(items) - n} more)" if len(items) > n else "")


def check_finite(name: str, tensor: torch.Tensor, source: str) -> None:
    """Refuse a tensor holding NaN or Inf: merging would silently spread it into every merged weight.

    Runs on every input tensor of every merge, so the common case must be cheap: a sum is NaN or
    Inf whenever any entry is, and one reduction needs no temporaries (``isfinite(t).all()``
    allocated ~2.5 bytes per float32 entry and took 25x longer). Only a non-finite sum (a bad
    entry, or finite entries whose sum overflowed) pays for the exact, chunked count.
    """
    n_nan, n_inf = non_finite_counts(tensor)
    if n_nan or n_inf:
        raise CheckpointError(f"NaN/Inf in tensor {name} of model {source} ({n_nan} NaN, {n_inf} Inf values)")


def non_finite_counts(tensor: torch.Tensor) -> tuple[int, int]:
    """A tensor's NaN and Inf counts, (0, 0) at the cost of one sum in the common, finite case (:func:`check_finite`)."""
    if not (tensor.is_floating_point() or tensor.is_complex()):
        return 0, 0
    if tensor.dtype.itemsize > 1 and bool(torch.isfinite(tensor.sum())):  # float8 has no sum kernel
        return 0, 0
    return _count_non_finite(tensor)


_FINITE_CHECK_CHUNK = 1 << 20  # entries per chunk: bounds the boolean temporaries to ~1 MB


def _count_non_finite(tensor: torch.Tensor) -> tuple[int, int]:
    """Exact NaN and Inf counts, a chunk at a time so memory stays small whatever the tensor's size."""
    n_nan = n_inf = 0
    for chunk in tensor.reshape(-1).split(_FINITE_CHECK_CHUNK):
        if chunk.dtype.itemsize == 1:
            chunk = chunk.float()  # float8: no isinf kernel; the upcast keeps NaN and Inf
        n_nan += int(torch.isnan(chunk).sum())
        n_inf += int(torch.isinf(chunk).sum())
    return n_nan, n_inf

"""Writing merged models as sharded safetensors directories, atomically.

Everything is built in a hidden temporary sibling of the output directory and
renamed into place only when complete, so an interrupted or failed merge never
leaves a half-written model that a later step could mistake for a real one.
A merge streams tensors and must not hold the model. Given the output ``layout``
(every tensor's name, shape and dtype, which a merge plan knows before it starts)
the shard files are created with their headers up front and each tensor's bytes
go to their offset as soon as it is added: memory O(one tensor), plus at most
``_QUEUE_TENSORS`` waiting for the background thread. Without a layout, tensors
are buffered one shard at a time (memory ~ one shard, two with the background
writer) and each full shard is written by ``safetensors``.
"""

from __future__ import annotations

import json
import os
import shutil
from collections import deque
from collections.abc import Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

from hm3.atomic import fsync_dir, fsync_tree, share_files
from hm3.checkpoint.safetensors_format import (
    DirectWrites,
    ShardLayout,
    TensorSlot,
    create_shard,
    open_direct,
    plan_layout,
    tensor_bytes,
)
from hm3.errors import CheckpointError, OutputExistsError
from hm3.outputs import MARKER_FILE, OWNER_FILE, check_output_dir, make_staging_dir, marker_text, staging_name

CONFIG_FILE = "config.json"
INDEX_FILE = "model.safetensors.index.json"
SINGLE_FILE = "model.safetensors"
# Files a model directory needs besides its weights to be usable for generation; copied when present.
TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "tokenizer.model",
    "vocab.json",
    "merges.txt",
    "vocab.txt",
    "added_tokens.json",
    "spiece.model",
    "chat_template.jinja",
    "chat_template.json",
    "generation_config.json",
)
# Tensors a layout writer lets wait for its background thread: enough to overlap merging with writing,
# few enough that memory stays O(tensor).
_QUEUE_TENSORS = 2


class StagedDirectory:
    """A directory built under a temporary sibling name and renamed to its real name only on :meth:`commit`.

    The output rules of :mod:`hm3.outputs` are checked first (never over an input, replace only what
    hm3 wrote unless ``force``), and the published directory carries hm3's marker. The staging name
    holds this process's id, so one left by a killed process is removed by the next writer beside it.
    """

    def __init__(self, out_dir: str | Path, *, overwrite: bool = False, force: bool = False,
                 inputs: Sequence[str | Path] = (), what: str = "model"):
        self.out_dir = Path(out_dir)
        self.overwrite = overwrite
        self.what = what
        check_output_dir(self.out_dir, overwrite=overwrite, force=force, inputs=inputs)
        self.out_dir.parent.mkdir(parents=True, exist_ok=True)
        self.tmp = make_staging_dir(self.out_dir.parent, self.out_dir.name, "tmp")

    @staticmethod
    def _exists(p: Path) -> bool:
        return p.exists() or p.is_symlink()

    def commit(self) -> Path:
        """Move the finished directory into place; an old one (overwrite) is replaced only now."""
        (self.tmp / OWNER_FILE).unlink(missing_ok=True)
        share_files(self.tmp)  # safetensors writes its shards 0o600
        (self.tmp / MARKER_FILE).write_text(marker_text(self.what))
        fsync_tree(self.tmp)  # on disk before it has its name (hm3.atomic's rule for single files)
        if not self._exists(self.out_dir):
            os.rename(self.tmp, self.out_dir)
            fsync_dir(self.out_dir.parent)
            return self.out_dir
        if not self.overwrite:
            self.abort()
            raise OutputExistsError(f"output directory appeared while writing: {self.out_dir}")
        old = self.out_dir.parent / staging_name(self.out_dir.name, "old")
        os.rename(self.out_dir, old)
        try:
            os.rename(self.tmp, self.out_dir)
        except OSError:
            os.rename(old, self.out_dir)
            raise
        fsync_dir(self.out_dir.parent)
        _remove(old)
        return self.out_dir

    def abort(self) -> None:
        """Remove the partial directory, leaving no trace of the failed write."""
        _remove(self.tmp)


def _remove(p: Path) -> None:
    if p.is_dir() and not p.is_symlink():
        shutil.rmtree(p, ignore_errors=True)
    else:
        p.unlink(missing_ok=True)


def _write_shard(tensors: dict[str, torch.Tensor], path: Path) -> None:
    try:
        save_file(tensors, str(path), metadata={"format": "pt"})
    except OSError as e:
        raise CheckpointError(f"cannot write shard {path}: {e}") from None


def config_with_dtype(config: dict[str, Any], dtype: torch.dtype | None) -> dict[str, Any]:
    """``config`` with its dtype entry set to ``dtype`` (transformers 5 says ``dtype``, 4 ``torch_dtype``)."""
    out = dict(config)
    if dtype is None:
        return out
    name = str(dtype).removeprefix("torch.")
    keys = [k for k in ("dtype", "torch_dtype") if k in out] or ["torch_dtype"]
    for k in keys:
        out[k] = name
    return out


class _PresizedShards:
    """Shard files created at their final size from a layout; tensors land at their offsets in any order."""

    def __init__(self, directory: Path, shards: list[ShardLayout], slots: dict[str, TensorSlot]):
        n = len(shards)
        self.files = [
            directory / (SINGLE_FILE if n == 1 else f"model-{i:05d}-of-{n:05d}.safetensors")
            for i in range(1, n + 1)
        ]
        self.shards = shards
        self.slots = slots
        self.fds: list[int] = []
        self.direct_fds: list[int | None] = []  # the same files, written past the page cache where they can be
        self.direct = DirectWrites()
        try:
            for path, layout in zip(self.files, shards, strict=True):
                self.fds.append(create_shard(path, layout))
                self.direct_fds.append(open_direct(path))
        except CheckpointError:
            self.close()
            raise

    def check(self, name: str, tensor: torch.Tensor, out_dtype: torch.dtype | None) -> None:
        """Refuse a tensor the layout did not announce, or announced with another shape or dtype."""
        slot = self.slots.get(name)
        if slot is None:
            raise CheckpointError(f"tensor {name} is not in the output layout given to the writer")
        shape, dtype = tuple(tensor.shape), _stored_dtype(tensor.dtype, out_dtype)
        if shape != slot.shape or dtype != slot.dtype:
            raise CheckpointError(
                f"tensor {name} is {list(shape)} {dtype} but the output layout says {list(slot.shape)} "
                f"{slot.dtype}"
            )

    def write(self, name: str, tensor: torch.Tensor, out_dtype: torch.dtype | None) -> None:
        """Convert (if asked) and put the tensor's bytes at its offset; runs on the writer thread."""
        slot = self.slots[name]
        t = tensor.detach().cpu()
        if out_dtype is not None and t.is_floating_point():
            t = t.to(out_dtype)
        shard = slot.shard
        self.direct_fds[shard] = self.direct.write(
            self.fds[shard], self.direct_fds[shard], tensor_bytes(t), slot.begin,
            where=f"tensor {name} to {self.files[shard]}",
        )

    def weight_map(self) -> dict[str, str]:
        return {name: path.name for path, s in zip(self.files, self.shards, strict=True) for name in s.names}

    def close(self) -> None:
        for fd in [*self.fds, *self.direct_fds]:
            if fd is not None:
                os.close(fd)
        self.fds, self.direct_fds = [], []


def _stored_dtype(dtype: torch.dtype, out_dtype: torch.dtype | None) -> torch.dtype:
    """The dtype a tensor is stored in: the writer's ``dtype`` applies to floating-point tensors only."""
    return out_dtype if out_dtype is not None and dtype.is_floating_point else dtype


class CheckpointWriter:
    """Stream tensors into a Hugging Face model directory that appears atomically on successful exit.

    ``layout`` lists every tensor to be added as ``(name, shape, dtype)``, the dtype being that of
    the tensor passed to :meth:`add` (``dtype`` conversion is applied on top). With it, tensors are
    written to disk as they arrive and memory stays O(tensor); without it, O(shard).

    With ``background=True`` disk writes run on one background thread while the caller keeps
    adding tensors (so writing overlaps merging); an error in that thread is raised by the next
    :meth:`add` or on exit. The writer owns the tensors passed to :meth:`add`: do not modify them
    afterwards.
    """

    def __init__(
        self,
        out_dir: str | Path,
        *,
        config: dict[str, Any],
        overwrite: bool = False,
        max_shard_bytes: int = 2_000_000_000,
        tokenizer_from: str | Path | None = None,
        dtype: torch.dtype | None = None,
        extra_files: dict[str, str] | None = None,
        background: bool = False,
        layout: Sequence[tuple[str, tuple[int, ...], torch.dtype]] | None = None,
        force: bool = False,
        inputs: Sequence[str | Path] = (),
    ):
        if max_shard_bytes <= 0:
            raise CheckpointError(f"max_shard_bytes must be positive, got {max_shard_bytes}")
        if tokenizer_from is not None and not Path(tokenizer_from).is_dir():
            raise CheckpointError(f"tokenizer source is not a directory: {tokenizer_from}")
        for fname in extra_files or {}:
            if (
                Path(fname).name != fname
                or fname in (CONFIG_FILE, INDEX_FILE)
                or fname.endswith(".safetensors")
            ):
                raise CheckpointError(
                    f"extra file name {fname!r} must be a plain file name not used by the model"
                )
        planned = None
        if layout is not None:
            if not layout:
                raise CheckpointError(f"empty output layout; refusing to write an empty model to {out_dir}")
            stored = [(n, shape, _stored_dtype(dt, dtype)) for n, shape, dt in layout]
            planned = plan_layout(stored, max_shard_bytes)  # validated before the output is touched
        self.out_dir = Path(out_dir)
        self.config = config
        self.max_shard_bytes = max_shard_bytes
        self.tokenizer_from = Path(tokenizer_from) if tokenizer_from is not None else None
        self.dtype = dtype
        self.extra_files = dict(extra_files or {})
        # refuses an output that is an input, or an existing one hm3 may not replace, before anything else
        self._stage = StagedDirectory(self.out_dir, overwrite=overwrite, force=force, inputs=inputs)
        self._buffer: dict[str, torch.Tensor] = {}
        self._buffer_bytes = 0
        self._buffer_storages: set[int] = set()
        self._shards: list[tuple[Path, list[str]]] = []
        self._names: set[str] = set()
        self._total_bytes = 0
        self._executor = (
            ThreadPoolExecutor(max_workers=1, thread_name_prefix="hm3-writer") if background else None
        )
        self._pending: deque[Future[None]] = deque()
        self._done = False
        self._presized: _PresizedShards | None = None
        if planned is not None:
            try:
                self._presized = _PresizedShards(self._stage.tmp, *planned)
            except BaseException:
                self.abort()
                raise

    def __enter__(self) -> CheckpointWriter:
        return self

    def __exit__(self, exc_type: object, exc: object, tb: object) -> None:
        if exc_type is not None:
            self.abort()
            return
        try:
            self.finish()
        except BaseException:
            self.abort()
            raise

    def add(self, name: str, tensor: torch.Tensor) -> None:
        """Write one tensor (layout) or queue it in the current shard, writing the shard once full."""
        self._check_background()
        if self._done:
            raise CheckpointError(f"writer for {self.out_dir} is already closed; cannot add {name}")
        if name in self._names:
            raise CheckpointError(f"tensor {name} added twice to {self.out_dir}")
        if self._presized is not None:
            self._presized.check(name, tensor, self.dtype)
            self._names.add(name)
            self._submit(_QUEUE_TENSORS, self._presized.write, name, tensor, self.dtype)
            return
        t = self._standalone(tensor)
        nbytes = t.numel() * t.element_size()
        if self._buffer and self._buffer_bytes + nbytes > self.max_shard_bytes:
            self._flush()
        self._buffer[name] = t
        self._buffer_bytes += nbytes
        self._buffer_storages.add(t.untyped_storage().data_ptr())
        self._names.add(name)
        self._total_bytes += nbytes

    def _standalone(self, tensor: torch.Tensor) -> torch.Tensor:
        """A CPU tensor owning exactly its own storage, as safetensors requires (no views, no sharing)."""
        t = tensor.detach()
        if self.dtype is not None and t.is_floating_point():
            t = t.to(self.dtype)
        t = t.cpu()
        owns_storage = (
            t.is_contiguous()
            and t.storage_offset() == 0
            and t.untyped_storage().nbytes() == t.numel() * t.element_size()
        )
        if not owns_storage or t.untyped_storage().data_ptr() in self._buffer_storages:
            t = t.clone(memory_format=torch.contiguous_format)
        return t

    def _flush(self) -> None:
        path = self._stage.tmp / f"shard-{len(self._shards):05d}.safetensors"  # final name needs the count
        tensors, self._buffer = self._buffer, {}
        self._buffer_bytes = 0
        self._buffer_storages = set()
        self._shards.append((path, list(tensors)))
        # bounds memory: at most one shard writing while the next one fills
        self._submit(1, _write_shard, tensors, path)

    def _submit(self, limit: int, fn: Any, *args: Any) -> None:
        """Run ``fn`` now, or on the writer thread once fewer than ``limit`` writes are waiting there."""
        if self._executor is None:
            fn(*args)
            return
        while len(self._pending) >= limit:
            self._pending.popleft().result()
        self._pending.append(self._executor.submit(fn, *args))

    def _wait_pending(self) -> None:
        while self._pending:
            self._pending.popleft().result()

    def _check_background(self) -> None:
        """Raise a background write's error now rather than after the rest of the merge."""
        while self._pending and self._pending[0].done():
            self._pending.popleft().result()

    def finish(self) -> Path:
        """Write what is left, the index, config, tokenizer and extra files, then move the directory into place."""
        if self._buffer:
            self._flush()
        self._wait_pending()
        self._shutdown()
        self._done = True
        if self._presized is not None:
            weight_map = self._finish_presized(self._presized)
        elif not self._shards:
            raise CheckpointError(
                f"no tensors were added; refusing to write an empty model to {self.out_dir}"
            )
        else:
            weight_map = self._name_shards()
        tmp = self._stage.tmp
        if len(set(weight_map.values())) > 1:
            index = {"metadata": {"total_size": self._total_bytes}, "weight_map": weight_map}
            (tmp / INDEX_FILE).write_text(json.dumps(index, indent=2) + "\n")
        (tmp / CONFIG_FILE).write_text(
            json.dumps(config_with_dtype(self.config, self.dtype), indent=2) + "\n"
        )
        if self.tokenizer_from is not None:
            for fname in TOKENIZER_FILES:
                if (self.tokenizer_from / fname).is_file():
                    shutil.copyfile(self.tokenizer_from / fname, tmp / fname)
        for fname, text in self.extra_files.items():
            (tmp / fname).write_text(text)
        return self._stage.commit()

    def _finish_presized(self, presized: _PresizedShards) -> dict[str, str]:
        """Refuse a model with tensors of the layout never added (their bytes would read as zeros)."""
        presized.close()
        missing = [n for n in presized.slots if n not in self._names]
        if missing:
            shown = ", ".join(missing[:5]) + (f", ... ({len(missing) - 5} more)" if len(missing) > 5 else "")
            raise CheckpointError(
                f"{len(missing)} tensor(s) of the output layout were never added to {self.out_dir}: {shown}"
            )
        self._total_bytes = sum(s.nbytes for s in presized.slots.values())
        return presized.weight_map()

    def _name_shards(self) -> dict[str, str]:
        """Rename temporary shards to the HF scheme now that their count is known; name -> shard file."""
        n = len(self._shards)
        weight_map = {}
        for i, (path, names) in enumerate(self._shards, start=1):
            final = SINGLE_FILE if n == 1 else f"model-{i:05d}-of-{n:05d}.safetensors"
            os.rename(path, path.with_name(final))
            weight_map.update(dict.fromkeys(names, final))
        return weight_map

    def _shutdown(self) -> None:
        if self._executor is not None:
            self._executor.shutdown(wait=True)
            self._executor = None

    def abort(self) -> None:
        """Discard everything written so far (waits for the background thread so nothing lands afterwards)."""
        self._done = True
        self._buffer = {}
        self._shutdown()
        self._pending.clear()
        if self._presized is not None:
            self._presized.close()
        self._stage.abort()

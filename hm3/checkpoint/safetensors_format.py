"""The safetensors file layout, computed ahead of the data so tensors can be written as they arrive.

A safetensors file is ``u64 header length | JSON header | data``, and the header
(every name, dtype, shape and byte range) comes first. ``save_file`` therefore
needs all tensors in memory at once; a merge that knows its output tensors'
names, shapes and dtypes up front can instead compute the headers, create each
shard at its final size and put every tensor's bytes at their offset the moment
it is merged, holding O(one tensor) instead of O(one shard).

Files are laid out exactly as ``safetensors.torch.save_file`` lays them out
(data sorted by dtype rank then name, header keys in data order, compact JSON,
space-padded to 8 bytes), so the output is byte-for-byte what it would write.
"""

from __future__ import annotations

import errno
import json
import math
import mmap
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from hm3.errors import CheckpointError

# Ascending in safetensors' own Dtype order: it stores larger ranks first, which keeps every tensor aligned.
SAFETENSORS_DTYPES: dict[str, torch.dtype] = {
    "BOOL": torch.bool,
    "U8": torch.uint8,
    "I8": torch.int8,
    "F8_E5M2": torch.float8_e5m2,
    "F8_E4M3": torch.float8_e4m3fn,
    "I16": torch.int16,
    "U16": torch.uint16,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "I32": torch.int32,
    "U32": torch.uint32,
    "F32": torch.float32,
    "F64": torch.float64,
    "I64": torch.int64,
    "U64": torch.uint64,
}
_DTYPE_NAMES = {dtype: name for name, dtype in SAFETENSORS_DTYPES.items()}
_DTYPE_RANK = {dtype: rank for rank, dtype in enumerate(SAFETENSORS_DTYPES.values())}
FORMAT_METADATA = {"format": "pt"}  # what transformers checks for ("pt") when it loads a shard


@dataclass(frozen=True)
class TensorSlot:
    """Where one tensor's bytes go: its shard, absolute byte range in that file, and what it must be."""

    shard: int
    begin: int
    shape: tuple[int, ...]
    dtype: torch.dtype

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * self.dtype.itemsize


@dataclass(frozen=True)
class ShardLayout:
    """One shard file: its encoded header (length prefix included) and total size."""

    names: tuple[str, ...]  # in the caller's order, as listed in the index
    header: bytes
    size: int


def safetensors_dtype_name(dtype: torch.dtype, tensor: str) -> str:
    """The safetensors name of ``dtype``; refusing early beats a failure after half the merge is written."""
    if dtype not in _DTYPE_NAMES:
        raise CheckpointError(f"tensor {tensor}: dtype {dtype} cannot be stored in safetensors")
    return _DTYPE_NAMES[dtype]


def split_into_shards(sizes: Sequence[tuple[str, int]], max_shard_bytes: int) -> list[list[str]]:
    """Greedy split in the given order: a shard is closed when the next tensor would overflow it.

    A tensor larger than ``max_shard_bytes`` gets a shard of its own rather than an error.
    """
    shards: list[list[str]] = []
    used = 0
    for name, nbytes in sizes:
        if not shards or (shards[-1] and used + nbytes > max_shard_bytes):
            shards.append([])
            used = 0
        shards[-1].append(name)
        used += nbytes
    return shards


def plan_layout(
    tensors: Sequence[tuple[str, tuple[int, ...], torch.dtype]], max_shard_bytes: int
) -> tuple[list[ShardLayout], dict[str, TensorSlot]]:
    """Shard assignment, headers and every tensor's file offset, from names, shapes and dtypes alone."""
    specs: dict[str, tuple[tuple[int, ...], torch.dtype]] = {}
    for name, shape, dtype in tensors:
        if name in specs:
            raise CheckpointError(f"tensor {name} appears twice in the output layout")
        shape = tuple(int(d) for d in shape)
        if any(d < 0 for d in shape):
            raise CheckpointError(f"tensor {name}: invalid shape {list(shape)} in the output layout")
        safetensors_dtype_name(dtype, name)
        specs[name] = (shape, dtype)
    sizes = [(n, math.prod(s) * d.itemsize) for n, (s, d) in specs.items()]
    shards, slots = [], {}
    for index, names in enumerate(split_into_shards(sizes, max_shard_bytes)):
        layout, offsets = _shard_layout(names, specs)
        shards.append(layout)
        data_start = len(layout.header)
        slots.update({n: TensorSlot(index, data_start + offsets[n], *specs[n]) for n in names})
    return shards, slots


def _shard_layout(
    names: list[str], specs: dict[str, tuple[tuple[int, ...], torch.dtype]]
) -> tuple[ShardLayout, dict[str, int]]:
    """Header of one shard and each tensor's offset in its data section, in safetensors' data order."""
    data_order = sorted(names, key=lambda n: (-_DTYPE_RANK[specs[n][1]], n))
    header: dict[str, object] = {"__metadata__": FORMAT_METADATA}
    offsets, end = {}, 0
    for name in data_order:
        shape, dtype = specs[name]
        begin, end = end, end + math.prod(shape) * dtype.itemsize
        offsets[name] = begin
        header[name] = {"dtype": _DTYPE_NAMES[dtype], "shape": list(shape), "data_offsets": [begin, end]}
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)  # safetensors pads with spaces so the data starts 8-byte aligned
    encoded = len(text).to_bytes(8, "little") + text
    return ShardLayout(names=tuple(names), header=encoded, size=len(encoded) + end), offsets


def create_shard(path: Path, layout: ShardLayout) -> int:
    """Create ``path`` at its final size with its header in place; returns a descriptor for :func:`write_at`.

    The data section starts as a hole (reads as zeros, takes no disk) until tensors are written into it.
    """
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
    except OSError as e:
        raise CheckpointError(f"cannot create shard {path}: {e}") from None
    try:
        write_at(fd, layout.header, 0, where=f"header of {path}")
        os.ftruncate(fd, layout.size)
    except (OSError, CheckpointError) as e:
        os.close(fd)
        raise CheckpointError(f"cannot create shard {path}: {e}") from None
    return fd


def tensor_bytes(tensor: torch.Tensor) -> memoryview:
    """The raw bytes of a CPU tensor in row-major order; for a contiguous tensor a writable view, not a copy."""
    t = tensor.detach().contiguous()
    return memoryview(t.reshape(-1).view(torch.uint8).numpy())


def write_at(fd: int, data: memoryview | bytes, offset: int, *, where: str) -> None:
    """``pwrite`` all of ``data`` at ``offset`` (a single call may write less, e.g. above 2 GiB)."""
    view = memoryview(data).cast("B")
    done = 0
    while done < len(view):
        try:
            n = os.pwrite(fd, view[done:], offset + done)
        except OSError as e:
            raise CheckpointError(f"cannot write {where}: {e}") from None
        if n == 0:
            raise CheckpointError(f"cannot write {where}: no progress at byte {offset + done}")
        done += n


# --- writing past the page cache -------------------------------------------------------------------------------

#: O_DIRECT wants the memory address, the file offset and the length aligned to the device's logical block:
#: a page is a multiple of every common one.
DIRECT_ALIGN = 4096
#: Tensors smaller than this go through the page cache: their few pages are not worth a copy.
DIRECT_MIN_BYTES = 1 << 20
_DIRECT_CHUNK = 8 << 20


def open_direct(path: Path) -> int | None:
    """A second descriptor of ``path`` whose writes bypass the page cache (``O_DIRECT``), or None where the OS or
    the file system has none (macOS; tmpfs before Linux 6.6): writes then go through the page cache as before."""
    flag = getattr(os, "O_DIRECT", 0)
    if not flag:
        return None
    try:
        return os.open(path, os.O_WRONLY | flag)
    except OSError:
        return None


class DirectWrites:
    """Writes a tensor's page-aligned middle through an ``O_DIRECT`` descriptor, from a page-aligned staging
    buffer, and its unaligned ends (which share pages with the neighbouring tensors or the header) through the
    page cache; every page of the file is thus written one way only, except after a short or refused direct
    write, whose rest goes through the page cache (the kernel keeps the two coherent).

    Why: a merge's output is written once and synced to disk before it is published, so the page cache
    gains nothing from holding it, while copying it into freshly allocated cache pages was the largest
    kernel cost of ``hm3 merge`` (a third of a SLERP merge's CPU samples, on a VM whose fresh pages are
    dear). The staging copy is a plain memcpy into a buffer that stays mapped.
    """

    def __init__(self) -> None:
        self._staging: mmap.mmap | None = None

    def write(self, fd: int, direct_fd: int | None, data: memoryview, offset: int, *, where: str) -> int | None:
        """Write ``data`` at ``offset``; returns the direct descriptor to use next time (None once the file
        system refused a direct write, after which this file is written through the page cache)."""
        view = memoryview(data).cast("B")
        head = -offset % DIRECT_ALIGN
        middle = (len(view) - head) // DIRECT_ALIGN * DIRECT_ALIGN if len(view) > head else 0
        if direct_fd is None or len(view) < DIRECT_MIN_BYTES or middle == 0:
            write_at(fd, view, offset, where=where)
            return direct_fd
        write_at(fd, view[:head], offset, where=where)
        if self._staging is None:
            self._staging = mmap.mmap(-1, _DIRECT_CHUNK)  # anonymous maps are page-aligned
        staging = memoryview(self._staging)
        done = head
        while done < head + middle:
            n = min(_DIRECT_CHUNK, head + middle - done)
            staging[:n] = view[done : done + n]
            try:
                written = os.pwrite(direct_fd, staging[:n], offset + done)
            except OSError as e:
                if e.errno != errno.EINVAL:
                    raise CheckpointError(f"cannot write {where}: {e}") from None
                os.close(direct_fd)  # this file system takes no direct writes after all: the page cache, from here
                write_at(fd, view[done:], offset + done, where=where)
                return None
            if written != n:  # a short direct write: finish the rest through the page cache
                write_at(fd, view[done + written :], offset + done + written, where=where)
                return direct_fd
            done += n
        write_at(fd, view[head + middle :], offset + head + middle, where=where)
        return direct_fd

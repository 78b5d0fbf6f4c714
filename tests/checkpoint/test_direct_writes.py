"""Layout writes past the page cache (``O_DIRECT``, :class:`hm3.checkpoint.safetensors_format.DirectWrites`): the
file is byte for byte what safetensors writes, whatever the tensors' sizes and offsets, the order they arrive
in, or the file system's refusal of direct writes (at open or at the first write)."""

from __future__ import annotations

import errno
import fcntl
import os
import random

import pytest
import torch
from safetensors.torch import save_file

import hm3.checkpoint.safetensors_format as fmt
from hm3.checkpoint import CheckpointWriter

O_DIRECT = getattr(os, "O_DIRECT", 0)
pytestmark = pytest.mark.skipif(not O_DIRECT, reason="no O_DIRECT on this OS")


def _tensors() -> dict[str, torch.Tensor]:
    """Sizes around every boundary of the direct path: below its minimum, exactly at it, a byte-odd bfloat16
    count (unaligned offsets after it), one page more or less, and several staging chunks with a ragged end."""
    g = torch.Generator().manual_seed(0)
    mib = 1 << 20
    shapes = {"a.small": ((300,), torch.float32), "b.min": ((mib // 4,), torch.float32),
              "c.odd_bf16": ((mib // 2 + 3,), torch.bfloat16), "d.page_more": ((mib // 4 + 1024 + 1,), torch.float32),
              "e.chunks": ((3, 1_000_003), torch.float32), "f.tiny": ((7,), torch.float16),
              "g.page_less": ((mib // 4 + 1023,), torch.float32)}
    return {n: torch.randn(s, generator=g).to(d) for n, (s, d) in shapes.items()}


def _write(tmp_path, tensors, name="out", *, seed=0, max_shard_bytes=1 << 40):
    names = list(tensors)
    random.Random(seed).shuffle(names)  # a layout writer takes tensors in any order
    layout = [(n, tuple(t.shape), t.dtype) for n, t in tensors.items()]
    with CheckpointWriter(tmp_path / name, config={}, layout=layout, background=True,
                          max_shard_bytes=max_shard_bytes) as w:
        for n in names:
            w.add(n, tensors[n])
    return tmp_path / name


def _direct_pwrites(monkeypatch, *, refuse: bool = False) -> list[int]:
    """Record (and optionally refuse with EINVAL, as a file system without direct I/O does) every pwrite made
    through an O_DIRECT descriptor; returns the list of their lengths."""
    seen: list[int] = []
    real = os.pwrite

    def pwrite(fd, data, offset):
        if fcntl.fcntl(fd, fcntl.F_GETFL) & O_DIRECT:
            seen.append(len(data))
            if refuse:
                raise OSError(errno.EINVAL, "Invalid argument")
        return real(fd, data, offset)

    monkeypatch.setattr(os, "pwrite", pwrite)
    return seen


@pytest.mark.parametrize("seed", [0, 1])
def test_direct_writes_give_safetensors_bytes_and_are_used_for_the_large_tensors(tmp_path, monkeypatch, seed):
    probe = tmp_path / "probe"
    probe.touch()
    fd = fmt.open_direct(probe)
    if fd is None:
        pytest.skip(f"the file system of {tmp_path} takes no O_DIRECT (the page-cache path is tested below)")
    os.close(fd)
    tensors = _tensors()
    direct = _direct_pwrites(monkeypatch)
    out = _write(tmp_path, tensors, seed=seed)
    save_file(tensors, tmp_path / "reference.safetensors", metadata={"format": "pt"})
    assert (out / "model.safetensors").read_bytes() == (tmp_path / "reference.safetensors").read_bytes()
    assert direct and all(n % fmt.DIRECT_ALIGN == 0 for n in direct)  # whole pages only, past the cache
    assert sum(direct) > 0.9 * sum(t.numel() * t.element_size() for t in tensors.values())


def test_a_file_system_refusing_direct_writes_gets_the_same_file_through_the_page_cache(tmp_path, monkeypatch):
    tensors = _tensors()
    reference = _write(tmp_path, tensors, "reference", max_shard_bytes=8 << 20)
    refused = _direct_pwrites(monkeypatch, refuse=True)
    out = _write(tmp_path, tensors, max_shard_bytes=8 << 20)  # three shards, the 12 MB tensor alone in one
    shards = list(out.glob("*.safetensors"))
    assert len(shards) == 3
    assert 1 <= len(refused) <= len(shards)  # at most one refusal per file (the 12 MB tensor has two chunks)
    for f in reference.glob("*.safetensors"):
        assert (out / f.name).read_bytes() == f.read_bytes()


def test_no_direct_descriptor_means_page_cache_writes(tmp_path, monkeypatch):
    """Where ``O_DIRECT`` cannot be opened (an OS or file system without it), nothing tries it."""
    real_open = os.open

    def open_(path, flags, *args):
        if flags & O_DIRECT:
            raise OSError(errno.EINVAL, "Invalid argument")
        return real_open(path, flags, *args)

    monkeypatch.setattr(os, "open", open_)
    direct = _direct_pwrites(monkeypatch)
    tensors = _tensors()
    out = _write(tmp_path, tensors)
    save_file(tensors, tmp_path / "reference.safetensors", metadata={"format": "pt"})
    assert (out / "model.safetensors").read_bytes() == (tmp_path / "reference.safetensors").read_bytes()
    assert direct == []

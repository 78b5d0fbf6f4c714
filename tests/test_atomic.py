"""Whole-file outputs: one atomic writer (fsync, then rename) for text, plots and Fisher files; the umask
decides their mode, as for any file a program creates."""

from __future__ import annotations

import errno
import os
import stat
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import torch

import hm3.atomic
from hm3.atomic import atomic_write_text
from hm3.fisher import save_fisher


def _figure(path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from hm3.report import save_figure

    fig, ax = plt.subplots()
    ax.plot([0, 1], [1, 0])
    return save_figure(fig, path)


WRITERS: dict[str, Callable[[Path], Path]] = {
    "text": lambda p: atomic_write_text(p, "a,b\n1,2\n"),
    "figure": _figure,
    "fisher": lambda p: save_fisher(p, {"w": torch.ones(3)}),
}


@pytest.fixture
def umask() -> Iterator[Callable[[int], None]]:
    old = os.umask(0o022)
    yield os.umask
    os.umask(old)


@pytest.mark.parametrize("writer", sorted(WRITERS))
@pytest.mark.parametrize("mask", [0o022, 0o027])
def test_outputs_get_the_umask_mode_not_a_private_one(writer, mask, umask, tmp_path):
    umask(mask)
    out = WRITERS[writer](tmp_path / "out.bin")
    assert stat.S_IMODE(out.stat().st_mode) == 0o666 & ~mask


@pytest.mark.parametrize("writer", sorted(WRITERS))
def test_a_failed_fsync_keeps_the_old_file_and_leaves_no_temporary(writer, tmp_path, monkeypatch):
    target = tmp_path / "out.bin"
    target.write_text("old")

    def full(fd: int) -> None:
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(hm3.atomic.os, "fsync", full)
    with pytest.raises(OSError, match=f"cannot write {target}: No space left on device; any previous"):
        WRITERS[writer](target)
    assert target.read_text() == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["out.bin"]


def test_an_existing_output_is_refused_without_overwrite(tmp_path):
    from hm3.errors import OutputExistsError

    atomic_write_text(tmp_path / "a.txt", "1")
    with pytest.raises(OutputExistsError, match="already exists"):
        atomic_write_text(tmp_path / "a.txt", "2", overwrite=False)
    assert (tmp_path / "a.txt").read_text() == "1"


def test_published_model_directories_get_the_umask_mode(umask, tmp_path):
    """safetensors and save_pretrained write 0o600 files; a published model directory must not keep them."""
    from hm3.checkpoint.synthetic import build_random_llama

    umask(0o027)
    out = build_random_llama(tmp_path / "m", hidden_size=16, num_layers=1, vocab_size=32, seed=0)
    modes = {p.name: stat.S_IMODE(p.stat().st_mode) for p in out.iterdir()}
    assert any(name.endswith(".safetensors") for name in modes)
    assert set(modes.values()) == {0o640}, modes

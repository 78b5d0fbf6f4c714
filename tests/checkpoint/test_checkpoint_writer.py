"""The writer's output loads in transformers with identical logits; writes are atomic and refuse to clobber."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

import hm3.checkpoint.writer as writer_module
from hm3.checkpoint import CheckpointWriter, open_checkpoint
from hm3.checkpoint.synthetic import build_random_llama
from hm3.errors import CheckpointError, OutputExistsError

IDS = torch.tensor([[1, 5, 9, 2, 33, 60, 7]])


def _logits(path) -> torch.Tensor:
    with torch.no_grad():
        return AutoModelForCausalLM.from_pretrained(path).eval()(IDS).logits


def _copy_model(src, out, **kwargs):
    with open_checkpoint(src) as ckpt, CheckpointWriter(out, config=ckpt.config, **kwargs) as w:
        for name in ckpt.tensor_names():
            w.add(name, ckpt.get(name))
    return out


def _leftovers(parent, name):
    return [p.name for p in parent.iterdir() if p.name.startswith(f".{name}.")]


@pytest.mark.parametrize("background", [False, True])
@pytest.mark.parametrize("max_shard_bytes", [2_000_000_000, 20_000])
def test_round_trip_same_logits(tiny_llama, tmp_path, background, max_shard_bytes):
    out = _copy_model(tiny_llama, tmp_path / "out", max_shard_bytes=max_shard_bytes, background=background)
    assert torch.equal(_logits(out), _logits(tiny_llama))
    assert _leftovers(tmp_path, "out") == []


def test_sharded_write_has_valid_index(tiny_llama, tmp_path):
    out = _copy_model(tiny_llama, tmp_path / "out", max_shard_bytes=20_000)
    index = json.loads((out / "model.safetensors.index.json").read_text())
    shards = sorted(set(index["weight_map"].values()))
    assert len(shards) > 1 and not (out / "model.safetensors").exists()
    assert shards == [f"model-{i:05d}-of-{len(shards):05d}.safetensors" for i in range(1, len(shards) + 1)]
    total = 0
    for shard in shards:
        state = load_file(out / shard)
        assert {n for n, s in index["weight_map"].items() if s == shard} == set(state)
        shard_bytes = sum(t.numel() * t.element_size() for t in state.values())
        assert (
            shard_bytes <= 20_000 or len(state) == 1
        )  # only a single oversized tensor may exceed the budget
        total += shard_bytes
    assert index["metadata"]["total_size"] == total
    with open_checkpoint(tiny_llama) as src:
        assert set(index["weight_map"]) == set(src.tensor_names())


def test_single_shard_file_name(tiny_llama, tmp_path):
    out = _copy_model(tiny_llama, tmp_path / "out")
    assert (out / "model.safetensors").is_file() and not (out / "model.safetensors.index.json").exists()


def test_tied_model_round_trip(tmp_path):
    src = build_random_llama(
        tmp_path / "tied", hidden_size=32, num_layers=2, vocab_size=64, tie_word_embeddings=True
    )
    out = _copy_model(src, tmp_path / "out")
    assert "lm_head.weight" not in load_file(out / "model.safetensors")
    assert torch.equal(_logits(out), _logits(src))


def test_dtype_conversion_updates_config(tiny_llama, tmp_path):
    out = _copy_model(tiny_llama, tmp_path / "out", dtype=torch.bfloat16)
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["dtype"] == "bfloat16"
    assert all(t.dtype == torch.bfloat16 for t in load_file(out / "model.safetensors").values())
    model = AutoModelForCausalLM.from_pretrained(out)
    assert next(model.parameters()).dtype == torch.bfloat16


def test_tokenizer_and_extra_files(tiny_llama, tmp_path):
    tok = tmp_path / "tok"
    tok.mkdir()
    (tok / "tokenizer_config.json").write_text('{"model_max_length": 8}')
    (tok / "merges.txt").write_text("a b\n")
    (tok / "unrelated.txt").write_text("not copied")
    out = _copy_model(
        tiny_llama, tmp_path / "out", tokenizer_from=tok, extra_files={"hm3_recipe.yml": "x: 1\n"}
    )
    assert (out / "tokenizer_config.json").read_text() == '{"model_max_length": 8}'
    assert (out / "merges.txt").read_text() == "a b\n"
    assert not (out / "unrelated.txt").exists()
    assert (out / "hm3_recipe.yml").read_text() == "x: 1\n"


def test_views_shared_storage_and_non_contiguous_tensors(tmp_path):
    base = torch.arange(24, dtype=torch.float32).reshape(4, 6)
    tensors = {"a": base, "a_again": base, "row": base[1], "t": base.t(), "cuda_like": base[:, ::2]}
    with CheckpointWriter(tmp_path / "out", config={}) as w:
        for name, t in tensors.items():
            w.add(name, t)
    got = load_file(tmp_path / "out" / "model.safetensors")
    assert set(got) == set(tensors)
    assert all(torch.equal(got[n], t) for n, t in tensors.items())


@pytest.mark.parametrize("layout", [False, True])
def test_every_file_is_on_disk_before_the_model_gets_its_name(tiny_llama, tmp_path, monkeypatch, layout):
    """A power cut after the rename must not leave a published model whose shards were never written
    back (a valid header over zeros reads as a model): every file and the directory are fsynced first,
    as :mod:`hm3.atomic` does for single files, and the parent after the rename."""
    out = tmp_path / "out"
    synced: list[Path] = []
    at_publish: list[Path] = []
    real_fsync, real_rename = os.fsync, os.rename

    def fsync(fd: int) -> None:
        synced.append(Path(os.readlink(f"/proc/self/fd/{fd}")))
        real_fsync(fd)

    def rename(src, dst) -> None:
        if Path(dst) == out:
            at_publish.extend(synced)
        real_rename(src, dst)

    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(os, "rename", rename)
    with open_checkpoint(tiny_llama) as ckpt:
        spec = [(n, ckpt.shape(n), ckpt.dtype(n)) for n in ckpt.tensor_names()] if layout else None
        with CheckpointWriter(out, config=ckpt.config, max_shard_bytes=20_000, layout=spec,
                              tokenizer_from=tiny_llama) as w:
            for name in ckpt.tensor_names():
                w.add(name, ckpt.get(name))
    (tmp,) = {p.parent for p in at_publish if p.suffix == ".safetensors"}  # the staging directory
    published = {p.relative_to(out) for p in out.rglob("*") if p.is_file()}
    assert len(published) > 3 and published <= {p.relative_to(tmp) for p in at_publish if p.parent == tmp}
    assert tmp in at_publish  # its entries too
    assert tmp_path in synced[len(at_publish):]  # the parent holds the new name once the rename is done


def test_existing_output_refused_before_any_work(tiny_llama, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    with pytest.raises(OutputExistsError, match="out"):
        CheckpointWriter(out, config={})
    assert (out / "keep.txt").read_text() == "mine"
    assert _leftovers(tmp_path, "out") == []


def test_overwrite_replaces_only_at_the_end(tiny_llama, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "old.txt").write_text("old")
    (out / ".hm3-output").write_text("{}")  # an output hm3 wrote: --overwrite may replace it
    with open_checkpoint(tiny_llama) as ckpt, CheckpointWriter(out, config=ckpt.config, overwrite=True) as w:
        for name in ckpt.tensor_names():
            w.add(name, ckpt.get(name))
        assert (out / "old.txt").exists()  # old output untouched while writing
    assert not (out / "old.txt").exists()
    assert torch.equal(_logits(out), _logits(tiny_llama))
    assert _leftovers(tmp_path, "out") == []


def test_failure_mid_write_leaves_nothing(tiny_llama, tmp_path):
    out = tmp_path / "out"
    with (
        pytest.raises(RuntimeError, match="boom"),
        open_checkpoint(tiny_llama) as ckpt,
        CheckpointWriter(out, config=ckpt.config, max_shard_bytes=20_000) as w,
    ):
        for i, name in enumerate(ckpt.tensor_names()):
            w.add(name, ckpt.get(name))
            if i == 10:
                raise RuntimeError("boom")
    assert not out.exists()
    assert _leftovers(tmp_path, "out") == []


def test_failed_overwrite_keeps_old_output(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "old.txt").write_text("old")
    (out / ".hm3-output").write_text("{}")
    with pytest.raises(RuntimeError), CheckpointWriter(out, config={}, overwrite=True) as w:
        w.add("x", torch.ones(3))
        raise RuntimeError("fail")
    assert (out / "old.txt").read_text() == "old"
    assert _leftovers(tmp_path, "out") == []


def test_background_write_error_surfaces_and_cleans_up(tmp_path, monkeypatch):
    def failing_save(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(writer_module, "save_file", failing_save)
    out = tmp_path / "out"
    with (
        pytest.raises(CheckpointError, match="disk full"),
        CheckpointWriter(out, config={}, max_shard_bytes=16, background=True) as w,
    ):
        for i in range(50):
            w.add(f"t{i}", torch.ones(4))
    assert not out.exists()
    assert _leftovers(tmp_path, "out") == []


def test_duplicate_tensor_and_empty_model_refused(tmp_path):
    with (
        pytest.raises(CheckpointError, match="added twice"),
        CheckpointWriter(tmp_path / "dup", config={}) as w,
    ):
        w.add("x", torch.ones(2))
        w.add("x", torch.ones(2))
    with pytest.raises(CheckpointError, match="no tensors"), CheckpointWriter(tmp_path / "empty", config={}):
        pass
    assert not (tmp_path / "dup").exists() and not (tmp_path / "empty").exists()
    assert _leftovers(tmp_path, "dup") == [] and _leftovers(tmp_path, "empty") == []


def test_shards_are_flushed_while_adding(tmp_path):
    """Memory stays ~one shard: full shards reach disk before the writer is finished."""
    with CheckpointWriter(tmp_path / "out", config={}, max_shard_bytes=64) as w:
        for i in range(4):
            w.add(f"t{i}", torch.full((16,), float(i)))  # 64 bytes each: one shard per tensor
        staged = [p for p in w._stage.tmp.iterdir() if p.suffix == ".safetensors"]
        assert len(staged) == 3 and not w._buffer.keys() - {"t3"}
    index = json.loads((tmp_path / "out" / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) == 4


KILLED_WRITER = """
import sys, time
from hm3.checkpoint.writer import StagedDirectory
stage = StagedDirectory(sys.argv[1])
(stage.tmp / "shard.safetensors").write_bytes(b"x" * 1000)
print(stage.tmp, flush=True)
time.sleep(600)
"""


def test_staging_of_a_killed_writer_is_removed_by_the_next_one(tiny_llama, tmp_path):
    """``kill -9`` during a write leaves its hidden staging directory; the next writer of that output
    removes it (its process is gone) but never one of a live process or of another output."""
    out = tmp_path / "out"
    child = subprocess.Popen([sys.executable, "-c", KILLED_WRITER, str(out)], stdout=subprocess.PIPE, text=True)
    stale = Path(child.stdout.readline().strip())
    os.kill(child.pid, signal.SIGKILL)
    child.wait()
    assert stale.is_dir() and f"-{child.pid}-" in stale.name
    live = tmp_path / f".out.tmp-{os.getppid()}-0123abcd"  # a running process's
    other = tmp_path / f".other.tmp-{child.pid}-0123abcd"  # another output's
    for d in (live, other):
        d.mkdir()
    with open_checkpoint(tiny_llama) as ckpt, CheckpointWriter(out, config=ckpt.config) as w:
        for name in ckpt.tensor_names():
            w.add(name, ckpt.get(name))
    assert not stale.exists() and live.is_dir() and other.is_dir()
    assert (out / ".hm3-output").is_file() and not (out / ".hm3-staging").exists()

"""Streaming I/O: the layout writer emits exactly what safetensors would, and memory stays O(tensor)."""

from __future__ import annotations

import filecmp
import json
import subprocess
import sys
import textwrap
import threading

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM

import hm3.checkpoint.writer as writer_module
from hm3.checkpoint import CheckpointWriter, SafetensorsFile, open_checkpoint
from hm3.errors import CheckpointError

IDS = torch.tensor([[1, 5, 9, 2, 33, 60, 7]])


def _mixed_tensors() -> dict[str, torch.Tensor]:
    """Every dtype class a checkpoint may hold, odd sizes that misalign naive packing, a scalar, an empty."""
    g = torch.Generator().manual_seed(0)
    return {
        "w.f32": torch.randn(3, 5, generator=g),
        "w.bf16": torch.randn(7, generator=g).to(torch.bfloat16),
        "w.f16": torch.randn(2, 3, generator=g).half(),
        "w.f64": torch.randn(3, generator=g).double(),
        "w.f8": torch.randn(5, generator=g).to(torch.float8_e4m3fn),
        "ids.i64": torch.arange(3),
        "ids.i32": torch.arange(5, dtype=torch.int32),
        "mask.bool": torch.tensor([True, False, True]),
        "raw.u8": torch.arange(9, dtype=torch.uint8),
        "a.scalar": torch.tensor(2.5),
        "z.empty": torch.zeros(0, 4),
    }


def _layout(tensors: dict[str, torch.Tensor]) -> list[tuple[str, tuple[int, ...], torch.dtype]]:
    return [(n, tuple(t.shape), t.dtype) for n, t in tensors.items()]


def _copy_model(src, out, *, layout_order=None, **kwargs):
    """Copy a model through the writer, with the layout in file order; tensors added in ``layout_order``."""
    with open_checkpoint(src) as ckpt:
        names = ckpt.tensor_names()
        layout = [(n, ckpt.shape(n), ckpt.dtype(n)) for n in names]
        with CheckpointWriter(out, config=ckpt.config, layout=layout, **kwargs) as w:
            for name in layout_order(names) if layout_order else names:
                w.add(name, ckpt.get(name))
    return out


@pytest.mark.parametrize("background", [False, True])
def test_layout_file_is_byte_identical_to_save_file(tmp_path, background):
    tensors = _mixed_tensors()
    save_file(tensors, tmp_path / "reference.safetensors", metadata={"format": "pt"})
    with CheckpointWriter(tmp_path / "out", config={}, layout=_layout(tensors), background=background) as w:
        for name in reversed(tensors):  # any add order: every tensor has its own offset
            w.add(name, tensors[name])
    written = tmp_path / "out" / "model.safetensors"
    assert written.read_bytes() == (tmp_path / "reference.safetensors").read_bytes()
    with safe_open(str(written), framework="pt") as f:
        assert set(f.keys()) == set(tensors) and f.metadata() == {"format": "pt"}


@pytest.mark.parametrize("background", [False, True])
def test_sharded_layout_output_equals_buffered_writer_output(tiny_llama, tmp_path, background):
    """Same shard split, index and bytes as the buffered writer; transformers sees the same model."""
    streamed = _copy_model(
        tiny_llama,
        tmp_path / "streamed",
        max_shard_bytes=20_000,
        background=background,
        layout_order=reversed,
    )
    with (
        open_checkpoint(tiny_llama) as ckpt,
        CheckpointWriter(tmp_path / "buffered", config=ckpt.config, max_shard_bytes=20_000) as w,
    ):
        for name in ckpt.tensor_names():
            w.add(name, ckpt.get(name))
    files = sorted(p.name for p in streamed.iterdir())
    assert files == sorted(p.name for p in (tmp_path / "buffered").iterdir())
    assert len([f for f in files if f.endswith(".safetensors")]) > 1
    match, mismatch, errors = filecmp.cmpfiles(streamed, tmp_path / "buffered", files, shallow=False)
    assert (mismatch, errors) == ([], [])
    index = json.loads((streamed / "model.safetensors.index.json").read_text())
    with open_checkpoint(tiny_llama) as src:
        for shard in set(index["weight_map"].values()):
            for name, t in load_file(streamed / shard).items():
                assert index["weight_map"][name] == shard and torch.equal(t, src.get(name))
    with torch.no_grad():
        got = AutoModelForCausalLM.from_pretrained(streamed).eval()(IDS).logits
        want = AutoModelForCausalLM.from_pretrained(tiny_llama).eval()(IDS).logits
    assert torch.equal(got, want)


def test_layout_with_dtype_conversion(tiny_llama, tmp_path):
    out = _copy_model(tiny_llama, tmp_path / "out", dtype=torch.bfloat16, background=True)
    assert json.loads((out / "config.json").read_text())["dtype"] == "bfloat16"
    with open_checkpoint(tiny_llama) as src:
        for name, t in load_file(out / "model.safetensors").items():
            assert t.dtype == torch.bfloat16 and torch.equal(t, src.get(name).to(torch.bfloat16))


def test_tensors_reach_disk_when_added(tmp_path):
    """Streaming, not buffering: a tensor's bytes are in the shard file before the writer finishes."""
    layout = [(f"t{i}", (4,), torch.float32) for i in range(3)]
    with CheckpointWriter(tmp_path / "out", config={}, layout=layout) as w:
        w.add("t1", torch.full((4,), 7.0))
        shard = w._stage.tmp / "model.safetensors"
        header_len = int.from_bytes(shard.read_bytes()[:8], "little")
        entry = json.loads(shard.read_bytes()[8 : 8 + header_len])["t1"]
        begin, end = (8 + header_len + o for o in entry["data_offsets"])
        assert shard.read_bytes()[begin:end] == torch.full((4,), 7.0).numpy().tobytes()
        w.add("t0", torch.zeros(4))
        w.add("t2", torch.zeros(4))


def test_background_queue_is_bounded(tmp_path, monkeypatch):
    """With the disk stalled, add() blocks once the queue is full instead of piling tensors up."""
    gate = threading.Event()
    real_write = writer_module.DirectWrites.write

    def stalled_write(*args, **kwargs):
        gate.wait(timeout=30)
        return real_write(*args, **kwargs)

    monkeypatch.setattr(writer_module.DirectWrites, "write", stalled_write)
    n = writer_module._QUEUE_TENSORS + 1
    layout = [(f"t{i}", (2,), torch.float32) for i in range(n)]
    with CheckpointWriter(tmp_path / "out", config={}, layout=layout, background=True) as w:
        for i in range(n - 1):
            w.add(f"t{i}", torch.ones(2))  # the queue takes these without waiting
        last = threading.Thread(target=w.add, args=(f"t{n - 1}", torch.ones(2)))
        last.start()
        last.join(timeout=0.5)
        assert last.is_alive(), "add() returned although the queue was full"
        gate.set()
        last.join(timeout=30)
        assert not last.is_alive()
    assert set(load_file(tmp_path / "out" / "model.safetensors")) == {n for n, _, _ in layout}


def _leftovers(parent, name):
    return [p.name for p in parent.iterdir() if p.name.startswith(f".{name}.")]


@pytest.mark.parametrize(
    ("name", "tensor", "message"),
    [
        ("extra.weight", torch.ones(2, 3), "extra.weight is not in the output layout"),
        (
            "a.weight",
            torch.ones(3, 2),
            r"a.weight is \[3, 2\] torch.float32 but the output layout says \[2, 3\]",
        ),
        (
            "a.weight",
            torch.ones(2, 3, dtype=torch.float16),
            "a.weight is .* torch.float16 but .* torch.float32",
        ),
    ],
)
def test_unexpected_tensor_refused(tmp_path, name, tensor, message):
    layout = [("a.weight", (2, 3), torch.float32)]
    with (
        pytest.raises(CheckpointError, match=message),
        CheckpointWriter(tmp_path / "out", config={}, layout=layout) as w,
    ):
        w.add(name, tensor)
    assert not (tmp_path / "out").exists() and _leftovers(tmp_path, "out") == []


def test_missing_tensors_refused(tmp_path):
    layout = [(f"t{i}", (2,), torch.float32) for i in range(8)]
    with (
        pytest.raises(CheckpointError, match=r"7 tensor\(s\) of the output layout were never added.*t1, t2"),
        CheckpointWriter(tmp_path / "out", config={}, layout=layout, background=True) as w,
    ):
        w.add("t0", torch.ones(2))
    assert not (tmp_path / "out").exists() and _leftovers(tmp_path, "out") == []


@pytest.mark.parametrize(
    ("layout", "message"),
    [
        ([], "empty output layout"),
        ([("x", (2,), torch.float32), ("x", (2,), torch.float32)], "x appears twice"),
        ([("c", (2,), torch.complex64)], "tensor c: dtype torch.complex64 cannot be stored"),
        ([("n", (2, -1), torch.float32)], r"tensor n: invalid shape \[2, -1\]"),
    ],
)
def test_bad_layout_refused_before_output_is_touched(tmp_path, layout, message):
    with pytest.raises(CheckpointError, match=message):
        CheckpointWriter(tmp_path / "out", config={}, layout=layout)
    assert list(tmp_path.iterdir()) == []


def test_background_write_error_surfaces_and_cleans_up(tmp_path, monkeypatch):
    def failing_write(*args, where, **kwargs):
        raise CheckpointError(f"cannot write {where}: disk full")

    monkeypatch.setattr(writer_module.DirectWrites, "write", failing_write)
    layout = [(f"t{i}", (4,), torch.float32) for i in range(50)]
    with (
        pytest.raises(CheckpointError, match="tensor t0 to .*disk full"),
        CheckpointWriter(tmp_path / "out", config={}, layout=layout, background=True) as w,
    ):
        for i in range(50):
            w.add(f"t{i}", torch.ones(4))
    assert not (tmp_path / "out").exists() and _leftovers(tmp_path, "out") == []


def test_reader_returns_every_dtype_as_safetensors_does(tmp_path):
    tensors = _mixed_tensors()
    model = tmp_path / "model"
    model.mkdir()
    (model / "config.json").write_text("{}")
    save_file(tensors, model / "model.safetensors")
    want = load_file(model / "model.safetensors")
    with open_checkpoint(model) as ckpt:
        for name, t in want.items():
            got = ckpt.get(name)
            assert got.dtype == t.dtype and got.shape == t.shape
            assert torch.equal(got.reshape(-1).view(torch.uint8), t.reshape(-1).view(torch.uint8)), (
                name
            )  # bitwise


def test_lone_safetensors_file(tmp_path):
    tensors = _mixed_tensors()
    save_file(tensors, tmp_path / "fisher.safetensors")
    with SafetensorsFile(tmp_path / "fisher.safetensors") as f:
        assert sorted(f.keys()) == sorted(tensors)
        for name, t in tensors.items():
            assert torch.equal(f.get(name).reshape(-1).view(torch.uint8), t.reshape(-1).view(torch.uint8))
        with pytest.raises(CheckpointError, match="fisher.safetensors has no tensor nope"):
            f.get("nope")
    with pytest.raises(CheckpointError, match="not found: .*missing.safetensors"):
        SafetensorsFile(tmp_path / "missing.safetensors")
    (tmp_path / "bad.safetensors").write_bytes(b"\x05" + b"\x00" * 7 + b"{oops")
    with pytest.raises(CheckpointError, match="bad.safetensors: corrupt"):
        SafetensorsFile(tmp_path / "bad.safetensors")


def test_reader_owns_its_tensors(tiny_llama):
    """Returned tensors are independent writable memory: changing one changes neither the file nor a re-read."""
    with open_checkpoint(tiny_llama) as ckpt:
        name = ckpt.tensor_names()[0]
        first = ckpt.get(name)
        first.zero_()
        assert not torch.equal(ckpt.get(name), first)


def test_file_truncated_after_open_is_an_error_not_a_crash(tiny_llama, tmp_path):
    import shutil

    model = shutil.copytree(tiny_llama, tmp_path / "model")
    with open_checkpoint(model) as ckpt:
        last = max(ckpt.tensor_names(), key=lambda n: ckpt._tensors[n].offset)
        ckpt.get(ckpt.tensor_names()[0])  # shard opened while intact
        with open(model / "model.safetensors", "r+b") as f:
            f.truncate(f.seek(0, 2) - 16)
        with pytest.raises(
            CheckpointError, match=f"model.safetensors: truncated while reading tensor {last}"
        ):
            ckpt.get(last)


_PEAK_SCRIPT = textwrap.dedent(
    """
    import resource, sys, torch
    from hm3.checkpoint import CheckpointWriter, SafetensorsFile, open_checkpoint

    def peak_mb():
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024

    mode, path = sys.argv[1], sys.argv[2]
    n, shape = 16, (1024, 1024)  # 16 tensors of 4 MiB
    layout = [(f"t{i}", shape, torch.float32) for i in range(n)]
    if mode == "read":
        ckpt = open_checkpoint(path)
        ckpt.get("t0")  # warm-up: allocator and file handle set up before the baseline
        start = peak_mb()
        for name in ckpt.tensor_names():
            ckpt.get(name)
    else:
        w = CheckpointWriter(path, config={}, layout=layout, background=True)
        w.add("t0", torch.full(shape, 0.0))
        start = peak_mb()
        for i in range(1, n):
            w.add(f"t{i}", torch.full(shape, float(i)))
        w.finish()
    print(peak_mb() - start)
    """
)


def _peak_growth_mb(mode: str, path) -> float:
    proc = subprocess.run(
        [sys.executable, "-c", _PEAK_SCRIPT, mode, str(path)], capture_output=True, text=True, timeout=120
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    return float(proc.stdout.split()[-1])


def test_peak_memory_is_a_few_tensors_not_the_model(tmp_path):
    """Reading or writing 64 MiB of 4 MiB tensors grows peak RSS by a few tensors (safe_open / a shard
    buffer grow it by the whole 64 MiB)."""
    written = tmp_path / "written"
    assert _peak_growth_mb("write", written) < 24
    assert len(load_file(written / "model.safetensors")) == 16
    assert _peak_growth_mb("read", written) < 16

"""The ``hm3 merge`` process settings (:mod:`hm3.process`): freed large buffers are reused instead of faulted in
again, a user's own settings stand, the import heap is frozen with the collector left as it was, and only a
process of the command's own is tuned.

Each check runs in a fresh interpreter: the settings are process-wide and must not leak into the test run.
"""

from __future__ import annotations

import json
import os
import platform
import subprocess
import sys

import pytest

_FAULTS = """
import json, resource, sys
import torch
from hm3.process import keep_freed_buffers
applied = keep_freed_buffers() if sys.argv[1] == "tuned" else None

def faults(floats):
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    a = torch.ones(floats)
    after = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    del a
    return after - before

faults(24 << 20)  # 96 MiB, freed: above glibc's largest default mmap threshold (32 MiB), so unmapped by default
print(json.dumps({"applied": applied, "second": faults(16 << 20)}))  # 64 MiB: fits where the 96 MiB were
"""


def _python(code: str, *args: str, env: dict[str, str] | None = None) -> dict:
    clean = {k: v for k, v in os.environ.items()
             if not k.startswith("MALLOC_") and k not in ("GLIBC_TUNABLES", "OPENBLAS_NUM_THREADS")}
    out = subprocess.run([sys.executable, "-c", code, *args], env=clean | (env or {}), capture_output=True,
                         text=True, check=True, timeout=120)
    return json.loads(out.stdout.strip().splitlines()[-1])


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="the thresholds are glibc's")
def test_a_freed_large_buffer_is_reused_instead_of_faulted_in_again():
    pages = (64 << 20) // os.sysconf("SC_PAGESIZE")
    default = _python(_FAULTS, "default")
    tuned = _python(_FAULTS, "tuned")
    assert default["second"] > pages // 2  # glibc's default: the 64 MiB array is a fresh mapping
    assert tuned["applied"] is True
    assert tuned["second"] < pages // 10  # kept in the heap: the 64 MiB reuse the freed 96 MiB's pages


def test_thresholds_the_user_set_in_the_environment_stand():
    for key, value in (("MALLOC_MMAP_THRESHOLD_", "131072"), ("GLIBC_TUNABLES", "glibc.malloc.trim_threshold=1")):
        assert _python(_FAULTS, "tuned", env={key: value})["applied"] is False


_FREEZE = """
import gc, json, sys
from hm3.process import frozen_imports
if sys.argv[1] == "disabled":
    gc.disable()
before = gc.get_freeze_count()
with frozen_imports():
    inside = gc.isenabled()
    import email.mime.text  # noqa: F401  (any module not yet imported)
print(json.dumps({"inside": inside, "after": gc.isenabled(), "frozen": gc.get_freeze_count() - before}))
"""


@pytest.mark.parametrize("state", ["enabled", "disabled"])
def test_imports_are_frozen_and_the_collector_is_left_as_it_was(state):
    out = _python(_FREEZE, state)
    assert out["inside"] is False  # no collection scans the half-built import heap
    assert out["after"] is (state == "enabled")
    assert out["frozen"] > 1000  # everything the interpreter and the import made is in the permanent generation


_COMMAND = """
import gc, json, os, sys
if sys.argv[1] == "torch-first":
    import torch  # noqa: F401  (a process that already holds torch: a test run, a notebook)
from hm3.process import tensor_loop_process
before = gc.get_freeze_count()
with tensor_loop_process() as tuned:
    import hm3.merge.engine  # noqa: F401
print(json.dumps({"tuned": tuned, "frozen": gc.get_freeze_count() - before, "gc": gc.isenabled(),
                  "blas": os.environ.get("OPENBLAS_NUM_THREADS")}))
"""


def test_a_fresh_command_process_is_tuned_and_one_that_holds_torch_is_left_alone():
    fresh = _python(_COMMAND, "fresh")
    assert fresh["tuned"] is True and fresh["gc"] is True and fresh["blas"] == "1"
    assert fresh["frozen"] > 100_000  # torch's objects, out of the collector's scans
    held = _python(_COMMAND, "torch-first")
    assert held == {"tuned": False, "frozen": 0, "gc": True, "blas": None}


def test_a_blas_thread_count_the_user_set_stands():
    out = _python(_COMMAND, "fresh", env={"OPENBLAS_NUM_THREADS": "2"})
    assert out["tuned"] is True and out["blas"] == "2"

"""How ``hm3 merge`` tunes its own process for a loop over large tensors: the garbage collector,
glibc's malloc and numpy's BLAS threads.

Python's cyclic garbage collector scans every object it tracks at each full collection, and
importing torch leaves over a quarter of a million of them; the merge loop makes enough garbage to run
full collections, which re-scanned them all (a profile of the merge benchmark found about 8% of its CPU
samples there). :func:`frozen_imports` moves what the imports made into the collector's permanent
generation, which it no longer scans; garbage made later is collected as before.

The streaming merge allocates and frees each tensor's buffers (inputs, task vectors, masks, result)
once per tensor. glibc serves a block above its mmap threshold (dynamic, at most 32 MiB) with a
fresh mapping and unmaps it on free, and trims the heap's free top above its trim threshold, so every
large tensor's buffers were faulted in again, page by page, zero-filled by the kernel. Raising both
thresholds keeps the freed blocks in the heap for the next tensor: on the merge benchmark's models
(``experiments/bench_merge.py``) the process spends markedly less time in the kernel, for a somewhat
higher peak RSS (docs/BENCHMARKS.md has the measurements).

numpy's bundled OpenBLAS starts a thread per core when numpy is imported, and those threads spin
while they wait for work that the merge never gives them (it calls no BLAS routine through numpy;
torch has its own): a profile of the merge benchmark found about 3% of its CPU samples in them,
taken from the merge's own threads on a machine with few cores. :func:`numpy_blas_single_threaded`
asks for one thread before numpy is imported.

Nothing here runs on import: a library import must not change the process's collector or allocator.
The ``hm3 merge`` command applies them through :func:`tensor_loop_process`, in a process of its own
only; a program using hm3 as a library (or calling the command's ``main`` in-process) decides for itself.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import gc
import os
import sys
from collections.abc import Iterator
from contextlib import contextmanager

#: glibc's mallopt parameters (malloc.h)
M_TRIM_THRESHOLD = -1
M_MMAP_THRESHOLD = -3
#: blocks up to this size come from the heap (mallopt takes an int: 1 GiB is well inside it)
HEAP_BLOCK_LIMIT = 1 << 30
#: the heap's free top is returned to the system only above this (the largest int mallopt takes)
TRIM_LIMIT = (1 << 31) - 1
#: the environment settings by which a user already chose glibc's thresholds
_USER_SETTINGS = ("MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_", "GLIBC_TUNABLES")


def keep_freed_buffers() -> bool:
    """Raise glibc's mmap and trim thresholds for this process; True when applied.

    Does nothing (False) where the C library is not glibc (no ``mallopt``), or where the user set
    the thresholds through the environment (their choice stands).
    """
    if any(key in os.environ for key in _USER_SETTINGS):
        return False
    name = ctypes.util.find_library("c")
    try:
        libc = ctypes.CDLL(name)
        mallopt = libc.mallopt
        libc.gnu_get_libc_version  # noqa: B018 -- only glibc has it; musl's mallopt ignores these keys
    except (OSError, AttributeError, TypeError):
        return False
    mallopt.argtypes = (ctypes.c_int, ctypes.c_int)
    mallopt.restype = ctypes.c_int
    return bool(mallopt(M_MMAP_THRESHOLD, HEAP_BLOCK_LIMIT)) and bool(mallopt(M_TRIM_THRESHOLD, TRIM_LIMIT))


@contextmanager
def frozen_imports() -> Iterator[None]:
    """Import inside this block with the collector paused, then freeze what exists (``gc.freeze``).

    The objects the imports create live as long as the process, so scanning them again at every full
    collection only costs time; freezing them keeps that work off the loop that follows. The collector
    is enabled again afterwards if it was before.
    """
    was_enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        gc.freeze()
        if was_enabled:
            gc.enable()


def numpy_blas_single_threaded() -> bool:
    """``OPENBLAS_NUM_THREADS=1`` unless the user set it; True when set here. Effective only before
    numpy is first imported (OpenBLAS reads it once)."""
    if "OPENBLAS_NUM_THREADS" in os.environ:
        return False
    os.environ["OPENBLAS_NUM_THREADS"] = "1"
    return True


@contextmanager
def tensor_loop_process() -> Iterator[bool]:
    """Wrap a command's imports: yields True when the process is tuned (all of the above), False when not.

    Tuned only where torch is not imported yet, that is where the command is the process's first work: a
    process that already holds torch (a test run, a notebook calling the command in-process) has settings
    and objects of its own that freezing or a changed environment would reach.
    """
    if "torch" in sys.modules:
        yield False
        return
    numpy_blas_single_threaded()
    with frozen_imports():
        yield True
    keep_freed_buffers()

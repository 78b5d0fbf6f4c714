"""How hm3 uses the CPU's threads: torch's intra-op pool and how idle OpenMP workers wait.

Nothing here runs on import: a library import must not change the process. The ``hm3`` command
(and ``scripts/*.sh``, the test suite's ``conftest.py``) apply :func:`prefer_sleeping_openmp_workers`
before torch is imported; a program using hm3 as a library decides for itself.
"""

from __future__ import annotations

import os

from hm3.errors import ConfigError


def prefer_sleeping_openmp_workers() -> None:
    """``OMP_WAIT_POLICY=PASSIVE`` unless the user set it; effective only before torch is imported.

    With libgomp's default (spin up to ~3 ms between parallel regions) the back-to-back tensor ops of the
    in-memory merge and of evaluation ran 10x slower whenever other processes held the cores
    (:mod:`hm3.merge.inmemory` has the measurements); PASSIVE costs nothing on an idle machine.
    """
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")


def set_threads(n: int | None) -> None:
    """torch's intra-op threads (``--threads``); ``None`` keeps torch's default (every core)."""
    if n is None:
        return
    if n < 1:
        raise ConfigError(f"--threads must be a positive number of threads, got {n}")
    import torch

    torch.set_num_threads(n)

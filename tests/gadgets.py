"""Malicious pickles for the tests and the red-team script: files that would run code if unpickled."""

from __future__ import annotations

import os
from pathlib import Path

import torch


class Gadget:
    """Unpickling this runs a shell command that creates ``marker``: proof that code ran."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def plant(path: Path, marker: Path) -> None:
    """A pickle that would create ``marker`` when loaded with ``weights_only=False``, at ``path``."""
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"X": torch.zeros(2), "payload": Gadget(marker)}, path)

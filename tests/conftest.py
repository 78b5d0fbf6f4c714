"""Fixtures shared across test folders: tiny models built on the fly (nothing is downloaded)."""

from __future__ import annotations

from pathlib import Path

import pytest


@pytest.fixture(scope="session")
def tiny_llama(tmp_path_factory) -> Path:
    """A tiny random Llama (hidden 32, 2 layers, vocab 64, untied); read-only: copy it before changing it."""
    from hm3.checkpoint.synthetic import build_random_llama

    return build_random_llama(
        tmp_path_factory.mktemp("tiny_llama") / "base", hidden_size=32, num_layers=2, vocab_size=64, seed=0
    )

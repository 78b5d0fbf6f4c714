"""experiments/bench_search_param.py reads a finished arm back from its run directory: only when that run is
the one asked for."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "experiments"))

import bench_search_param  # noqa: E402

from hm3.errors import ConfigError  # noqa: E402


def test_a_finished_run_made_with_other_settings_is_not_read_back_as_this_one(tmp_path, micro_zoo_dir):
    # the run directory's name carries the optimiser, seed and budget, not --validation-examples: a second
    # call in the same --work with fewer examples must not report the first call's HV as its own
    args = argparse.Namespace(normalize=False, bo_options={}, validation_examples=8, test_examples=4,
                              fisher_examples=4, quiet=True)
    first = bench_search_param.one_run(micro_zoo_dir, tmp_path, "random", 0, 2, args)
    assert first["reused"] is False
    assert bench_search_param.one_run(micro_zoo_dir, tmp_path, "random", 0, 2, args)["reused"] is True
    other = argparse.Namespace(**{**vars(args), "validation_examples": 4})
    with pytest.raises(ConfigError, match="validation_examples"):
        bench_search_param.one_run(micro_zoo_dir, tmp_path, "random", 0, 2, other)

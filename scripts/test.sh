#!/usr/bin/env bash
# The test suite on a fresh machine: sets up .venv, then runs ruff and pytest.
# Extra arguments go to pytest (e.g. scripts/test.sh -m "not slow" for quick feedback).
set -euo pipefail
cd "$(dirname "$0")/.."
# idle OpenMP workers sleep instead of spinning (hm3/threads.py): hm3 sets it only in its CLI
export OMP_WAIT_POLICY="${OMP_WAIT_POLICY:-PASSIVE}"
scripts/setup.sh
.venv/bin/ruff check hm3 objectives tests experiments
# one pytest-xdist worker per core (HM3_TEST_WORKERS=N to choose; -n 0 runs serially); a test file's
# tests stay on one worker, so its module fixtures (tiny models, runs) are built once; files go out in the
# order tests/conftest.py gives them (the slow ones first), not re-sorted by test count
exec .venv/bin/python -m pytest -n "${HM3_TEST_WORKERS:-auto}" --dist loadfile --no-loadscope-reorder "$@"

#!/usr/bin/env bash
# The test suite on a fresh machine: sets up .venv, then runs ruff and pytest.
# Extra arguments go to pytest (e.g. scripts/test.sh -m "not slow").
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
.venv/bin/ruff check hm3 objectives tests experiments
exec .venv/bin/python -m pytest "$@"

#!/usr/bin/env bash
# The main job on the embedded default: sets up .venv, then runs `hm3 demo`.
set -euo pipefail
cd "$(dirname "$0")/.."
# idle OpenMP workers sleep instead of spinning (hm3/threads.py): hm3 sets it only in its CLI
export OMP_WAIT_POLICY="${OMP_WAIT_POLICY:-PASSIVE}"
scripts/setup.sh
exec .venv/bin/hm3 demo "$@"

#!/usr/bin/env bash
# The main job on the embedded default: sets up .venv, then runs `hm3 demo`.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
exec .venv/bin/hm3 demo "$@"

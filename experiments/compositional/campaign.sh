#!/usr/bin/env bash
# The compositional campaign (build, ablation seeds, bound, report) as one resumable command.
#
#   experiments/compositional/campaign.sh OUTDIR [--device cpu|cuda] [--dtype float32|bfloat16] [--toy]
#       [--work DIR] [--seeds 0,1,2] [--batch-size N] [--deadline-s N] [--set KEY=VALUE]...
#       [--smol-dir DIR | --smol-wheel FILE] [--threads N]
#
# What it runs, what it writes, how it resumes, the deadline and the exit codes: campaign.py's
# docstring (--help). This wrapper picks the interpreter (PYTHON, else the repository's .venv, else
# python3) and puts the repository on PYTHONPATH, so it runs from a plain copy of the tree.
# HM3_WHEELS=DIR installs the wheels in DIR first (offline, into a folder under TMPDIR put on PYTHONPATH):
# hm3's dependencies that a machine without a package index lacks (device_wheels.sh fetches them).
set -euo pipefail
repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
py="${PYTHON:-}"
if [[ -z "$py" ]]; then
  if [[ -x "$repo/.venv/bin/python" ]]; then py="$repo/.venv/bin/python"; else py="$(command -v python3)"; fi
fi
if [[ -n "${HM3_WHEELS:-}" ]]; then
  site="${TMPDIR:-/tmp}/hm3-campaign-site"  # one folder, refilled on each call
  rm -rf "$site"
  "$py" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target "$site" "$HM3_WHEELS"/*.whl
  export PYTHONPATH="$site${PYTHONPATH:+:$PYTHONPATH}"
fi
export PYTHONPATH="$repo${PYTHONPATH:+:$PYTHONPATH}"
exec "$py" "$repo/experiments/compositional/campaign.py" "$@"

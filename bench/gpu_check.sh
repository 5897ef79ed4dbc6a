#!/usr/bin/env bash
# One prepared GPU run (< 8 min, --budget-s): GPU tests (Triton kernels, CUDA graphs, engine, overlap scheduling), the
# weight-streaming floor, loopserve's engine (Triton + CUDA graphs, overlap on and off; torch eager as the
# old path), a profile of where the 8B steps' time goes, saturation throughput, and transformers' eager
# generate as the naive baseline, on dummy Llama-3.1-8B and SmolLM2-135M shapes.
# Run scripts/gpu_wheels.sh first (here, with network) and carry .whl: the GPU machine has no xgrammar.
# Results: $OUT/gpu.jsonl (or ./gpu.jsonl); each step has its own timeout so one failure costs only itself,
# and the steps run most needed first, so a run cut by the device budget loses the least.
# --no-eager-baseline skips the last step (the torch eager engine, the path before the Triton kernels).
# --parts LIST (comma-separated; default tests,targets,diagnostics,profiles,eager) runs only those parts:
# a second, shorter device call can take the diagnostics and profiles that a first one's budget cut.
# One part runs only when named: lanes (bench/gpu_lanes.py: a decode lane and a prefill lane at once,
# whether running them side by side beats running them in turn; ~2 minutes).
# --budget-s N (default 470): each step's timeout is cut to what is left of N seconds from the start, and
# a step with under 10 s left is skipped, so the run ends, summary included, within 8 minutes (and the
# device tool's 600 s a call). Order: the rows the targets and issue 5 need (engines, floors, saturation,
# the transformers baselines), then the diagnostic rows (fused GEMVs forced on, the A/B pairs), then the
# profiles.
set -uo pipefail
cd "$(dirname "$0")/.."
eager_baseline=1
budget=470
parts=tests,targets,diagnostics,profiles,eager
while [ $# -gt 0 ]; do
  case "$1" in
    --no-eager-baseline) eager_baseline=0 ;;
    --budget-s) budget="$2"; shift ;;
    --parts) parts="$2"; shift ;;
    *) echo "usage: $0 [--no-eager-baseline] [--budget-s N] [--parts tests,targets,diagnostics,profiles,eager,lanes]" >&2
       exit 2 ;;
  esac
  shift
done
[ "$eager_baseline" = 1 ] || parts="${parts//eager/}"
part() { [[ ",$parts," == *",$1,"* ]]; }
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
# Wheels the GPU machine lacks, carried in .whl (scripts/gpu_wheels.sh), go into a scratch site folder.
if compgen -G ".whl/*.whl" > /dev/null; then
  site=$(mktemp -d)
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target "$site" .whl/*.whl \
    && export PYTHONPATH="$site:$PYTHONPATH"
fi
out="${OUT:-.}/gpu.jsonl"
: > "$out"
nvidia-smi --query-gpu=name,memory.total,clocks.sm,clocks.max.sm --format=csv,noheader
python -c "import torch, triton, transformers; print('torch', torch.__version__, 'triton', triton.__version__, 'transformers', transformers.__version__)"
B8=bench/configs/llama-3.1-8b.json
B135=bench/configs/smollm2-135m.json
# step TIMEOUT CMD...: CMD under its timeout, cut to the budget left (SECONDS: bash's seconds since start).
# Each step's start is logged as "[+Ns]" (to the script's own stderr, fd 3, past the steps' pipes), so a
# log shows what each took.
exec 3>&2
step() {
  local t=$1 left=$((budget - SECONDS))
  shift
  if [ "$left" -lt 10 ]; then echo "   skipped: the ${budget} s budget is spent"; return 0; fi
  echo "   [+${SECONDS}s]" >&3
  # SIGINT, not TERM: a cut pytest still prints its summary (counts and failures so far).
  timeout -s INT -k 5 $((t < left ? t : left)) "$@"
}
g() { step "$1" python -m bench.gpu_decode "${@:2}" --out "$out" 2>&1 | tail -3; }

if part tests; then
echo "== GPU tests"
# xdist spreads the kernels' first-time Triton compiles (most of this step on a fresh machine) over
# cores: 14 of the machine's 16 (8 took 148 s on an H100 for 474 tests in the fourteenth session, 12 took
# 164 s on an H200 for 478; the list has grown since). The whole log, with the failures' tracebacks and
# the slowest tests, goes to gpu-tests.log beside gpu.jsonl: it comes back even from a cut run. The
# kernels no GPU has run yet come first: a cut step then loses tests that passed on a GPU before.
step 180 python -m pytest -q -p no:cacheprovider -n 14 -rfE --durations=25 --device cuda \
  tests/model/test_gated_mlp.py tests/model/test_gemv.py tests/model/test_gemv_tuning.py \
  tests/model/test_fused_ops.py tests/attention tests/engine/test_engine.py tests/unit/test_argmax.py \
  tests/unit/test_step_inputs.py tests/unit/test_tuning.py \
  "tests/engine/test_overlap.py::test_launching_a_step_never_waits_for_the_device" \
  "tests/engine/test_overlap.py::test_staggered_batch_matches_synchronous_and_overlaps" \
  "tests/engine/test_overlap.py::test_grammar_and_penalty_requests_overlap_too" \
  2>&1 | tee "${OUT:-.}/gpu-tests.log" | grep -E "passed|failed|Error|error|FAILED|skipped: the" | tail -25
fi
if part targets; then
echo "== 8B (then profiles of its batch-1 decode and both long-prompt turns, on the same warm engine)"
g 180 engine --config $B8 --profile-top 15
g 40 floor --config $B8
echo "== 135M"
g 90 engine --config $B135 --profile-top 15
g 30 floor --config $B135
echo "== 8B saturation (sharegpt-like, random 1000/1000), each then profiled for a few steps"
g 80 throughput --config $B8 --workload sharegpt --seconds 20 --profile-top 15
g 80 throughput --config $B8 --workload random1000 --seconds 20 --profile-top 15
echo "== baselines: transformers eager"
g 80 hf --config $B8 --output-len 32
g 40 hf --config $B135 --output-len 32
fi
if part diagnostics; then
echo "== diagnostics: the fused GEMVs forced on (135M with and without PDL)"
g 60 engine --config $B8 --fused-decode-gemv on --long-prompt-len 0
g 40 engine --config $B135 --fused-decode-gemv on --long-prompt-len 0
g 40 engine --config $B135 --fused-decode-gemv on --long-prompt-len 0 --no-pdl
echo "== 8B sharegpt-like at 32 sequences, with and without mixed-step graphs (their A/B, where launches may set the pace)"
g 60 throughput --config $B8 --workload sharegpt --max-num-seqs 32 --warmup 3 --seconds 12
g 60 throughput --config $B8 --workload sharegpt --max-num-seqs 32 --warmup 3 --seconds 12 --no-mixed-step-graphs
fi
if part profiles; then
# (The target rows' engines already profiled batch-1 decode, both long-prompt turns and saturation.)
echo "== 8B profiles: mixed decode + prefill steps (after bench.gpu_profile's other phases); decode with the fused GEMVs"
step 100 python -m bench.gpu_profile --config $B8 --out "$out" 2>&1 | tail -1 | cut -c1-400
step 50 python -m bench.gpu_profile --config $B8 --decode-only --fused-decode-gemv on --long-len 1024 --out "$out" 2>&1 \
  | tail -1 | cut -c1-300
fi
if part lanes; then
  echo "== 8B: a decode lane (160 sequences) and a prefill lane (4,096 prompt tokens a step), alone and at once"
  step 180 python -m bench.gpu_lanes --config $B8 --out "$out" 2>&1 | tail -2 | cut -c1-400
fi
if part eager; then
  echo "== loopserve torch eager (the pre-Triton path)"
  g 80 engine --config $B8 --attention-backend torch --enforce-eager
fi
echo "== summary, and issue 5's targets"
python -m bench.gpu_summary "$out"

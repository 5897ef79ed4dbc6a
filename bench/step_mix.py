"""The steps a saturation workload makes, with the forward skipped (CPU, deterministic): how many
carry prompt tokens, how many prompts and tokens those hold, and how many each set of step graphs
could serve. It says which of a busy server's steps CUDA graphs can take, without a GPU.

  python -m bench.step_mix --workload sharegpt --steps 1500 --out bench/results/step-mix-sharegpt.json

The engine is bench/gpu_decode.py's saturation engine (same scheduler, 256 sequences by default, requests
replaced as they finish, the same lengths) over a KV pool of --kv-blocks blocks (default: the 8B
model's pool on the H200 in the sixth session). Lengths decide the schedule: outputs run to their
max_tokens, so the skipped forward changes nothing. The first third of the steps (the initial burst
of prompts) is left out.
"""
from __future__ import annotations

import argparse
import collections
import json
import random
import statistics
import tempfile
from pathlib import Path

import torch

from bench.gpu_decode import BENCH_SCHEDULER, SATURATION_SEQS, record_steps, workload_lengths
from loopserve.config import CacheConfig, EngineConfig, SchedulerConfig
from loopserve.engine.core import EngineCore, EngineRequest, _step_graph_specs
from loopserve.sampling_params import SamplingParams

H200_8B_KV_BLOCKS = 52808
# A model only big enough to run the engine: the forward is skipped, the scheduler is what is measured.
_TINY = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 16, "intermediate_size": 32,
         "num_hidden_layers": 1, "num_attention_heads": 2, "num_key_value_heads": 1, "vocab_size": 1000,
         "max_position_embeddings": 16384, "rms_norm_eps": 1e-5, "torch_dtype": "float32"}


def step_mix(workload: str, num_steps: int, kv_blocks: int, max_num_seqs: int = SATURATION_SEQS) -> dict:
    folder = Path(tempfile.mkdtemp())
    (folder / "config.json").write_text(json.dumps(_TINY))
    config = EngineConfig(model=str(folder), load_format="dummy", dtype="fp32", device="cpu",
                          max_model_len=_TINY["max_position_embeddings"], cache=CacheConfig(num_blocks=kv_blocks),
                          scheduler=SchedulerConfig(max_num_seqs=max_num_seqs, **BENCH_SCHEDULER),
                          overlap_scheduling=False)
    core = EngineCore(config)

    def forward_logits(out, prev=None):
        if out.empty:
            return None, []
        sampling = [s for s in out.seqs if s.samples]
        return torch.zeros(len(sampling), _TINY["vocab_size"]), sampling

    core.runner.forward_logits = forward_logits
    steps = record_steps(core)
    rng = random.Random(0)
    added = 0

    def add() -> None:
        nonlocal added
        p, o = workload_lengths(workload, rng)
        core.add_request(EngineRequest(f"r{added}", [rng.randrange(1, _TINY["vocab_size"]) for _ in range(p)],
                                       SamplingParams(temperature=0, max_tokens=o, ignore_eos=True)))
        added += 1

    for _ in range(2 * max_num_seqs):
        add()
    while len(steps) < num_steps:
        for o in core.step():
            if o.finish_reason:
                add()
    steady = steps[num_steps // 3:num_steps]
    prompt_steps = [s for s in steady if s[2]]
    specs = _step_graph_specs(config, config.scheduler)
    served = [next((k for k, spec in enumerate(specs) if spec.holds(t, b, p, b > p)), None)
              for b, t, p in prompt_steps]
    return {"bench": "step_mix", "workload": workload, "max_num_seqs": max_num_seqs, "kv_blocks": kv_blocks,
            "steps": len(steady),
            "mean_seqs_per_step": statistics.fmean(b for b, _, _ in steady),
            "mean_tokens_per_step": statistics.fmean(t for _, t, _ in steady),
            "prompt_steps": len(prompt_steps),
            "mean_tokens_prompt_step": statistics.fmean(t for _, t, _ in prompt_steps) if prompt_steps else 0,
            # prompt steps by the graph set that could serve them (0: prefill graphs, 1: mixed-step graphs)
            "prompt_steps_by_graph_set": {k: served.count(k) for k in sorted({s for s in served if s is not None})},
            "prompt_steps_eager": served.count(None),
            "prompts_per_prompt_step": dict(sorted(collections.Counter(p for _, _, p in prompt_steps).items())),
            "graph_sets": [{"max_seqs": s.max_seqs, "max_prompts": s.max_prompts, "max_tokens": s.token_sizes[-1]}
                           for s in specs]}


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--workload", choices=["sharegpt", "random1000"], default="sharegpt")
    ap.add_argument("--steps", type=int, default=1500)
    ap.add_argument("--kv-blocks", type=int, default=H200_8B_KV_BLOCKS)
    ap.add_argument("--max-num-seqs", type=int, default=SATURATION_SEQS)
    ap.add_argument("--out", type=Path)
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    result = step_mix(args.workload, args.steps, args.kv_blocks, args.max_num_seqs)
    print(json.dumps(result), flush=True)
    if args.out:
        args.out.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()

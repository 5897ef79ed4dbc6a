"""Offline benchmark: loopserve's engine against transformers' `generate` on the same prompts, same run.

Measures (medians over --repeats):
  - throughput: N prompts of random lengths, greedy, fixed output length, all submitted at once;
  - batch-1 decode: one prompt, output tok/s after the first token, plus TTFT.
Writes JSON with both engines' numbers and the ratios.

  python -m bench.offline --model smollm2 --num-prompts 16 --out bench/results/offline.json
"""
from __future__ import annotations

import argparse
import json
import platform
import random
import statistics
import time
from pathlib import Path

import torch

from loopserve import LLM, SamplingParams
from loopserve.engine.core import EngineRequest
from loopserve.fetch import resolve_model


def make_prompts(n: int, lo: int, hi: int, vocab: int, seed: int) -> list[list[int]]:
    rng = random.Random(seed)
    # Plain token ids from the ordinary part of the vocabulary; the model's text is irrelevant to speed.
    return [[rng.randrange(100, min(vocab, 40000)) for _ in range(rng.randint(lo, hi))] for _ in range(n)]


def loopserve_throughput(llm: LLM, prompts, out_len: int) -> dict:
    params = SamplingParams(temperature=0, max_tokens=out_len, ignore_eos=True)
    llm.engine.kv.reset_prefix_cache()
    t0 = time.perf_counter()
    outs = llm.generate([{"prompt_token_ids": p} for p in prompts], params)
    dt = time.perf_counter() - t0
    n_out = sum(len(o.outputs[0].token_ids) for o in outs)
    return {"seconds": dt, "output_tokens": n_out, "output_tok_s": n_out / dt,
            "total_tok_s": (n_out + sum(map(len, prompts))) / dt}


def loopserve_batch1(llm: LLM, prompt, out_len: int) -> dict:
    llm.engine.kv.reset_prefix_cache()
    engine = llm.engine
    params = SamplingParams(temperature=0, max_tokens=out_len, ignore_eos=True)
    t0 = time.perf_counter()
    engine.add_request(EngineRequest("b1", list(prompt), params))
    first = None
    n = 0
    while engine.has_unfinished():
        n += sum(len(o.new_token_ids) for o in engine.step())
        if first is None and n:
            first = time.perf_counter()
    end = time.perf_counter()
    return {"ttft_s": first - t0, "decode_tok_s": (n - 1) / (end - first), "output_tokens": n}


def hf_model(model_path: str, dtype: torch.dtype):
    from transformers import AutoModelForCausalLM
    p = Path(model_path)
    if p.suffix == ".gguf":
        return AutoModelForCausalLM.from_pretrained(str(p.parent), gguf_file=p.name, dtype=dtype).eval()
    return AutoModelForCausalLM.from_pretrained(str(p), dtype=dtype).eval()


@torch.inference_mode()
def hf_batch1(model, prompt, out_len: int) -> dict:
    ids = torch.tensor([prompt])
    kw = dict(do_sample=False, pad_token_id=0)
    t0 = time.perf_counter()
    model.generate(ids, max_new_tokens=1, min_new_tokens=1, **kw)
    t1 = time.perf_counter()
    model.generate(ids, max_new_tokens=out_len, min_new_tokens=out_len, **kw)
    t2 = time.perf_counter()
    # Decode rate from the difference of two runs, so the prompt's prefill cancels out.
    return {"ttft_s": t1 - t0, "decode_tok_s": (out_len - 1) / ((t2 - t1) - (t1 - t0)), "output_tokens": out_len}


@torch.inference_mode()
def hf_throughput(model, prompts, out_len: int) -> dict:
    longest = max(map(len, prompts))
    ids = torch.zeros((len(prompts), longest), dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, p in enumerate(prompts):  # left padding, as generate expects for decoder-only models
        ids[i, longest - len(p):] = torch.tensor(p)
        mask[i, longest - len(p):] = 1
    t0 = time.perf_counter()
    model.generate(ids, attention_mask=mask, max_new_tokens=out_len, min_new_tokens=out_len, do_sample=False,
                   pad_token_id=0)
    dt = time.perf_counter() - t0
    n_out = out_len * len(prompts)
    return {"seconds": dt, "output_tokens": n_out, "output_tok_s": n_out / dt,
            "total_tok_s": (n_out + sum(map(len, prompts))) / dt}


def median_of(runs: list[dict]) -> dict:
    return {k: statistics.median(r[k] for r in runs) for k in runs[0]}


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2")
    ap.add_argument("--dtype", default="auto")
    ap.add_argument("--num-prompts", type=int, default=16)
    ap.add_argument("--min-prompt-len", type=int, default=32)
    ap.add_argument("--max-prompt-len", type=int, default=512)
    ap.add_argument("--output-len", type=int, default=64)
    ap.add_argument("--batch1-prompt-len", type=int, default=256)
    ap.add_argument("--batch1-output-len", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--no-baseline", action="store_true", help="skip transformers' generate")
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args(argv)

    model_path = resolve_model(args.model)
    llm = LLM(model_path, dtype=args.dtype)
    dtype = llm.engine.dtype
    vocab = llm.engine.model_config.vocab_size
    prompts = make_prompts(args.num_prompts, args.min_prompt_len, args.max_prompt_len, vocab, args.seed)
    b1_prompt = make_prompts(1, args.batch1_prompt_len, args.batch1_prompt_len, vocab, args.seed + 1)[0]

    loopserve_batch1(llm, b1_prompt[:16], 4)  # warm-up
    result = {"model": str(model_path), "machine": platform.processor() or platform.machine(),
              "torch_threads": torch.get_num_threads(), "args": {k: str(v) for k, v in vars(args).items()},
              "loopserve": {}, "transformers": {}}
    runs_tp, runs_b1 = [], []
    for _ in range(args.repeats):
        runs_tp.append(loopserve_throughput(llm, prompts, args.output_len))
        runs_b1.append(loopserve_batch1(llm, b1_prompt, args.batch1_output_len))
    result["loopserve"] = {"throughput": median_of(runs_tp), "batch1": median_of(runs_b1)}
    del llm

    if not args.no_baseline:
        model = hf_model(model_path, dtype)
        hf_batch1(model, b1_prompt[:16], 2)  # warm-up
        runs_tp, runs_b1 = [], []
        for _ in range(args.repeats):
            runs_tp.append(hf_throughput(model, prompts, args.output_len))
            runs_b1.append(hf_batch1(model, b1_prompt, args.batch1_output_len))
        result["transformers"] = {"throughput": median_of(runs_tp), "batch1": median_of(runs_b1)}
        ls, hf = result["loopserve"], result["transformers"]
        result["ratios"] = {
            "throughput_output_tok_s": ls["throughput"]["output_tok_s"] / hf["throughput"]["output_tok_s"],
            "batch1_decode_tok_s": ls["batch1"]["decode_tok_s"] / hf["batch1"]["decode_tok_s"],
            "batch1_ttft": hf["batch1"]["ttft_s"] / ls["batch1"]["ttft_s"],
        }
    text = json.dumps(result, indent=2)
    print(text)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(text)
    return result


if __name__ == "__main__":
    main()

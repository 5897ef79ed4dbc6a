"""Serving benchmark against any OpenAI-compatible server (loopserve, llama-server, vLLM, ...).

Streams chat completions and measures TTFT, inter-token latency, end-to-end latency and output
throughput at several concurrency levels, plus a multi-turn mode where every turn resends the whole
history (what prefix caching should make nearly free). Writes JSON.

  python -m bench.serve --base-url http://127.0.0.1:8000/v1 --concurrency 1 8 32 --out serve.json
  python -m bench.serve --base-url http://127.0.0.1:8000/v1 --multi-turn 5
"""
from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import time
from dataclasses import dataclass, field
from pathlib import Path

import httpx

TOPICS = ["the history of paged memory in operating systems", "why prefix caching helps agents",
          "how continuous batching schedules requests", "the cost model of LLM decoding",
          "structured outputs and grammars", "speculative decoding", "tool calling formats",
          "tensor parallelism", "KV cache quantization", "head-of-line blocking"]
FILLER = ("An agent sends a long system prompt with tool schemas, then a growing history of earlier turns "
          "and tool results, and asks for a short structured answer. ")


def make_prompt(approx_tokens: int, index: int) -> str:
    # ~22 tokens per filler sentence for Llama-style BPE vocabularies; exact counts come back in usage.
    body = FILLER * max(1, approx_tokens // 22)
    return f"Request {index}. {body}\nNow write a detailed essay about {TOPICS[index % len(TOPICS)]}."


@dataclass
class RequestResult:
    ok: bool
    ttft: float = 0.0
    e2e: float = 0.0
    itl: list[float] = field(default_factory=list)
    prompt_tokens: int = 0
    cached_tokens: int = 0
    output_tokens: int = 0
    error: str = ""
    text: str = ""


async def stream_chat(client: httpx.AsyncClient, url: str, model: str, messages: list[dict], max_tokens: int,
                      headers: dict) -> RequestResult:
    body = {"model": model, "messages": messages, "max_tokens": max_tokens, "temperature": 0.0,
            "stream": True, "stream_options": {"include_usage": True}, "ignore_eos": True}
    res = RequestResult(ok=False)
    t0 = time.perf_counter()
    last = None
    chunks = 0
    try:
        async with client.stream("POST", url, json=body, headers=headers) as resp:
            if resp.status_code != 200:
                res.error = f"HTTP {resp.status_code}: {(await resp.aread())[:200]!r}"
                return res
            async for line in resp.aiter_lines():
                if not line.startswith("data:"):
                    continue
                data = line[5:].strip()
                if data == "[DONE]":
                    break
                chunk = json.loads(data)
                usage = chunk.get("usage")
                if usage:
                    res.prompt_tokens = usage.get("prompt_tokens", 0)
                    res.output_tokens = usage.get("completion_tokens", 0)
                    res.cached_tokens = (usage.get("prompt_tokens_details") or {}).get("cached_tokens") or 0
                for choice in chunk.get("choices") or []:
                    piece = (choice.get("delta") or {}).get("content")
                    if piece:
                        now = time.perf_counter()
                        if last is None:
                            res.ttft = now - t0
                        else:
                            res.itl.append(now - last)
                        last = now
                        chunks += 1
                        res.text += piece
    except (httpx.HTTPError, json.JSONDecodeError) as e:
        res.error = repr(e)
        return res
    res.e2e = time.perf_counter() - t0
    res.output_tokens = res.output_tokens or chunks
    res.ok = last is not None
    return res


def pct(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    values = sorted(values)
    return values[min(len(values) - 1, int(round(q / 100 * (len(values) - 1))))]


def summarize(results: list[RequestResult], wall: float) -> dict:
    ok = [r for r in results if r.ok]
    itl = [x for r in ok for x in r.itl]
    out_tokens = sum(r.output_tokens for r in ok)
    return {
        "requests": len(results), "failed": len(results) - len(ok), "wall_s": wall,
        "output_tok_s": out_tokens / wall if wall else 0.0,
        "ttft_p50_s": pct([r.ttft for r in ok], 50), "ttft_p99_s": pct([r.ttft for r in ok], 99),
        "itl_p50_s": pct(itl, 50), "itl_p99_s": pct(itl, 99),
        "e2e_p50_s": pct([r.e2e for r in ok], 50), "e2e_p99_s": pct([r.e2e for r in ok], 99),
        "decode_tok_s_per_request_p50": statistics.median(
            [(r.output_tokens - 1) / (r.e2e - r.ttft) for r in ok if r.output_tokens > 1 and r.e2e > r.ttft] or [0]),
        "mean_prompt_tokens": statistics.mean([r.prompt_tokens for r in ok]) if ok else 0,
        "mean_output_tokens": statistics.mean([r.output_tokens for r in ok]) if ok else 0,
        "errors": sorted({r.error for r in results if r.error})[:5],
    }


async def run_concurrency(client, url, model, headers, concurrency: int, num_requests: int, prompt_tokens: int,
                          max_tokens: int) -> dict:
    sem = asyncio.Semaphore(concurrency)

    async def one(i):
        async with sem:
            msgs = [{"role": "user", "content": make_prompt(prompt_tokens, i)}]
            return await stream_chat(client, url, model, msgs, max_tokens, headers)

    t0 = time.perf_counter()
    results = await asyncio.gather(*(one(i) for i in range(num_requests)))
    return {"concurrency": concurrency, **summarize(results, time.perf_counter() - t0)}


async def run_multi_turn(client, url, model, headers, turns: int, prompt_tokens: int, max_tokens: int) -> dict:
    messages = [{"role": "system", "content": make_prompt(prompt_tokens, 0)}]
    per_turn = []
    for t in range(turns):
        messages.append({"role": "user", "content": f"Turn {t + 1}: continue, and mention {TOPICS[t % len(TOPICS)]}."})
        r = await stream_chat(client, url, model, messages, max_tokens, headers)
        per_turn.append({"turn": t + 1, "ok": r.ok, "ttft_s": r.ttft, "e2e_s": r.e2e, "prompt_tokens": r.prompt_tokens,
                         "cached_tokens": r.cached_tokens, "output_tokens": r.output_tokens, "error": r.error})
        messages.append({"role": "assistant", "content": r.text})
    later = [p["ttft_s"] for p in per_turn[1:] if p["ok"]]
    return {"turns": per_turn, "later_turns_ttft_median_s": statistics.median(later) if later else None}


async def resolve_model(client, base_url, headers, model):
    if model:
        return model
    r = await client.get(f"{base_url}/models", headers=headers)
    r.raise_for_status()
    return r.json()["data"][0]["id"]


async def amain(args) -> dict:
    headers = {"Authorization": f"Bearer {args.api_key}"} if args.api_key else {}
    base = args.base_url.rstrip("/")
    url = f"{base}/chat/completions"
    async with httpx.AsyncClient(timeout=httpx.Timeout(args.timeout)) as client:
        model = await resolve_model(client, base, headers, args.model)
        # Warm-up: one short request (first-request compilation, lazy allocations).
        await stream_chat(client, url, model, [{"role": "user", "content": "hi"}], 4, headers)
        out = {"base_url": base, "model": model, "label": args.label, "prompt_tokens_target": args.prompt_tokens,
               "max_tokens": args.max_tokens, "runs": []}
        if args.multi_turn:
            out["multi_turn"] = await run_multi_turn(client, url, model, headers, args.multi_turn, args.prompt_tokens,
                                                     args.max_tokens)
        for c in args.concurrency:
            n = args.num_requests or (max(c, 4) if c > 1 else 3)
            res = await run_concurrency(client, url, model, headers, c, n, args.prompt_tokens, args.max_tokens)
            out["runs"].append(res)
            print(json.dumps({k: v for k, v in res.items() if k != "errors"}), flush=True)
    return out


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--base-url", required=True, help="e.g. http://127.0.0.1:8000/v1")
    ap.add_argument("--model", default=None, help="default: the first id of GET /models")
    ap.add_argument("--api-key", default=None)
    ap.add_argument("--label", default="")
    ap.add_argument("--concurrency", type=int, nargs="*", default=[1, 8, 32])
    ap.add_argument("--num-requests", type=int, default=0, help="per concurrency level (default: max(c, 4))")
    ap.add_argument("--prompt-tokens", type=int, default=510)
    ap.add_argument("--max-tokens", type=int, default=128)
    ap.add_argument("--multi-turn", type=int, default=0, help="also run one chat of this many turns")
    ap.add_argument("--timeout", type=float, default=900)
    ap.add_argument("--out", type=Path)
    args = ap.parse_args(argv)
    out = asyncio.run(amain(args))
    text = json.dumps(out, indent=2)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(text)
    else:
        print(text)
    return out


if __name__ == "__main__":
    main()

"""Tokenizing an agent's chat prompt each turn: the whole rendered text against PromptEncoder's segments.

One synthetic agent session of bench/agent.py (a ~--system-tokens system prompt with tool schemas, a
task, then --steps turns of a scripted assistant action and a ~--tool-result-tokens tool result) is
rendered with the model's chat template after every turn, as the server does with each request, and
tokenized both ways in alternation: `tokenizer.encode(text, add_special_tokens=False)` (what the server
did before) and `PromptEncoder.encode` (what it does now), which must give the same ids. Each round
replays the session with a fresh encoder, so its first turn is cold. Reports each way's median ms
per turn at the session's last turn and over all turns, and their ratio.

  python -m bench.prompt_tokens --rounds 5 --out bench/results/prompt-tokens.json
"""
from __future__ import annotations

import argparse
import json
import platform
import random
import statistics
import time
from pathlib import Path

from bench.agent import (
    TokenCounter,
    build_system_prompt,
    make_action,
    make_task,
    make_tool_result,
    synthetic_reply,
)
from loopserve.model.prompt_encoder import PromptEncoder


def session_texts(tokenizer, steps: int, system_tokens: int, tool_result_tokens: int, seed: int) -> list[str]:
    """The rendered prompt of each request of one agent session."""
    counter = TokenCounter(tokenizer)
    system, tools = build_system_prompt(seed, system_tokens, counter)
    rng = random.Random(f"{seed}:session")
    messages = [{"role": "system", "content": system}, {"role": "user", "content": make_task(rng, 0)}]
    texts = []
    for _ in range(steps):
        texts.append(tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True))
        tool, arguments = make_action(rng, tools)
        messages.append({"role": "assistant", "content": synthetic_reply(tool, arguments)})
        result = make_tool_result(rng, tool, tool_result_tokens, counter)
        messages.append({"role": "user", "content": f"Observation from {tool}:\n{result}"})
    return texts


def measure(tokenizer, texts: list[str], rounds: int) -> dict:
    whole: list[list[float]] = [[] for _ in texts]
    segments: list[list[float]] = [[] for _ in texts]
    for _ in range(rounds):
        encoder = PromptEncoder(tokenizer)
        for i, text in enumerate(texts):
            t0 = time.perf_counter()
            ref = tokenizer.encode(text, add_special_tokens=False)
            t1 = time.perf_counter()
            ids = encoder.encode(text)
            t2 = time.perf_counter()
            assert ids == ref, f"turn {i}: the segmented ids differ from the tokenizer's"
            whole[i].append((t1 - t0) * 1e3)
            segments[i].append((t2 - t1) * 1e3)
    per_turn_whole = [statistics.median(w) for w in whole]
    per_turn_segments = [statistics.median(s) for s in segments]
    last_tokens = len(tokenizer.encode(texts[-1], add_special_tokens=False))
    return {
        "segmenting": encoder.segmenting,
        "turns": len(texts),
        "first_turn_tokens": len(tokenizer.encode(texts[0], add_special_tokens=False)),
        "last_turn_tokens": last_tokens,
        "last_turn_ms_whole": round(per_turn_whole[-1], 3),
        "last_turn_ms_segments": round(per_turn_segments[-1], 3),
        "last_turn_speedup": round(per_turn_whole[-1] / per_turn_segments[-1], 1),
        "first_turn_ms_whole": round(per_turn_whole[0], 3),
        "first_turn_ms_segments": round(per_turn_segments[0], 3),
        "session_ms_whole": round(sum(per_turn_whole), 2),
        "session_ms_segments": round(sum(per_turn_segments), 2),
        "per_turn_ms_whole": [round(x, 3) for x in per_turn_whole],
        "per_turn_ms_segments": [round(x, 3) for x in per_turn_segments],
    }


def main(argv=None) -> None:
    from loopserve.fetch import ensure_model
    from loopserve.model.tokenizer import load_tokenizer

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2", help="a model alias or folder / .gguf whose tokenizer to use")
    ap.add_argument("--steps", type=int, default=24)
    ap.add_argument("--system-tokens", type=int, default=4000)
    ap.add_argument("--tool-result-tokens", type=int, default=400)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", type=Path)
    args = ap.parse_args(argv)
    path = ensure_model(args.model) if not Path(args.model).exists() else Path(args.model)
    tokenizer = load_tokenizer(path)
    texts = session_texts(tokenizer, args.steps, args.system_tokens, args.tool_result_tokens, args.seed)
    result = {"bench": "prompt_tokens", "model": args.model, "rounds": args.rounds, "steps": args.steps,
              "system_tokens": args.system_tokens, "tool_result_tokens": args.tool_result_tokens,
              "host": platform.processor() or platform.machine(), **measure(tokenizer, texts, args.rounds)}
    text = json.dumps(result, indent=1)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(text + "\n")
    print(json.dumps({k: v for k, v in result.items() if not k.startswith("per_turn")}, indent=1))


if __name__ == "__main__":
    main()

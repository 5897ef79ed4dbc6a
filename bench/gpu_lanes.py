"""Would a prefill lane beside the decode lane pay? A measurement for issue 5's saturation rows.

Both saturation rows lie past what the engine's steps can reach running prefill and decode work in
turn (docs/PERF.md: the in-turn ceilings). The way past them is to run a memory-bound decode step and a
compute-bound prefill at the same time: NanoFlow's intra-step overlap, or SGLang's prefill/decode
multiplexing. This measures the second one's premise before anything is built for it.

Two engines share one GPU and one set of weights (the prefill engine is built on the decode engine's
model), each driven by its own host thread on its own CUDA stream:
  decode lane   --decode-seqs requests decoding over --prompt-len-token prompts (CUDA graphs, tuned tiles);
  prefill lane  --prompt-len-token prompts of one output token each, --chunk prompt tokens a step
                (eager: past 2,048 tokens a step's device time hides its launches), the queue kept full.
Phases of --seconds each: the prefill lane alone, then both lanes at once, first on streams of equal
priority, then with the decode lane's stream first. The decode lane's contexts grow all the while, and
its rate with them, so it also runs alone for half a phase before and after each "both" phase; a
phase's decode reference is the mean of those two. One JSON line, with each lane's tokens a second and,
for each "both" phase, the sum over the lanes of both/alone: running the lanes in turn sums to 1.0,
what lies above is what overlap adds. Then, where PyTorch has CUDA green contexts, a second line: both
at once with the prefill lane's kernels confined to --prefill-sms SMs (a GEMM filling every SM can leave
the decode kernels none), the decode lane's on all of them, first.

  python -m bench.gpu_lanes --config bench/configs/llama-3.1-8b.json --out gpu.jsonl
"""
from __future__ import annotations

import argparse
import contextlib
import random
import statistics
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from unittest import mock

import torch

from bench.gpu_decode import dummy_model_dir, emit
from bench.gpu_profile import add_request
from loopserve.config import CacheConfig, EngineConfig, SchedulerConfig
from loopserve.device_caps import sm_count
from loopserve.engine.core import EngineCore
from loopserve.model import load_model_config

# While both lanes' threads run: a thread waiting for the GIL gets it within this, not Python's 5 ms
# default, so the decode lane's short host steps do not queue behind the prefill lane's eager launches.
SWITCH_INTERVAL_S = 5e-4


@dataclass
class Lane:
    """One engine, the work it keeps queued, its steps and the tokens it has done: output tokens
    (decode lane) or prompt tokens of finished prompts (prefill lane)."""
    name: str
    core: EngineCore
    refill: Callable[[Lane], None]  # queues more work after one of the lane's requests finishes
    stream: torch.cuda.Stream | None = None
    tokens: int = 0
    steps: int = 0
    added: int = 0
    counts_prompts: bool = False
    prompt_len: int = 0
    errors: list = field(default_factory=list)

    def step(self) -> None:
        for out in self.core.step():
            if self.counts_prompts:
                self.tokens += self.prompt_len if out.finish_reason else 0
            else:
                self.tokens += len(out.new_token_ids)
            if out.finish_reason:
                self.refill(self)
        self.steps += 1


def _engine(folder: Path, device: str, max_num_seqs: int, max_tokens_a_step: int, kv_bytes: int,
            eager: bool) -> EngineCore:
    dtype = "bf16" if device.startswith("cuda") else "fp32"
    # As the saturation rows' engines (bench/gpu_decode.py): graph tables and tuning shapes for 16k.
    max_model_len = min(load_model_config(folder, "dummy").max_position_embeddings, 16384)
    return EngineCore(EngineConfig(
        model=str(folder), load_format="dummy", dtype=dtype, device=device, enforce_eager=eager,
        max_model_len=max_model_len, cache=CacheConfig(kv_cache_bytes=kv_bytes),
        scheduler=SchedulerConfig(max_num_seqs=max_num_seqs, max_num_batched_tokens=max_tokens_a_step,
                                  long_prefill_token_threshold=max_tokens_a_step)))


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def _run(lanes: list[Lane], seconds: float, device: str) -> dict[str, float]:
    """Step every lane from its own thread (on its stream) for `seconds`; tokens a second by lane, and
    steps a second as `<lane>_steps`."""
    _sync(device)
    stop = threading.Event()
    start = {lane.name: (lane.tokens, lane.steps) for lane in lanes}

    def loop(lane: Lane) -> None:
        # PyTorch's current stream is the thread's own: every launch and copy of this lane goes to its stream.
        with torch.cuda.stream(lane.stream) if lane.stream is not None else contextlib.nullcontext():
            try:
                while not stop.is_set():
                    lane.step()
            except Exception as e:  # noqa: BLE001 - reported in the row, and the other lane stops too
                lane.errors.append(repr(e))
                stop.set()

    threads = [threading.Thread(target=loop, args=(lane,), daemon=True) for lane in lanes]
    switch = sys.getswitchinterval()
    sys.setswitchinterval(SWITCH_INTERVAL_S)
    t0 = time.perf_counter()
    try:
        for t in threads:
            t.start()
        stop.wait(seconds)
    finally:  # a KeyboardInterrupt (gpu_check's timeout) stops the lanes too
        stop.set()
        for t in threads:
            t.join()
        sys.setswitchinterval(switch)
    _sync(device)
    dt = time.perf_counter() - t0
    rates = {lane.name: (lane.tokens - start[lane.name][0]) / dt for lane in lanes}
    rates |= {f"{lane.name}_steps": (lane.steps - start[lane.name][1]) / dt for lane in lanes}
    return rates


def _fractions(both: dict[str, float], alone: dict[str, float]) -> float | None:
    """Both/alone summed over the lanes; None where a lane did nothing alone (no reference)."""
    if not all(alone.values()):
        return None
    return sum(both[k] / alone[k] for k in alone)


def run(config: Path, device: str, decode_seqs: int, prompt_len: int, chunk: int, seconds: float,
        decode_kv_bytes: int, prefill_kv_bytes: int, prefill_sms: int | None = None) -> Iterator[dict]:
    """The lanes row; then, on a GPU whose PyTorch has green contexts, the lanes_sm_partition row: both
    lanes at once with the prefill lane's kernels confined to prefill_sms SMs (None: half, in eights),
    the decode lane's on every SM, first. Its own row, after the first: a green context that fails
    costs only itself."""
    folder = dummy_model_dir(config)
    rng = random.Random(0)
    decode = _engine(folder, device, decode_seqs, 8192, decode_kv_bytes, eager=False)
    # The prefill engine loads no weights of its own: it is built on the decode engine's model.
    with mock.patch("loopserve.model.load_model", lambda *args, **kwargs: (decode.model, decode.model_config)):
        prefill = _engine(folder, device, 16, chunk, prefill_kv_bytes, eager=True)
    assert prefill.model is decode.model
    if decode.runner.extend_timings:  # tuned (a GPU): Triton backends on both
        prefill.runner.backend.extend_tiles = dict(decode.runner.backend.extend_tiles)
    vocab = decode.model_config.vocab_size

    def add(lane: Lane, max_tokens: int) -> None:
        add_request(lane.core, f"{lane.name}{lane.added}", [rng.randrange(100, vocab - 1) for _ in range(prompt_len)],
                    max_tokens)
        lane.added += 1

    # Decode requests outlast the run (none finishes); prompts finish at their first token and are replaced.
    dec = Lane("decode", decode, refill=lambda lane: add(lane, 1 << 20))
    pre = Lane("prefill", prefill, refill=lambda lane: add(lane, 1), counts_prompts=True, prompt_len=prompt_len)
    for _ in range(decode_seqs):
        add(dec, 1 << 20)
    while any(r.num_output_tokens == 0 for r in decode.requests.values()):  # every request decoding
        dec.step()
    for _ in range(2 * max(1, chunk // prompt_len) + 2):
        add(pre, 1)
    for _ in range(3):  # the prefill lane's shapes, compiled outside the timing
        pre.step()
    cuda = device.startswith("cuda")
    dec.stream = torch.cuda.Stream() if cuda else None
    pre.stream = torch.cuda.Stream() if cuda else None

    def context() -> float:
        return prompt_len + statistics.fmean(r.num_output_tokens for r in decode.requests.values())

    prefill_alone = _run([pre], seconds, device)
    decode_alone = [_run([dec], seconds / 2, device)]
    row = {"mode": "lanes", "decode_seqs": decode_seqs, "prompt_len": prompt_len, "chunk": chunk,
           "seconds": seconds, "prefill_tok_s_alone": prefill_alone["prefill"],
           "prefill_steps_s_alone": prefill_alone["prefill_steps"]}

    def both(phase: str, into: dict) -> None:
        """A "both" phase between two decode-alone half phases, written into `into`."""
        into[f"decode_context_{phase}"] = context()
        got = _run([dec, pre], seconds, device)
        decode_alone.append(_run([dec], seconds / 2, device))
        alone = {"decode": statistics.fmean(d["decode"] for d in decode_alone[-2:]),
                 "prefill": prefill_alone["prefill"]}
        into[f"decode_tok_s_alone_{phase}"] = alone["decode"]
        into |= {f"decode_tok_s_{phase}": got["decode"], f"prefill_tok_s_{phase}": got["prefill"],
                 f"decode_steps_s_{phase}": got["decode_steps"], f"prefill_steps_s_{phase}": got["prefill_steps"]}
        into[f"sum_of_fractions_{phase}"] = _fractions(got, alone)

    both("both", row)
    if cuda:  # the decode lane's kernels dispatched first wherever both wait for an SM
        least, greatest = torch.cuda.Stream.priority_range()
        dec.stream = torch.cuda.Stream(priority=greatest)
        pre.stream = torch.cuda.Stream(priority=least)
        both("both_decode_first", row)
    row |= {"decode_context_end": context(), "preemptions": decode.scheduler.num_preemptions,
            "errors": dec.errors + pre.errors or None}
    yield row
    try:
        from torch.cuda import green_contexts
    except ImportError:  # a PyTorch before green contexts
        green_contexts = None
    if cuda and green_contexts is not None and green_contexts.SUPPORTED:
        sms = sm_count(torch.device(device))
        n = prefill_sms or max(8, sms // 2 // 8 * 8)
        dec.errors, pre.errors = [], []
        part = {"mode": "lanes_sm_partition", "prefill_sms": n, "sm_count": sms, "seconds": seconds}
        try:
            # Its side stream, not the context made current: kernels queued there run on its SMs.
            pre.stream = green_contexts.GreenContext.create(num_sms=n).Stream()
            both("both", part)
        except Exception as e:  # noqa: BLE001 - a driver or build without them: said in the row
            pre.errors.append(repr(e))
        yield part | {"decode_context_end": context(), "preemptions": decode.scheduler.num_preemptions,
                      "errors": dec.errors + pre.errors or None}
    decode.abort(list(decode.requests))
    prefill.abort(list(prefill.requests))


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", type=Path, required=True, help="an HF config.json")
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--decode-seqs", type=int, default=160)
    ap.add_argument("--prompt-len", type=int, default=800)
    ap.add_argument("--chunk", type=int, default=4096, help="the prefill lane's prompt tokens a step")
    ap.add_argument("--seconds", type=float, default=4.0, help="each phase's stepping time")
    # One set of weights (15 GiB on the 8B shape), the graphs and the prefill lane's activations beside
    # it fit an H100 80GB. 160 sequences stay within it past ~2,400 tokens of context; an H200's ~20 s of
    # decoding here ends near 2,100 (rows report decode_context_end and any preemptions).
    ap.add_argument("--decode-kv-gib", type=float, default=48.0)
    ap.add_argument("--prefill-kv-gib", type=float, default=2.0)
    ap.add_argument("--prefill-sms", type=int, help="the SM-partitioned phase: the prefill lane's SMs "
                    "(default: half the GPU's, in eights)")
    ap.add_argument("--out", type=Path)
    args = ap.parse_args(argv)
    for row in run(args.config, args.device, args.decode_seqs, args.prompt_len, args.chunk, args.seconds,
                   int(args.decode_kv_gib * (1 << 30)), int(args.prefill_kv_gib * (1 << 30)), args.prefill_sms):
        emit(row, args.config, args.device, args.out)


if __name__ == "__main__":
    main()

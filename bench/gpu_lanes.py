"""Would a prefill lane beside the decode lane pay? A measurement for issue 5's saturation rows.

Both saturation rows lie past what the engine's steps can reach running prefill and decode work in
turn (docs/PERF.md: the in-turn ceilings). The way past them is to run a memory-bound decode step and a
compute-bound prefill at the same time: NanoFlow's intra-step overlap, or SGLang's prefill/decode
multiplexing. This measures the second one's premise before anything is built for it.

Two engines share one GPU and one set of weights, each driven by its own host thread on its own CUDA
stream:
  decode lane   --decode-seqs requests decoding over --prompt-len-token prompts (CUDA graphs, tuned tiles);
  prefill lane  --prompt-len-token prompts of one output token each, --chunk prompt tokens a step
                (eager: past 2,048 tokens a step's device time hides its launches), the queue kept full.
Each lane runs alone for --seconds, then both at once: first on streams of equal priority, then with the
decode lane's stream first. One JSON line, with each lane's tokens a second in each phase and, for each
"both" phase, the sum over the lanes of both/alone. Running the lanes in turn sums to 1.0; what lies above
is what overlap adds. Then, where PyTorch has CUDA green contexts, a second line: both at once with the
prefill lane's kernels confined to --prefill-sms SMs (a GEMM filling every SM can leave the decode
kernels none), the decode lane's on all of them.

  python -m bench.gpu_lanes --config bench/configs/llama-3.1-8b.json --out gpu.jsonl
"""
from __future__ import annotations

import argparse
import contextlib
import gc
import random
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import torch

from bench.gpu_decode import dummy_model_dir, emit
from loopserve.config import CacheConfig, EngineConfig, SchedulerConfig
from loopserve.device_caps import sm_count
from loopserve.engine.core import EngineCore, EngineRequest
from loopserve.model import load_model_config
from loopserve.sampling_params import SamplingParams


@dataclass
class Lane:
    """One engine, the work it keeps queued, and the tokens it has done: output tokens (decode lane)
    or prompt tokens of finished prompts (prefill lane)."""
    name: str
    core: EngineCore
    refill: Callable[[Lane], None]  # queues more work after one of the lane's requests finishes
    stream: torch.cuda.Stream | None = None
    green: object = None  # a torch.cuda.green_contexts.GreenContext the lane's thread makes current
    tokens: int = 0
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


def _engine(folder: Path, device: str, max_num_seqs: int, max_tokens_a_step: int, kv_bytes: int,
            eager: bool) -> EngineCore:
    dtype = "bf16" if device.startswith("cuda") else "fp32"
    # As the saturation rows' engines (bench/gpu_decode.py): graph tables and tuning shapes for 16k.
    max_model_len = min(load_model_config(folder, "dummy").max_position_embeddings, 16384)
    return EngineCore(EngineConfig(
        model=str(folder), load_format="dummy", dtype=dtype, device=device, enforce_eager=eager,
        max_model_len=max_model_len,
        cache=CacheConfig(kv_cache_bytes=kv_bytes),
        scheduler=SchedulerConfig(max_num_seqs=max_num_seqs, max_num_batched_tokens=max_tokens_a_step,
                                  long_prefill_token_threshold=max_tokens_a_step)))


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def _run(lanes: list[Lane], seconds: float, device: str) -> dict[str, float]:
    """Step every lane from its own thread (on its stream) for `seconds`; tokens a second by lane."""
    _sync(device)
    stop = threading.Event()
    start = {lane.name: lane.tokens for lane in lanes}

    def loop(lane: Lane) -> None:
        # PyTorch's current stream is the thread's own: every launch and copy of this lane goes to its stream.
        with torch.cuda.stream(lane.stream) if lane.stream is not None else contextlib.nullcontext():
            try:
                if lane.green is not None:
                    lane.green.set_context()
                try:
                    while not stop.is_set():
                        lane.step()
                finally:
                    if lane.green is not None:
                        lane.green.pop_context()
            except Exception as e:  # noqa: BLE001 - reported in the row, and the other lane stops too
                lane.errors.append(repr(e))
                stop.set()

    threads = [threading.Thread(target=loop, args=(lane,)) for lane in lanes]
    t0 = time.perf_counter()
    for t in threads:
        t.start()
    stop.wait(seconds)
    stop.set()
    for t in threads:
        t.join()
    _sync(device)
    dt = time.perf_counter() - t0
    return {lane.name: (lane.tokens - start[lane.name]) / dt for lane in lanes}


def run(config: Path, device: str, decode_seqs: int, prompt_len: int, chunk: int, seconds: float,
        decode_kv_bytes: int, prefill_kv_bytes: int, prefill_sms: int | None = None) -> Iterator[dict]:
    """The lanes row; then, on a GPU whose PyTorch has green contexts, the lanes_sm_partition row: both
    lanes at once with the prefill lane's kernels confined to prefill_sms SMs (None: half, in eights),
    the decode lane's on every SM, first. Its own row, after the first: a green context that fails
    costs only itself."""
    folder = dummy_model_dir(config)
    rng = random.Random(0)
    # The prefill lane first, then the decode lane; the prefill lane then takes the decode lane's model
    # (one set of weights on the card) and the decode lane's tuned extend tiles.
    prefill = _engine(folder, device, 16, chunk, prefill_kv_bytes, eager=True)
    decode = _engine(folder, device, decode_seqs, 8192, decode_kv_bytes, eager=False)
    prefill.model = prefill.runner.model = decode.model
    if decode.runner.extend_timings:  # tuned (a GPU): Triton backends on both
        prefill.runner.backend.extend_tiles = dict(decode.runner.backend.extend_tiles)
    gc.collect()
    if device.startswith("cuda"):
        torch.cuda.empty_cache()
    vocab = decode.model_config.vocab_size

    def add(lane: Lane, max_tokens: int) -> None:
        ids = [rng.randrange(100, vocab - 1) for _ in range(prompt_len)]
        lane.core.add_request(EngineRequest(f"{lane.name}{lane.added}", ids, SamplingParams(
            temperature=0, max_tokens=max_tokens, ignore_eos=True), ids_checked=True))
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
    phases = {"decode_alone": _run([dec], seconds, device), "prefill_alone": _run([pre], seconds, device),
              "both": _run([dec, pre], seconds, device)}
    if cuda:  # the decode lane's kernels dispatched first wherever both wait for an SM
        least, greatest = torch.cuda.Stream.priority_range()
        dec.stream = torch.cuda.Stream(priority=greatest)
        pre.stream = torch.cuda.Stream(priority=least)
        phases["both_decode_first"] = _run([dec, pre], seconds, device)
    alone = {"decode": phases["decode_alone"]["decode"], "prefill": phases["prefill_alone"]["prefill"]}
    context_end = prompt_len + max(r.num_output_tokens for r in decode.requests.values())
    row = {"mode": "lanes", "decode_seqs": decode_seqs, "prompt_len": prompt_len, "chunk": chunk,
           "seconds": seconds, "decode_context_end": context_end,
           "decode_tok_s_alone": alone["decode"], "prefill_tok_s_alone": alone["prefill"],
           "errors": dec.errors + pre.errors or None}
    for phase in ("both", "both_decode_first"):
        if phase in phases:
            got = phases[phase]
            row[f"decode_tok_s_{phase}"] = got["decode"]
            row[f"prefill_tok_s_{phase}"] = got["prefill"]
            row[f"sum_of_fractions_{phase}"] = sum(got[k] / alone[k] for k in alone if alone[k] > 0)
    yield row
    from torch.cuda import green_contexts

    if cuda and green_contexts.SUPPORTED:
        sms = sm_count(torch.device(device))
        n = prefill_sms or max(8, sms // 2 // 8 * 8)
        dec.errors, pre.errors = [], []
        try:
            pre.green = green_contexts.GreenContext.create(num_sms=n)
            pre.stream = pre.green.Stream()
            got = _run([dec, pre], seconds, device)
        except Exception as e:  # noqa: BLE001 - a driver or build without them: said in the row
            pre.errors.append(repr(e))
            got = {}
        yield {"mode": "lanes_sm_partition", "prefill_sms": n, "sm_count": sms, "seconds": seconds,
               "decode_tok_s_both": got.get("decode"), "prefill_tok_s_both": got.get("prefill"),
               "sum_of_fractions_both": sum(got[k] / alone[k] for k in alone if alone[k] > 0) if got else None,
               "errors": dec.errors + pre.errors or None}
    decode.abort(list(decode.requests))
    prefill.abort(list(prefill.requests))


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", type=Path, required=True, help="an HF config.json")
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--decode-seqs", type=int, default=192)
    ap.add_argument("--prompt-len", type=int, default=800)
    ap.add_argument("--chunk", type=int, default=4096, help="the prefill lane's prompt tokens a step")
    ap.add_argument("--seconds", type=float, default=5.0, help="each phase's stepping time")
    # On an H100 80GB: two engines' start-up weights (2 x 15 GiB, one set freed after), the decode lane's KV
    # for 192 sequences up to ~1,600 tokens of context (an H200's four phases end near 1,500), the graphs.
    ap.add_argument("--decode-kv-gib", type=float, default=38.0)
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

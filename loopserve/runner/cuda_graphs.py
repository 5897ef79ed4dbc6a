"""CUDA graphs: DecodeGraphs for pure-decode steps (one graph per batch size of a ladder, replayed
with padding) and PrefillGraphs for steps with prompt tokens (prefill / extend / mixed steps: one set
for a few sequences, one for up to max_num_seqs decodes beside a few prompt chunks).

A decode step launches a few hundred small kernels; at batch 1 on a GPU their launch cost, not the
weight reads, would set the step time. Each graph holds the whole forward plus the logits for a
fixed batch size, reading its inputs from static buffers. A step with n sequences packs its inputs
for the smallest captured size b >= n in one copy, one kernel lays them into the buffers
(runner/step_inputs.py), and the graph replays; rows n..b-1 are padding that attends to one token of
a scratch KV block (one block past the pool, never handed out), so they cannot touch real cache
entries. Only the attention backend's device-side layout is used inside the graph (Triton kernels,
no host synchronisation). The graph ends with the logits' greedy argmax (runner/argmax.py), which an
all-greedy step takes as its tokens; other sampling runs after the replay, outside it.
"""
from __future__ import annotations

import functools
import itertools
import logging
from dataclasses import dataclass, field

import numpy as np
import torch

from loopserve.attention.metadata import AttentionMetadata, ForwardBatch, KVCache
from loopserve.config import StepGraphSpec
from loopserve.runner.argmax import greedy_argmax
from loopserve.runner.host_copy import host_image, to_device
from loopserve.runner.step_inputs import StepInputs, pack_decode_inputs, unpack_decode_inputs

log = logging.getLogger(__name__)


@dataclass
class CaptureMemory:
    """A CUDA-graph memory pool and the one stream that captures into it. The caching allocator reuses
    a freed block only for allocations on the stream it was made on, so graphs captured into one
    pool from different streams would each add their peak instead of sharing it."""
    stream: torch.cuda.Stream = field(default_factory=torch.cuda.Stream)
    pool: object = None  # set by the first capture


@torch.inference_mode()
def _capture_all(graphs: dict, forwards: list, memory: CaptureMemory | None = None) -> CaptureMemory:
    """Capture each (key, forward) into `graphs[key] = (graph, output)`, in order, all in one memory
    pool (list the largest first: it sets the pool's size), `memory`'s if given; returns it. Each
    forward runs twice uncaptured first, so kernels compile and autotune outside the capture."""
    memory = memory or CaptureMemory()
    stream = memory.stream
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for key, forward in forwards:
            for _ in range(2):
                forward()
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=memory.pool, stream=stream):
                output = forward()
            memory.pool = graph.pool()
            graphs[key] = (graph, output)
    torch.cuda.current_stream().wait_stream(stream)
    torch.cuda.synchronize()
    return memory


def capture_graph(fn) -> torch.cuda.CUDAGraph:
    """fn run twice on a side stream (compiles, autotunes, fills the allocator), then captured alone."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        fn()
        fn()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    return graph


def pick_fused_sizes(timings: dict[int, tuple[float, float]]) -> tuple[list[int], int]:
    """From {batch size: (ms cuBLAS, ms fused GEMV)}: the sizes whose fused graph is faster, and the
    most tokens an eager forward may take through the fused layers (every timed size up to it chose
    them; 0 if size 1 did not)."""
    sizes = sorted(b for b, (plain, fused) in timings.items() if fused < plain)
    eager_rows = 0
    for b in sorted(timings):
        if b not in sizes:
            break
        eager_rows = b
    return sizes, eager_rows


def replay_ms(*graphs: torch.cuda.CUDAGraph, rounds: int = 3, reps: int = 10) -> list[float]:
    """Milliseconds a replay of each graph: in alternating rounds (drifting clocks and a noisy
    neighbour weigh on all alike), the best round of each."""
    best = [float("inf")] * len(graphs)
    for _ in range(rounds):
        for i, graph in enumerate(graphs):
            graph.replay()  # warm
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            for _ in range(reps):
                graph.replay()
            end.record()
            end.synchronize()
            best[i] = min(best[i], start.elapsed_time(end) / reps)
    return best


class DecodeGraphs:
    def __init__(self, model: torch.nn.Module, kv_caches: list[KVCache], backend, batch_sizes: list[int],
                 max_blocks_per_seq: int, scratch_block: int, device: torch.device,
                 choose_fused_gemv_rows: int = 0) -> None:
        """choose_fused_gemv_rows: sizes up to this are captured with and without the model's fused GEMV
        layers, and the faster graph kept (EngineConfig.fused_decode_gemv "auto"); 0 captures each size
        as the model stands."""
        self.model = model
        self.choose_fused_rows = choose_fused_gemv_rows
        # {batch size: (ms cuBLAS, ms fused GEMV)} for the sizes timed both ways, and the sizes that chose fused.
        self.fused_timings: dict[int, tuple[float, float]] = {}
        self.fused_sizes: list[int] = []
        self.kv_caches = kv_caches
        self.backend = backend
        self.sizes = sorted(set(batch_sizes))
        self.max_batch = self.sizes[-1]
        self.block_size = kv_caches[0].block_size
        self.scratch_block = scratch_block
        self.scratch_slot = scratch_block * self.block_size
        n = self.max_batch
        self.input_ids = torch.zeros(n, dtype=torch.long, device=device)
        self.positions = torch.zeros(n, dtype=torch.long, device=device)
        self.slot_mapping = torch.full((n,), self.scratch_slot, dtype=torch.long, device=device)
        self.block_tables = torch.full((n, max_blocks_per_seq), scratch_block, dtype=torch.long, device=device)
        self.seq_lens = torch.ones(n, dtype=torch.int32, device=device)
        self.query_start_loc = torch.arange(n + 1, dtype=torch.int32, device=device)
        # {batch size: (graph, (logits, greedy argmax))}
        self.graphs: dict[int, tuple[torch.cuda.CUDAGraph, tuple[torch.Tensor, torch.Tensor]]] = {}
        self._last: tuple[torch.Tensor, torch.Tensor] | None = None  # the last replay's (logits, argmax)

    def _batch(self, b: int) -> ForwardBatch:
        meta = AttentionMetadata(query_start_loc=list(range(b + 1)), seq_lens=[1] * b,
                                 slot_mapping=self.slot_mapping[:b], block_tables=self.block_tables[:b],
                                 decode_indices=list(range(b)), prefill_indices=[],
                                 query_start_loc_t=self.query_start_loc[:b + 1], seq_lens_t=self.seq_lens[:b],
                                 max_query_len=1)
        return ForwardBatch(meta, self.kv_caches, self.backend)

    def _forward(self, b: int) -> tuple[torch.Tensor, torch.Tensor]:
        """fp32 logits [b, vocab] and their greedy argmax [b]."""
        logits = self.model.forward_logits(self.input_ids[:b], self.positions[:b], self._batch(b))
        return logits, greedy_argmax(logits)

    def capture(self) -> None:
        """Capture every size, largest first, all in one memory pool (the largest sets its size)."""
        if self.choose_fused_rows:
            self.model.fused_gemv_rows = 0  # cuBLAS first; the fused variants are captured beside them
        _capture_all(self.graphs, [(b, functools.partial(self._forward, b)) for b in reversed(self.sizes)])
        if not self.choose_fused_rows:
            return
        small = [b for b in self.sizes if b <= self.choose_fused_rows]
        fused: dict = {}
        self.model.fused_gemv_rows = self.choose_fused_rows
        try:
            _capture_all(fused, [(b, functools.partial(self._forward, b)) for b in reversed(small)])
        except Exception as e:  # noqa: BLE001 - the GEMV cannot take this model (shapes, compiler): keep cuBLAS
            log.warning("fused GEMV decode graphs not captured, cuBLAS kept: %s", e, exc_info=True)
            fused = {}
        self.fused_timings = {b: tuple(replay_ms(self.graphs[b][0], fused[b][0])) for b in small if fused}
        self.fused_sizes, self.model.fused_gemv_rows = pick_fused_sizes(self.fused_timings)
        for b in self.fused_sizes:
            self.graphs[b] = fused[b]
        log.info("decode graphs, fused GEMV against cuBLAS (ms a replay): %s; fused at sizes %s",
                 {b: tuple(round(t, 3) for t in ts) for b, ts in self.fused_timings.items()}, self.fused_sizes)

    def fits(self, num_seqs: int, max_blocks: int) -> bool:
        return num_seqs <= self.max_batch and max_blocks <= self.block_tables.shape[1]

    @torch.inference_mode()
    def run(self, inputs: StepInputs, prev_tokens: torch.Tensor | None) -> torch.Tensor:
        """Replay for a pure-decode step of n sequences; returns their fp32 logits [n, vocab]. The inputs
        travel in one copy, padded to the graph's size, and one kernel lays them into its buffers,
        pending tokens from prev_tokens (the previous step's sampled tokens, on the device)."""
        n = len(inputs.seq_lens)
        b = next(s for s in self.sizes if s >= n)
        w = inputs.max_blocks
        packed = to_device(pack_decode_inputs(inputs, b, self.scratch_block, self.block_size), torch.long,
                           self.input_ids.device)
        unpack_decode_inputs(packed, prev_tokens, b, w, self.input_ids, self.positions, self.slot_mapping,
                             self.seq_lens, self.block_tables)
        captured = self.graphs.get(b)
        if captured is None:  # not captured (CPU tests): the same static forward, run as a replay is fed
            logits, argmax = self._forward(b)
        else:
            graph, (logits, argmax) = captured
            graph.replay()
        self._last = (logits[:n], argmax[:n])
        return self._last[0]

    def argmax_of(self, logits: torch.Tensor) -> torch.Tensor | None:
        """The graph's own greedy argmax of `logits` if they are what the last replay returned (and
        nothing has edited them since: the caller's promise); else None. Like the logits, it is a
        static buffer: valid until the next replay, which stream order puts after every use queued
        before it."""
        if self._last is None or logits is not self._last[0]:
            return None
        return self._last[1]


class PrefillGraphs:
    """CUDA graphs for steps with prompt tokens: prefills, prefix-cache extends, and mixed steps of
    prompt chunks beside decodes. One graph per token count of a ladder, replayed padded. Two sets
    exist (runner): a few slots in two variants (with and without 1-token rows), for the agent turn's
    time to first token; and, for a busy server's steady state of hundreds of decodes beside a prompt
    chunk or two, slots for every running sequence, with at most a few of them prompts.

    An eager forward of such a step costs ~15-25 ms of host time on an 8B model (four GEMMs and five
    Triton launches per layer, ~40-80 us each). Against ~5 ms of device time for a 128-token prompt,
    the host set the time to first token; against ~20 ms for 256 decodes beside a 500-token chunk, it
    is as long as the device's work (estimates: docs/PERF.md). Replaying a graph costs the input copies.

    Layout of a graph for T tokens, S sequence slots (the set's, at most T: `slots`) and P prompt
    slots (all static buffers):
      * tokens 0..n-1 are the step's, n..T-1 padding: padding tokens write K/V to the scratch slot, and
        their rows carry garbage (a split extend's merge may even write NaN there) that no real row
        reads: every op between is row by row, and logits_rows never selects them;
      * slots 0..B-1 are the step's sequences in its order, B..S-1 empty (query_start_loc stays at n:
        no new tokens);
      * the extend kernel's grid covers the P prompt slots (prompt_ids): the step's multi-token
        sequences, then a slot without extend work (a 1-token one, which it skips, or an empty one),
        so its programs scale with P, not S;
      * with 1-token rows, the decode kernel attends all S slots: a 1-token sequence over its real
        length into its row, every other slot over one key of its first block (seq len 1) into a
        spare attention-output row T, past the forward's rows;
      * logits rows 0..L-1 select the sampled rows, the rest select row 0 (discarded); every graph of
        the set writes its logits into one shared buffer (a set of 256 slots would otherwise hold
        131 MB of fp32 logits a graph on a 128k vocabulary).
    Triton's kernels read all lengths on the device, so a replay sees the step's real sizes.
    """

    def __init__(self, model: torch.nn.Module, kv_caches: list[KVCache], backend, spec: StepGraphSpec,
                 max_blocks_per_seq: int, scratch_block: int, device: torch.device) -> None:
        self.model = model
        self.kv_caches = kv_caches
        self.backend = backend
        self.spec = spec
        self.sizes = sorted(set(spec.token_sizes))
        self.scratch_slot = scratch_block * kv_caches[0].block_size
        t, s, p = self.sizes[-1], spec.max_seqs, spec.max_prompts
        # The static inputs are views of two buffers, one a dtype, so a step's inputs (but its block
        # tables) travel in two host-to-device copies straight into them (`run`), where copying and
        # padding them buffer by buffer took ~15 small device operations and as many host calls.
        # `_layout` builds host images of both buffers every step, segment by segment.
        self._long_segments = Segments(tuple(long_segments(t, s)), 8)
        self._int_segments = Segments(tuple(int_segments(s, p)), 4)
        self._longs = torch.zeros(self._long_segments.length, dtype=torch.long, device=device)
        (self.input_ids, self.positions, self.slot_mapping, self.logits_rows, self.single_q_rows,
         self.single_rows, self._fill_dst, self._fill_src) = self._long_segments.views(self._longs)
        self._ints = torch.ones(self._int_segments.length, dtype=torch.int32, device=device)
        self.query_start_loc, self.seq_lens, self.prompt_ids, self.single_lens = self._int_segments.views(self._ints)
        self.query_start_loc.zero_()
        self.prompt_ids.zero_()
        self.slot_mapping.fill_(self.scratch_slot)
        self.block_tables = torch.full((s, max_blocks_per_seq), scratch_block, dtype=torch.long, device=device)
        self.logits = torch.zeros(s, model.config.vocab_size, dtype=torch.float32, device=device)
        self.graphs: dict[tuple[int, bool], torch.cuda.CUDAGraph] = {}

    @property
    def max_seqs(self) -> int:
        return self.spec.max_seqs

    @property
    def max_prompts(self) -> int:
        return self.spec.max_prompts

    def slots(self, t: int) -> int:
        """The sequence slots of the graph for t tokens: a step has no more sequences, nor sampled
        rows, than tokens, so a 16-token graph of a 256-slot set attends and samples 16 slots."""
        return min(self.max_seqs, t)

    def _batch(self, t: int, with_single: bool) -> ForwardBatch:
        s = self.slots(t)
        tables = self.block_tables[:s]
        meta = AttentionMetadata(query_start_loc=[0] * (s + 1), seq_lens=[1] * s,
                                 slot_mapping=self.slot_mapping[:t], block_tables=tables,
                                 decode_indices=list(range(s)) if with_single else [],
                                 prefill_indices=list(range(s)),
                                 query_start_loc_t=self.query_start_loc[:s + 1], seq_lens_t=self.seq_lens[:s],
                                 max_query_len=t, static_layout=True)
        meta.derived["triton_prefill_ids"] = self.prompt_ids
        if with_single:
            meta.derived["triton_single_rows"] = (self.single_q_rows[:s], self.single_rows[:s], tables,
                                                  self.single_lens[:s])
        return ForwardBatch(meta, self.kv_caches, self.backend)

    def forward(self, t: int, with_single: bool) -> torch.Tensor:
        """The static forward for T = t: fp32 logits [slots(t), vocab] of the rows in logits_rows."""
        s = self.slots(t)
        hidden = self.model(self.input_ids[:t], self.positions[:t], self._batch(t, with_single),
                            out_rows=self.logits_rows[:s])
        return self.model.compute_logits(hidden, out=self.logits[:s])

    def capture(self, memory: CaptureMemory | None = None) -> CaptureMemory:
        """Capture every (size, variant), largest first, in one memory pool: `memory`'s if given (sets
        of step graphs are never replayed at once, and their logits live outside it); returns it."""
        captured: dict = {}
        memory = _capture_all(captured, [((t, single), functools.partial(self.forward, t, single))
                                         for t in reversed(self.sizes) for single in self.spec.variants], memory)
        self.graphs = {key: graph for key, (graph, _) in captured.items()}
        return memory

    def fits(self, num_tokens: int, num_seqs: int, num_prompts: int, num_logits: int, max_blocks: int,
             with_single: bool) -> bool:
        return (self.spec.holds(num_tokens, num_seqs, num_prompts, with_single) and num_logits <= self.max_seqs
                and max_blocks <= self.block_tables.shape[1])

    @torch.inference_mode()
    def run(self, host: StepInputs, prev_tokens: torch.Tensor | None) -> torch.Tensor:
        """The step through the smallest graph that fits; returns fp32 logits [len(logits_rows), vocab].
        Its inputs are laid out on the host in the buffers' own layout, padded (`_layout`), and copied in
        three host-to-device copies (long inputs, int32 inputs, block tables); pending input tokens
        come from prev_tokens (the previous step's sampled tokens, on the device). Without captured
        graphs (CPU tests), the same static forward runs eagerly."""
        n, b, w = len(host.token_ids), len(host.seq_lens), host.max_blocks
        t = next(size for size in self.sizes if size >= n)
        with_single = bool(host.decode_idx)
        longs, ints = self._layout(host, t, with_single)
        device = self._longs.device
        self._longs.copy_(host_image(torch.from_numpy(longs), device), non_blocking=True)
        self._ints.copy_(host_image(torch.from_numpy(ints), device), non_blocking=True)
        tables = torch.from_numpy(np.asarray(host.tables, np.int64).reshape(b, w))
        self.block_tables[:b, :w].copy_(host_image(tables, device), non_blocking=True)
        if host.fill_dst:
            k = len(host.fill_dst)
            self.input_ids.index_copy_(0, self._fill_dst[:k], prev_tokens.index_select(0, self._fill_src[:k]))
        graph = self.graphs.get((t, with_single))
        if graph is None:
            logits = self.forward(t, with_single)
        else:
            graph.replay()
            logits = self.logits
        return logits[:len(host.logits_rows)]

    def _layout(self, host: StepInputs, t: int, with_single: bool) -> tuple[np.ndarray, np.ndarray]:
        """The step's long and int32 inputs as host images of `_longs` and `_ints`, padded as the class
        docstring lays out. The prompt slots are padded with a slot without extend work: a 1-token
        sequence (which the kernel skips) or the first empty slot; none is empty only when every slot
        is a prompt, which leaves no prompt slot to pad."""
        n, b, s = len(host.token_ids), len(host.seq_lens), self.slots(t)
        longs = np.zeros(self._longs.shape[0], np.int64)
        ids, pos, slots, logits_rows, single_q, single_out, fill_dst, fill_src = self._long_segments.views(longs)
        ids[:n] = host.token_ids  # a pending token's entry is overwritten on the device
        pos[:n] = host.positions
        slots[:n] = host.slots
        slots[n:] = self.scratch_slot
        logits_rows[:len(host.logits_rows)] = host.logits_rows
        fill_dst[:len(host.fill_dst)] = host.fill_dst
        fill_src[:len(host.fill_src)] = host.fill_src
        ints = np.ones(self._ints.shape[0], np.int32)
        qsl, lens, prompt_ids, single_lens = self._int_segments.views(ints)
        qsl[:b + 1] = host.query_start_loc
        qsl[b + 1:] = n
        lens[:b] = host.seq_lens
        prompts = host.prefill_idx
        idle = host.decode_idx[0] if host.decode_idx else b
        assert idle < s or len(prompts) == self.max_prompts, "no idle slot to pad the prompt slots with"
        prompt_ids[:len(prompts)] = prompts
        prompt_ids[len(prompts):] = idle
        if with_single:
            single_out[:s] = t
            for i in host.decode_idx:
                single_q[i] = single_out[i] = host.query_start_loc[i]
                single_lens[i] = host.seq_lens[i]
        return longs, ints


@dataclass(frozen=True)
class Segments:
    """Consecutive segments of one buffer, `sizes` elements of `itemsize` bytes each, every one starting
    on a 16-byte boundary of it. Triton specialises a pointer argument on 16-byte alignment: a graph's
    kernels reading an unaligned view would be other variants than the startup tuners timed, each
    compiled again before the capture."""
    sizes: tuple[int, ...]
    itemsize: int

    @functools.cached_property
    def starts(self) -> list[int]:
        per = 16 // self.itemsize
        ends = itertools.accumulate(-(-n // per) * per for n in self.sizes)
        return [0, *itertools.islice(ends, len(self.sizes) - 1)]

    @property
    def length(self) -> int:
        """The buffer's elements (the last segment unpadded)."""
        return self.starts[-1] + self.sizes[-1]

    def views(self, buffer):
        """The segments of `buffer` (a tensor or a numpy array of `length` elements), as views."""
        return [buffer[a:a + n] for a, n in zip(self.starts, self.sizes)]


def long_segments(t: int, s: int) -> list[int]:
    """PrefillGraphs' long inputs for T tokens and S slots, in order: input ids, positions, cache slots
    (T each), logits rows, the decode kernel's query rows and output rows (S each), and the pending
    tokens' rows and their rows in the previous step's tokens (S each)."""
    return [t, t, t, s, s, s, s, s]


def int_segments(s: int, p: int) -> list[int]:
    """PrefillGraphs' int32 inputs for S slots and P prompt slots: query_start_loc (S + 1), seq_lens
    (S), prompt_ids (P), and the decode kernel's lengths (S)."""
    return [s + 1, s, p, s]


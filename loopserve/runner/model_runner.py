"""Model runner: turns a SchedulerOutput into one forward pass over the paged cache, then samples."""
from __future__ import annotations

import contextlib
import functools
import itertools
import logging
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import torch

from loopserve.attention.metadata import AttentionMetadata, ForwardBatch, KVCache, kv_cache_shape
from loopserve.attention.triton_backend import make_backend
from loopserve.config import ModelConfig, StepGraphSpec
from loopserve.device_caps import pdl_supported
from loopserve.engine.kv_cache import KVOp
from loopserve.engine.scheduler import ScheduledSeq, SchedulerOutput
from loopserve.engine.request import PENDING_TOKEN
from loopserve.runner.decode_tuning import tune_decode_tiles
from loopserve.runner.extend_tuning import tune_extend_tiles
from loopserve.runner.gated_mlp_tuning import tune_gated_mlp
from loopserve.runner.gemv_tuning import tune_gemv_choices
from loopserve.runner.host_copy import to_device
from loopserve.runner.sampler import SampledBatch, SampledToken, Sampler, SamplingRow
from loopserve.runner.step_inputs import StepInputs
from loopserve.runner.tuning import Tuned

log = logging.getLogger(__name__)


@dataclass
class LaunchedStep:
    """A step whose forward and sampling are queued on the device; `result` reads the tokens back.

    Under overlap scheduling the next step is prepared and launched before this one's result is read:
    its inputs take this step's sampled tokens on the device (`token_rows` says which row is whose)."""
    out: SchedulerOutput
    sampling: list[ScheduledSeq] = field(default_factory=list)
    batch: SampledBatch | None = None

    @functools.cached_property
    def token_rows(self) -> dict[str, int]:
        """Request id -> its row of batch.token_ids; only the next step's pending inputs look it up."""
        return {s.request.request_id: i for i, s in enumerate(self.sampling)}

    def result(self) -> RunnerOutput:
        if self.batch is None:
            return RunnerOutput({})
        tokens = self.batch.tokens()
        return RunnerOutput({s.request.request_id: [t] for s, t in zip(self.sampling, tokens)})


@dataclass
class RunnerOutput:
    # Only for requests whose last known token was processed: the token sampled after it, or with
    # speculation the accepted proposed tokens followed by one token of the target's own.
    sampled: dict[str, list[SampledToken]]
    # Speculating requests, when asked: the target's argmax at each verified position (k + 1).
    predictions: dict[str, list[int]] = field(default_factory=dict)


def kv_bytes_per_block(cfg: ModelConfig, block_size: int, dtype: torch.dtype) -> int:
    return 2 * cfg.num_layers * block_size * cfg.num_kv_heads * cfg.head_dim * dtype.itemsize


def _sdpa_without_cudnn(device: torch.device):
    """On CUDA, SDPA may pick cuDNN attention, which builds an execution plan for every new shape
    (~0.1-1 s each, measured as a fixed per-request TTFT cost): keep it to flash / mem-efficient / math."""
    if device.type != "cuda":
        return contextlib.nullcontext()
    from torch.nn.attention import SDPBackend, sdpa_kernel
    return sdpa_kernel([SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH])


class ModelRunner:
    def __init__(self, model: torch.nn.Module, model_config: ModelConfig, num_blocks: int, block_size: int,
                 device: torch.device, dtype: torch.dtype, sampler: Sampler, attention_backend: str = "auto",
                 cuda_graph_sizes: list[int] | None = None, max_model_len: int | None = None,
                 num_host_blocks: int = 0, step_graphs: list[StepGraphSpec] | None = None,
                 choose_fused_gemv_rows: int = 0, pdl: bool = True, max_step_tokens: int = 0) -> None:
        self.model = model
        self.cfg = model_config
        self.device = device
        self.block_size = block_size
        self.sampler = sampler
        self.backend = make_backend(attention_backend, device)
        self._set_pdl(pdl)
        self.structured = None  # StructuredOutputManager, set by the engine when a request is constrained
        use_graphs = bool(cuda_graph_sizes) and device.type == "cuda" and self.backend.needs_device_layout
        # With graphs, one block past the pool is the scratch block padding rows write to.
        heads_outer = getattr(self.backend, "heads_outer", lambda _: False)(device)
        shape = kv_cache_shape(num_blocks + int(use_graphs), block_size, model_config.num_kv_heads,
                               model_config.head_dim, heads_outer)
        self.kv_caches = [KVCache(torch.zeros(shape, dtype=dtype, device=device),
                                  torch.zeros(shape, dtype=dtype, device=device), heads_outer)
                          for _ in range(model_config.num_layers)]
        # Host-memory tier (retained sessions' blocks pushed off the device): pinned for async copies.
        host_shape = kv_cache_shape(num_host_blocks, block_size, model_config.num_kv_heads, model_config.head_dim,
                                    heads_outer)
        pin = device.type == "cuda"
        self.host_kv = [(torch.zeros(host_shape, dtype=dtype, pin_memory=pin),
                         torch.zeros(host_shape, dtype=dtype, pin_memory=pin))
                        for _ in range(model_config.num_layers)] if num_host_blocks else []
        self.graphs = None
        # CUDA-graph sets for steps with prompt tokens, tried in order (runner/cuda_graphs.py)
        self.step_graphs: list = []
        # role -> Tuned: the fused layers' startup GEMV tuning (empty when it did not run)
        self.gemv_timings: dict[str, Tuned] = {}
        # regime -> Tuned: the extend attention kernel's startup tile tuning (empty when it did not run)
        self.extend_timings: dict[str, Tuned] = {}
        # regime -> Tuned: the decode attention kernel's startup tile tuning (empty when it did not run)
        self.decode_timings: dict[str, Tuned] = {}
        # "<rows> rows" -> Tuned: the MLPs' gate_up + SiLU-mul startup tuning (empty when it did not run)
        self.gated_timings: dict[str, Tuned] = {}
        if use_graphs:
            self._capture_graphs(num_blocks, cuda_graph_sizes, max_model_len, step_graphs or [],
                                 choose_fused_gemv_rows, max_step_tokens)

    def _capture_graphs(self, num_blocks: int, cuda_graph_sizes: list[int], max_model_len: int | None,
                        step_graphs: list[StepGraphSpec], choose_fused_gemv_rows: int,
                        max_step_tokens: int) -> None:
        """The startup tuners, then the decode graphs and the step-graph sets. A failure in any of them
        (a capture the driver refuses, a kernel the compiler rejects) costs speed, not service: the
        tuners' defaults stay, and steps without graphs run eagerly, each said in the log."""
        from loopserve.runner.cuda_graphs import DecodeGraphs, PrefillGraphs

        model, cfg, device = self.model, self.cfg, self.device
        max_blocks = -(-(max_model_len or cfg.max_position_embeddings) // self.block_size)
        # The attention kernels' tiles, before any graph captures them (runner/extend_tuning.py,
        # runner/decode_tuning.py: the decode graphs' batch sizes and table width).
        self.extend_timings = self._tuned("extend attention tiles", lambda: tune_extend_tiles(
            self.backend, self.kv_caches[0], cfg.num_heads, max_model_len or cfg.max_position_embeddings))
        self.decode_timings = self._tuned("decode attention tiles", lambda: tune_decode_tiles(
            self.backend, self.kv_caches[0], cfg.num_heads, max(cuda_graph_sizes), max_blocks))
        # Before any graph captures an MLP: the graphs keep the choice for their rows.
        self.gated_timings = self._tuned("gate_up + SiLU-mul", lambda: tune_gated_mlp(model, max_step_tokens))

        def decode_graphs() -> DecodeGraphs:
            if choose_fused_gemv_rows or model.fused_gemv_rows:
                model.gemv_choices = {}  # a retry (without PDL) after a failed capture starts afresh
                self.gemv_timings = self._tuned("fused GEMV choices", lambda: tune_gemv_choices(model))
            graphs = DecodeGraphs(model, self.kv_caches, self.backend, cuda_graph_sizes, max_blocks,
                                  scratch_block=num_blocks, device=device,
                                  choose_fused_gemv_rows=choose_fused_gemv_rows)
            graphs.capture()
            return graphs

        try:
            self.graphs = decode_graphs()
        except Exception as e:  # noqa: BLE001 - see the docstring
            if self.pdl:
                # A driver that cannot capture programmatic launches: the same graphs with plain ones.
                log.warning("decode graphs with programmatic dependent launch failed to capture (%s); "
                            "capturing them without it", e)
                self._set_pdl(False)
                try:
                    self.graphs = decode_graphs()
                except Exception as e2:  # noqa: BLE001
                    self._without_decode_graphs(e2)
            else:
                self._without_decode_graphs(e)
        memory = None  # one memory pool (and capture stream) for every set of step graphs
        for spec in step_graphs:
            graphs = PrefillGraphs(model, self.kv_caches, self.backend, spec, max_blocks,
                                   scratch_block=num_blocks, device=device)
            try:
                memory = graphs.capture(memory)
            except Exception as e:  # noqa: BLE001 - the decode graphs stand; these steps run eagerly
                log.warning("CUDA graphs for steps of up to %d sequences disabled, capture failed: %s",
                            spec.max_seqs, e, exc_info=True)
                continue
            self.step_graphs.append(graphs)

    def _without_decode_graphs(self, error: Exception) -> None:
        """Decode steps run eagerly, on cuBLAS layers (whatever the fused GEMV capture left set)."""
        log.error("decode CUDA graphs failed to capture; decode steps run eagerly, much slower: %s", error,
                  exc_info=True)
        self.graphs = None
        self.model.fused_gemv_rows = 0
        self.model.gemv_choices = {}

    @staticmethod
    def _tuned(what: str, tune: Callable[[], dict[str, Tuned]]) -> dict[str, Tuned]:
        """A startup tuner's timings on this GPU; on a failure (a capture the driver refuses, a kernel
        the compiler rejects) none, and the defaults stay: each tuner sets its choices only once it has
        timed them all."""
        try:
            return tune()
        except Exception as e:  # noqa: BLE001 - a tuner that fails costs its speed-up, not the server
            log.warning("%s not tuned, defaults kept: %s", what, e, exc_info=True)
            return {}

    def _set_pdl(self, pdl: bool) -> None:
        """Programmatic dependent launch for the decode attention and fused GEMV kernels; `self.pdl`
        says whether they use it (only where the device supports it)."""
        triton_backend = self.backend.name == "triton"
        self.pdl = pdl and triton_backend and pdl_supported(self.device)
        self.model.use_pdl = self.pdl
        if triton_backend:
            self.backend.pdl = self.pdl

    def _prepare(self, out: SchedulerOutput, prev: LaunchedStep | None = None
                 ) -> tuple[torch.Tensor, torch.Tensor, AttentionMetadata, torch.Tensor]:
        """The step's inputs on the device (see _host_inputs and _device_inputs)."""
        return self._device_inputs(self._host_inputs(out, prev), prev)

    def _host_inputs(self, out: SchedulerOutput, prev: LaunchedStep | None) -> StepInputs:
        """The step's inputs as host lists. A pending input token (overlap scheduling) is PENDING_TOKEN,
        with the row of `prev`'s sampled tokens that will hold it."""
        bs = self.block_size
        token_ids: list[int] = []
        positions: list[int] = []
        slots: list[int] = []
        query_start_loc = [0]
        seq_lens: list[int] = []
        decode_idx: list[int] = []
        prefill_idx: list[int] = []
        logits_rows: list[int] = []
        max_blocks = max(len(s.block_ids) for s in out.seqs)
        tables: list[int] = []
        fill_dst: list[int] = []
        fill_src: list[int] = []
        for i, seq in enumerate(out.seqs):
            req = seq.request
            start, n = req.num_computed_tokens, seq.num_new_tokens
            end = start + n
            known_end = end - seq.num_spec_tokens
            token_ids.extend(req.all_token_ids[start:known_end])
            if token_ids and token_ids[-1] == PENDING_TOKEN:
                fill_dst.append(len(token_ids) - 1)
                fill_src.append(prev.token_rows[req.request_id])
            if seq.num_spec_tokens:
                token_ids.extend(req.spec_token_ids[:seq.num_spec_tokens])
            pos = range(start, end)
            positions.extend(pos)
            ids = seq.block_ids
            slots.extend(ids[p // bs] * bs + p % bs for p in pos)
            tables.extend(ids)
            tables.extend([0] * (max_blocks - len(ids)))
            query_start_loc.append(query_start_loc[-1] + n)
            seq_lens.append(end)
            (decode_idx if n == 1 else prefill_idx).append(i)
            if seq.samples:  # the last known token's row, then one row per proposed token
                last = query_start_loc[-1] - 1
                logits_rows.extend(range(last - seq.num_spec_tokens, last + 1))
        return StepInputs(token_ids, positions, slots, tables, max_blocks, query_start_loc, seq_lens, decode_idx,
                          prefill_idx, logits_rows, fill_dst, fill_src)

    def _device_inputs(self, host: StepInputs, prev: LaunchedStep | None
                       ) -> tuple[torch.Tensor, torch.Tensor, AttentionMetadata, torch.Tensor]:
        """(input ids, positions, attention metadata, logits rows) on the device. Everything travels in
        ONE host-to-device copy (token ids, positions, slots, block tables, logits rows, and the layout
        for device-side kernels), sliced there; pending tokens are taken from `prev`'s sampled tokens."""
        parts = [host.token_ids, host.positions, host.slots, host.tables, host.logits_rows]
        if self.backend.needs_device_layout:
            parts += [host.query_start_loc, host.seq_lens]
        parts += [host.fill_dst, host.fill_src]
        sizes = [len(p) for p in parts]
        # numpy reads a long list of ints several times faster than torch.tensor does
        packed = to_device(np.fromiter(itertools.chain.from_iterable(parts), np.int64, sum(sizes)),
                           torch.long, self.device)
        views = packed.split(sizes)
        if host.fill_dst:
            views[0].index_copy_(0, views[-2], prev.batch.token_ids.index_select(0, views[-1]))
        qsl = host.query_start_loc
        meta = AttentionMetadata(
            query_start_loc=qsl, seq_lens=host.seq_lens, slot_mapping=views[2],
            block_tables=views[3].view(len(host.seq_lens), host.max_blocks), decode_indices=host.decode_idx,
            prefill_indices=host.prefill_idx)
        if self.backend.needs_device_layout:
            meta.query_start_loc_t = views[5].to(torch.int32)
            meta.seq_lens_t = views[6].to(torch.int32)
            meta.max_query_len = max(b - a for a, b in zip(qsl, qsl[1:]))
        return views[0], views[1], meta, views[4]

    @torch.inference_mode()
    def forward_logits(self, out: SchedulerOutput, prev: LaunchedStep | None = None
                       ) -> tuple[torch.Tensor | None, list[ScheduledSeq]]:
        """One forward pass; fp32 logits of the sampling rows (k + 1 per speculating request) and the
        scheduled sequences they belong to, in order."""
        if out.empty:
            return None, []
        host = self._host_inputs(out, prev)
        sampling = [s for s in out.seqs if s.samples]
        # Pure decode, every sequence sampled: rows are the logits rows, in order.
        every_row = not host.prefill_idx and len(sampling) == len(out.seqs)
        if self.graphs is not None and every_row and self.graphs.fits(len(out.seqs), host.max_blocks):
            return self.graphs.run(host, prev.batch.token_ids if host.fill_dst else None), sampling
        graphs = self.step_graphs_for(len(host.token_ids), host, len(host.logits_rows))
        if graphs is not None:
            logits = graphs.run(host, prev.batch.token_ids if host.fill_dst else None)
            return (logits, sampling) if sampling else (None, [])
        input_ids, positions, meta, logits_rows = self._device_inputs(host, prev)
        batch = ForwardBatch(meta, self.kv_caches, self.backend)
        with _sdpa_without_cudnn(self.device):
            if every_row:  # a pure decode step samples every row, in order
                return self.model.forward_logits(input_ids, positions, batch), sampling
            # Only the logits rows' hidden states (none for a mid-prompt chunk): see CausalLM.forward.
            hidden = self.model(input_ids, positions, batch, out_rows=logits_rows)
        if not sampling:
            return None, []
        return self.model.compute_logits(hidden), sampling

    def step_graphs_for(self, num_tokens: int, host: StepInputs, num_logits: int):
        """The first graph set that holds a step with prompt tokens, or None (it runs eagerly)."""
        return next((g for g in self.step_graphs if g.fits(
            num_tokens, len(host.seq_lens), len(host.prefill_idx), num_logits, host.max_blocks,
            bool(host.decode_idx))), None)

    def _start_masks(self, out: SchedulerOutput):
        """Start filling the grammar masks of constrained rows (they fill while the forward runs). A row
        of a request that finished since it was scheduled (overlap scheduling) is left unmasked: its
        result is dropped, and its grammar may be done."""
        if self.structured is None:
            return None
        rows, row = [], 0
        for seq in out.seqs:
            if not seq.samples:
                continue
            if seq.request.grammar is not None and not seq.request.status.finished:
                rows.append((row + seq.num_spec_tokens, seq.request.grammar))
            row += seq.num_spec_tokens + 1
        if not rows:
            return None
        return self.structured.start_masks(rows, row), [r for r, _ in rows]

    def run_kv_ops(self, ops: list[KVOp]) -> None:
        """Offloads, restores and copy-on-write copies, in order; runs of one kind go in one indexed copy."""
        for kind, group in itertools.groupby(ops, key=lambda op: op.kind):
            group = list(group)
            src = [op.src for op in group]
            dst = [op.dst for op in group]
            dst = to_device(dst, torch.long, self.device if kind != "offload" else torch.device("cpu"))
            src = to_device(src, torch.long, self.device if kind != "restore" else torch.device("cpu"))
            for layer, cache in enumerate(self.kv_caches):
                for dev, host in zip((cache.key, cache.value), self.host_kv[layer] if self.host_kv else (None, None)):
                    if cache.heads_outer:  # blocks are dim 1
                        dev, host = dev.transpose(0, 1), host.transpose(0, 1) if host is not None else None
                    if kind == "copy":
                        dev[dst] = dev[src]
                    elif kind == "offload":
                        host[dst] = dev[src].to("cpu")
                    else:
                        dev[dst] = host[src].to(self.device, non_blocking=True)

    @torch.inference_mode()
    def execute(self, out: SchedulerOutput, draft_probs: dict[str, torch.Tensor] | None = None,
                want_predictions: bool = False) -> RunnerOutput:
        """Run the step and read its tokens back (speculating requests are verified here)."""
        if not any(s.num_spec_tokens for s in out.seqs):
            return self.launch(out).result()
        if out.kv_ops:
            self.run_kv_ops(out.kv_ops)
        masks = self._start_masks(out)
        logits, sampling = self.forward_logits(out)
        if masks is not None:
            self.structured.apply_masks(logits, *masks)
        from loopserve.spec.verify import verify
        sampled, predictions = verify(self.sampler, logits, sampling, draft_probs or {}, want_predictions)
        return RunnerOutput(sampled, predictions)

    @torch.inference_mode()
    def launch(self, out: SchedulerOutput, prev: LaunchedStep | None = None,
               before_sampling: Callable[[], None] | None = None) -> LaunchedStep:
        """Queue the step's block copies, forward and sampling on the device without waiting for it;
        pending input tokens come from `prev`. `before_sampling` runs once the forward is queued: under
        overlap scheduling the engine reads `prev` back there, so the grammar masks and penalties of
        this step see the tokens `prev` sampled, while the device runs this step's forward. The
        sampled tokens then start their copy to the host."""
        if out.kv_ops:
            self.run_kv_ops(out.kv_ops)
        masks = self._start_masks(out) if before_sampling is None else None
        logits, sampling = self.forward_logits(out, prev)
        if before_sampling is not None:
            before_sampling()
            masks = self._start_masks(out) if logits is not None else None
        if logits is None:
            return LaunchedStep(out)
        if masks is not None:
            self.structured.apply_masks(logits, *masks)
        rows = [SamplingRow(s.request.params, s.request.prompt_token_ids, s.request.output_token_ids,
                            s.request.generator) for s in sampling]
        # A decode graph's own argmax, unless masks edited its logits since
        greedy = self.graphs.argmax_of(logits) if self.graphs is not None and masks is None else None
        batch = self.sampler.sample_batch(logits, rows, greedy_ids=greedy)
        batch.start_copy()
        return LaunchedStep(out, sampling, batch)

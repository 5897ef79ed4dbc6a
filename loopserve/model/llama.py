"""One plain-PyTorch decoder for the Llama family (Llama, Mistral, Qwen2, Qwen3).

Tokens are flat ([T, ...], no batch dim): many sequences share one forward, and the attention
backend uses `ForwardBatch.meta` to tell them apart and to read/write the paged KV cache.
Q/K/V and gate/up are fused into single matmuls (fewer kernel launches per layer); `load_weights`
slices the separate HF tensors into them.
"""
from __future__ import annotations

import functools
import math
from collections.abc import Iterable

import torch
import torch.nn.functional as F
from torch import nn

from loopserve.attention.metadata import ForwardBatch
from loopserve.config import ModelConfig
from loopserve.model.fused_ops import fused_add_rms_norm, rms_norm
from loopserve.model.gated_mlp import GatedChoices, choice_for_rows, gated_by
from loopserve.model.gemv import GemvChoice, GemvWorkspace, gemv_by, gemv_workspace

# The GEMV role (CausalLM.gemv_choices) of forward_logits' last kernel: final RMSNorm, lm_head and fp32 logits.
LOGITS_ROLE = "lm_head"

# Rope variants we implement; `freq_factors` is internal (GGUF files store Llama-3 scaling as a
# precomputed per-frequency divisor tensor instead of the formula's parameters).
ROPE_TYPES = ("default", "linear", "llama3", "freq_factors")


class RMSNorm(nn.Module):
    """RMSNorm over the last dim, computed in fp32 and cast back before the weight (as transformers)."""

    def __init__(self, dim: int, eps: float, dtype: torch.dtype | None = None) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim, dtype=dtype))
        self.eps = eps

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None = None):
        """rmsnorm(x); with a residual, (rmsnorm(x + residual), x + residual) in one fused pass."""
        if residual is None:
            return rms_norm(x, self.weight, self.eps)
        return fused_add_rms_norm(x, residual, self.weight, self.eps)


def rope_inv_freq(head_dim: int, theta: float, scaling: dict | None) -> torch.Tensor:
    """Inverse frequencies [head_dim // 2] (fp32, CPU) for the configured rope variant."""
    # Explicit CPU: a surrounding `with torch.device(...)` must not move this small computation.
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.float32, device="cpu") / head_dim))
    rope_type = (scaling or {}).get("rope_type", "default")
    if rope_type == "default":
        return inv_freq
    if rope_type == "linear":
        # Linear interpolation: positions divided by the factor, i.e. frequencies divided by it.
        return inv_freq / float(scaling["factor"])
    if rope_type == "llama3":
        return _llama3_inv_freq(inv_freq, scaling)
    if rope_type == "freq_factors":
        factors = torch.tensor(scaling["factors"], dtype=torch.float32, device="cpu")
        if factors.numel() != inv_freq.numel():
            raise ValueError(f"rope freq_factors has {factors.numel()} entries, expected {inv_freq.numel()}")
        return inv_freq / factors
    raise ValueError(f"unsupported rope_type {rope_type!r}; supported: {', '.join(ROPE_TYPES[:3])}")


def _llama3_inv_freq(inv_freq: torch.Tensor, scaling: dict) -> torch.Tensor:
    """Llama 3.1 scaling: long wavelengths are slowed by `factor`, short ones kept, and the band in
    between interpolated smoothly (by how many wavelengths fit in the original context)."""
    factor = float(scaling["factor"])
    low_freq_factor = float(scaling.get("low_freq_factor", 1.0))
    high_freq_factor = float(scaling.get("high_freq_factor", 4.0))
    old_context = float(scaling["original_max_position_embeddings"])
    low_freq_wavelen = old_context / low_freq_factor
    high_freq_wavelen = old_context / high_freq_factor

    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > low_freq_wavelen, inv_freq / factor, inv_freq)
    smooth = (old_context / wavelen - low_freq_factor) / (high_freq_factor - low_freq_factor)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    is_medium = (wavelen >= high_freq_wavelen) & (wavelen <= low_freq_wavelen)
    return torch.where(is_medium, smoothed, scaled)


class RotaryEmbedding(nn.Module):
    """Neox/HF ("rotate_half") rotary embedding with a cos/sin table indexed by position."""

    def __init__(self, head_dim: int, max_positions: int, theta: float, scaling: dict | None) -> None:
        super().__init__()
        self.head_dim = head_dim
        self.max_positions = max_positions
        self.theta = theta
        self.scaling = scaling
        rope_inv_freq(head_dim, theta, scaling)  # fail fast on an unsupported rope type, even on meta
        self.register_buffer("cos_sin_cache", self._build(), persistent=False)

    def _build(self) -> torch.Tensor:
        # Built on the CPU in fp32 (deterministic, matches transformers), then moved: [P, head_dim].
        device = torch.get_default_device()  # honours a surrounding `with torch.device(...)`
        if device.type == "meta":
            return torch.empty(self.max_positions, self.head_dim, device="meta")
        inv_freq = rope_inv_freq(self.head_dim, self.theta, self.scaling)
        positions = torch.arange(self.max_positions, dtype=torch.float32, device="cpu")
        freqs = torch.outer(positions, inv_freq)
        return torch.cat([freqs.cos(), freqs.sin()], dim=-1).to(device)

    def reset_cache(self, device: torch.device | str) -> None:
        """Recompute the table (after `to_empty` materialized a meta-built model)."""
        with torch.device(device):
            self.cos_sin_cache = self._build()


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig, layer_idx: int, dtype: torch.dtype | None) -> None:
        super().__init__()
        self.layer_idx = layer_idx
        self.num_heads, self.num_kv_heads, self.head_dim = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
        self.q_size = cfg.num_heads * cfg.head_dim
        self.kv_size = cfg.num_kv_heads * cfg.head_dim
        self.scale = cfg.head_dim ** -0.5
        self.qkv_proj = nn.Linear(cfg.hidden_size, self.q_size + 2 * self.kv_size,
                                  bias=cfg.attention_bias, dtype=dtype)
        # Qwen2's biases are on q/k/v only; Llama/Qwen3's `attention_bias` also covers o_proj.
        o_bias = cfg.attention_bias and cfg.architecture != "Qwen2ForCausalLM"
        self.o_proj = nn.Linear(self.q_size, cfg.hidden_size, bias=o_bias, dtype=dtype)
        if cfg.qk_norm:
            self.q_norm = RMSNorm(cfg.head_dim, cfg.rms_norm_eps, dtype)
            self.k_norm = RMSNorm(cfg.head_dim, cfg.rms_norm_eps, dtype)
        else:
            self.q_norm = self.k_norm = None

    def forward(self, x: torch.Tensor, positions: torch.Tensor, rotary: "RotaryEmbedding",
                batch: ForwardBatch, keep_rows: torch.Tensor | None = None) -> torch.Tensor:
        """keep_rows: o_proj only for these rows (every row's K/V still goes into the cache)."""
        o = self.attend_qkv(self.qkv_proj(x), positions, rotary, batch)
        return self.o_proj(o if keep_rows is None else o.index_select(0, keep_rows))

    def attend_qkv(self, qkv: torch.Tensor, positions: torch.Tensor, rotary: "RotaryEmbedding",
                   batch: ForwardBatch) -> torch.Tensor:
        """Projected qkv [T, q + 2 kv] -> attention output [T, q_size], before o_proj."""
        t = qkv.shape[0]
        q, k, v = qkv.split([self.q_size, self.kv_size, self.kv_size], dim=-1)
        q = q.view(t, self.num_heads, self.head_dim)
        k = k.view(t, self.num_kv_heads, self.head_dim)
        v = v.view(t, self.num_kv_heads, self.head_dim)
        if self.q_norm is not None:
            q = self.q_norm(q.reshape(-1, self.head_dim)).view(t, self.num_heads, self.head_dim)
            k = self.k_norm(k.reshape(-1, self.head_dim)).view(t, self.num_kv_heads, self.head_dim)
        cache = batch.kv_caches[self.layer_idx]
        # Rotary, the cache write of k and v, attention: q and k are this step's own tensors (the backend
        # may rotate them in place). One or two kernels on GPU.
        o = batch.backend.rotary_attend(q, k, v, positions, rotary.cos_sin_cache, cache, batch.meta, self.scale)
        return o.reshape(t, self.q_size)


class MLP(nn.Module):
    def __init__(self, cfg: ModelConfig, dtype: torch.dtype | None) -> None:
        super().__init__()
        self.gate_up_proj = nn.Linear(cfg.hidden_size, 2 * cfg.intermediate_size, bias=False, dtype=dtype)
        self.down_proj = nn.Linear(cfg.intermediate_size, cfg.hidden_size, bias=False, dtype=dtype)
        # gate_up and its SiLU-mul, by the step's rows: cuBLAS and a kernel, or one fused GEMM
        # (model/gated_mlp.py). Set for every layer by CausalLM.set_gated_choices.
        self.gated_choices: GatedChoices = ()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(gated_by(choice_for_rows(self.gated_choices, x.shape[0]), x, self.gate_up_proj.weight))


class DecoderLayer(nn.Module):
    def __init__(self, cfg: ModelConfig, layer_idx: int, dtype: torch.dtype | None) -> None:
        super().__init__()
        self.self_attn = Attention(cfg, layer_idx, dtype)
        self.mlp = MLP(cfg, dtype)
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, dtype)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, dtype)

    def forward(self, h: torch.Tensor, residual: torch.Tensor | None, positions: torch.Tensor,
                rotary: "RotaryEmbedding", batch: ForwardBatch,
                keep_rows: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """The residual stream travels beside the layer output, so each add fuses into the next norm:
        returns (mlp output, residual) with the layer's result being their sum. keep_rows: after the
        attention (which still writes every row's K/V), only these rows go on, in this order."""
        if residual is None:
            h, residual = self.input_layernorm(h), h
        else:
            h, residual = self.input_layernorm(h, residual)
        h = self.self_attn(h, positions, rotary, batch, keep_rows)
        if keep_rows is not None:
            residual = residual.index_select(0, keep_rows)
        h, residual = self.post_attention_layernorm(h, residual)
        return self.mlp(h), residual

    @functools.cached_property
    def gemv_roles(self) -> dict[str, tuple[nn.Linear, dict, bool]]:
        """forward_fused's four GEMVs: role -> (its linear layer, prologue keywords for fused_gemv,
        whether it adds the residual). Built once: weights load into the same parameters in place."""
        attn, mlp = self.self_attn, self.mlp
        norm_in, norm_post = self.input_layernorm, self.post_attention_layernorm
        return {"qkv": (attn.qkv_proj, dict(norm_weight=norm_in.weight, eps=norm_in.eps), False),
                "o": (attn.o_proj, {}, True),
                "gate_up": (mlp.gate_up_proj, dict(norm_weight=norm_post.weight, eps=norm_post.eps), False),
                "down": (mlp.down_proj, dict(silu_mul=True), True)}

    def forward_fused(self, hs: torch.Tensor, positions: torch.Tensor, rotary: "RotaryEmbedding",
                      batch: ForwardBatch, pdl: bool = True, choices: dict[str, GemvChoice] | None = None,
                      workspace: GemvWorkspace | None = None) -> torch.Tensor:
        """The same layer for a few rows, on the hidden state itself (residual stream materialised):
        five kernels, four GEMVs with the norms, the SiLU-mul and the residual adds inside them
        (model/gemv.py) and the attention. choices: role -> a GemvTile, or CUBLAS for a role that
        runs faster as cuBLAS and separate kernels (the startup tuner's picks); workspace: the
        forward's split-K scratch (gemv_workspace), where a choice splits K."""
        roles = self.gemv_roles
        choices = choices or {}

        def gemv(role: str, x: torch.Tensor, residual: torch.Tensor | None = None) -> torch.Tensor:
            linear, prologue, _ = roles[role]
            return gemv_by(choices.get(role), x, linear.weight, linear.bias, residual=residual, pdl=pdl,
                           workspace=workspace, **prologue)

        o = self.self_attn.attend_qkv(gemv("qkv", hs), positions, rotary, batch)
        hs = gemv("o", o, hs)
        return gemv("down", gemv("gate_up", hs), hs)


class DecoderModel(nn.Module):
    def __init__(self, cfg: ModelConfig, dtype: torch.dtype | None) -> None:
        super().__init__()
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size, dtype=dtype)
        self.layers = nn.ModuleList(DecoderLayer(cfg, i, dtype) for i in range(cfg.num_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, dtype)


# HF per-projection names -> (our fused param, shard index within it).
_FUSED = {
    "q_proj": ("qkv_proj", 0), "k_proj": ("qkv_proj", 1), "v_proj": ("qkv_proj", 2),
    "gate_proj": ("gate_up_proj", 0), "up_proj": ("gate_up_proj", 1),
}


class CausalLM(nn.Module):
    def __init__(self, config: ModelConfig, dtype: torch.dtype | None = None) -> None:
        super().__init__()
        self.config = config
        self.model = DecoderModel(config, dtype)
        self.rotary = RotaryEmbedding(config.head_dim, config.max_position_embeddings,
                                      config.rope_theta, config.rope_scaling)
        self.lm_head = (None if config.tie_word_embeddings
                        else nn.Linear(config.hidden_size, config.vocab_size, bias=False, dtype=dtype))
        # Forwards of at most this many tokens take the fused small-batch GEMV layers (0: never); the
        # engine sets it from EngineConfig.fused_decode_gemv.
        self.fused_gemv_rows = 0
        # Launch the fused GEMVs with programmatic dependent launch where the device has it (the runner
        # sets it from EngineConfig.programmatic_dependent_launch).
        self.use_pdl = True
        # The fused layers' GEMV choices by role (DecoderLayer.gemv_roles): a tile, or cuBLAS. The
        # runner's startup tuner sets them on a GPU; a role without one takes gemv.default_tile.
        self.gemv_choices: dict[str, GemvChoice] = {}

    def set_gated_choices(self, choices: GatedChoices) -> None:
        """Every MLP's gate_up + SiLU-mul choice by rows (the runner's startup tuner sets it on a GPU)."""
        for layer in self.model.layers:
            layer.mlp.gated_choices = choices

    @property
    def gated_choices(self) -> GatedChoices:
        return self.model.layers[0].mlp.gated_choices

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, batch: ForwardBatch,
                out_rows: torch.Tensor | None = None) -> torch.Tensor:
        """input_ids, positions: [T]; returns final-normed hidden states [T, hidden], or with out_rows
        (a long tensor of row indices) those rows' [len(out_rows), hidden]. The last layer then runs its
        o_proj, MLP and the final norm for those rows only: in a prefill only the rows that are sampled
        need a hidden state (one of an 8k-token prompt), while every row's K/V is still written. On an
        8B model that skips ~1/32 of a long prompt's linear FLOPs (~3.2 TFLOP at 8k tokens)."""
        if self._takes_fused_layers(input_ids):
            h = self.model.norm(self._fused_layers(input_ids, positions, batch))
            return h if out_rows is None else h.index_select(0, out_rows)
        h = self.model.embed_tokens(input_ids)
        residual = None
        last = len(self.model.layers) - 1
        for i, layer in enumerate(self.model.layers):
            h, residual = layer(h, residual, positions, self.rotary, batch, out_rows if i == last else None)
        return self.model.norm(h, residual)[0]

    def _takes_fused_layers(self, input_ids: torch.Tensor) -> bool:
        return 0 < input_ids.shape[0] <= self.fused_gemv_rows

    def _fused_layers(self, input_ids: torch.Tensor, positions: torch.Tensor, batch: ForwardBatch) -> torch.Tensor:
        """The decoder layers' fused small-batch path (DecoderLayer.forward_fused): the hidden state
        before the final norm."""
        h = self.model.embed_tokens(input_ids)
        roles = self.model.layers[0].gemv_roles
        workspace = gemv_workspace([(self.gemv_choices.get(role), linear.weight.shape[0])
                                    for role, (linear, _, _) in roles.items()], input_ids.shape[0], h.device)
        for layer in self.model.layers:
            h = layer.forward_fused(h, positions, self.rotary, batch, self.use_pdl, self.gemv_choices, workspace)
        return h

    def forward_logits(self, input_ids: torch.Tensor, positions: torch.Tensor, batch: ForwardBatch) -> torch.Tensor:
        """fp32 logits [T, vocab] of every row: compute_logits(forward(...)), except that a forward the
        fused layers take ends in one GEMV (the LOGITS_ROLE) doing the final RMSNorm, the lm_head and
        the fp32 store, where three kernels would each wait for the last: a decode step's tail."""
        if not self._takes_fused_layers(input_ids):
            return self.compute_logits(self.forward(input_ids, positions, batch))
        weight, prologue = self.logits_gemv
        return gemv_by(self.gemv_choices.get(LOGITS_ROLE), self._fused_layers(input_ids, positions, batch), weight,
                       pdl=self.use_pdl, **prologue)

    @property
    def lm_head_weight(self) -> torch.Tensor:
        return self.model.embed_tokens.weight if self.lm_head is None else self.lm_head.weight

    @property
    def logits_gemv(self) -> tuple[torch.Tensor, dict]:
        """forward_logits' last GEMV: (its weight, the prologue and output keywords of gemv_by)."""
        norm = self.model.norm
        return self.lm_head_weight, dict(norm_weight=norm.weight, eps=norm.eps, out_dtype=torch.float32)

    def compute_logits(self, hidden: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
        """hidden [N, hidden] -> fp32 logits [N, vocab], into `out` when given (the cast to fp32 is a
        copy either way: a CUDA graph can make it into a buffer it shares with other graphs)."""
        logits = F.linear(hidden, self.lm_head_weight)
        return logits.float() if out is None else out.copy_(logits)

    # ---- weights -------------------------------------------------------------------------------

    def _shard_sizes(self, fused: str) -> list[int]:
        c = self.config
        if fused == "qkv_proj":
            return [c.num_heads * c.head_dim, c.num_kv_heads * c.head_dim, c.num_kv_heads * c.head_dim]
        return [c.intermediate_size, c.intermediate_size]

    def _target(self, name: str) -> tuple[str, int | None]:
        """HF tensor name -> (our parameter name, shard index or None when not fused)."""
        parts = name.split(".")
        for i, part in enumerate(parts):
            if part in _FUSED and i + 1 < len(parts):
                fused, shard = _FUSED[part]
                return ".".join(parts[:i] + [fused] + parts[i + 1:]), shard
        return name, None

    @torch.no_grad()
    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> None:
        """Copy HF-named tensors in (cast to our dtype/device); raise on unknown or missing ones."""
        params = dict(self.named_parameters())
        expected: set[tuple[str, int | None]] = set()
        for pname in params:
            fused = pname.split(".")[-2]
            if fused in ("qkv_proj", "gate_up_proj"):
                expected.update((pname, s) for s in range(len(self._shard_sizes(fused))))
            else:
                expected.add((pname, None))

        loaded: set[tuple[str, int | None]] = set()
        for name, tensor in weights:
            if name.endswith("rotary_emb.inv_freq"):
                continue  # a derived buffer some old checkpoints saved
            if name == "lm_head.weight" and self.lm_head is None:
                continue  # tied checkpoints sometimes store a copy of the embedding
            pname, shard = self._target(name)
            if pname not in params:
                raise ValueError(f"checkpoint tensor {name!r} has no place in {self.config.architecture} "
                                 f"(is the config right? attention_bias={self.config.attention_bias}, "
                                 f"qk_norm={self.config.qk_norm}, tie={self.config.tie_word_embeddings})")
            dst = params[pname].data
            if shard is not None:
                sizes = self._shard_sizes(pname.split(".")[-2])
                dst = dst.narrow(0, sum(sizes[:shard]), sizes[shard])
            if tuple(tensor.shape) != tuple(dst.shape):
                raise ValueError(f"tensor {name!r} has shape {tuple(tensor.shape)}, expected {tuple(dst.shape)}")
            dst.copy_(tensor)
            loaded.add((pname, shard))

        missing = expected - loaded
        if missing:
            names = sorted(p if s is None else f"{p}[shard {s}]" for p, s in missing)
            more = f" (+{len(names) - 10} more)" if len(names) > 10 else ""
            raise ValueError(f"checkpoint is missing {len(names)} weights: {', '.join(names[:10])}{more}")

    @torch.no_grad()
    def init_dummy_weights(self, seed: int = 0) -> None:
        """Random weights for benchmarking without a checkpoint: N(0, 0.02), norms one, biases zero.

        Draws on the parameters' own device so an 8B model never round-trips through the CPU.
        """
        device = next(self.parameters()).device
        gen = torch.Generator(device=device).manual_seed(seed)
        for name, p in self.named_parameters():
            if name.endswith("norm.weight"):
                p.fill_(1.0)
            elif name.endswith(".bias"):
                p.zero_()
            else:
                p.normal_(0.0, 0.02, generator=gen)

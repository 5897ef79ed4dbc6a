"""GGUF (llama.cpp) files: ModelConfig from metadata, weights dequantized and renamed to HF names.

Quantized tensors are dequantized to fp32 on load (we run dense matmuls); the file is memory-mapped
so only one tensor at a time is materialized.
"""
from __future__ import annotations

import re
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from loopserve.config import ModelConfig
from loopserve.model.hf_config import SUPPORTED_ARCHITECTURES

if TYPE_CHECKING:
    from gguf import GGUFReader

# general.architecture -> our architecture. Mistral GGUFs are written with the `llama` architecture.
GGUF_ARCHITECTURES = {"llama": "LlamaForCausalLM", "qwen2": "Qwen2ForCausalLM", "qwen3": "Qwen3ForCausalLM"}

_GLOBAL_NAMES = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
}
_BLOCK_NAMES = {
    "attn_norm": "input_layernorm",
    "ffn_norm": "post_attention_layernorm",
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "attn_q_norm": "self_attn.q_norm",
    "attn_k_norm": "self_attn.k_norm",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
}
_BLOCK_RE = re.compile(r"blk\.(\d+)\.(\w+)\.(weight|bias)")
# Llama-3 style rope scaling, stored by llama.cpp as a tensor of per-frequency divisors.
_ROPE_FREQS = "rope_freqs.weight"


def open_gguf(path: str | Path) -> GGUFReader:
    from gguf import GGUFReader  # imported lazily: only GGUF users pay for it
    return GGUFReader(str(path))


def _field(reader: GGUFReader, key: str, default: Any = None) -> Any:
    field = reader.fields.get(key)
    return default if field is None else field.contents()


def _array_len(reader: GGUFReader, key: str) -> int | None:
    field = reader.fields.get(key)
    return None if field is None else len(field.data)


def gguf_architecture(reader: GGUFReader) -> tuple[str, str]:
    """(GGUF architecture prefix, our architecture name)."""
    gguf_arch = _field(reader, "general.architecture")
    if gguf_arch not in GGUF_ARCHITECTURES:
        raise ValueError(f"unsupported GGUF architecture {gguf_arch!r}; supported GGUF architectures: "
                         f"{', '.join(GGUF_ARCHITECTURES)} (loopserve supports {', '.join(SUPPORTED_ARCHITECTURES)})")
    return gguf_arch, GGUF_ARCHITECTURES[gguf_arch]


def _tensor_names(reader: GGUFReader) -> set[str]:
    return {t.name for t in reader.tensors}


def _dequantize(tensor) -> np.ndarray:
    from gguf.quants import dequantize
    # GGUF lists dims fastest-first (ne0 = columns); numpy/torch want them slowest-first.
    shape = tuple(int(d) for d in reversed(tensor.shape.tolist()))
    return dequantize(tensor.data, tensor.tensor_type).reshape(shape)


def model_config_from_gguf(reader: GGUFReader) -> ModelConfig:
    prefix, arch = gguf_architecture(reader)

    def meta(key: str, default: Any = None) -> Any:
        return _field(reader, f"{prefix}.{key}", default)

    hidden = int(meta("embedding_length"))
    num_heads = int(meta("attention.head_count"))
    vocab = meta("vocab_size") or _array_len(reader, "tokenizer.ggml.tokens")
    if vocab is None:
        raise ValueError("GGUF has neither a vocab_size nor a tokenizer.ggml.tokens list")
    names = _tensor_names(reader)

    rope_scaling = None
    scaling_type = meta("rope.scaling.type")
    if scaling_type == "linear":
        rope_scaling = {"rope_type": "linear", "factor": float(meta("rope.scaling.factor"))}
    elif scaling_type not in (None, "none"):
        raise ValueError(f"unsupported GGUF rope scaling type {scaling_type!r}")
    if _ROPE_FREQS in names:
        factors = _dequantize(next(t for t in reader.tensors if t.name == _ROPE_FREQS))
        rope_scaling = {"rope_type": "freq_factors", "factors": [float(x) for x in factors.reshape(-1)]}

    # Chat models often stop on an end-of-turn token distinct from eos; treat all of them as stops.
    eos = []
    for key in ("tokenizer.ggml.eos_token_id", "tokenizer.ggml.eot_token_id", "tokenizer.ggml.eom_token_id"):
        value = _field(reader, key)
        if value is not None and int(value) not in eos:
            eos.append(int(value))
    bos = _field(reader, "tokenizer.ggml.bos_token_id")

    head_count_kv = meta("attention.head_count_kv") or num_heads
    return ModelConfig(
        architecture=arch,
        vocab_size=int(vocab),
        hidden_size=hidden,
        intermediate_size=int(meta("feed_forward_length")),
        num_layers=int(meta("block_count")),
        num_heads=num_heads,
        num_kv_heads=int(head_count_kv),
        head_dim=int(meta("attention.key_length") or hidden // num_heads),
        rms_norm_eps=float(meta("attention.layer_norm_rms_epsilon", 1e-6)),
        rope_theta=float(meta("rope.freq_base", 10000.0)),
        max_position_embeddings=int(meta("context_length", 2048)),
        tie_word_embeddings="output.weight" not in names,
        attention_bias="blk.0.attn_q.bias" in names,
        qk_norm="blk.0.attn_q_norm.weight" in names,
        rope_scaling=rope_scaling,
        eos_token_ids=tuple(eos),
        bos_token_id=None if bos is None else int(bos),
    )


def unpermute_rotary(w: np.ndarray, n_head: int) -> np.ndarray:
    """Undo llama.cpp's `permute(w, n_head)` on Q/K rows.

    llama.cpp interleaves each head's two rotary halves (its rope pairs adjacent dims); HF pairs
    dim i with i + head_dim/2. Forward was reshape(n_head, 2, hd/2) -> swap -> flatten, so the
    inverse reads rows as (n_head, hd/2, 2) and swaps back.
    """
    half = w.shape[0] // n_head // 2
    return w.reshape(n_head, half, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def hf_name(gguf_name: str) -> str:
    if gguf_name in _GLOBAL_NAMES:
        return _GLOBAL_NAMES[gguf_name]
    m = _BLOCK_RE.fullmatch(gguf_name)
    if m is None or m.group(2) not in _BLOCK_NAMES:
        raise ValueError(f"unknown GGUF tensor {gguf_name!r}")
    layer, part, kind = m.groups()
    return f"model.layers.{layer}.{_BLOCK_NAMES[part]}.{kind}"


def iter_gguf_weights(reader: GGUFReader, config: ModelConfig) -> Iterator[tuple[str, torch.Tensor]]:
    """Yield (HF name, fp32 tensor) for every weight in the file."""
    permuted = _field(reader, "general.architecture") == "llama"  # only llama's converter permutes Q/K
    for tensor in reader.tensors:
        if tensor.name == _ROPE_FREQS:
            continue  # folded into config.rope_scaling
        name = hf_name(tensor.name)
        arr = _dequantize(tensor)
        if permuted and ".q_proj." in name:
            arr = unpermute_rotary(arr, config.num_heads)
        elif permuted and ".k_proj." in name:
            arr = unpermute_rotary(arr, config.num_kv_heads)
        if not arr.flags.writeable:  # memory-mapped F32 data; torch wants a writable buffer
            arr = arr.copy()
        yield name, torch.from_numpy(np.ascontiguousarray(arr))


def load_gguf(path: str | Path) -> tuple[ModelConfig, Iterator[tuple[str, torch.Tensor]]]:
    reader = open_gguf(path)
    config = model_config_from_gguf(reader)
    return config, iter_gguf_weights(reader, config)

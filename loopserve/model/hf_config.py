"""Translate a Hugging Face config.json (transformers 4.x or 5.x style) into a ModelConfig."""
from __future__ import annotations

from typing import Any

from loopserve.config import ModelConfig

SUPPORTED_ARCHITECTURES: tuple[str, ...] = (
    "LlamaForCausalLM",
    "MistralForCausalLM",
    "Qwen2ForCausalLM",
    "Qwen3ForCausalLM",
)

# Configs without an `architectures` list still name their family in `model_type`.
_MODEL_TYPE_TO_ARCH = {
    "llama": "LlamaForCausalLM",
    "mistral": "MistralForCausalLM",
    "qwen2": "Qwen2ForCausalLM",
    "qwen3": "Qwen3ForCausalLM",
}

DEFAULT_ROPE_THETA = 10000.0


def check_architecture(arch: str) -> str:
    if arch not in SUPPORTED_ARCHITECTURES:
        raise ValueError(f"unsupported model architecture {arch!r}; loopserve supports "
                         f"{', '.join(SUPPORTED_ARCHITECTURES)}")
    return arch


def _architecture(cfg: dict[str, Any]) -> str:
    archs = cfg.get("architectures") or []
    if archs:
        return check_architecture(archs[0])
    model_type = cfg.get("model_type")
    if model_type in _MODEL_TYPE_TO_ARCH:
        return _MODEL_TYPE_TO_ARCH[model_type]
    return check_architecture(str(model_type or "<none given>"))


def normalize_rope_scaling(params: dict[str, Any] | None) -> dict[str, Any] | None:
    """Rope scaling as a dict with a `rope_type` key (minus `rope_theta`), or None for plain rope.

    Old configs spell the type `type`; transformers 5 folds theta and the type into `rope_parameters`.
    """
    if not params:
        return None
    out = {k: v for k, v in params.items() if k not in ("rope_theta", "type")}
    rope_type = params.get("rope_type", params.get("type", "default"))
    if rope_type == "default":
        return None
    out["rope_type"] = rope_type
    return out


def _rope(cfg: dict[str, Any]) -> tuple[float, dict[str, Any] | None]:
    params = cfg.get("rope_parameters")
    # Per-layer-type rope dicts ({"full_attention": {...}}) are a newer transformers form; take the full one.
    if isinstance(params, dict) and "full_attention" in params and isinstance(params["full_attention"], dict):
        params = params["full_attention"]
    params = params or {}
    theta = params.get("rope_theta", cfg.get("rope_theta", DEFAULT_ROPE_THETA))
    scaling = normalize_rope_scaling(params) or normalize_rope_scaling(cfg.get("rope_scaling"))
    return float(theta), scaling


def eos_ids(value: Any) -> tuple[int, ...]:
    if value is None:
        return ()
    if isinstance(value, int):
        return (value,)
    return tuple(int(v) for v in value)


def model_config_from_hf(cfg: dict[str, Any]) -> ModelConfig:
    arch = _architecture(cfg)
    if cfg.get("hidden_act", "silu") not in ("silu", "swish"):
        raise ValueError(f"hidden_act {cfg['hidden_act']!r} is not supported (only silu)")
    if cfg.get("mlp_bias"):
        raise ValueError("mlp_bias=True is not supported")
    hidden = int(cfg["hidden_size"])
    num_heads = int(cfg["num_attention_heads"])
    theta, scaling = _rope(cfg)
    if arch == "Qwen2ForCausalLM":
        attention_bias = True  # Qwen2 always has q/k/v biases; its config has no key for it
    else:
        attention_bias = bool(cfg.get("attention_bias", False))
    return ModelConfig(
        architecture=arch,
        vocab_size=int(cfg["vocab_size"]),
        hidden_size=hidden,
        intermediate_size=int(cfg["intermediate_size"]),
        num_layers=int(cfg["num_hidden_layers"]),
        num_heads=num_heads,
        num_kv_heads=int(cfg.get("num_key_value_heads") or num_heads),
        head_dim=int(cfg.get("head_dim") or hidden // num_heads),
        rms_norm_eps=float(cfg.get("rms_norm_eps", 1e-6)),
        rope_theta=theta,
        max_position_embeddings=int(cfg.get("max_position_embeddings", 2048)),
        tie_word_embeddings=bool(cfg.get("tie_word_embeddings", False)),
        attention_bias=attention_bias,
        qk_norm=arch == "Qwen3ForCausalLM",
        rope_scaling=scaling,
        eos_token_ids=eos_ids(cfg.get("eos_token_id")),
        bos_token_id=cfg.get("bos_token_id"),
    )

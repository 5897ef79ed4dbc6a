"""One home for loopserve's defaults and the typed configs that cross module boundaries."""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

import torch

DEFAULT_MODEL = "smollm2"
DEFAULT_BLOCK_SIZE = 16
DEFAULT_MAX_NUM_BATCHED_TOKENS = 2048
DEFAULT_MAX_NUM_SEQS = 64
# One long prompt may take at most this share of a step's token budget, so decodes keep flowing.
DEFAULT_LONG_PREFILL_FRACTION = 0.5
DEFAULT_CPU_KV_CACHE_BYTES = 1 << 30
DEFAULT_GPU_MEMORY_UTILIZATION = 0.85
DEFAULT_MAX_MODEL_LEN_CAP = 8192


def default_models_dir() -> Path:
    """Where `loopserve fetch` puts models: $XDG_DATA_HOME/loopserve/models (or ~/.local/share/...)."""
    base = os.environ.get("XDG_DATA_HOME") or str(Path.home() / ".local" / "share")
    return Path(base) / "loopserve" / "models"


DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16,
          "bf16": torch.bfloat16, "float16": torch.float16, "fp16": torch.float16,
          "half": torch.float16, "float": torch.float32}


def resolve_dtype(dtype: str | torch.dtype | None, device: torch.device) -> torch.dtype:
    """`auto`/None: fp32 on CPU (AVX2 cores have no fast bf16), bf16 on GPU."""
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype is None or dtype == "auto":
        return torch.float32 if device.type == "cpu" else torch.bfloat16
    if dtype not in DTYPES:
        raise ValueError(f"dtype must be one of auto, {', '.join(sorted(DTYPES))}; got {dtype!r}")
    return DTYPES[dtype]


def default_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


@dataclass(frozen=True)
class ModelConfig:
    """Architecture facts the model code needs, read from an HF config.json or GGUF metadata."""
    architecture: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float
    rope_theta: float
    max_position_embeddings: int
    tie_word_embeddings: bool = False
    attention_bias: bool = False
    qk_norm: bool = False
    rope_scaling: dict | None = None
    eos_token_ids: tuple[int, ...] = ()
    bos_token_id: int | None = None


@dataclass(frozen=True)
class CacheConfig:
    block_size: int = DEFAULT_BLOCK_SIZE
    # KV pool size: bytes if set, else a fraction of free GPU memory (GPU) / DEFAULT_CPU_KV_CACHE_BYTES (CPU).
    kv_cache_bytes: int | None = None
    gpu_memory_utilization: float = DEFAULT_GPU_MEMORY_UTILIZATION
    num_blocks: int | None = None  # exact override, mostly for tests
    enable_prefix_caching: bool = True


@dataclass(frozen=True)
class SchedulerConfig:
    max_num_batched_tokens: int = DEFAULT_MAX_NUM_BATCHED_TOKENS
    max_num_seqs: int = DEFAULT_MAX_NUM_SEQS
    # Cap on the tokens one prefill may take in a step; None = DEFAULT_LONG_PREFILL_FRACTION of the budget.
    long_prefill_token_threshold: int | None = None
    max_model_len: int = DEFAULT_MAX_MODEL_LEN_CAP

    def prefill_cap(self) -> int:
        if self.long_prefill_token_threshold is not None:
            return max(1, self.long_prefill_token_threshold)
        return max(1, int(self.max_num_batched_tokens * DEFAULT_LONG_PREFILL_FRACTION))


@dataclass(frozen=True)
class EngineConfig:
    model: str = DEFAULT_MODEL
    dtype: str = "auto"
    device: str | None = None
    load_format: str = "auto"  # auto | safetensors | gguf | dummy
    seed: int = 0
    max_model_len: int | None = None
    tokenizer: str | None = None
    cache: CacheConfig = field(default_factory=CacheConfig)
    scheduler: SchedulerConfig = field(default_factory=SchedulerConfig)


DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = 8000
DEFAULT_MAX_WAITING_REQUESTS = 256


@dataclass(frozen=True)
class ServerConfig:
    host: str = DEFAULT_HOST
    port: int = DEFAULT_PORT
    api_key: str | None = None
    served_model_name: str | None = None  # defaults to the --model argument
    # Admission: requests beyond max_num_seqs running + this many waiting get 429 with Retry-After.
    max_waiting_requests: int = DEFAULT_MAX_WAITING_REQUESTS
    # SIGTERM: stop accepting, let in-flight requests finish for at most this long, then exit.
    drain_timeout_s: float = 30.0

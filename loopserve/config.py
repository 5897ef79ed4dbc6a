"""One home for loopserve's defaults and the typed configs that cross module boundaries."""
from __future__ import annotations

import dataclasses
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
# Host-memory tier for retained sessions' blocks forced off the device (GPU only by default: on CPU
# "host memory" is where the cache already lives).
DEFAULT_GPU_HOST_KV_CACHE_BYTES = 4 << 30
# Head-of-line protection (see engine/scheduler.py): a prefill with more than this many tokens left
# counts as long, and while shorter work exists it gets at most a chunk of tokens a step: on CPU
# (SmolLM2-135M, 2 cores: ~2 ms a prompt token) 128 tokens add ~0.25 s to a step; on a GPU 1024
# tokens of an 8B model add ~25 ms.
DEFAULT_LONG_PROMPT_THRESHOLD = 1024
DEFAULT_LONG_PROMPT_CHUNK_CPU = 128
DEFAULT_LONG_PROMPT_CHUNK_GPU = 1024
# Agent sessions (X-Session-Id or `user`): how long a finished turn's blocks stay pinned when the
# request gives no hint, and the largest hint accepted.
DEFAULT_SESSION_RETENTION_S = 60.0
MAX_SESSION_RETENTION_S = 3600.0
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
    # Host-memory tier for retained sessions' blocks; None: DEFAULT_GPU_HOST_KV_CACHE_BYTES on GPU, 0 on CPU.
    host_kv_cache_bytes: int | None = None


@dataclass(frozen=True)
class SchedulerConfig:
    max_num_batched_tokens: int = DEFAULT_MAX_NUM_BATCHED_TOKENS
    max_num_seqs: int = DEFAULT_MAX_NUM_SEQS
    # Cap on the tokens one prefill may take in a step; None = DEFAULT_LONG_PREFILL_FRACTION of the budget.
    long_prefill_token_threshold: int | None = None
    max_model_len: int = DEFAULT_MAX_MODEL_LEN_CAP
    long_prompt_threshold: int = DEFAULT_LONG_PROMPT_THRESHOLD
    # None: DEFAULT_LONG_PROMPT_CHUNK_GPU on CUDA, DEFAULT_LONG_PROMPT_CHUNK_CPU elsewhere (the engine decides).
    long_prompt_chunk: int | None = None

    def long_chunk(self, on_gpu: bool = False) -> int:
        if self.long_prompt_chunk is not None:
            return max(1, self.long_prompt_chunk)
        return DEFAULT_LONG_PROMPT_CHUNK_GPU if on_gpu else DEFAULT_LONG_PROMPT_CHUNK_CPU

    def prefill_cap(self) -> int:
        if self.long_prefill_token_threshold is not None:
            return max(1, self.long_prefill_token_threshold)
        return max(1, int(self.max_num_batched_tokens * DEFAULT_LONG_PREFILL_FRACTION))


SPEC_METHODS = ("ngram", "draft_model", "lookahead")
DEFAULT_NUM_SPECULATIVE_TOKENS = 5
DEFAULT_PROMPT_LOOKUP_MIN = 2
DEFAULT_PROMPT_LOOKUP_MAX = 4
DEFAULT_LOOKAHEAD_NGRAM_SIZE = 4
DEFAULT_LOOKAHEAD_POOL_SIZE = 8
# Speculation is off for a whole step when more than this many requests are decoding: the extra
# verify tokens then cost more than they save (CPU runs out of compute first; a GPU can raise this).
# Below it the per-request length already shrinks with the batch (see loopserve/spec/adaptive.py).
DEFAULT_SPEC_DISABLE_BY_BATCH_SIZE = 16
# Per-request adaptive length: acceptance is an EWMA over verify passes; k maximises the expected
# tokens per pass, E(k) = (1 - a^(k+1)) / (1 - a), over its cost 1 + k * c, in one-token decode steps.
# VERIFY_TOKEN_COST is c at batch 1 (CPU, SmolLM2-135M: a 6-token verify costs ~1.5 decodes; a GPU is
# nearer 0.01); DRAFT_TOKEN_COST adds one draft step per proposed token. Below MIN_GAIN expected
# speedup the request stops speculating for REPROBE_INTERVAL steps, then tries again with one token.
DEFAULT_SPEC_ACCEPTANCE_EWMA = 0.3
DEFAULT_SPEC_INITIAL_ACCEPTANCE = 0.6
DEFAULT_SPEC_VERIFY_TOKEN_COST = 0.1
DEFAULT_SPEC_DRAFT_TOKEN_COST = 0.15
DEFAULT_SPEC_MIN_GAIN = 1.05
DEFAULT_SPEC_REPROBE_INTERVAL = 16


@dataclass(frozen=True)
class SpeculativeConfig:
    """Speculative decoding, vLLM-style: `SpeculativeConfig.from_dict({"method": "ngram", ...})`."""
    method: str
    num_speculative_tokens: int = DEFAULT_NUM_SPECULATIVE_TOKENS  # k: the most tokens proposed per step
    # ngram: match the longest suffix of prompt + output of this many tokens against earlier text.
    prompt_lookup_min: int = DEFAULT_PROMPT_LOOKUP_MIN
    prompt_lookup_max: int = DEFAULT_PROMPT_LOOKUP_MAX
    # draft_model: a smaller model with the target's tokenizer (alias or path), its own KV pool.
    model: str | None = None
    draft_load_format: str = "auto"
    draft_num_blocks: int | None = None  # None: as many blocks as the target's pool
    # lookahead: n-gram size of the pool built from Jacobi trajectories, n-grams kept per first token.
    lookahead_ngram_size: int = DEFAULT_LOOKAHEAD_NGRAM_SIZE
    lookahead_pool_size: int = DEFAULT_LOOKAHEAD_POOL_SIZE
    # Adaptive length and switching off (see the DEFAULT_SPEC_* notes above).
    adaptive: bool = True
    disable_by_batch_size: int = DEFAULT_SPEC_DISABLE_BY_BATCH_SIZE
    acceptance_ewma: float = DEFAULT_SPEC_ACCEPTANCE_EWMA
    initial_acceptance: float = DEFAULT_SPEC_INITIAL_ACCEPTANCE
    verify_token_cost: float = DEFAULT_SPEC_VERIFY_TOKEN_COST  # < 1
    draft_token_cost: float = DEFAULT_SPEC_DRAFT_TOKEN_COST
    min_gain: float = DEFAULT_SPEC_MIN_GAIN
    reprobe_interval: int = DEFAULT_SPEC_REPROBE_INTERVAL

    def __post_init__(self) -> None:
        def check(ok: bool, name: str, allowed: str) -> None:
            if not ok:
                raise ValueError(f"speculative_config.{name} must be {allowed}, got {getattr(self, name)!r}")

        def is_int(v) -> bool:
            return isinstance(v, int) and not isinstance(v, bool)

        def is_num(v) -> bool:
            return isinstance(v, (int, float)) and not isinstance(v, bool)

        check(self.method in SPEC_METHODS, "method", f"one of {', '.join(SPEC_METHODS)}")
        check(is_int(self.num_speculative_tokens) and 1 <= self.num_speculative_tokens <= 64,
              "num_speculative_tokens", "an integer in [1, 64]")
        check(is_int(self.prompt_lookup_min) and self.prompt_lookup_min >= 1, "prompt_lookup_min", "an integer >= 1")
        check(is_int(self.prompt_lookup_max) and self.prompt_lookup_max >= self.prompt_lookup_min,
              "prompt_lookup_max", f"an integer >= prompt_lookup_min ({self.prompt_lookup_min})")
        if self.method == "draft_model":
            check(isinstance(self.model, str) and bool(self.model), "model",
                  "a draft model alias or path (required with method 'draft_model')")
        else:
            check(self.model is None, "model", f"unset with method {self.method!r} (only 'draft_model' uses it)")
        check(self.draft_load_format in ("auto", "safetensors", "gguf", "dummy"), "draft_load_format",
              "one of auto, safetensors, gguf, dummy")
        check(self.draft_num_blocks is None or (is_int(self.draft_num_blocks) and self.draft_num_blocks >= 1),
              "draft_num_blocks", "None or an integer >= 1")
        check(is_int(self.lookahead_ngram_size) and 2 <= self.lookahead_ngram_size <= 16,
              "lookahead_ngram_size", "an integer in [2, 16]")
        check(is_int(self.lookahead_pool_size) and self.lookahead_pool_size >= 1, "lookahead_pool_size",
              "an integer >= 1")
        check(isinstance(self.adaptive, bool), "adaptive", "true or false")
        check(is_int(self.disable_by_batch_size) and self.disable_by_batch_size >= 1, "disable_by_batch_size",
              "an integer >= 1")
        check(is_num(self.acceptance_ewma) and 0.0 < self.acceptance_ewma <= 1.0, "acceptance_ewma", "in (0, 1]")
        check(is_num(self.initial_acceptance) and 0.0 <= self.initial_acceptance <= 1.0, "initial_acceptance",
              "in [0, 1]")
        check(is_num(self.verify_token_cost) and 0.0 <= self.verify_token_cost < 1.0, "verify_token_cost",
              "in [0, 1)")
        check(is_num(self.draft_token_cost) and self.draft_token_cost >= 0.0, "draft_token_cost", ">= 0")
        check(is_num(self.min_gain) and self.min_gain > 0.0, "min_gain", "> 0")
        check(is_int(self.reprobe_interval) and self.reprobe_interval >= 1, "reprobe_interval", "an integer >= 1")

    @classmethod
    def from_dict(cls, d: "dict | SpeculativeConfig | None") -> "SpeculativeConfig | None":
        """A vLLM-style `speculative_config` dict (or None / an instance) -> SpeculativeConfig."""
        if d is None or isinstance(d, SpeculativeConfig):
            return d
        if not isinstance(d, dict):
            raise ValueError(f"speculative_config must be a dict, got {type(d).__name__}")
        allowed = [f.name for f in dataclasses.fields(cls)]
        unknown = sorted(set(d) - set(allowed))
        if unknown:
            raise ValueError(f"speculative_config has unknown field(s) {', '.join(unknown)}; "
                             f"allowed: {', '.join(allowed)}")
        if "method" not in d:
            raise ValueError(f"speculative_config.method is required: one of {', '.join(SPEC_METHODS)}")
        return cls(**d)


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
    speculative: SpeculativeConfig | None = None  # `SpeculativeConfig.from_dict(json)` for a CLI flag
    attention_backend: str = "auto"  # auto (Triton on CUDA, torch elsewhere) | torch | triton
    # Decode steps replay CUDA graphs captured for DEFAULT_CUDA_GRAPH_BATCH_SIZES (up to max_num_seqs),
    # steps of up to DEFAULT_PREFILL_GRAPH_MAX_SEQS sequences and DEFAULT_PREFILL_GRAPH_TOKENS[-1] tokens
    # (prefills, extends, mixed) replay prefill graphs, larger mixed steps mixed-step graphs (below);
    # True runs every step eagerly (as vLLM's --enforce-eager).
    enforce_eager: bool = False
    # Overlap scheduling: step N+1 is scheduled and launched before step N's tokens are read back.
    # None: on for CUDA devices (off on CPU, whose forward does not run asynchronously); always off
    # with speculative decoding.
    overlap_scheduling: bool | None = None
    # Forwards of up to MAX_GEMV_ROWS tokens (batch 1-4 decode) can run each layer as four Triton GEMVs
    # with the RMSNorms, the SiLU-mul and the residual adds fused in (model/gemv.py) instead of cuBLAS and
    # small kernels. "auto": each CUDA-graph decode batch size up to MAX_GEMV_ROWS is captured both ways
    # and timed at startup, and the faster graph kept (eager forwards follow the choice of the sizes from
    # 1 up); without CUDA graphs, off. "on" / "off": always / never. On CPU "on" needs Triton's
    # interpreter (tests only). With graphs ("auto" or "on"), each role's GEMV (qkv, o, gate_up, down) is
    # first tuned at startup: the kernel's candidate tiles and cuBLAS with separate kernels, timed over
    # all layers (runner/gemv_tuning.py). The first GEMV (H200, sixth session) ran at 2.1 TB/s against
    # cuBLAS's 3.7; "auto" keeps whichever is faster on the card at hand.
    fused_decode_gemv: str = "auto"
    # On Hopper and later, the decode attention and fused GEMV kernels launch with programmatic dependent
    # launch: each may start while the kernel before it finishes, reading weights (and old K/V) before it
    # waits for that kernel's output. False launches them plainly: the A/B baseline, and the way around a
    # driver that cannot capture such launches (the runner also falls back by itself if capture fails).
    programmatic_dependent_launch: bool = True
    # With more than DEFAULT_PREFILL_GRAPH_MAX_SEQS running sequences, steps of decodes beside at most
    # DEFAULT_MIXED_GRAPH_MAX_PROMPTS prompt chunks (and up to DEFAULT_MIXED_GRAPH_TOKENS[-1] tokens)
    # replay mixed-step graphs too: a busy server's steady state, otherwise launched eagerly at ~0.5 ms
    # of host time a layer.
    # False runs them eagerly: the A/B baseline.
    mixed_step_graphs: bool = True

    def __post_init__(self) -> None:
        if self.fused_decode_gemv not in FUSED_DECODE_GEMV_MODES:
            raise ValueError(f"fused_decode_gemv must be one of {', '.join(FUSED_DECODE_GEMV_MODES)}, "
                             f"got {self.fused_decode_gemv!r}")


FUSED_DECODE_GEMV_MODES = ("auto", "on", "off")


# Batch sizes captured as CUDA graphs for decode steps; a batch runs in the smallest graph that fits it
# (padding rows write to a scratch KV block). Larger batches run eagerly.
DEFAULT_CUDA_GRAPH_BATCH_SIZES = (1, 2, 4, 8, 16, 24, 32, 48, 64, 96, 128, 160, 192, 256)
# Token counts captured as CUDA graphs for steps with new prompt tokens (a step runs in the smallest
# graph with at least its tokens; padding is under half the step). An eager forward of a
# short prefill costs ~25 ms of host launches on an 8B model; past 2,048 tokens the device time
# (~30 ms and up) hides the launches, so larger steps run eagerly.
DEFAULT_PREFILL_GRAPH_TOKENS = (16, 32, 64, 128, 192, 256, 384, 512, 768, 1024, 1536, 2048)
# Sequence slots of a prefill graph: an agent turn's extend, with a few other sessions' decodes beside it.
DEFAULT_PREFILL_GRAPH_MAX_SEQS = 8
# Mixed-step graphs (EngineConfig.mixed_step_graphs): slots for max_num_seqs sequences, at most
# DEFAULT_MIXED_GRAPH_MAX_PROMPTS of them prompts. A busy server's step is hundreds of decodes beside a
# prompt chunk or two (~0.9 new prompts a step in ShareGPT-like saturation: bench/step_mix.py); the extend
# kernel's grid covers every prompt slot, and a slot without a prompt costs a layer ~Hq x T / 64
# programs that exit at once. Its GEMMs are compute-bound, so every padding token costs what a real one does,
# and past 256 tokens the ladder steps by 64 (mean padding ~32 tokens, ~3 % of such a step's ~1,070;
# each graph adds ~0.1 s of capture at startup on an 8B model).
DEFAULT_MIXED_GRAPH_MAX_PROMPTS = 4
DEFAULT_MIXED_GRAPH_TOKENS = tuple(sorted({*DEFAULT_PREFILL_GRAPH_TOKENS, *range(256, 2049, 64)}))


@dataclass(frozen=True)
class StepGraphSpec:
    """One set of CUDA graphs for steps with prompt tokens (runner/cuda_graphs.py: PrefillGraphs): a
    graph per token count, each with max_seqs sequence slots of which at most max_prompts hold
    multi-token sequences."""
    token_sizes: tuple[int, ...]
    max_seqs: int
    max_prompts: int

    @property
    def variants(self) -> tuple[bool, ...]:
        """With 1-token rows, and without: a set with fewer prompt slots than sequence slots has only
        the first (a step of more sequences than prompt slots has some)."""
        return (True, False) if self.max_prompts == self.max_seqs else (True,)

    def holds(self, num_tokens: int, num_seqs: int, num_prompts: int, with_single: bool) -> bool:
        """Whether a step of this shape fits one of the set's graphs."""
        return (num_tokens <= self.token_sizes[-1] and num_seqs <= self.max_seqs and num_prompts <= self.max_prompts
                and with_single in self.variants)

DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = 8000
DEFAULT_MAX_WAITING_REQUESTS = 256
# Token ids of prompt segments kept for later turns (model/prompt_encoder.py): ~40 bytes a token.
DEFAULT_PROMPT_SEGMENT_CACHE_TOKENS = 1 << 20


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
    # Tool-call format of the model's output (loopserve.tools.PARSERS); None: chosen from the chat template.
    tool_call_parser: str | None = None
    # <think> reasoning split into reasoning_content (loopserve.tools.reasoning.REASONING_PARSERS); None: off.
    reasoning_parser: str | None = None
    # Agent sessions: seconds a finished turn's KV stays pinned when the request gives no hint (0: off).
    session_retention_s: float = DEFAULT_SESSION_RETENTION_S
    # Prompts reuse the token ids of segments (chat messages) an earlier request held (0: tokenize whole texts).
    prompt_segment_cache_tokens: int = DEFAULT_PROMPT_SEGMENT_CACHE_TOKENS

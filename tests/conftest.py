"""Shared fixtures: tiny random-weight models saved as HF folders with a locally trained tokenizer."""
from __future__ import annotations

import contextlib
import os
import sys
from pathlib import Path

import pytest
import torch

if not torch.cuda.is_available():
    # Triton kernels run in its interpreter on CPU tensors. @triton.jit reads this when a kernel is
    # defined, i.e. when its module is first imported, so it must be set before any test imports one.
    os.environ.setdefault("TRITON_INTERPRET", "1")

CHAT_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)

CORPUS = [
    "The quick brown fox jumps over the lazy dog. 0123456789",
    "def add(a, b):\n    return a + b\n",
    '{"name": "loopserve", "tools": ["search", "read_file"], "ok": true}',
    "Agents make many sequential calls over long shared prompts.",
    "héllo wörld — ünïcode ✓ 日本語 🙂",
] * 20


def build_tokenizer(out_dir: Path, vocab_size: int = 320):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(CORPUS, trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|im_end|>", bos_token="<|endoftext|>",
                                   pad_token="<|endoftext|>", unk_token="<|endoftext|>")
    fast.chat_template = CHAT_TEMPLATE
    fast.save_pretrained(out_dir)
    return fast


def build_tiny_model(out_dir: Path, arch: str = "llama", seed: int = 0, **overrides) -> Path:
    """Save a tiny random model of `arch` (llama | mistral | qwen2 | qwen3) with a tokenizer into out_dir."""
    import transformers

    out_dir.mkdir(parents=True, exist_ok=True)
    tok = build_tokenizer(out_dir)
    common = dict(vocab_size=max(384, len(tok)), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024,
                  # Large init so logits are peaked: greedy tests must not hinge on near-ties.
                  initializer_range=0.3, eos_token_id=tok.eos_token_id, bos_token_id=tok.bos_token_id,
                  tie_word_embeddings=False)
    common.update(overrides)
    cls = {"llama": (transformers.LlamaConfig, transformers.LlamaForCausalLM),
           "mistral": (transformers.MistralConfig, transformers.MistralForCausalLM),
           "qwen2": (transformers.Qwen2Config, transformers.Qwen2ForCausalLM),
           "qwen3": (transformers.Qwen3Config, transformers.Qwen3ForCausalLM)}[arch]
    if arch == "qwen3":
        common.setdefault("head_dim", 16)
    torch.manual_seed(seed)
    model = cls[1](cls[0](**common)).eval()
    model.save_pretrained(out_dir, safe_serialization=True)
    return out_dir


@pytest.fixture(scope="session")
def tiny_llama(tmp_path_factory) -> Path:
    return build_tiny_model(tmp_path_factory.mktemp("tiny-llama"), "llama")


@pytest.fixture(scope="session")
def smollm2_gguf() -> Path:
    from loopserve.fetch import ensure_model
    return ensure_model("smollm2")


def pytest_addoption(parser):
    parser.addoption("--device", default="cpu", help="device for engine tests (bench/gpu_check.sh passes cuda)")


@pytest.fixture(scope="session")
def device(request) -> str:
    dev = request.config.getoption("--device")
    if dev.startswith("cuda") and not torch.cuda.is_available():
        pytest.skip("--device cuda given but no GPU is available")
    return dev


@pytest.fixture
def make_llm(tiny_llama, device):
    """Build LLMs over the tiny model; after the test every one must have its whole block pool back
    (the draft model's too, with speculative decoding)."""
    from loopserve import LLM

    made = []

    def factory(**kw):
        kw.setdefault("num_kv_blocks", 256)
        kw.setdefault("block_size", 4)
        kw.setdefault("device", device)
        kw.setdefault("dtype", "fp32")
        # Tests compare LLMs token for token; "auto" would pick each one's decode GEMV by a startup
        # timing (its own test asks for it).
        kw.setdefault("fused_decode_gemv", "off")
        llm = LLM(str(kw.pop("model", tiny_llama)), **kw)
        made.append(llm)
        return llm

    yield factory
    for llm in made:
        assert llm.stats().num_running == 0 and llm.stats().num_waiting == 0
        llm.engine.scheduler.retention.release_all()  # session pins are the only blocks allowed to stay held
        stats = llm.stats()
        assert stats.num_free_blocks == stats.num_blocks, "KV blocks leaked"
        if llm.engine._structured is not None:
            assert not llm.engine._structured._pending, "grammar state leaked"
        spec = llm.engine.spec
        if spec is not None:
            assert not spec.states, "adaptive state leaked"
            kv = getattr(spec.proposer, "kv", None)
            if kv is not None:
                assert kv.num_free_blocks == kv.num_blocks, "draft KV blocks leaked"
                assert not spec.proposer.seqs


# Tensor methods that bring values to the host: inside a CUDA graph capture each is a synchronisation
# the capture refuses, or a value frozen into every replay.
_HOST_READS = ("item", "tolist", "cpu", "numpy", "nonzero", "__bool__", "__int__", "__float__", "__index__")


@contextlib.contextmanager
def host_round_trips_refused():
    """Within: loopserve code that reads a tensor's values on the host (_HOST_READS) or uploads host
    data (`to_device`) raises. A static forward of the step graphs runs so on CPU, where nothing is
    captured, to show the GPU capture would take it: an upload would be captured as a copy from a
    pinned buffer that later steps reuse, and a host read cannot be captured at all. Only calls made
    directly from loopserve's modules count (Triton's interpreter reads its arguments on the host)."""
    import loopserve.attention.triton_backend as triton_backend

    saved = {name: getattr(torch.Tensor, name) for name in _HOST_READS}
    own = {name for name in _HOST_READS if name in vars(torch.Tensor)}  # the rest come from torch's C base

    def refused(name, method):
        def guarded(*args, **kwargs):
            if sys._getframe(1).f_globals.get("__name__", "").startswith("loopserve"):
                raise AssertionError(f"Tensor.{name} in a static forward: a host round trip a CUDA graph cannot hold")
            return method(*args, **kwargs)
        return guarded

    def upload(*args, **kwargs):
        raise AssertionError("to_device in a static forward: a CUDA graph would replay the upload of a stale buffer")

    saved_upload = triton_backend.to_device
    try:
        for name, method in saved.items():
            setattr(torch.Tensor, name, refused(name, method))
        triton_backend.to_device = upload
        yield
    finally:
        for name, method in saved.items():
            if name in own:
                setattr(torch.Tensor, name, method)
            else:
                delattr(torch.Tensor, name)
        triton_backend.to_device = saved_upload


class StandInTimer:
    """A startup tuner's time_fn for CPU tests, where nothing is timed. Each call runs every candidate
    once as its timing graph would capture it (no host round trips), checks that all agree with the
    first, and ranks them: call i's fastest is candidate fastest(i, n) of n, the rest slower in
    candidate order. `calls` holds each call's (candidates, rows of the first one's result)."""

    def __init__(self, fastest):
        self.fastest = fastest
        self.calls: list[tuple[int, int]] = []

    def __call__(self, fns):
        with host_round_trips_refused():
            outs = [fn().clone() for fn in fns]  # candidates may share an output buffer
        for out in outs[1:]:
            torch.testing.assert_close(out, outs[0], atol=1e-5, rtol=1e-5)
        best = self.fastest(len(self.calls), len(fns))
        self.calls.append((len(fns), outs[0].shape[0]))
        return [0.5 if j == best else 1.0 + j for j in range(len(fns))]

    @property
    def candidates(self) -> list[int]:
        return [n for n, _ in self.calls]


@pytest.fixture
def with_prefill_graphs():
    """Give an eager Triton LLM step graph sets built (not captured: what a capture records, run as a
    replay is fed) over a pool grown by a scratch block, tried in order as the runner's are; returns
    the (set index, tokens, variant) each step used. `max_prompts` (None: every slot) applies to the
    last set; the others have a prompt slot per sequence slot."""

    def attach(llm, sizes: list[int], max_seqs: int | list[int], max_prompts: int | None = None
               ) -> list[tuple[int, int, bool]]:
        from loopserve.attention.metadata import KVCache
        from loopserve.config import StepGraphSpec
        from loopserve.runner.cuda_graphs import PrefillGraphs

        runner = llm.engine.runner
        runner.kv_caches = [KVCache(torch.cat([c.key, c.key[:1]]), torch.cat([c.value, c.value[:1]]), c.heads_outer)
                            for c in runner.kv_caches]
        scratch = runner.kv_caches[0].key.shape[0] - 1
        max_blocks = -(-llm.engine.max_model_len // runner.block_size)
        slots = max_seqs if isinstance(max_seqs, list) else [max_seqs]
        served = []
        runner.step_graphs = []
        for k, s in enumerate(slots):
            prompts = max_prompts if k == len(slots) - 1 and max_prompts is not None else s
            graphs = PrefillGraphs(runner.model, runner.kv_caches, runner.backend,
                                   StepGraphSpec(tuple(sizes), s, prompts), max_blocks,
                                   scratch_block=scratch, device=runner.device)

            def forward(t, with_single, k=k, orig=graphs.forward):
                served.append((k, t, with_single))
                with host_round_trips_refused():
                    return orig(t, with_single)

            graphs.forward = forward
            runner.step_graphs.append(graphs)
        return served

    return attach


@pytest.fixture
def with_decode_graphs():
    """Give an eager Triton LLM decode graphs built (not captured: each step runs the static forward a
    replay would, on the padded static buffers) over a pool grown by a scratch block; returns the
    (graph size, whether a pending token came from the step before) of each step they served."""

    def attach(llm, sizes: list[int]) -> list[int]:
        from loopserve.attention.metadata import KVCache
        from loopserve.runner.cuda_graphs import DecodeGraphs

        runner = llm.engine.runner
        runner.kv_caches = [KVCache(torch.cat([c.key, c.key[:1]]), torch.cat([c.value, c.value[:1]]), c.heads_outer)
                            for c in runner.kv_caches]
        scratch = runner.kv_caches[0].key.shape[0] - 1
        max_blocks = -(-llm.engine.max_model_len // runner.block_size)
        graphs = DecodeGraphs(runner.model, runner.kv_caches, runner.backend, sizes, max_blocks,
                              scratch_block=scratch, device=runner.device)
        served = []
        orig, static_forward = graphs.run, graphs._forward

        def run(inputs, prev_tokens):
            served.append((next(b for b in graphs.sizes if b >= len(inputs.seq_lens)), prev_tokens is not None))
            return orig(inputs, prev_tokens)

        def forward(b):
            with host_round_trips_refused():
                return static_forward(b)

        graphs.run, graphs._forward = run, forward
        runner.graphs = graphs
        return served

    return attach

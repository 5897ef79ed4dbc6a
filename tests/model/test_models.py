"""loopserve's model code against transformers: same weights in, same logits out.

Tiny random models of every supported architecture are saved with transformers, loaded back by
loopserve, and run through the paged attention path (blocks of 4 scattered over the pool).
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
import transformers

from loopserve.attention import AttentionMetadata, ForwardBatch, KVCache, TorchPagedAttention
from loopserve.model import (SUPPORTED_ARCHITECTURES, CausalLM, load_model, load_model_config,
                             load_tokenizer, model_config_from_hf)

ATOL = 1e-4
BLOCK_SIZE = 4
# Deliberately out of order and non-contiguous: a sequence's blocks are wherever the pool had room.
BLOCK_TABLE = [9, 2, 14, 5, 11, 0, 7, 3]
NUM_BLOCKS = 16
SEQ_LEN = 21            # 20-token prefill + 1 decode

TINY = dict(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
            rms_norm_eps=1e-5, tie_word_embeddings=False, bos_token_id=1, eos_token_id=2)

HF_CLASSES = {
    "llama": (transformers.LlamaConfig, transformers.LlamaForCausalLM),
    "mistral": (transformers.MistralConfig, transformers.MistralForCausalLM),
    "qwen2": (transformers.Qwen2Config, transformers.Qwen2ForCausalLM),
    "qwen3": (transformers.Qwen3Config, transformers.Qwen3ForCausalLM),
}


def build_hf(family: str, seed: int = 0, **overrides) -> transformers.PreTrainedModel:
    """A tiny fp32 transformers model whose every weight (norms and biases too) is random, so a
    misplaced norm, bias or fused slice changes the logits."""
    cfg_cls, model_cls = HF_CLASSES[family]
    torch.manual_seed(seed)
    model = model_cls(cfg_cls(**{**TINY, **overrides})).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.copy_(1 + 0.2 * torch.randn_like(p))
            else:
                p.normal_(0.0, 0.08)
    return model


def save_hf(model: transformers.PreTrainedModel, folder: Path, **kw) -> Path:
    model.save_pretrained(folder, **kw)
    return folder


def hf_logits(model: transformers.PreTrainedModel, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(ids[None]).logits[0].float()


class PagedSequence:
    """Drives one sequence through a CausalLM step by step over a freshly allocated paged cache.

    Without an explicit block table the sequence gets blocks scattered over a pool twice its size.
    """

    def __init__(self, model: CausalLM, block_table: list[int] | None = None, max_len: int = 32):
        cfg = model.config
        if block_table is None:
            n = -(-max_len // BLOCK_SIZE)
            block_table = torch.randperm(2 * n, generator=torch.Generator().manual_seed(n), device="cpu")[:n].tolist()
        num_blocks = max(NUM_BLOCKS, max(block_table) + 1)
        shape = (num_blocks, BLOCK_SIZE, cfg.num_kv_heads, cfg.head_dim)
        dtype = model.model.embed_tokens.weight.dtype
        self.model, self.block_table = model, block_table
        self.caches = [KVCache(torch.zeros(shape, dtype=dtype), torch.zeros(shape, dtype=dtype))
                       for _ in range(cfg.num_layers)]
        self.backend = TorchPagedAttention()
        self.length = 0

    def meta(self, n: int) -> AttentionMetadata:
        positions = range(self.length, self.length + n)
        slots = [self.block_table[p // BLOCK_SIZE] * BLOCK_SIZE + p % BLOCK_SIZE for p in positions]
        return AttentionMetadata(
            query_start_loc=[0, n], seq_lens=[self.length + n],
            slot_mapping=torch.tensor(slots, dtype=torch.long),
            block_tables=torch.tensor([self.block_table], dtype=torch.long),
            decode_indices=[0] if n == 1 else [], prefill_indices=[] if n == 1 else [0])

    @torch.no_grad()
    def step(self, ids: torch.Tensor, out_rows: torch.Tensor | None = None) -> torch.Tensor:
        """Append ids (the next len(ids) tokens); return their logits [len(ids), vocab] (only out_rows')."""
        n = ids.shape[0]
        positions = torch.arange(self.length, self.length + n)
        batch = ForwardBatch(meta=self.meta(n), kv_caches=self.caches, backend=self.backend)
        hidden = self.model(ids, positions, batch, out_rows=out_rows)
        self.length += n
        return self.model.compute_logits(hidden)


def full_prefill_logits(model: CausalLM, ids: torch.Tensor) -> torch.Tensor:
    return PagedSequence(model, max_len=len(ids)).step(ids)


def token_ids(n: int = SEQ_LEN, vocab: int = TINY["vocab_size"], seed: int = 1) -> torch.Tensor:
    return torch.randint(0, vocab, (n,), generator=torch.Generator().manual_seed(seed))


# ---- tiny models of each architecture vs transformers -------------------------------------------

CASES = {
    "llama": ("llama", {}),
    "llama_bias": ("llama", {"attention_bias": True}),
    "mistral_tied": ("mistral", {"tie_word_embeddings": True}),
    "qwen2": ("qwen2", {}),
    "qwen3": ("qwen3", {"head_dim": 24}),   # head_dim != hidden/heads, as in real Qwen3
    "llama3_rope": ("llama", {"max_position_embeddings": 256, "rope_parameters": {
        "rope_type": "llama3", "rope_theta": 10000.0, "factor": 8.0, "low_freq_factor": 1.0,
        "high_freq_factor": 4.0, "original_max_position_embeddings": 64}}),
    "linear_rope": ("llama", {"rope_parameters": {"rope_type": "linear", "rope_theta": 500.0, "factor": 2.0}}),
}


@pytest.fixture(scope="module", params=list(CASES))
def pair(request, tmp_path_factory) -> tuple[transformers.PreTrainedModel, CausalLM, str]:
    family, overrides = CASES[request.param]
    hf = build_hf(family, **overrides)
    folder = save_hf(hf, tmp_path_factory.mktemp(request.param))
    ours, _ = load_model(folder)
    return hf, ours, request.param


def test_prefill_then_decode_matches_transformers(pair):
    hf, ours, _ = pair
    ids = token_ids()
    ref = hf_logits(hf, ids)
    seq = PagedSequence(ours, BLOCK_TABLE)
    prefill = seq.step(ids[:-1])
    decode = seq.step(ids[-1:])
    assert prefill.dtype == torch.float32 and prefill.shape == (SEQ_LEN - 1, TINY["vocab_size"])
    torch.testing.assert_close(prefill, ref[:-1], atol=ATOL, rtol=0)
    torch.testing.assert_close(decode, ref[-1:], atol=ATOL, rtol=0)


def test_chunked_prefill_matches_transformers(pair):
    hf, ours, _ = pair
    ids = token_ids(seed=2)
    ref = hf_logits(hf, ids)
    seq = PagedSequence(ours, BLOCK_TABLE)
    chunks = [seq.step(ids[:9]), seq.step(ids[9:])]   # second chunk starts mid-block
    torch.testing.assert_close(torch.cat(chunks), ref, atol=ATOL, rtol=0)


def test_last_layer_for_the_sampled_rows_only(pair):
    """out_rows: the last layer's o_proj / MLP and the final norm for those rows alone give their full
    forward's logits, and every row's K/V (the last layer's too) is still in the cache: the next turn's
    tokens match transformers' over the whole sequence."""
    hf, ours, _ = pair
    ids = token_ids(seed=3)
    ref = hf_logits(hf, ids)
    seq = PagedSequence(ours, BLOCK_TABLE)
    rows = torch.tensor([11, 0, 11])                     # any rows, in any order, repeats allowed
    torch.testing.assert_close(seq.step(ids[:12], out_rows=rows), ref[rows], atol=ATOL, rtol=0)
    assert seq.step(ids[12:16], out_rows=torch.tensor([], dtype=torch.long)).shape == (0, TINY["vocab_size"])
    torch.testing.assert_close(seq.step(ids[16:]), ref[16:], atol=ATOL, rtol=0)


def test_config_fields(pair):
    hf, ours, case = pair
    c = ours.config
    assert c.architecture == type(hf).__name__
    assert (c.hidden_size, c.num_layers, c.num_heads, c.num_kv_heads) == (64, 2, 4, 2)
    assert c.head_dim == (24 if case == "qwen3" else 16)
    assert c.tie_word_embeddings == (case == "mistral_tied")
    assert c.attention_bias == (case in ("llama_bias", "qwen2"))
    assert c.qk_norm == (case == "qwen3")
    assert c.eos_token_ids == (2,) and c.bos_token_id == 1
    rope_type = (c.rope_scaling or {}).get("rope_type", "default")
    assert rope_type == {"llama3_rope": "llama3", "linear_rope": "linear"}.get(case, "default")


def test_two_sequences_in_one_flat_batch():
    """A decode and a prefill chunk of different sequences share one forward."""
    hf = build_hf("llama")
    ours = CausalLM(model_config_from_hf(hf.config.to_dict()))
    ours.load_weights(hf.state_dict().items())
    a, b = token_ids(12, seed=3), token_ids(10, seed=4)
    ref_a, ref_b = hf_logits(hf, a), hf_logits(hf, b)

    tables = [[3, 8, 1, 0], [6, 12, 4, 10]]
    seq_a = PagedSequence(ours, tables[0])
    seq_a.step(a[:11])                              # a's prompt; b then uses the same pool
    meta = AttentionMetadata(
        query_start_loc=[0, 1, 11], seq_lens=[12, 10],
        slot_mapping=torch.tensor([tables[0][11 // 4] * 4 + 11 % 4]
                                  + [tables[1][p // 4] * 4 + p % 4 for p in range(10)]),
        block_tables=torch.tensor(tables), decode_indices=[0], prefill_indices=[1])
    ids = torch.cat([a[11:], b])
    positions = torch.cat([torch.tensor([11]), torch.arange(10)])
    with torch.no_grad():
        logits = ours.compute_logits(ours(ids, positions, ForwardBatch(meta, seq_a.caches, seq_a.backend)))
    torch.testing.assert_close(logits[0], ref_a[-1], atol=ATOL, rtol=0)
    torch.testing.assert_close(logits[1:], ref_b, atol=ATOL, rtol=0)


def test_sharded_checkpoint(tmp_path):
    hf = build_hf("qwen2", seed=5)
    folder = save_hf(hf, tmp_path, max_shard_size="40KB")
    index = json.loads((folder / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 2
    ours, _ = load_model(folder, load_format="safetensors")
    ids = token_ids()
    torch.testing.assert_close(full_prefill_logits(ours, ids), hf_logits(hf, ids), atol=ATOL, rtol=0)


def test_bf16_weights_stay_bf16(tmp_path):
    folder = save_hf(build_hf("llama"), tmp_path)
    ours, _ = load_model(folder, dtype=torch.bfloat16)
    assert {p.dtype for p in ours.parameters()} == {torch.bfloat16}
    logits = full_prefill_logits(ours, token_ids())
    assert logits.dtype == torch.float32 and torch.isfinite(logits).all()


# ---- config parsing and errors ------------------------------------------------------------------

def _hf_dict(**kw) -> dict:
    base = {"architectures": ["LlamaForCausalLM"], "hidden_size": 64, "intermediate_size": 128,
            "num_hidden_layers": 2, "num_attention_heads": 4, "vocab_size": 256}
    return {**base, **kw}


def test_config_parsing_variants():
    c = model_config_from_hf(_hf_dict(rope_theta=5e5, eos_token_id=[7, 9],
                                      rope_scaling={"type": "linear", "factor": 4.0}))
    assert c.rope_theta == 5e5 and c.eos_token_ids == (7, 9) and c.num_kv_heads == 4 and c.head_dim == 16
    assert c.rope_scaling == {"rope_type": "linear", "factor": 4.0}
    c = model_config_from_hf(_hf_dict(rope_parameters={"rope_theta": 1e6, "rope_type": "default"}))
    assert c.rope_theta == 1e6 and c.rope_scaling is None and c.eos_token_ids == ()
    c = model_config_from_hf(_hf_dict(architectures=["Qwen2ForCausalLM"]))
    assert c.attention_bias and not c.qk_norm


def test_unknown_architecture(tmp_path):
    with pytest.raises(ValueError, match="GPT2LMHeadModel.*LlamaForCausalLM"):
        model_config_from_hf(_hf_dict(architectures=["GPT2LMHeadModel"]))
    (tmp_path / "config.json").write_text(json.dumps(_hf_dict(architectures=["FalconForCausalLM"])))
    with pytest.raises(ValueError, match="FalconForCausalLM"):
        load_model(tmp_path, load_format="dummy")
    assert set(SUPPORTED_ARCHITECTURES) == {"LlamaForCausalLM", "MistralForCausalLM",
                                            "Qwen2ForCausalLM", "Qwen3ForCausalLM"}


def test_unsupported_rope_type():
    cfg = model_config_from_hf(_hf_dict(rope_parameters={"rope_type": "yarn", "rope_theta": 1e4, "factor": 4.0}))
    with pytest.raises(ValueError, match="yarn"):
        CausalLM(cfg)


def test_missing_and_unknown_weights():
    hf = build_hf("llama")
    state = dict(hf.state_dict())
    ours = CausalLM(model_config_from_hf(hf.config.to_dict()))
    partial = {k: v for k, v in state.items() if "layers.1.self_attn.k_proj" not in k}
    with pytest.raises(ValueError, match=r"missing.*layers\.1\.self_attn\.qkv_proj"):
        ours.load_weights(partial.items())
    with pytest.raises(ValueError, match="bogus"):
        ours.load_weights([*state.items(), ("model.layers.0.bogus.weight", torch.zeros(1))])
    with pytest.raises(ValueError, match="shape"):
        ours.load_weights([("model.norm.weight", torch.zeros(3))])


def test_missing_files(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_model(tmp_path / "nope")
    with pytest.raises(FileNotFoundError, match="neither"):
        load_model(tmp_path)
    transformers.LlamaConfig(**TINY).save_pretrained(tmp_path)
    with pytest.raises(FileNotFoundError, match="dummy"):
        load_model(tmp_path)
    with pytest.raises(ValueError, match="load_format"):
        load_model(tmp_path, load_format="pickle")


def test_dummy_load_format(tmp_path):
    transformers.Qwen3Config(**TINY, head_dim=16).save_pretrained(tmp_path)
    model, cfg = load_model(tmp_path, load_format="dummy")
    assert cfg == load_model_config(tmp_path) and cfg.qk_norm
    assert torch.equal(model.model.norm.weight, torch.ones(64))
    assert torch.equal(model.model.layers[0].self_attn.q_norm.weight, torch.ones(16))
    w = model.model.layers[1].mlp.gate_up_proj.weight
    assert abs(w.std().item() - 0.02) < 0.002 and abs(w.mean().item()) < 0.002
    assert torch.isfinite(full_prefill_logits(model, token_ids())).all()


# ---- GGUF ---------------------------------------------------------------------------------------

_GGUF_BLOCK = {"input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm",
               "self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
               "self_attn.o_proj": "attn_output", "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up",
               "mlp.down_proj": "ffn_down"}


def llama_cpp_permute(w: np.ndarray, n_head: int) -> np.ndarray:
    """What llama.cpp's HF->GGUF converter does to Q/K rows (interleaved rotary halves)."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def gguf_name(hf: str) -> str:
    top = {"model.embed_tokens.weight": "token_embd.weight", "model.norm.weight": "output_norm.weight",
           "lm_head.weight": "output.weight"}
    if hf in top:
        return top[hf]
    _, _, layer, rest = hf.split(".", 3)
    module, kind = rest.rsplit(".", 1)
    return f"blk.{layer}.{_GGUF_BLOCK[module]}.{kind}"


def write_gguf(hf: transformers.PreTrainedModel, path: Path, quantize: dict[str, object] | None = None) -> Path:
    """A llama-architecture GGUF of `hf` the way llama.cpp lays it out; `quantize` maps GGUF tensor
    names to a GGMLQuantizationType to store them in."""
    import gguf
    c = hf.config
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_context_length(c.max_position_embeddings)
    w.add_embedding_length(c.hidden_size)
    w.add_block_count(c.num_hidden_layers)
    w.add_feed_forward_length(c.intermediate_size)
    w.add_head_count(c.num_attention_heads)
    w.add_head_count_kv(c.num_key_value_heads)
    w.add_layer_norm_rms_eps(c.rms_norm_eps)
    w.add_rope_freq_base(c.rope_parameters["rope_theta"])
    w.add_tokenizer_model("gpt2")
    w.add_token_list([f"<t{i}>" for i in range(c.vocab_size)])
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)
    for name, t in hf.state_dict().items():
        if name == "lm_head.weight" and c.tie_word_embeddings:
            continue
        arr = t.float().numpy()
        if ".q_proj." in name:
            arr = llama_cpp_permute(arr, c.num_attention_heads)
        elif ".k_proj." in name:
            arr = llama_cpp_permute(arr, c.num_key_value_heads)
        gname = gguf_name(name)
        qtype = (quantize or {}).get(gname)
        if qtype is None:
            w.add_tensor(gname, np.ascontiguousarray(arr))
        else:
            w.add_tensor(gname, gguf.quants.quantize(arr, qtype), raw_dtype=qtype)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


@pytest.mark.parametrize("tie", [False, True])
def test_gguf_round_trip(tmp_path, tie):
    hf = build_hf("llama", seed=3, tie_word_embeddings=tie, num_attention_heads=8, num_key_value_heads=2,
                  head_dim=8, rope_theta=50000.0)
    path = write_gguf(hf, tmp_path / "tiny.gguf")
    ours, cfg = load_model(path)
    assert cfg == load_model_config(tmp_path)   # a folder holding one .gguf works too
    assert cfg.tie_word_embeddings == tie and cfg.vocab_size == TINY["vocab_size"]
    assert (cfg.num_heads, cfg.num_kv_heads, cfg.head_dim, cfg.rope_theta) == (8, 2, 8, 50000.0)
    assert cfg.eos_token_ids == (2,) and cfg.bos_token_id == 1
    ids = token_ids()
    torch.testing.assert_close(full_prefill_logits(ours, ids), hf_logits(hf, ids), atol=ATOL, rtol=0)


def test_gguf_quantized_tensors(tmp_path):
    """Q8_0 / F16 tensors come back in HF [out, in] layout equal to what the quantizer kept."""
    import gguf
    Q = gguf.GGMLQuantizationType
    hf = build_hf("llama", seed=4)
    quant = {"blk.0.ffn_down.weight": Q.Q8_0, "blk.1.attn_q.weight": Q.Q8_0, "blk.0.attn_k.weight": Q.F16}
    ours, _ = load_model(write_gguf(hf, tmp_path / "q.gguf", quant), load_format="gguf")
    state = hf.state_dict()

    def roundtrip(arr: np.ndarray, qtype) -> torch.Tensor:
        return torch.from_numpy(gguf.quants.dequantize(gguf.quants.quantize(arr, qtype), qtype).reshape(arr.shape))

    down = state["model.layers.0.mlp.down_proj.weight"]             # [64, 128]: not square
    torch.testing.assert_close(ours.model.layers[0].mlp.down_proj.weight, roundtrip(down.numpy(), Q.Q8_0))
    q = state["model.layers.1.self_attn.q_proj.weight"]
    q_ours = ours.model.layers[1].self_attn.qkv_proj.weight[:64]
    # Quantization runs on the permuted rows; blocks lie within a row, so un-permuting commutes.
    torch.testing.assert_close(q_ours, roundtrip(q.numpy(), Q.Q8_0))
    assert (q_ours - q).abs().max() < 0.01
    k = state["model.layers.0.self_attn.k_proj.weight"]
    torch.testing.assert_close(ours.model.layers[0].self_attn.qkv_proj.weight[64:96], k.half().float())


# ---- the real SmolLM2-135M-Instruct GGUF --------------------------------------------------------

@pytest.fixture(scope="module")
def smollm2_tokenizer(smollm2_path):
    return load_tokenizer(smollm2_path)


def test_smollm2_tokenizer_splits_digits(smollm2_tokenizer):
    tok = smollm2_tokenizer
    for text in ["  42", "x = 1234\n    y = 56", "pi is 3.14159, in 2024."]:
        ids = tok.encode(text, add_special_tokens=False)
        pieces = [tok.decode([i]) for i in ids]
        digits = [p for p in pieces if any(ch.isdigit() for ch in p)]
        assert digits and all(len(p) == 1 for p in digits), pieces
        assert tok.decode(ids) == text
    assert tok.encode("  42", add_special_tokens=False)[-2:] == tok.convert_tokens_to_ids(["4", "2"])
    assert "<|im_start|>assistant" in tok.apply_chat_template([{"role": "user", "content": "hi"}],
                                                              tokenize=False, add_generation_prompt=True)


@pytest.mark.slow   # ~30 s on 2 CPU cores: two loads of a 135M model
def test_smollm2_greedy_matches_transformers(smollm2_path, smollm2_tokenizer):
    """The real GGUF through loopserve's whole engine gives transformers' greedy text."""
    from loopserve import LLM, SamplingParams

    tok = smollm2_tokenizer
    prompt = tok.apply_chat_template([{"role": "user", "content": "What is the capital of France?"}],
                                     tokenize=False, add_generation_prompt=True)
    ids = torch.tensor(tok.encode(prompt, add_special_tokens=False))
    n_new = 16

    llm = LLM(str(smollm2_path))
    cfg = llm.engine.model_config
    assert cfg.architecture == "LlamaForCausalLM" and cfg.tie_word_embeddings and cfg.num_layers == 30
    out = llm.generate({"prompt_token_ids": ids.tolist()},
                       SamplingParams(temperature=0, max_tokens=n_new, ignore_eos=True))[0].outputs[0]
    ours_new = out.token_ids
    ours = llm.engine.model

    hf = transformers.AutoModelForCausalLM.from_pretrained(
        str(smollm2_path.parent), gguf_file=smollm2_path.name, dtype=torch.float32).eval()
    with torch.no_grad():
        ref = hf.generate(ids[None], attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                          max_new_tokens=n_new, do_sample=False, eos_token_id=None, pad_token_id=2)
        ref_logits = hf(ids[None]).logits[0]
    torch.testing.assert_close(full_prefill_logits(ours, ids), ref_logits, atol=1e-3, rtol=0)
    assert ours_new == ref[0, len(ids):].tolist(), (tok.decode(ours_new), tok.decode(ref[0, len(ids):]))
    assert out.text == tok.decode(ref[0, len(ids):], skip_special_tokens=True)

"""Fixtures for speculative decoding: a target, a different draft with the same tokenizer, a model
whose greedy output loops (so n-gram lookup has something to find), and an LLM factory that checks
both KV pools (target and draft) are whole after each test."""
from pathlib import Path

import pytest

from tests.conftest import build_tiny_model


@pytest.fixture(scope="session")
def tiny_draft(tmp_path_factory) -> Path:
    # Same tokenizer and vocab as tiny_llama, different (smaller) weights: a real q != p.
    return build_tiny_model(tmp_path_factory.mktemp("tiny-draft"), "llama", seed=1, hidden_size=32,
                            intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                            num_key_value_heads=1)


@pytest.fixture(scope="session")
def near_draft(tiny_llama, tmp_path_factory) -> Path:
    """tiny_llama with a perturbed output layer: q close to p but not equal (partial acceptance)."""
    import shutil

    import torch
    from safetensors.torch import load_file, save_file

    out = tmp_path_factory.mktemp("tiny-near-draft")
    for f in tiny_llama.iterdir():
        shutil.copy(f, out / f.name)
    tensors = load_file(str(out / "model.safetensors"))
    gen = torch.Generator().manual_seed(3)
    w = tensors["lm_head.weight"]
    tensors["lm_head.weight"] = w + 0.5 * w.std() * torch.randn(w.shape, generator=gen)
    save_file(tensors, str(out / "model.safetensors"), metadata={"format": "pt"})
    return out


@pytest.fixture(scope="session")
def looping_model(tmp_path_factory) -> Path:
    """Attention and MLP outputs zeroed: next token = f(current token), so greedy text soon cycles."""
    from safetensors.torch import load_file, save_file

    out = build_tiny_model(tmp_path_factory.mktemp("tiny-loop"), "llama", seed=2)
    path = out / "model.safetensors"
    tensors = load_file(str(path))
    for name in tensors:
        if name.endswith(("o_proj.weight", "down_proj.weight")):
            tensors[name].zero_()
    save_file(tensors, str(path), metadata={"format": "pt"})
    return out

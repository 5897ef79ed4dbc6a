"""Find a model's config and weights on disk (HF folder, GGUF file, or neither) and build a CausalLM."""
from __future__ import annotations

import dataclasses
import json
from collections.abc import Iterator
from pathlib import Path

import torch

from loopserve.config import ModelConfig
from loopserve.model.gguf_loader import load_gguf, model_config_from_gguf, open_gguf
from loopserve.model.hf_config import eos_ids, model_config_from_hf
from loopserve.model.llama import CausalLM

LOAD_FORMATS = ("auto", "safetensors", "gguf", "dummy")
SAFETENSORS_INDEX = "model.safetensors.index.json"


def _single_gguf(folder: Path) -> Path | None:
    found = sorted(folder.glob("*.gguf"))
    if len(found) > 1:
        raise ValueError(f"{folder} holds several .gguf files ({', '.join(f.name for f in found)}); "
                         "pass the path of the one to load")
    return found[0] if found else None


def _safetensors_files(folder: Path) -> list[Path]:
    index = folder / SAFETENSORS_INDEX
    if index.exists():
        names = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        files = [folder / n for n in names]
        absent = [f.name for f in files if not f.exists()]
        if absent:
            raise FileNotFoundError(f"{index} lists shards that are not in {folder}: {', '.join(absent)}")
        return files
    return sorted(folder.glob("*.safetensors"))


def resolve_source(path: str | Path, load_format: str = "auto") -> tuple[str, Path]:
    """(format, location): location is the .gguf file for gguf, else the model folder.

    For `dummy` the format tells where the config comes from: the folder's config.json, or
    (with no config.json) the metadata of its single .gguf.
    """
    if load_format not in LOAD_FORMATS:
        raise ValueError(f"load_format must be one of {', '.join(LOAD_FORMATS)}; got {load_format!r}")
    p = Path(path).expanduser()
    if not p.exists():
        raise FileNotFoundError(f"model path {p} does not exist")

    if p.is_file():
        if load_format == "safetensors":
            raise ValueError(f"load_format='safetensors' needs a model folder, got the file {p}")
        if p.suffix != ".gguf" and load_format != "gguf":
            raise ValueError(f"{p} is not a .gguf file; pass an HF model folder or a .gguf file")
        return ("dummy" if load_format == "dummy" else "gguf"), p

    has_config = (p / "config.json").exists()
    if load_format == "dummy":
        if has_config:
            return "dummy", p
        gguf = _single_gguf(p)
        if gguf is None:
            raise FileNotFoundError(f"{p} has no config.json (or .gguf) to build a dummy model from")
        return "dummy", gguf
    if load_format == "gguf":
        gguf = _single_gguf(p)
        if gguf is None:
            raise FileNotFoundError(f"no .gguf file in {p}")
        return "gguf", gguf

    has_weights = bool(_safetensors_files(p)) if has_config else False
    if load_format == "safetensors" or (has_config and has_weights):
        if not has_config:
            raise FileNotFoundError(f"{p} has no config.json")
        if not has_weights:
            raise FileNotFoundError(f"{p} has no *.safetensors weights")
        return "safetensors", p
    gguf = _single_gguf(p)
    if gguf is not None:
        return "gguf", gguf
    if has_config:
        raise FileNotFoundError(f"{p} has a config.json but no *.safetensors weights "
                                "(use load_format='dummy' for random weights)")
    raise FileNotFoundError(f"{p} has neither config.json + *.safetensors nor a .gguf file")


def _hf_config(folder: Path) -> ModelConfig:
    config = model_config_from_hf(json.loads((folder / "config.json").read_text()))
    # Instruct models often list extra stop tokens (end of turn) only in generation_config.json.
    gen_path = folder / "generation_config.json"
    if gen_path.exists():
        extra = eos_ids(json.loads(gen_path.read_text()).get("eos_token_id"))
        merged = config.eos_token_ids + tuple(i for i in extra if i not in config.eos_token_ids)
        config = dataclasses.replace(config, eos_token_ids=merged)
    return config


def _config_at(location: Path) -> ModelConfig:
    if location.is_file():
        return model_config_from_gguf(open_gguf(location))
    return _hf_config(location)


def load_model_config(path: str | Path, load_format: str = "auto") -> ModelConfig:
    """The config `load_model(path, load_format)` would use; a folder with only config.json
    (no weights yet) is fine here, since the config alone is asked for."""
    try:
        _, location = resolve_source(path, load_format)
    except FileNotFoundError:
        if load_format != "auto":
            raise
        _, location = resolve_source(path, "dummy")
    return _config_at(location)


def iter_safetensors(folder: Path) -> Iterator[tuple[str, torch.Tensor]]:
    from safetensors import safe_open
    for file in _safetensors_files(folder):
        with safe_open(str(file), framework="pt", device="cpu") as f:  # memory-mapped
            for name in f.keys():
                yield name, f.get_tensor(name)


def empty_model(config: ModelConfig, dtype: torch.dtype, device: torch.device) -> CausalLM:
    """A CausalLM with uninitialized parameters allocated directly on `device`.

    Building on the meta device skips nn.Linear's random init (seconds for a big model) that
    would be overwritten anyway.
    """
    with torch.device("meta"):
        model = CausalLM(config, dtype=dtype)
    model.to_empty(device=device)
    model.rotary.reset_cache(device)
    return model


def load_model(path: str | Path, load_format: str = "auto", dtype: torch.dtype = torch.float32,
               device: torch.device | str = "cpu") -> tuple[CausalLM, ModelConfig]:
    fmt, location = resolve_source(path, load_format)
    device = torch.device(device)
    if fmt == "gguf":
        config, weights = load_gguf(location)
    else:
        config = _config_at(location)
        weights = iter_safetensors(location) if fmt == "safetensors" else None

    model = empty_model(config, dtype, device)
    if weights is None:
        model.init_dummy_weights()
    else:
        model.load_weights(weights)
    model.requires_grad_(False)
    return model.eval(), config

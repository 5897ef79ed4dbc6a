"""Model code and loading: HF folders (safetensors), GGUF files, or random (dummy) weights."""
from loopserve.model.hf_config import SUPPORTED_ARCHITECTURES, model_config_from_hf
from loopserve.model.llama import CausalLM
from loopserve.model.loader import load_model, load_model_config
from loopserve.model.tokenizer import load_tokenizer

__all__ = ["CausalLM", "SUPPORTED_ARCHITECTURES", "load_model", "load_model_config", "load_tokenizer",
           "model_config_from_hf"]

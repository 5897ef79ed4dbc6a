"""loopserve: a fast LLM inference engine and OpenAI-compatible server for agent workloads."""
from loopserve.sampling_params import SamplingParams

__all__ = ["LLM", "SamplingParams"]


def __getattr__(name):
    # LLM pulls in torch models and transformers; import it lazily so `loopserve fetch` stays light.
    if name == "LLM":
        from loopserve.llm import LLM
        return LLM
    raise AttributeError(name)

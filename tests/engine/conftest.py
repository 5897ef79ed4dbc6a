import pytest


@pytest.fixture
def make_llm(tiny_llama, device):
    """Build LLMs over the tiny model; after the test every one must have its whole block pool back."""
    from loopserve import LLM

    made = []

    def factory(**kw):
        kw.setdefault("num_kv_blocks", 256)
        kw.setdefault("block_size", 4)
        kw.setdefault("device", device)
        kw.setdefault("dtype", "fp32")
        llm = LLM(str(kw.pop("model", tiny_llama)), **kw)
        made.append(llm)
        return llm

    yield factory
    for llm in made:
        stats = llm.stats()
        assert stats.num_running == 0 and stats.num_waiting == 0
        assert stats.num_free_blocks == stats.num_blocks, "KV blocks leaked"

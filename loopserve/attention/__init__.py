from loopserve.attention.metadata import AttentionMetadata, ForwardBatch, KVCache
from loopserve.attention.torch_ref import TorchPagedAttention

__all__ = ["AttentionMetadata", "ForwardBatch", "KVCache", "TorchPagedAttention"]

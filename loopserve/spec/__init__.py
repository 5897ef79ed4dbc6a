"""Speculative decoding: proposers (n-gram lookup, draft model, lookahead), lossless verification,
adaptive proposal length, metrics. `SpecDecoder` ties them into EngineCore.step."""
from loopserve.spec.base import Proposal, Proposer
from loopserve.spec.metrics import SpecDecodeStats

__all__ = ["Proposal", "Proposer", "SpecDecodeStats"]

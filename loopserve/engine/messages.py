"""Typed messages between the API process and the engine process (pickled over ZMQ)."""
from __future__ import annotations

from dataclasses import dataclass

from loopserve.config import ModelConfig
from loopserve.engine.core import EngineOutput, EngineRequest, EngineStats


# API process -> engine
@dataclass
class AddRequests:
    requests: list[EngineRequest]  # the samples of one user request, added atomically


@dataclass
class AbortRequests:
    request_ids: list[str]


@dataclass
class StopRequests:
    """Samples the detokenizer ended on a stop string: finished as `stop`, not aborted."""
    request_ids: list[str]
    stop_reasons: list[str]


@dataclass
class Shutdown:
    pass


# engine -> API process
@dataclass
class EngineReady:
    model_path: str
    model_config: ModelConfig
    max_model_len: int
    num_blocks: int
    block_size: int
    dtype: str
    device: str


@dataclass
class EngineStep:
    outputs: list[EngineOutput]
    stats: EngineStats


@dataclass
class RequestFailed:
    request_id: str
    message: str


@dataclass
class EngineDead:
    message: str

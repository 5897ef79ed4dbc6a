"""A stream consumer that lags behind the engine still gets every update, the final one included.

(Regression: AsyncEngineClient.generate once checked the shared, cumulative RequestOutput for
`finished`, so a consumer several steps behind stopped early and lost the last deltas: SSE streams
ended without their finish_reason, typically while the server was draining.)
"""
from __future__ import annotations

import asyncio

from loopserve.config import EngineConfig
from loopserve.engine.client import AsyncEngineClient
from loopserve.engine.core import EngineOutput
from loopserve.engine.messages import EngineStep
from loopserve.engine.output_processor import OutputProcessor
from loopserve.sampling_params import SamplingParams


def test_lagging_consumer_gets_all_updates(tiny_llama):
    from loopserve.model import load_tokenizer

    tok = load_tokenizer(tiny_llama)

    async def main():
        client = AsyncEngineClient(EngineConfig(model=str(tiny_llama)))
        client.tokenizer, client.processor = tok, OutputProcessor(tok)
        sent = []

        async def fake_send(msg):
            sent.append(msg)

        client._send = fake_send
        gen = client.generate([5, 6, 7], SamplingParams(max_tokens=3, temperature=0), request_id="r")
        first = asyncio.ensure_future(gen.__anext__())
        await asyncio.sleep(0)  # the request is registered; now three steps land before any is read
        for i, finish in enumerate([None, None, "length"]):
            await client._on_step(EngineStep([EngineOutput("r", [40 + i], None, finish_reason=finish)], None))
        updates = [await first] + [u async for u in gen]
        assert [len(u.deltas) for u in updates] == [1, 1, 1]
        assert updates[-1].deltas[0].finish_reason == "length"
        assert [t for u in updates for t in u.deltas[0].token_ids] == [40, 41, 42]
        assert client.num_inflight == 0

    asyncio.run(main())

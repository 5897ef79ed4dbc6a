"""The startup heap freeze of a server process (engine/process.py freeze_startup_heap): the API app
built by run_server freezes it once its lifespan has started and unfreezes it at shutdown; an app
embedded in another process (these tests) leaves the collector alone."""
import asyncio
import gc
from types import SimpleNamespace

import pytest

pytest.importorskip("fastapi")

from loopserve.server.app import build_app  # noqa: E402


class _StartedClient:
    """What the app's lifespan reads of an engine client that has already started."""
    observer = None
    stats = None
    tokenizer = None
    dead = None
    max_model_len = 64
    config = SimpleNamespace(model="stub")
    ready = SimpleNamespace(num_blocks=8)

    async def shutdown(self) -> None:
        pass


@pytest.mark.parametrize("freeze", [True, False])
def test_the_server_app_freezes_its_startup_heap_while_it_serves(freeze):
    counts = []

    async def serve(app):
        async with app.router.lifespan_context(app):
            counts.append(gc.get_freeze_count())
        counts.append(gc.get_freeze_count())

    assert gc.get_freeze_count() == 0
    asyncio.run(serve(build_app(_StartedClient(), freeze_heap=freeze)))
    serving, after = counts
    assert (serving > 10_000) if freeze else serving == 0
    assert after == 0

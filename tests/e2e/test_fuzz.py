"""Schema fuzzing: schemathesis drives every GET/POST operation of the live server's own OpenAPI schema.

The server is a real `loopserve serve` subprocess on a tiny model, started with --max-model-len 256 so
no generated request can make much work (max_tokens itself cannot be bounded through the schema).
Checks: no response is a 5xx, and afterwards the server is healthy, idle and has every KV block back.
"""
from __future__ import annotations

import sys
import time
from collections import Counter
from pathlib import Path

import pytest

_ROOT = str(Path(__file__).resolve().parents[2])
if _ROOT not in sys.path:  # `tests.*` imports below, also when run as plain `pytest`
    sys.path.insert(0, _ROOT)

schemathesis = pytest.importorskip("schemathesis", reason="schemathesis is not installed (pip install -e '.[test]')")
from hypothesis import HealthCheck, Phase, given, settings  # noqa: E402
from hypothesis.errors import Unsatisfiable  # noqa: E402
from schemathesis.checks import not_a_server_error  # noqa: E402

from tests.conftest import build_tiny_model  # noqa: E402
from tests.e2e.server_proc import metric, pool_whole, start_server, wait_idle  # noqa: E402

API_KEY = "fuzz-test-key"
MAX_EXAMPLES = 25
GEN_CAP = 16  # positive generation requests ask for at most this many tokens (see _bound_generation)

pytestmark = pytest.mark.timeout(480)


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    model_dir = build_tiny_model(tmp_path_factory.mktemp("fuzz-model"), "llama")
    srv = start_server(model_dir, tmp_path_factory.mktemp("fuzz-logs"), max_model_len=256, api_key=API_KEY)
    try:
        yield srv
    finally:
        srv.stop()


@pytest.fixture(scope="module")
def api_schema(server):
    return schemathesis.openapi.from_url(server.base_url + "/openapi.json", headers=server.headers, timeout=30)


# Built by hand from the schema's operations rather than with `schemathesis.pytest.from_fixture(...)
# .parametrize()`: that wrapper sets `request.node._nodeid`, which pytest >= 9.2 no longer has.
def _operations(api_schema):
    ops = []
    for result in api_schema.get_all_operations():
        op = result.ok()  # raises on an operation the schema describes badly: that is a failure too
        if op.method.upper() in ("GET", "POST"):
            ops.append(op)
    return ops


def _bound_generation(case) -> None:
    """Keep valid generation requests short, so the whole run stays around two minutes on 2 CPU cores.

    A schema-valid chat/completions body usually omits max_tokens (= the rest of the 256-token context)
    or asks for up to 256, at ~10-20 engine steps a second here. Such values (None, or 17..256) become
    GEN_CAP; anything the server should reject (negative, 0, beyond the context, wrong types) is kept.
    """
    body = case.body
    if not isinstance(body, dict) or not case.operation.path.endswith("completions"):
        return
    for key in ("max_tokens", "max_completion_tokens"):
        value = body.get(key)
        if value is None and key == "max_completion_tokens":
            continue  # absent: max_tokens decides
        if value is None or (type(value) is int and GEN_CAP < value <= 256):
            body[key] = GEN_CAP


def test_no_server_errors(api_schema, server):
    from schemathesis import GenerationMode

    ops = _operations(api_schema)
    assert ops, "the schema lists no GET/POST operations"
    failures: list[str] = []
    counts: dict[str, int] = {}
    seconds: dict[str, float] = {}
    statuses: dict[str, Counter] = {}
    for op in ops:
        for mode, n in ((GenerationMode.POSITIVE, MAX_EXAMPLES), (GenerationMode.NEGATIVE, MAX_EXAMPLES // 2)):
            label = f"{op.label} [{mode.value}]"

            @settings(max_examples=n, deadline=None, database=None, derandomize=True,
                      phases=[Phase.explicit, Phase.generate], suppress_health_check=list(HealthCheck))
            @given(case=op.as_strategy(generation_mode=mode))
            def run(case):
                counts[label] = counts.get(label, 0) + 1
                if mode == GenerationMode.POSITIVE:
                    _bound_generation(case)
                resp = case.call_and_validate(base_url=server.base_url, headers=server.headers,
                                              checks=[not_a_server_error], timeout=120)
                statuses.setdefault(label, Counter())[resp.status_code] += 1

            t0 = time.monotonic()
            try:
                run()
            except Unsatisfiable:
                pass  # nothing to break: e.g. no negative input exists for an operation without parameters
            except Exception as e:  # noqa: BLE001 - report every operation, not just the first failure
                failures.append(f"{label}: {type(e).__name__}: {e}")
            seconds[label] = time.monotonic() - t0
            if server.proc.poll() is not None:
                pytest.fail(f"server died while fuzzing {label}:\n{server.log_tail()}")
    print("\nfuzzed (label: calls, seconds, statuses):")
    for k, t in seconds.items():
        print(f"  {k}: {counts.get(k, 0)}, {t:.1f}s, {dict(sorted(statuses.get(k, {}).items()))}")
    assert not failures, "\n\n".join(failures) + f"\n\nserver log tail:\n{server.log_tail(30)}"


def test_healthy_and_pool_whole_after_fuzz(server):
    assert server.proc.poll() is None, f"server died during fuzzing:\n{server.log_tail()}"
    with server.client() as c:
        assert c.get("/health").status_code == 200
    m = wait_idle(server, timeout=10, need_blocks=True)
    assert metric(m, "num_requests_running") == 0
    assert pool_whole(m)

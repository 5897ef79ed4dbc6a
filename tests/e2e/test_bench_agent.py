"""`loopserve bench agent` (bench/agent.py) against the tiny server: report keys and sane values, fan-out.

Runs in-process through the CLI's parser (`loopserve.cli.main`), which also finds bench/ in the checkout.
"""
from __future__ import annotations

import json

import pytest

from loopserve.cli import main as cli_main


def main(argv: list[str]) -> int:
    return cli_main(["bench", "agent", *argv])

COMMON = ["--system-tokens", "200", "--tool-result-tokens", "50", "--max-tokens", "4", "--tool-pause-s", "0",
          "--ignore-eos", "--no-progress"]


def run_bench(server, tiny_llama, out, *extra: str) -> dict:
    argv = ["--base-url", server.base_url, "--api-key", server.api_key, "--tokenizer", str(tiny_llama),
            "--out", str(out), *COMMON, *extra]
    assert main(argv) == 0
    return json.loads(out.read_text())


def test_agent_sessions(server, tiny_llama, tmp_path):
    out = tmp_path / "agent.json"
    r = run_bench(server, tiny_llama, out, "--sessions", "2", "--steps", "3", "--seed", "1")
    for key in ("step_latency_p50_s", "step_latency_p99_s", "ttft_p50_s", "ttft_p99_s", "ttft_cached_p50_s",
                "ttft_uncached_p50_s", "itl_mean_s", "session_wall_mean_s", "cached_prompt_token_ratio",
                "sessions", "steps", "workload", "rows", "by_step_index", "errors"):
        assert key in r, key
    assert (r["sessions"], r["steps"], r["errors"], r["requests"]) == (2, 3, 0, 6)
    assert len(r["rows"]) == 6 and all(row["ok"] and row["kind"] == "agent" for row in r["rows"])
    assert 0 < r["step_latency_p50_s"] <= r["step_latency_p99_s"]
    assert 0 < r["ttft_p50_s"] <= r["ttft_p99_s"]
    assert r["itl_mean_s"] > 0 and r["session_wall_mean_s"] > 0
    assert r["workload"]["system_tokens"] == 200 and r["workload"]["seed"] == 1
    # Each step resends the previous one's prompt: the server reports the shared prefix as cached.
    assert 0 < r["cached_prompt_token_ratio"] <= 1
    assert r["ttft_cached_p50_s"] is not None
    by_session: dict[str, list[int]] = {}
    for row in r["rows"]:
        by_session.setdefault(row["session"], []).append(row["prompt_tokens"])
    assert all(len(p) == 3 and p[0] < p[1] < p[2] for p in by_session.values())  # growing history
    assert [e["step"] for e in r["by_step_index"]] == [0, 1, 2]
    assert all(e["n"] == 2 and e["latency_p50_s"] > 0 for e in r["by_step_index"])
    kv = r["server_kv"]  # polled from loopserve's /metrics
    assert kv["total_blocks"] > 0 and 0 < kv["peak_used_blocks"] <= kv["total_blocks"]
    assert kv["session_retention_pins"] == 6  # every finished turn of a session is pinned
    png = out.with_suffix(".png")
    assert png.is_file() and png.stat().st_size > 1000 and png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_agent_fanout(server, tiny_llama, tmp_path):
    out = tmp_path / "fanout.json"
    r = run_bench(server, tiny_llama, out, "--sessions", "1", "--steps", "2", "--fanout", "2", "--seed", "2",
                  "--no-warmup")
    assert r["errors"] == 0 and r["requests"] == 6  # 2 orchestrator steps + 2 x 2 workers
    kinds = sorted(row["kind"] for row in r["rows"])
    assert kinds == ["orchestrator"] * 2 + ["worker"] * 4
    workers = [row for row in r["rows"] if row["kind"] == "worker"]
    assert {row["session"] for row in workers} == {"agent-2-0000-w0", "agent-2-0000-w1"}
    # Workers branch off the orchestrator's prefix, so most of their prompt is a cache hit.
    assert all(row["cached_tokens"] > 0 for row in workers)
    assert r["by_step_index"][0]["worker_n"] == 2 and r["cached_prompt_token_ratio"] > 0
    assert out.with_suffix(".png").stat().st_size > 0
    # The second worker diverges from the first inside a block: it copies that block (copy-on-write).
    assert r["server_kv"]["kv_cow_tokens"] > 0


def test_agent_head_of_line_mode(server, tiny_llama, tmp_path):
    out = tmp_path / "hol.json"
    r = run_bench(server, tiny_llama, out, "--sessions", "2", "--steps", "3", "--seed", "3", "--no-warmup",
                  "--long-prompt-tokens", "300", "--long-prompt-at-s", "0", "--hol-baseline", "--no-plot")
    cmp_ = r["head_of_line_comparison"]
    assert cmp_["short_ttft_p99_without_s"] > 0 and cmp_["short_ttft_p99_with_s"] > 0
    # The ratio is rounded (3 places) from the unrounded p99s, the p99s themselves to the microsecond.
    assert cmp_["p99_ratio"] == pytest.approx(cmp_["short_ttft_p99_with_s"] / cmp_["short_ttft_p99_without_s"],
                                              abs=6e-4)
    assert cmp_["long_prompt_ttft_s"] > 0
    assert r["baseline"]["workload"]["long_prompt_tokens"] == 0 and r["baseline"]["requests"] == 6
    assert sum(row["kind"] == "long_prompt" for row in r["rows"]) == 1


def test_agent_server_errors_are_recorded(server, tmp_path):
    """A wrong API key: every step fails with HTTP 401, the run finishes and counts them."""
    out = tmp_path / "errors.json"
    argv = ["--base-url", server.base_url, "--api-key", "wrong", "--model", server.model, "--out", str(out),
            "--sessions", "1", "--steps", "2", "--no-warmup", "--no-plot", *COMMON]
    assert main(argv) == 1  # nothing succeeded
    r = json.loads(out.read_text())
    assert r["errors"] == 2 and r["ok"] == 0 and "HTTP 401" in r["error_samples"][0]


def test_agent_churn_runs_beside_the_sessions(server, tiny_llama, tmp_path):
    out = tmp_path / "churn.json"
    r = run_bench(server, tiny_llama, out, "--sessions", "1", "--steps", "3", "--seed", "4", "--no-warmup",
                  "--no-plot", "--churn-concurrency", "1", "--churn-tokens", "60", "--tool-pause-s", "0.2")
    assert r["requests"] == 3 and r["errors"] == 0  # churn is not an agent step
    assert r["churn_requests"] >= 1 and r["workload"]["churn_concurrency"] == 1
    churn = [row for row in r["rows"] if row["kind"] == "churn"]
    assert churn and all(row["session"].startswith("churn-") for row in churn)

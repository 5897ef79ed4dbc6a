"""Agent-loop benchmark against any OpenAI-compatible server (loopserve, llama.cpp's llama-server, vLLM).

Drives synthetic ReAct-style agent sessions, all running at once:

* a shared system prompt with instructions and tool JSON schemas (~--system-tokens), built from --seed;
* per session: a user task, then --steps requests, each resending the whole conversation so far; after
  each reply the client "runs the tool" (a pause of ~--tool-pause-s with jitter) and appends the
  assistant's reply and a tool result (file listing / JSON / log of ~--tool-result-tokens);
* --fanout K: every orchestrator step also branches into K worker requests that share the
  orchestrator's prefix and add their own suffix; their answers come back as the tool result;
* --long-prompt-tokens T: one extra client sends a single cold prompt of ~T tokens at
  --long-prompt-at-s, to show what a long prefill does to the short steps' TTFT (head-of-line);
  with --hol-baseline the same workload first runs without it (on a cold prefix of its own) and the
  report compares the short steps' p99 TTFT with and without the long prompt.

--churn-concurrency C sends, alongside the sessions, C streams of one-off cold prompts of
~--churn-tokens tokens without a session (other traffic filling the cache while the agents' tools
run): with a small KV pool this is what session retention is for.

Against a loopserve server it also polls /metrics (--metrics-poll-s) and reports the KV pool's peak
use, session pins, pins released under pressure, host offloads / restores and copy-on-write tokens:
the memory side of fan-out sharing and retention.

Requests are streaming chat completions (usage included, temperature 0, X-Session-Id header and
`user` set to the session id). Per request it records latency (start to last token), TTFT, mean
inter-token gap, prompt / cached / output tokens (from the server's usage; without usage the prompt
is counted with --tokenizer, or estimated at 4 characters per token, and cached is unknown). Errors
(HTTP >= 400, broken streams) are recorded per request and the run goes on.

The workload (system prompt, tasks, tool results, pauses) is a function of --seed. With
--history reply (default) the assistant turns are the server's own replies, so the prompts are
deterministic when the server is (temperature 0); --history synthetic appends scripted actions
instead, so every prompt depends on the seed alone. A rerun with the same seed against the same
server may find its prefixes cached already: change --seed (or --prefix-salt) for a cold start.

  loopserve bench agent --base-url http://127.0.0.1:8000 --sessions 8 --steps 20 --out agent.json
  python -m bench.agent --base-url http://127.0.0.1:8080/v1 --sessions 4 --fanout 3 --out fanout.json

Writes the JSON report to --out (stdout without it) and a plot of step latency against step index
next to it (FILE.png).
"""
from __future__ import annotations

import argparse
import asyncio
import contextlib
import itertools
import json
import random
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

DEFAULTS = {"base_url": "http://127.0.0.1:8000", "sessions": 8, "steps": 20, "fanout": 0, "system_tokens": 4000,
            "tool_result_tokens": 400, "tool_pause_s": 0.5, "tool_pause_jitter": 0.5, "max_tokens": 32,
            "long_prompt_tokens": 0, "long_prompt_at_s": 5.0, "seed": 0, "timeout": 600.0, "metrics_poll_s": 0.25}
STEP_KINDS = ("agent", "orchestrator", "worker")  # the agents' own requests (not churn / the long prompt)
CACHED_THRESHOLD = 0.5  # a step counts as "cached" when at least this share of its prompt was a cache hit
ERROR_SAMPLES = 5


# ---------------------------------------------------------------- token counting

class TokenCounter:
    """Counts tokens with the served model's tokenizer when given one, else estimates 4 characters a token."""

    def __init__(self, tokenizer=None) -> None:
        self.tokenizer = tokenizer
        self.source = "tokenizer" if tokenizer is not None else "estimate"

    def count(self, text: str) -> int:
        if self.tokenizer is None:
            return max(1, (len(text) + 3) // 4) if text else 0
        return len(self.tokenizer.encode(text, add_special_tokens=False))

    def truncate(self, text: str, tokens: int) -> str:
        if self.tokenizer is None:
            return text[:4 * tokens]
        ids = self.tokenizer.encode(text, add_special_tokens=False)
        return self.tokenizer.decode(ids[:tokens])

    def count_messages(self, messages: list[dict]) -> int:
        if self.tokenizer is not None:
            # Without a chat template (or with one that rejects these roles): the contents plus a few tokens each.
            with contextlib.suppress(Exception):
                return self.count(self.tokenizer.apply_chat_template(messages, tokenize=False,
                                                                     add_generation_prompt=True))
        return sum(self.count(str(m.get("content") or "")) + 4 for m in messages)


# ---------------------------------------------------------------- synthetic workload

VERBS = {
    "read": "Read", "write": "Write", "search": "Search", "list": "List", "delete": "Delete", "run": "Run",
    "query": "Query", "fetch": "Fetch", "create": "Create", "update": "Update", "inspect": "Inspect",
    "diff": "Show the differences of", "lint": "Lint", "format": "Format", "profile": "Profile",
    "summarize": "Summarize", "validate": "Validate", "deploy": "Deploy", "rollback": "Roll back",
    "watch": "Watch",
}
NOUNS = {
    "file": "a file in the workspace", "directory": "a directory of the repository",
    "code": "source code across the repository", "tests": "the project's test suite",
    "database": "the application database", "url": "an HTTP endpoint", "issue": "an issue in the tracker",
    "branch": "a git branch", "commit": "a git commit", "logs": "service logs", "metrics": "time-series metrics",
    "config": "a configuration file", "container": "a container in the sandbox", "package": "a package dependency",
    "secret": "an entry in the secrets store", "schema": "a database schema", "notebook": "a notebook cell",
    "ticket": "a support ticket", "pipeline": "a CI pipeline", "document": "a document in the knowledge base",
}
PARAMS = [
    ("path", {"type": "string", "description": "Path relative to the repository root, e.g. `src/app/main.py`."}),
    ("pattern", {"type": "string", "description": "A regular expression (RE2 syntax); matched per line."}),
    ("query", {"type": "string", "description": "Free-text query. Quote exact phrases with double quotes."}),
    ("max_results", {"type": "integer", "minimum": 1, "maximum": 500, "default": 50,
                     "description": "Upper bound on returned items; results past it are truncated."}),
    ("recursive", {"type": "boolean", "default": False, "description": "Descend into subdirectories."}),
    ("encoding", {"type": "string", "enum": ["utf-8", "latin-1", "base64"], "default": "utf-8",
                  "description": "How to decode the bytes."}),
    ("timeout_s", {"type": "number", "minimum": 0.1, "maximum": 600, "default": 30,
                   "description": "Give up after this many seconds and return a timeout error."}),
    ("start_line", {"type": "integer", "minimum": 1, "description": "First line to return (1-based)."}),
    ("end_line", {"type": "integer", "minimum": 1, "description": "Last line to return (inclusive)."}),
    ("content", {"type": "string", "description": "Full new content. Existing content is replaced."}),
    ("mode", {"type": "string", "enum": ["append", "overwrite", "patch"], "default": "patch",
              "description": "How the change is applied."}),
    ("env", {"type": "object", "additionalProperties": {"type": "string"},
             "description": "Extra environment variables for the command."}),
    ("args", {"type": "array", "items": {"type": "string"}, "description": "Command-line arguments, unquoted."}),
    ("labels", {"type": "array", "items": {"type": "string"}, "maxItems": 20,
                "description": "Labels to filter or attach (case-insensitive)."}),
    ("since", {"type": "string", "format": "date-time", "description": "Only items newer than this ISO-8601 time."}),
    ("limit_bytes", {"type": "integer", "minimum": 1024, "maximum": 1048576, "default": 65536,
                     "description": "Truncate the output after this many bytes."}),
    ("dry_run", {"type": "boolean", "default": True, "description": "Report what would change without changing it."}),
    ("id", {"type": "string", "pattern": "^[A-Za-z0-9_-]{1,64}$", "description": "Identifier of the object."}),
    ("sort", {"type": "string", "enum": ["relevance", "newest", "oldest", "name"], "default": "relevance",
              "description": "Ordering of the results."}),
    ("filters", {"type": "object", "properties": {"language": {"type": "string"}, "owner": {"type": "string"},
                                                  "status": {"type": "string", "enum": ["open", "closed", "any"]}},
                 "description": "Structured filters combined with AND."}),
]
RULES = [
    "Think step by step, but keep each thought short: one or two sentences.",
    "Call exactly one tool per turn, then wait for its result before continuing.",
    "Never invent file contents; read a file before you edit it.",
    "Prefer small, reviewable patches over rewriting whole files.",
    "Run the relevant tests after every change and report failures verbatim.",
    "If a tool returns an error, read the message carefully and try a different approach.",
    "Do not access the network except through the provided tools.",
    "Keep secrets out of your replies; refer to them by name only.",
    "When the task is done, reply with `Final Answer:` followed by a summary of what changed.",
    "Respect the repository's style: formatting, naming and import order.",
    "If the task is ambiguous, state the assumption you make and continue.",
    "Stop after 40 tool calls and summarize your progress, even if unfinished.",
    "Quote paths exactly as tools return them.",
    "Use `search_code` before `read_file` when you do not know where something is defined.",
]
MODULES = ["scheduler", "engine", "cache", "router", "tokenizer", "config", "utils", "server", "client", "metrics",
           "kv_pool", "sampler", "model", "attention", "loader", "auth", "storage", "queue", "billing", "events"]
DIRS = ["src", "src/core", "src/api", "lib", "tests", "tests/unit", "scripts", "docs", "tools", "services/worker"]
EXTS = [".py", ".py", ".py", ".rs", ".ts", ".json", ".yaml", ".md", ".toml"]
LEVELS = ["DEBUG", "INFO", "INFO", "INFO", "WARN", "ERROR"]
LOG_EVENTS = ["request handled", "cache miss", "cache hit", "retrying upstream call", "connection reset by peer",
              "slow query", "scheduled batch", "worker heartbeat", "config reloaded", "token refreshed",
              "rate limit exceeded", "checkpoint written", "assertion failed", "queue depth high"]
TASKS = [
    "The test `{test}` in `{path}` started failing after the last merge. Find the cause and fix it.",
    "Add a `--{flag}` option to the CLI in `{path}` and document it in the README.",
    "Profile `{func}` in `{path}`: it got 3x slower this week. Find the regression and propose a fix.",
    "Refactor `{path}` so that `{func}` no longer depends on global state; keep the tests green.",
    "Users report intermittent 502 errors from the `{module}` service. Investigate the logs and fix the bug.",
    "Migrate `{path}` from the deprecated `{module}` API to the new one and update all call sites.",
    "Write unit tests for `{func}` in `{path}` covering the edge cases listed in issue #{issue}.",
    "Issue #{issue}: `{func}` returns wrong results for empty inputs. Reproduce it, then fix it.",
]


def _path(rng: random.Random) -> str:
    return f"{rng.choice(DIRS)}/{rng.choice(MODULES)}{rng.choice(EXTS)}"


def _func(rng: random.Random) -> str:
    return f"{rng.choice(['load', 'parse', 'merge', 'flush', 'handle', 'resolve', 'schedule'])}_{rng.choice(MODULES)}"


def make_tool(rng: random.Random, name: str, verb: str, noun: str) -> dict:
    chosen = rng.sample(PARAMS, rng.randint(2, 6))
    props = {p: dict(schema) for p, schema in chosen}
    required = [p for p, _ in chosen[:rng.randint(1, len(chosen))]]
    extra = rng.choice(["Results are returned as JSON.", "Fails with an error object if access is denied.",
                        "Output longer than the limit is truncated with a marker.",
                        "This call is idempotent and safe to retry.", "Requires a clean working tree.",
                        "Costs one unit of the session's tool budget."])
    return {"type": "function", "function": {
        "name": name, "description": f"{VERBS[verb]} {NOUNS[noun]}. {extra}",
        "parameters": {"type": "object", "properties": props, "required": required, "additionalProperties": False}}}


def _pad_to(parts: list[str], target: int, counter: TokenCounter, more: Callable[[], str]) -> None:
    total = sum(counter.count(p) for p in parts)
    while total < target:
        piece = more()
        parts.append(piece)
        total += counter.count(piece)


def build_system_prompt(seed: int, target_tokens: int, counter: TokenCounter, salt: str = "") -> tuple[str, list[str]]:
    """The shared system prompt (instructions + tool schemas) of ~target_tokens, and its tool names."""
    rng = random.Random(f"{seed}:system")
    rules = rng.sample(RULES, len(RULES))
    intro = (f"{salt}\n" if salt else "") + (
        "You are Looper, an autonomous software engineering agent working in a sandboxed checkout of the "
        "user's repository. You solve the user's task by calling tools and reasoning about their results.\n\n# Rules\n")
    fmt = ("\n# Output format\nEach turn, reply with:\nThought: <your reasoning>\n"
           "Action: {\"tool\": \"<tool name>\", \"arguments\": {...}}\n"
           "or, when done:\nFinal Answer: <summary>\n\n# Tools\n"
           "You can call the following tools. Each is described by its JSON schema:\n")
    # Rules take up to a fifth of the budget (at least two), tool schemas the rest (at least one).
    rule_lines = [f"{i + 1}. {r}\n" for i, r in enumerate(rules)]
    budget, n_rules = target_tokens // 5, 2
    while n_rules < len(rule_lines) and sum(counter.count(r) for r in rule_lines[:n_rules + 1]) <= budget:
        n_rules += 1
    head = [intro, *rule_lines[:n_rules], fmt]
    combos = [(v, n) for v in VERBS for n in NOUNS if (v, n) not in (("read", "file"), ("search", "code"))]
    rng.shuffle(combos)
    combos = [("read", "file"), ("search", "code")] + combos  # the rules mention these two
    names: list[str] = []

    def next_tool() -> str:
        v, n = combos[len(names) % len(combos)]
        name = f"{v}_{n}" + (f"_v{len(names) // len(combos) + 1}" if len(names) >= len(combos) else "")
        names.append(name)
        return json.dumps(make_tool(rng, name, v, n), indent=1) + "\n"

    parts = head + [next_tool()]  # at least one tool
    _pad_to(parts, target_tokens, counter, next_tool)
    text = "".join(parts)
    if counter.count(text) > 1.1 * target_tokens:  # small targets: the fixed parts alone overshoot
        text = counter.truncate(text, target_tokens)
    return text, names


def make_task(rng: random.Random, index: int) -> str:
    text = rng.choice(TASKS).format(test=f"test_{_func(rng)}", path=_path(rng), flag=rng.choice(MODULES).replace("_", "-"),
                                    func=_func(rng), module=rng.choice(MODULES), issue=rng.randint(100, 9999))
    return f"[session {index}] {text}"


def make_action(rng: random.Random, tools: list[str]) -> tuple[str, dict]:
    tool = rng.choice(tools)
    return tool, {"path": _path(rng), "query": _func(rng)}


def synthetic_reply(tool: str, arguments: dict) -> str:
    return (f"Thought: I need the output of {tool} on {arguments['path']} to continue.\n"
            f"Action: {json.dumps({'tool': tool, 'arguments': arguments})}")


def _listing_line(rng: random.Random) -> str:
    size = rng.randint(0, 200_000)
    return (f"{rng.choice(['-rw-r--r--', '-rwxr-xr-x', 'drwxr-xr-x'])} 1 agent agent {size:>7} "
            f"{rng.choice(['Jan', 'Mar', 'Jun', 'Sep', 'Nov'])} {rng.randint(1, 28):>2} "
            f"{rng.randint(0, 23):02d}:{rng.randint(0, 59):02d} {_path(rng)}\n")


def _json_line(rng: random.Random) -> str:
    return json.dumps({"path": _path(rng), "line": rng.randint(1, 2000), "score": round(rng.random(), 3),
                       "match": f"def {_func(rng)}(self, {rng.choice(MODULES)}: int = {rng.randint(0, 99)}):"}) + ",\n"


def _log_line(rng: random.Random) -> str:
    return (f"2025-{rng.randint(1, 12):02d}-{rng.randint(1, 28):02d}T{rng.randint(0, 23):02d}:{rng.randint(0, 59):02d}:"
            f"{rng.randint(0, 59):02d}.{rng.randint(0, 999):03d}Z {rng.choice(LEVELS):<5} "
            f"[{rng.choice(MODULES)}-{rng.randint(0, 15)}] {rng.choice(LOG_EVENTS)} "
            f"id={rng.getrandbits(48):012x} took={rng.randint(1, 5000)}ms\n")


def make_tool_result(rng: random.Random, tool: str, target_tokens: int, counter: TokenCounter) -> str:
    """A synthetic tool output of about target_tokens (+-25 %): a file listing, JSON results or log lines."""
    target = max(1, round(target_tokens * rng.uniform(0.75, 1.25)))
    kind = rng.choice(["listing", "json", "log"])
    line = {"listing": _listing_line, "json": _json_line, "log": _log_line}[kind]
    head = {"listing": f"$ ls -la  # via {tool}\n", "json": '{"results": [\n', "log": f"==> {tool}: last lines <==\n"}[kind]
    parts = [head]
    _pad_to(parts, target, counter, lambda: line(rng))
    if kind == "json":
        parts[-1] = parts[-1].rstrip(",\n") + "\n"
        parts.append(f'], "truncated": {str(rng.random() < 0.3).lower()}}}\n')
    return "".join(parts)


def make_long_prompt(seed: int, target_tokens: int, counter: TokenCounter) -> str:
    rng = random.Random(f"{seed}:long-prompt")
    parts = [f"Long cold request {rng.getrandbits(64):016x}. Read these logs and summarize the incidents:\n"]
    _pad_to(parts, target_tokens, counter, lambda: _log_line(rng))
    return "".join(parts)


# ---------------------------------------------------------------- requests

@dataclass
class Row:
    kind: str                 # agent | orchestrator | worker | long_prompt | churn | warmup
    session: str
    step: int
    worker: int | None
    t_start_s: float          # since the run started
    ok: bool = False
    latency_s: float | None = None    # request start to last token (to stream end without tokens)
    ttft_s: float | None = None
    itl_mean_s: float | None = None
    output_tokens: int = 0
    prompt_tokens: int | None = None
    cached_tokens: int | None = None  # None: the server did not report it
    prompt_tokens_source: str = "usage"
    finish_reason: str | None = None
    error: str | None = None
    n_gaps: int = 0           # inter-token gaps behind itl_mean_s


def _delta_has_token(delta: dict) -> bool:
    return bool(delta.get("content") or delta.get("reasoning_content") or delta.get("reasoning")
                or delta.get("tool_calls"))


class Runner:
    def __init__(self, args: argparse.Namespace, client, url: str, model: str, headers: dict,
                 counter: TokenCounter, progress) -> None:
        self.args, self.client, self.url, self.model = args, client, url, model
        self.headers, self.counter, self.progress = headers, counter, progress
        self.t0 = time.perf_counter()
        self.rows: list[Row] = []
        self.errors = 0

    def body(self, messages: list[dict], session: str | None, max_tokens: int) -> dict:
        body = {"model": self.model, "messages": messages, "max_tokens": max_tokens, "temperature": 0.0,
                "stream": True, "stream_options": {"include_usage": True}}
        if session is not None:
            body["user"] = session
        if self.args.ignore_eos:
            body["ignore_eos"] = True
        return body

    async def request(self, messages: list[dict], session: str, kind: str, step: int,
                      worker: int | None = None, max_tokens: int | None = None) -> tuple[Row, str]:
        t_start = time.perf_counter()
        row = Row(kind, session, step, worker, t_start - self.t0)
        in_session = kind not in ("churn", "long_prompt")
        session_headers = {"X-Session-Id": session} if in_session else {}
        pieces: list[str] = []
        token_times: list[float] = []
        done = False
        try:
            body = self.body(messages, session if in_session else None, max_tokens or self.args.max_tokens)
            async with self.client.stream("POST", self.url, json=body,
                                          headers={**self.headers, **session_headers}) as resp:
                if resp.status_code >= 400:
                    text = (await resp.aread()).decode(errors="replace")
                    raise _StepError(f"HTTP {resp.status_code}: {text[:300]}")
                async for line in resp.aiter_lines():
                    if not line.startswith("data:"):
                        continue
                    data = line[5:].strip()
                    if data == "[DONE]":
                        done = True
                        break
                    chunk = json.loads(data)
                    if chunk.get("error"):
                        raise _StepError(f"stream error: {json.dumps(chunk['error'])[:300]}")
                    usage = chunk.get("usage")
                    if usage:
                        row.prompt_tokens = usage.get("prompt_tokens")
                        row.output_tokens = usage.get("completion_tokens") or 0
                        cached = (usage.get("prompt_tokens_details") or {}).get("cached_tokens")
                        row.cached_tokens = cached if isinstance(cached, int) else None
                    for choice in chunk.get("choices") or []:
                        delta = choice.get("delta") or {}
                        if _delta_has_token(delta):
                            token_times.append(time.perf_counter())
                            pieces.append(delta.get("content") or "")
                        if choice.get("finish_reason"):
                            row.finish_reason = choice["finish_reason"]
            if not done and row.finish_reason is None:
                raise _StepError("broken stream: ended without [DONE] or a finish_reason")
            row.ok = True
        except _StepError as e:
            row.error = str(e)
        except Exception as e:  # noqa: BLE001 - network errors, bad JSON: recorded, the run goes on
            row.error = f"{type(e).__name__}: {e}"[:300]
        end = token_times[-1] if token_times else time.perf_counter()
        row.latency_s = end - t_start
        if token_times:
            row.ttft_s = token_times[0] - t_start
            gaps = [b - a for a, b in itertools.pairwise(token_times)]
            row.n_gaps = len(gaps)
            row.itl_mean_s = sum(gaps) / len(gaps) if gaps else None
        if not row.output_tokens:
            row.output_tokens = len(token_times)
        if row.prompt_tokens is None:
            row.prompt_tokens = self.counter.count_messages(messages)
            row.prompt_tokens_source = self.counter.source
        if kind != "warmup":
            self.rows.append(row)
            if not row.ok and kind != "churn":
                self.errors += 1
            if self.progress is not None and kind != "churn":
                self.progress.update(1)
                if not row.ok:
                    self.progress.set_postfix(errors=self.errors, refresh=False)
        return row, "".join(pieces)

    async def pause(self, rng: random.Random) -> None:
        p, j = self.args.tool_pause_s, self.args.tool_pause_jitter
        seconds = max(0.0, rng.uniform(p * (1 - j), p * (1 + j)))  # drawn even when 0: same rng stream
        if seconds > 0:
            await asyncio.sleep(seconds)

    def assistant_turn(self, rng: random.Random, tools: list[str], reply: str, row: Row, sid: str,
                       step: int) -> tuple[dict, str, str | None]:
        """The assistant message to append, the tool it 'called' and its call id (tool role only)."""
        tool, arguments = make_action(rng, tools)
        text = reply if self.args.history == "reply" and row.ok and reply.strip() else synthetic_reply(tool, arguments)
        msg: dict[str, Any] = {"role": "assistant", "content": text}
        call_id = None
        if self.args.tool_role == "tool":
            call_id = f"call_{sid}_{step}"
            msg["tool_calls"] = [{"id": call_id, "type": "function",
                                  "function": {"name": tool, "arguments": json.dumps(arguments)}}]
        return msg, tool, call_id

    def tool_message(self, tool: str, call_id: str | None, result: str) -> dict:
        if self.args.tool_role == "tool":
            return {"role": "tool", "tool_call_id": call_id, "content": result}
        return {"role": "user", "content": f"Observation from {tool}:\n{result}"}

    async def session(self, index: int, system: str, tools: list[str]) -> float:
        a = self.args
        sid = f"agent-{a.seed}-{index:04d}"
        rng = random.Random(f"{a.seed}:session:{index}")
        messages = [{"role": "system", "content": system}, {"role": "user", "content": make_task(rng, index)}]
        start = time.perf_counter()
        for step in range(a.steps):
            row, reply = await self.request(messages, sid, "orchestrator" if a.fanout else "agent", step)
            assistant, tool, call_id = self.assistant_turn(rng, tools, reply, row, sid, step)
            if a.fanout:
                result = await self.fan_out(index, sid, step, messages + [assistant], call_id)
            else:
                result = make_tool_result(rng, tool, a.tool_result_tokens, self.counter)
            if step == a.steps - 1:
                break
            await self.pause(rng)
            messages += [assistant, self.tool_message(tool, call_id, result)]
        return time.perf_counter() - start

    async def fan_out(self, index: int, sid: str, step: int, prefix: list[dict], call_id: str | None) -> str:
        """K workers on the orchestrator's prefix plus their own subtask and context; returns their report."""
        a = self.args

        async def worker(j: int) -> str:
            rng = random.Random(f"{a.seed}:session:{index}:step:{step}:worker:{j}")
            context = make_tool_result(rng, f"worker_{j}", a.tool_result_tokens, self.counter)
            task = (f"You are worker {j} of {a.fanout}. Subtask: check `{_path(rng)}` for problems related to "
                    f"`{_func(rng)}` and report in one paragraph.\nContext:\n{context}")
            suffix = ({"role": "tool", "tool_call_id": call_id, "content": task} if a.tool_role == "tool"
                      else {"role": "user", "content": task})
            row, reply = await self.request(prefix + [suffix], f"{sid}-w{j}", "worker", step, worker=j)
            return reply if a.history == "reply" and row.ok and reply.strip() else f"worker {j}: no findings."

        answers = await asyncio.gather(*(worker(j) for j in range(a.fanout)))
        return "".join(f"- worker {j}: {text.strip()}\n" for j, text in enumerate(answers))

    async def churn(self, index: int, stop: asyncio.Event) -> None:
        """One-off cold prompts without a session, back to back until stop is set."""
        n = 0
        while not stop.is_set():
            text = make_long_prompt(self.args.seed * 100003 + index * 10007 + n, self.args.churn_tokens, self.counter)
            await self.request([{"role": "user", "content": text}], f"churn-{index}", "churn", n, max_tokens=1)
            n += 1

    async def long_prompt(self, text: str) -> None:
        delay = self.args.long_prompt_at_s - (time.perf_counter() - self.t0)
        if delay > 0:
            await asyncio.sleep(delay)
        await self.request([{"role": "user", "content": text}], f"long-prompt-{self.args.seed}", "long_prompt", 0)


class _StepError(Exception):
    pass


# ---------------------------------------------------------------- report

def percentile(values: list[float], q: float) -> float | None:
    """Linear interpolation between closest ranks (numpy's default); None without values."""
    if not values:
        return None
    v = sorted(values)
    pos = (len(v) - 1) * q / 100
    lo = int(pos)
    hi = min(lo + 1, len(v) - 1)
    return v[lo] + (v[hi] - v[lo]) * (pos - lo)


def _mean(values: list[float]) -> float | None:
    return sum(values) / len(values) if values else None


def _r(x: float | None, nd: int = 6) -> float | None:
    return None if x is None else round(x, nd)


def _row_dict(r: Row) -> dict:
    return {k: round(v, 6) if isinstance(v, float) else v for k, v in asdict(r).items()}


def _cached_share(r: Row) -> float | None:
    if r.cached_tokens is None or not r.prompt_tokens:
        return None
    return r.cached_tokens / r.prompt_tokens


def summarize(rows: list[Row], session_walls: list[float], wall_s: float, steps: int, fanout: int) -> dict:
    steps_rows = [r for r in rows if r.kind in STEP_KINDS]
    ok = [r for r in steps_rows if r.ok]
    lat = [r.latency_s for r in ok]
    ttft = [r.ttft_s for r in ok if r.ttft_s is not None]
    cached_steps = [r.ttft_s for r in ok if r.ttft_s is not None and _cached_share(r) is not None
                    and _cached_share(r) >= CACHED_THRESHOLD]
    uncached_steps = [r.ttft_s for r in ok if r.ttft_s is not None and _cached_share(r) is not None
                      and _cached_share(r) < CACHED_THRESHOLD]
    gaps_total = sum(r.itl_mean_s * r.n_gaps for r in ok if r.itl_mean_s is not None)
    n_gaps = sum(r.n_gaps for r in ok)
    # Cache reuse over every request but each session's first (whose prefix is only cacheable across sessions).
    later = [r for r in ok if not (r.kind in ("agent", "orchestrator") and r.step == 0) and r.cached_tokens is not None]
    later_prompt = sum(r.prompt_tokens or 0 for r in later)
    cached_known = any(r.cached_tokens is not None for r in ok)
    out_tokens = sum(r.output_tokens for r in ok)
    errors = [r for r in steps_rows if not r.ok]

    by_step = []
    for s in range(steps):
        main = [r for r in ok if r.step == s and r.kind in ("agent", "orchestrator")]
        entry = {"step": s, "n": len(main), "latency_p50_s": _r(percentile([r.latency_s for r in main], 50)),
                 "latency_p99_s": _r(percentile([r.latency_s for r in main], 99)),
                 "ttft_p50_s": _r(percentile([r.ttft_s for r in main if r.ttft_s is not None], 50)),
                 "prompt_tokens_mean": _r(_mean([r.prompt_tokens for r in main if r.prompt_tokens is not None]), 1),
                 "cached_tokens_mean": _r(_mean([r.cached_tokens for r in main if r.cached_tokens is not None]), 1)}
        if fanout:
            workers = [r for r in ok if r.step == s and r.kind == "worker"]
            entry.update({"worker_n": len(workers),
                          "worker_latency_p50_s": _r(percentile([r.latency_s for r in workers], 50)),
                          "worker_latency_p99_s": _r(percentile([r.latency_s for r in workers], 99)),
                          "worker_ttft_p50_s": _r(percentile([r.ttft_s for r in workers if r.ttft_s is not None], 50))})
        by_step.append(entry)

    return {
        "requests": len(steps_rows), "ok": len(ok), "errors": len(errors),
        "error_samples": sorted({r.error for r in errors if r.error})[:ERROR_SAMPLES],
        "wall_s": _r(wall_s),
        "step_latency_p50_s": _r(percentile(lat, 50)), "step_latency_p99_s": _r(percentile(lat, 99)),
        "step_latency_mean_s": _r(_mean(lat)),
        "ttft_p50_s": _r(percentile(ttft, 50)), "ttft_p99_s": _r(percentile(ttft, 99)),
        "ttft_cached_p50_s": _r(percentile(cached_steps, 50)), "ttft_uncached_p50_s": _r(percentile(uncached_steps, 50)),
        "n_cached_steps": len(cached_steps), "n_uncached_steps": len(uncached_steps),
        "itl_mean_s": _r(gaps_total / n_gaps if n_gaps else None),
        "session_wall_mean_s": _r(_mean(session_walls)), "session_wall_max_s": _r(max(session_walls, default=None)),
        "cached_prompt_token_ratio": (_r(sum(r.cached_tokens for r in later) / later_prompt)
                                      if later and later_prompt else None),
        "cached_tokens_reported": cached_known,
        "prompt_tokens_total": sum(r.prompt_tokens or 0 for r in ok),
        "cached_tokens_total": sum(r.cached_tokens or 0 for r in ok) if cached_known else None,
        "output_tokens_total": out_tokens,
        "output_tok_s": _r(out_tokens / wall_s if wall_s else None, 3),
        "requests_per_s": _r(len(ok) / wall_s if wall_s else None, 3),
        "by_step_index": by_step,
    }


def head_of_line(rows: list[Row]) -> dict | None:
    """The long prompt's own numbers, and the short steps' TTFT while its prefill ran vs the rest."""
    long = next((r for r in rows if r.kind == "long_prompt"), None)
    if long is None:
        return None
    lo = long.t_start_s
    hi = lo + (long.ttft_s if long.ttft_s is not None else long.latency_s or 0.0)
    steps = [r for r in rows if r.kind in STEP_KINDS and r.ok and r.ttft_s is not None]
    during = [r.ttft_s for r in steps if r.t_start_s < hi and r.t_start_s + r.ttft_s > lo]
    other = [r.ttft_s for r in steps if not (r.t_start_s < hi and r.t_start_s + r.ttft_s > lo)]
    return {"row": _row_dict(long), "prefill_window_s": [_r(lo), _r(hi)],
            "n_steps_during": len(during), "ttft_p50_during_s": _r(percentile(during, 50)),
            "ttft_max_during_s": _r(max(during, default=None)), "n_steps_other": len(other),
            "ttft_p50_other_s": _r(percentile(other, 50))}


def plot(report: dict, rows: list[Row], path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    hol = report.get("head_of_line")
    fig, axes = plt.subplots(1, 2 if hol else 1, figsize=(12 if hol else 7, 4.5), squeeze=False)
    ax = axes[0][0]
    by = report["by_step_index"]
    xs = [e["step"] for e in by]
    for key, label, style in [("latency_p50_s", "p50", "o-"), ("latency_p99_s", "p99", "s--"),
                              ("ttft_p50_s", "TTFT p50", "^:"), ("worker_latency_p50_s", "worker p50", "d-.")]:
        pts = [(x, e[key]) for x, e in zip(xs, by) if e.get(key) is not None]
        if pts:
            ax.plot([p[0] for p in pts], [p[1] for p in pts], style, label=label, markersize=4)
    w = report["workload"]
    ax.set_title(f"{w['sessions']} sessions x {w['steps']} steps" + (f", fan-out {w['fanout']}" if w["fanout"] else ""))
    ax.set_xlabel("step index")
    ax.xaxis.get_major_locator().set_params(integer=True)
    ax.set_ylabel("step latency (s)")
    ax.set_ylim(bottom=0)
    ax.grid(alpha=0.3)
    ax.legend()
    if hol:
        ax2 = axes[0][1]
        pts = [(r.t_start_s, r.ttft_s) for r in rows if r.kind in STEP_KINDS and r.ok and r.ttft_s is not None]
        ax2.scatter([p[0] for p in pts], [p[1] for p in pts], s=8, label="step TTFT")
        lo, hi = hol["prefill_window_s"]
        ax2.axvspan(lo, hi, color="tab:red", alpha=0.2, label="long prompt prefill")
        ax2.set_xlabel("request start (s since run start)")
        ax2.set_ylabel("TTFT (s)")
        ax2.set_ylim(bottom=0)
        ax2.grid(alpha=0.3)
        ax2.legend()
    fig.suptitle(f"loopserve bench agent: {report['model']}", fontsize=10)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


# ---------------------------------------------------------------- driver

def api_base(url: str) -> str:
    url = url.rstrip("/")
    return url if url.endswith("/v1") else url + "/v1"


def validate(args: argparse.Namespace) -> None:
    for name in ("sessions", "steps"):
        if getattr(args, name) < 1:
            raise ValueError(f"--{name} must be >= 1")
    for name in ("fanout", "system_tokens", "tool_result_tokens", "long_prompt_tokens", "tool_pause_s",
                 "long_prompt_at_s", "churn_concurrency", "churn_tokens"):
        if getattr(args, name) < 0:
            raise ValueError(f"--{name.replace('_', '-')} must be >= 0")
    if args.max_tokens < 1:
        raise ValueError("--max-tokens must be >= 1")
    if not 0 <= args.tool_pause_jitter <= 1:
        raise ValueError("--tool-pause-jitter must be in [0, 1]")


async def run_async(args: argparse.Namespace) -> tuple[dict, list[Row]]:
    import httpx

    validate(args)
    tokenizer = None
    if args.tokenizer:
        from loopserve.model import load_tokenizer
        tokenizer = load_tokenizer(args.tokenizer)
    counter = TokenCounter(tokenizer)
    system, tools = build_system_prompt(args.seed, args.system_tokens, counter, args.prefix_salt or "")
    long_text = make_long_prompt(args.seed, args.long_prompt_tokens, counter) if args.long_prompt_tokens else None

    base = api_base(args.base_url)
    headers = {"Authorization": f"Bearer {args.api_key}"} if args.api_key else {}
    conns = args.sessions * max(1, args.fanout) + 4
    limits = httpx.Limits(max_connections=conns, max_keepalive_connections=conns)
    async with httpx.AsyncClient(timeout=httpx.Timeout(args.timeout, connect=30.0), limits=limits) as client:
        model = args.model
        if not model:
            try:
                r = await client.get(f"{base}/models", headers=headers)
                r.raise_for_status()
                model = r.json()["data"][0]["id"]
            except Exception as e:  # noqa: BLE001
                raise RuntimeError(f"cannot list models at {base}/models ({type(e).__name__}: {e}); "
                                   f"is the server up? (or pass --model)") from None
        runner = Runner(args, client, f"{base}/chat/completions", model, headers, counter, None)
        if not args.no_warmup:  # first-request costs (compilation, lazy allocations); not recorded
            await runner.request([{"role": "user", "content": "Say hi."}], "warmup", "warmup", 0, max_tokens=4)

        total = args.sessions * args.steps * (1 + args.fanout) + (1 if long_text else 0)
        progress = None
        if not args.no_progress:
            from tqdm import tqdm
            progress = tqdm(total=total, desc="agent steps", unit="req", file=sys.stderr, dynamic_ncols=True)
        runner.progress = progress
        poller = KVPoller(client, args.base_url, headers, args.metrics_poll_s)
        await poller.start()
        runner.t0 = time.perf_counter()
        try:
            jobs = [runner.session(i, system, tools) for i in range(args.sessions)]
            if long_text:
                jobs.append(runner.long_prompt(long_text))
            stop_churn = asyncio.Event()
            churn = [asyncio.create_task(runner.churn(i, stop_churn)) for i in range(args.churn_concurrency)]
            results = await asyncio.gather(*jobs)
            stop_churn.set()
            for task in churn:
                task.cancel()
            await asyncio.gather(*churn, return_exceptions=True)
        finally:
            if progress is not None:
                progress.close()
        wall = time.perf_counter() - runner.t0
        server_kv = await poller.stop()
    walls = list(results[:args.sessions])

    report = {
        "benchmark": "agent", "base_url": base, "model": model, "label": args.label,
        "sessions": args.sessions, "steps": args.steps,
        "workload": {"sessions": args.sessions, "steps": args.steps, "fanout": args.fanout,
                     "system_tokens": args.system_tokens, "system_tokens_counted": counter.count(system),
                     "num_tools": len(tools), "tool_result_tokens": args.tool_result_tokens,
                     "tool_pause_s": args.tool_pause_s, "tool_pause_jitter": args.tool_pause_jitter,
                     "max_tokens": args.max_tokens, "long_prompt_tokens": args.long_prompt_tokens,
                     "long_prompt_at_s": args.long_prompt_at_s if long_text else None, "seed": args.seed,
                     "history": args.history, "tool_role": args.tool_role, "ignore_eos": args.ignore_eos,
                     "prefix_salt": args.prefix_salt, "token_counts": counter.source,
                     "churn_concurrency": args.churn_concurrency, "churn_tokens": args.churn_tokens},
        "churn_requests": sum(1 for r in runner.rows if r.kind == "churn"),
        **summarize(runner.rows, walls, wall, args.steps, args.fanout),
        "head_of_line": head_of_line(runner.rows),
        "server_kv": server_kv,
        "session_walls_s": [_r(w) for w in walls],
        "rows": [_row_dict(r) for r in runner.rows],
    }
    return report, runner.rows


class KVPoller:
    """Samples a loopserve server's /metrics during the run: peak KV use and session / sharing counters.

    Silent (reports None) against servers without loopserve's metrics."""

    GAUGES = ("kv_cache_total_blocks", "kv_cache_free_blocks", "session_pinned_blocks", "session_retained")
    COUNTERS = ("session_retention_pins_total", "kv_offloaded_blocks_total", "kv_restored_blocks_total",
                "kv_cow_copies_total", "kv_cow_tokens_total", "num_preemptions_total",
                "prefix_cache_hits_total", "prefix_cache_queries_total")

    def __init__(self, client, base_url: str, headers: dict, interval_s: float) -> None:
        root = base_url.rstrip("/")
        root = root[:-3] if root.endswith("/v1") else root
        self.client, self.url, self.headers, self.interval = client, root + "/metrics", headers, interval_s
        self.start_values: dict[str, float] | None = None
        self.peak_used = 0.0
        self.peak_pinned = 0.0
        self.samples = 0
        self._task = None

    async def read(self) -> dict[str, float] | None:
        try:
            r = await self.client.get(self.url, headers=self.headers, timeout=5.0)
        except Exception:  # noqa: BLE001 - not every server has /metrics
            return None
        if r.status_code != 200 or "loopserve:kv_cache_total_blocks" not in r.text:
            return None
        values: dict[str, float] = {}
        for line in r.text.splitlines():
            if line.startswith("loopserve:"):
                name, _, value = line.rpartition(" ")
                key = name.removeprefix("loopserve:")
                if "{" in key:
                    base, _, label = key.partition("{")
                    if base == "session_retention_released_total":
                        key = "session_released_" + label.split('"')[1]
                    else:
                        continue
                with contextlib.suppress(ValueError):
                    values[key] = float(value)
        return values

    def _observe(self, v: dict[str, float]) -> None:
        self.samples += 1
        total, free = v.get("kv_cache_total_blocks", 0.0), v.get("kv_cache_free_blocks", 0.0)
        self.peak_used = max(self.peak_used, total - free)
        self.peak_pinned = max(self.peak_pinned, v.get("session_pinned_blocks", 0.0))

    async def start(self) -> None:
        if self.interval <= 0:
            return
        self.start_values = await self.read()
        if self.start_values is None:
            return

        async def loop() -> None:
            while True:
                await asyncio.sleep(self.interval)
                v = await self.read()
                if v is not None:
                    self._observe(v)

        self._task = asyncio.create_task(loop())

    async def stop(self) -> dict | None:
        if self._task is None:
            return None
        self._task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self._task
        end = await self.read() or {}
        self._observe(end)
        start = self.start_values or {}
        delta = {k.removesuffix("_total"): end.get(k, 0.0) - start.get(k, 0.0) for k in self.COUNTERS}
        for reason in ("expired", "pressure"):
            delta[f"session_released_{reason}"] = (end.get(f"session_released_{reason}", 0.0)
                                                   - start.get(f"session_released_{reason}", 0.0))
        total = end.get("kv_cache_total_blocks", 0.0)
        return {"total_blocks": total, "peak_used_blocks": self.peak_used,
                "peak_usage": _r(self.peak_used / total if total else None, 4),
                "peak_pinned_blocks": self.peak_pinned, "samples": self.samples, **delta}


def compare_head_of_line(baseline: dict, loaded: dict) -> dict:
    """Short steps' TTFT with the long prompt against the same workload without it."""
    def ttfts(report: dict) -> list[float]:
        return [r["ttft_s"] for r in report["rows"]
                if r["kind"] in STEP_KINDS and r["ok"] and r["ttft_s"] is not None]

    base, load = ttfts(baseline), ttfts(loaded)
    hol = loaded.get("head_of_line") or {}
    lo, hi = hol.get("prefill_window_s") or (None, None)
    during = [r["ttft_s"] for r in loaded["rows"] if lo is not None and r["kind"] in STEP_KINDS and r["ok"]
              and r["ttft_s"] is not None and r["t_start_s"] < hi and r["t_start_s"] + r["ttft_s"] > lo]
    p99_base, p99_load, p99_during = percentile(base, 99), percentile(load, 99), percentile(during, 99)
    return {"short_ttft_p99_without_s": _r(p99_base), "short_ttft_p99_with_s": _r(p99_load),
            "short_ttft_p99_during_prefill_s": _r(p99_during), "n_during_prefill": len(during),
            "short_ttft_p50_without_s": _r(percentile(base, 50)), "short_ttft_p50_with_s": _r(percentile(load, 50)),
            "p99_ratio": _r(p99_load / p99_base if p99_base and p99_load else None, 3),
            "p99_during_ratio": _r(p99_during / p99_base if p99_base and p99_during else None, 3),
            "long_prompt_ttft_s": (hol.get("row") or {}).get("ttft_s"),
            "baseline_wall_s": baseline.get("wall_s")}


def add_arguments(p: argparse.ArgumentParser) -> None:
    d = DEFAULTS
    g = p.add_argument_group("server")
    g.add_argument("--base-url", default=d["base_url"],
                   help=f"server URL, with or without /v1 (default: {d['base_url']})")
    g.add_argument("--model", default=None, help="model name to send (default: the first id of GET /v1/models)")
    g.add_argument("--api-key", default=None, help="sent as 'Authorization: Bearer KEY'")
    g.add_argument("--tokenizer", default=None,
                   help="the served model's folder or .gguf: sizes the synthetic text in real tokens and counts "
                        "prompts when the server reports no usage (default: 4 characters a token)")
    g.add_argument("--timeout", type=float, default=d["timeout"], help="per-request timeout in seconds")
    g = p.add_argument_group("workload")
    g.add_argument("--sessions", type=int, default=d["sessions"], help="concurrent agent sessions (default: 8)")
    g.add_argument("--steps", type=int, default=d["steps"], help="requests per session (default: 20)")
    g.add_argument("--fanout", type=int, default=d["fanout"],
                   help="K: each orchestrator step also branches into K worker requests on its prefix (default: 0)")
    g.add_argument("--system-tokens", type=int, default=d["system_tokens"],
                   help="approximate size of the shared system prompt with tool schemas (default: 4000)")
    g.add_argument("--tool-result-tokens", type=int, default=d["tool_result_tokens"],
                   help="approximate size of each tool result, +-25%% (default: 400)")
    g.add_argument("--tool-pause-s", type=float, default=d["tool_pause_s"],
                   help="client-side tool time between steps (default: 0.5)")
    g.add_argument("--tool-pause-jitter", type=float, default=d["tool_pause_jitter"],
                   help="pause drawn uniformly in [p*(1-j), p*(1+j)] (default: 0.5)")
    g.add_argument("--max-tokens", type=int, default=d["max_tokens"], help="max_tokens per step (default: 32)")
    g.add_argument("--ignore-eos", action="store_true", help="send ignore_eos (vLLM/loopserve extension)")
    g.add_argument("--long-prompt-tokens", type=int, default=d["long_prompt_tokens"],
                   help="head-of-line mode: one extra cold prompt of about this many tokens (default: off)")
    g.add_argument("--long-prompt-at-s", type=float, default=d["long_prompt_at_s"],
                   help="when to send it, seconds after the sessions start (default: 5)")
    g.add_argument("--churn-concurrency", type=int, default=0,
                   help="background streams of one-off cold prompts without a session (default: 0)")
    g.add_argument("--churn-tokens", type=int, default=1000, help="tokens per churn prompt (default: 1000)")
    g.add_argument("--hol-baseline", action="store_true",
                   help="with --long-prompt-tokens: first run the workload without the long prompt and report "
                        "the short steps' p99 TTFT ratio (head_of_line_comparison)")
    g.add_argument("--history", choices=["reply", "synthetic"], default="reply",
                   help="assistant turns in the history: the server's replies, or scripted actions (default: reply)")
    g.add_argument("--tool-role", choices=["user", "tool"], default="user",
                   help="tool results as user messages, or as tool messages answering assistant tool_calls "
                        "(needs a chat template that knows them) (default: user)")
    g.add_argument("--seed", type=int, default=d["seed"], help="workload seed (default: 0)")
    g.add_argument("--prefix-salt", default=None, help="text put first in the system prompt (a cold cache on reruns)")
    g = p.add_argument_group("output")
    g.add_argument("--out", default=None, help="write the JSON report here (default: stdout)")
    g.add_argument("--plot", default=None, help="PNG path (default: --out with .png)")
    g.add_argument("--no-plot", action="store_true")
    g.add_argument("--no-progress", action="store_true", help="no progress bar")
    g.add_argument("--no-warmup", action="store_true", help="skip the one short warm-up request")
    g.add_argument("--label", default="", help="free text stored in the report")
    g.add_argument("--metrics-poll-s", type=float, default=d["metrics_poll_s"],
                   help="poll a loopserve server's /metrics this often for peak KV use (0: off; default: 0.25)")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="loopserve bench agent", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    add_arguments(p)
    return p


def format_summary(report: dict) -> str:
    def f(x):
        return "-" if x is None else f"{x * 1000:.1f} ms"
    lines = [f"agent bench: {report['sessions']} sessions x {report['steps']} steps"
             + (f" x fan-out {report['workload']['fanout']}" if report["workload"]["fanout"] else "")
             + f", {report['requests']} requests, {report['errors']} errors, wall {report['wall_s']:.2f} s",
             f"  step latency p50 {f(report['step_latency_p50_s'])}  p99 {f(report['step_latency_p99_s'])}",
             (f"  TTFT p50 {f(report['ttft_p50_s'])}  p99 {f(report['ttft_p99_s'])}  cached p50 "
              f"{f(report['ttft_cached_p50_s'])}  uncached p50 {f(report['ttft_uncached_p50_s'])}"),
             (f"  ITL mean {f(report['itl_mean_s'])}  session wall mean {f(report['session_wall_mean_s'])}  "
              f"cached prompt token ratio {report['cached_prompt_token_ratio']}")]
    hol = report.get("head_of_line")
    if hol:
        lines.append(f"  long prompt TTFT {f(hol['row']['ttft_s'])}; step TTFT p50 during its prefill "
                     f"{f(hol['ttft_p50_during_s'])} (n={hol['n_steps_during']}) vs other {f(hol['ttft_p50_other_s'])}")
    cmp_ = report.get("head_of_line_comparison")
    if cmp_:
        lines.append(f"  short-step TTFT p99 without the long prompt {f(cmp_['short_ttft_p99_without_s'])}, with it "
                     f"{f(cmp_['short_ttft_p99_with_s'])} (x{cmp_['p99_ratio']}), during its prefill "
                     f"{f(cmp_['short_ttft_p99_during_prefill_s'])} (x{cmp_['p99_during_ratio']})")
    kv = report.get("server_kv")
    if kv:
        lines.append(f"  server KV: peak {kv['peak_used_blocks']:.0f}/{kv['total_blocks']:.0f} blocks, peak pinned "
                     f"{kv['peak_pinned_blocks']:.0f}, pins released for pressure {kv['session_released_pressure']:.0f}, "
                     f"preemptions {kv['num_preemptions']:.0f}, COW tokens {kv['kv_cow_tokens']:.0f}")
    for e in report["error_samples"]:
        lines.append(f"  error: {e}")
    return "\n".join(lines)


def main(argv: list[str] | argparse.Namespace | None = None) -> int:
    """Entry point of `loopserve bench agent` (a Namespace from the CLI parser) and `python -m bench.agent`."""
    args = argv if isinstance(argv, argparse.Namespace) else build_parser().parse_args(argv)
    try:
        baseline = None
        if args.hol_baseline and args.long_prompt_tokens:
            base_args = argparse.Namespace(**{**vars(args), "long_prompt_tokens": 0,
                                              "prefix_salt": f"{args.prefix_salt or ''}hol-baseline"})
            baseline, _ = asyncio.run(run_async(base_args))
            print(format_summary(baseline), file=sys.stderr, flush=True)
        report, rows = asyncio.run(run_async(args))
        if baseline is not None:
            report["head_of_line_comparison"] = compare_head_of_line(baseline, report)
            report["baseline"] = {k: v for k, v in baseline.items() if k != "rows"}
    except (ValueError, RuntimeError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr, flush=True)
        return 2 if isinstance(e, ValueError) else 1
    plot_path = Path(args.plot) if args.plot else (Path(args.out).with_suffix(".png") if args.out else None)
    if plot_path is not None and not args.no_plot:
        try:
            plot(report, rows, plot_path)
            report["plot"] = str(plot_path)
        except ImportError:
            print("warning: matplotlib is not installed; no plot (pip install 'loopserve[bench]')", file=sys.stderr)
    text = json.dumps(report, indent=2)
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(text + "\n")
    else:
        print(text)
    print(format_summary(report), file=sys.stderr, flush=True)
    return 0 if report["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())

"""Agent-like prompts for the speculative decoding benchmarks, in chat form.

Kinds, 8 variants each: `edit` (rewrite code with one change), `json` (return a JSON object with one
field changed), `paths` (repeat a file list with one addition), `open` (open-ended writing, nothing in
the prompt to copy) and `open_sampled` (the same, sampled: the no-slowdown check).
"""
from __future__ import annotations

import json

_CODE = [
    '''def load_config(path):
    """Read a JSON config file and fill in defaults."""
    with open(path) as f:
        data = json.load(f)
    data.setdefault("host", "127.0.0.1")
    data.setdefault("port", 8000)
    data.setdefault("workers", 4)
    data.setdefault("timeout", 30)
    if data["port"] < 1 or data["port"] > 65535:
        raise ValueError("port out of range")
    if data["workers"] < 1:
        raise ValueError("need at least one worker")
    return data
''',
    '''class RateLimiter:
    def __init__(self, rate, burst):
        self.rate = rate
        self.burst = burst
        self.tokens = burst
        self.last = time.monotonic()

    def allow(self):
        now = time.monotonic()
        self.tokens = min(self.burst, self.tokens + (now - self.last) * self.rate)
        self.last = now
        if self.tokens >= 1:
            self.tokens -= 1
            return True
        return False
''',
    '''def merge_sorted(a, b):
    result = []
    i = j = 0
    while i < len(a) and j < len(b):
        if a[i] <= b[j]:
            result.append(a[i])
            i += 1
        else:
            result.append(b[j])
            j += 1
    result.extend(a[i:])
    result.extend(b[j:])
    return result
''',
    '''async def fetch_all(session, urls, limit=10):
    semaphore = asyncio.Semaphore(limit)
    results = {}

    async def fetch(url):
        async with semaphore:
            async with session.get(url) as response:
                results[url] = await response.text()

    await asyncio.gather(*(fetch(url) for url in urls))
    return results
''',
]
_EDITS = ["replace `return` on the last line with `return  # done`",
          "rename the first argument of the first function to `arg`",
          "add the comment `# reviewed` above the first line",
          "add a type hint `: list` to the first argument"]

_RECORDS = [
    {"id": 1042, "name": "deploy-api", "status": "running", "owner": "platform", "replicas": 3,
     "image": "registry.local/api:1.8.2", "env": {"LOG_LEVEL": "info", "REGION": "eu-west-1"},
     "ports": [8080, 9090], "labels": ["prod", "critical"], "created": "2024-05-01T10:00:00Z"},
    {"task": "index-docs", "state": "queued", "priority": 2, "retries": 0, "max_retries": 5,
     "input": {"bucket": "docs-raw", "prefix": "2024/06/"}, "output": {"bucket": "docs-index"},
     "tags": ["nightly", "search"], "submitted_by": "scheduler", "submitted_at": "2024-06-02T01:00:00Z"},
]
_FIELD_CHANGES = ['Set "status" (or "state") to "done".', 'Increase the numeric "replicas" or "priority" by one.',
                  'Add the tag "reviewed" to the list of tags or labels.', 'Change the owner or submitter to "alice".']

_PATHS = [
    "src/loopserve/engine/core.py", "src/loopserve/engine/scheduler.py", "src/loopserve/engine/kv_cache.py",
    "src/loopserve/runner/model_runner.py", "src/loopserve/runner/sampler.py", "src/loopserve/model/llama.py",
    "src/loopserve/model/loader.py", "src/loopserve/server/app.py", "src/loopserve/server/metrics.py",
    "tests/unit/test_scheduler.py", "tests/unit/test_sampler.py", "tests/engine/test_engine.py",
    "docs/ARCHITECTURE.md", "bench/offline.py", "pyproject.toml", "README.md",
]

_OPEN = ["Write a short poem about the sea at night.", "Explain why the sky is blue to a child.",
         "Give three tips for staying focused while working from home.",
         "Describe a day in the life of a lighthouse keeper.", "What are the benefits of learning a second language?",
         "Write a short story about a robot who learns to paint.", "Why do cats purr? Answer briefly.",
         "Suggest a weekend plan for a rainy city break."]


def _user(text: str) -> list[dict]:
    return [{"role": "user", "content": text}]


def prompts(kind: str, n: int = 8) -> list[list[dict]]:
    """n conversations of one kind (see KINDS)."""
    out = []
    for i in range(n):
        if kind == "edit":
            code, change = _CODE[i % len(_CODE)], _EDITS[(i // len(_CODE)) % len(_EDITS)]
            out.append(_user("You are a code editing tool. Apply one edit to the code and output the complete "
                             f"edited file, nothing else.\nEdit: {change}.\n\n```python\n{code}```"))
        elif kind == "json":
            rec, change = _RECORDS[i % len(_RECORDS)], _FIELD_CHANGES[(i // len(_RECORDS)) % len(_FIELD_CHANGES)]
            out.append(_user(f"Return this JSON with one field changed. {change} Output only the JSON.\n\n"
                             f"{json.dumps(rec, indent=2)}"))
        elif kind == "paths":
            paths = _PATHS[i % 4:] + _PATHS[:i % 4]
            out.append(_user("Repeat this list of file paths exactly, one per line, and add "
                             f"tests/unit/test_new_{i}.py at the end.\n\n" + "\n".join(paths)))
        elif kind in ("open", "open_sampled"):
            out.append(_user(_OPEN[i % len(_OPEN)]))
        else:
            raise ValueError(f"unknown prompt kind {kind!r}; known: {', '.join(KINDS)}")
    return out


KINDS = ("edit", "json", "paths", "open", "open_sampled")


def sampling_params(kind: str, max_tokens: int, index: int = 0):
    """Greedy for every kind except `open_sampled` (seeded sampling: the text rarely repeats itself, so
    proposals rarely match -- the no-slowdown check; seeded n-gram output is still identical)."""
    from loopserve import SamplingParams
    if kind == "open_sampled":
        return SamplingParams(temperature=0.8, top_p=0.95, seed=1000 + index, max_tokens=max_tokens)
    return SamplingParams(temperature=0.0, max_tokens=max_tokens)

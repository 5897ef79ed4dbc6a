"""`loopserve` command line: fetch models, generate completions, chat in the terminal, serve over HTTP."""
from __future__ import annotations

import argparse
import sys
import time

from loopserve.config import DEFAULT_MODEL, FUSED_DECODE_GEMV_MODES

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


def _parse_bytes(text: str) -> int:
    """'1073741824', '512M', '2G', '1.5GiB' -> bytes."""
    t = text.strip().lower().removesuffix("b").removesuffix("i")
    scale = {"k": 1 << 10, "m": 1 << 20, "g": 1 << 30, "t": 1 << 40}.get(t[-1:], 1)
    if scale != 1:
        t = t[:-1]
    try:
        value = float(t) * scale
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a size in bytes: {text!r} (e.g. 1073741824, 512M, 2G)") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"size must be positive, got {text!r}")
    return int(value)


def _add_serve_args(p: argparse.ArgumentParser) -> None:
    import os

    from loopserve.config import (DEFAULT_BLOCK_SIZE, DEFAULT_HOST, DEFAULT_MAX_NUM_BATCHED_TOKENS,
                                  DEFAULT_MAX_NUM_SEQS, DEFAULT_MAX_WAITING_REQUESTS, DEFAULT_PORT, SchedulerConfig,
                                  ServerConfig)
    p.add_argument("--host", default=DEFAULT_HOST, help=f"address to listen on (default: {DEFAULT_HOST})")
    p.add_argument("--port", type=int, default=DEFAULT_PORT, help=f"(default: {DEFAULT_PORT})")
    p.add_argument("--served-model-name", default=None,
                   help="the model name clients send and /v1/models lists (default: the --model value)")
    p.add_argument("--api-key", default=os.environ.get("LOOPSERVE_API_KEY"),
                   help="require 'Authorization: Bearer KEY' on /v1/*, /tokenize, /detokenize "
                        "(default: $LOOPSERVE_API_KEY, else no auth)")
    p.add_argument("--max-num-seqs", type=int, default=DEFAULT_MAX_NUM_SEQS,
                   help=f"most requests running at once (default: {DEFAULT_MAX_NUM_SEQS})")
    p.add_argument("--max-num-batched-tokens", type=int, default=DEFAULT_MAX_NUM_BATCHED_TOKENS,
                   help=f"token budget of one engine step (default: {DEFAULT_MAX_NUM_BATCHED_TOKENS})")
    p.add_argument("--max-model-len", type=int, default=None,
                   help="context window in tokens (default: the model's, capped by the KV cache)")
    p.add_argument("--kv-cache-bytes", type=_parse_bytes, default=None,
                   help="KV-cache pool size, e.g. 2G (default: 1 GiB on CPU, a share of free memory on GPU)")
    p.add_argument("--block-size", type=int, default=DEFAULT_BLOCK_SIZE,
                   help=f"tokens per KV-cache block (default: {DEFAULT_BLOCK_SIZE})")
    p.add_argument("--no-prefix-caching", action="store_true", help="disable automatic prefix caching")
    p.add_argument("--session-retention", type=float, default=ServerConfig.session_retention_s, metavar="SECONDS",
                   help="agent sessions (X-Session-Id or `user`): seconds a finished turn's KV stays pinned when "
                        "the request sends no hint; 0 turns retention off "
                        f"(default: {ServerConfig.session_retention_s:g})")
    p.add_argument("--prompt-segment-cache-tokens", type=int, default=ServerConfig.prompt_segment_cache_tokens,
                   metavar="N", help="prompts reuse the token ids of segments (between the tokenizer's added "
                                     "tokens, e.g. chat messages) that earlier requests held, up to N cached ids; "
                                     "0 tokenizes every prompt whole "
                                     f"(default: {ServerConfig.prompt_segment_cache_tokens})")
    p.add_argument("--host-kv-cache-bytes", type=_parse_bytes, default=None,
                   help="host-memory tier for retained sessions' KV forced off the device, e.g. 8G "
                        "(default: 4 GiB on GPU, 0 on CPU)")
    p.add_argument("--long-prompt-threshold", type=int, default=SchedulerConfig.long_prompt_threshold,
                   help="head-of-line protection: a prefill with more tokens left than this yields to shorter "
                        f"work (default: {SchedulerConfig.long_prompt_threshold})")
    p.add_argument("--long-prompt-chunk", type=int, default=None,
                   help="tokens a yielding long prefill gets per step while shorter work exists; it doubles "
                        "each step the prefill runs alone (default: 1024 on GPU, 128 on CPU)")
    p.add_argument("--speculative-config", default=None, metavar="JSON",
                   help='speculative decoding, e.g. \'{"method": "ngram", "num_speculative_tokens": 5}\' '
                        "(methods: ngram, draft_model with \"model\", lookahead; default: off)")
    from loopserve.tools import PARSERS
    from loopserve.tools.reasoning import REASONING_PARSERS
    p.add_argument("--tool-call-parser", default=None, choices=sorted(PARSERS),
                   help="the model's tool-call format (default: chosen from its chat template)")
    p.add_argument("--reasoning-parser", default=None, choices=sorted(REASONING_PARSERS),
                   help="split <think> reasoning into reasoning_content (default: off)")
    p.add_argument("--max-waiting-requests", type=int, default=DEFAULT_MAX_WAITING_REQUESTS,
                   help="requests allowed to wait beyond --max-num-seqs before new ones get 429 "
                        f"(default: {DEFAULT_MAX_WAITING_REQUESTS})")
    p.add_argument("--drain-timeout", type=float, default=ServerConfig.drain_timeout_s,
                   help="on SIGTERM, seconds in-flight requests get to finish "
                        f"(default: {ServerConfig.drain_timeout_s:g})")
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:1 ... (default: cuda if available)")
    p.add_argument("--attention-backend", default="auto", choices=["auto", "torch", "triton"],
                   help="paged attention kernels (default: auto = Triton on CUDA, torch on CPU)")
    p.add_argument("--enforce-eager", action="store_true",
                   help="no CUDA graphs (decode steps, prefill / extend steps of up to 8 sequences, "
                        "mixed steps)")
    p.add_argument("--mixed-step-graphs", default=True, action=argparse.BooleanOptionalAction,
                   help="CUDA graphs for steps of more than 8 sequences with at most 4 prompt chunks (a busy "
                        "server's decodes beside new prompts); --no-mixed-step-graphs runs them eagerly "
                        "(default: on)")
    p.add_argument("--overlap-scheduling", default=None, action=argparse.BooleanOptionalAction,
                   help="schedule and launch the next step before reading back the current one "
                        "(default: on for CUDA, off on CPU; always off with speculative decoding)")
    p.add_argument("--fused-decode-gemv", default="auto", choices=list(FUSED_DECODE_GEMV_MODES),
                   help="batch 1-4 decode layers as Triton GEMVs with the norms, SiLU-mul and residual adds "
                        "fused in (each GEMV's tile, or cuBLAS, timed per role at startup); auto: per "
                        "CUDA-graph batch size, whichever of that and cuBLAS timed faster at startup "
                        "(default: auto)")
    p.add_argument("--pdl", default=True, action=argparse.BooleanOptionalAction,
                   help="programmatic dependent launch for the decode kernels on Hopper and later: each may "
                        "start while the one before it finishes (default: on)")
    p.add_argument("--seed", type=int, default=0, help="engine seed for unseeded sampling (default: 0)")
    p.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"])
    p.add_argument("--no-access-log", action="store_true", help="do not log every HTTP request")


def cmd_serve(args: argparse.Namespace) -> int:
    from loopserve.config import CacheConfig, EngineConfig, SchedulerConfig, ServerConfig
    from loopserve.fetch import resolve_model

    from loopserve.config import MAX_SESSION_RETENTION_S
    for name in ("max_num_seqs", "max_num_batched_tokens", "block_size", "long_prompt_threshold", "long_prompt_chunk"):
        if getattr(args, name) is not None and getattr(args, name) < 1:
            raise UsageError(f"--{name.replace('_', '-')} must be >= 1")
    if args.max_model_len is not None and args.max_model_len < 2:
        raise UsageError("--max-model-len must be >= 2")
    if not 0 <= args.session_retention <= MAX_SESSION_RETENTION_S:
        raise UsageError(f"--session-retention must be in [0, {MAX_SESSION_RETENTION_S:g}]")
    if args.max_waiting_requests < 0:
        raise UsageError("--max-waiting-requests must be >= 0")
    if args.prompt_segment_cache_tokens < 0:
        raise UsageError("--prompt-segment-cache-tokens must be >= 0")
    if not 0 <= args.port <= 65535:
        raise UsageError("--port must be in [0, 65535]")
    try:
        path = resolve_model(args.model, models_dir=args.models_dir)
        speculative = _speculative_config(args.speculative_config)
    except ValueError as e:
        raise UsageError(str(e)) from None
    engine_config = EngineConfig(speculative=speculative, attention_backend=args.attention_backend,
        enforce_eager=args.enforce_eager, overlap_scheduling=args.overlap_scheduling,
        fused_decode_gemv=args.fused_decode_gemv, programmatic_dependent_launch=args.pdl,
        mixed_step_graphs=args.mixed_step_graphs, model=path, dtype=args.dtype,
        device=args.device, load_format=args.load_format, seed=args.seed, max_model_len=args.max_model_len,
        cache=CacheConfig(block_size=args.block_size, kv_cache_bytes=args.kv_cache_bytes,
                          enable_prefix_caching=not args.no_prefix_caching,
                          host_kv_cache_bytes=args.host_kv_cache_bytes),
        scheduler=SchedulerConfig(max_num_batched_tokens=args.max_num_batched_tokens, max_num_seqs=args.max_num_seqs,
                                  long_prompt_threshold=args.long_prompt_threshold,
                                  long_prompt_chunk=args.long_prompt_chunk))
    server_config = ServerConfig(host=args.host, port=args.port, api_key=args.api_key or None,
                                 served_model_name=args.served_model_name or args.model,
                                 max_waiting_requests=args.max_waiting_requests, drain_timeout_s=args.drain_timeout,
                                 tool_call_parser=args.tool_call_parser, reasoning_parser=args.reasoning_parser,
                                 session_retention_s=args.session_retention,
                                 prompt_segment_cache_tokens=args.prompt_segment_cache_tokens)
    from loopserve.server.launcher import run_server
    return run_server(engine_config, server_config, log_level=args.log_level, access_log=not args.no_access_log)


def _speculative_config(text: str | None):
    import json

    from loopserve.config import SpeculativeConfig
    if text is None:
        return None
    try:
        return SpeculativeConfig.from_dict(json.loads(text))
    except json.JSONDecodeError as e:
        raise ValueError(f"--speculative-config is not valid JSON: {e}") from None


def cmd_bench_spec(args: argparse.Namespace) -> int:
    from loopserve.fetch import resolve_model
    from loopserve.spec.select import main as bench_spec

    try:
        args.target = str(resolve_model(args.target, models_dir=args.models_dir))
        args.draft = [str(resolve_model(d, models_dir=args.models_dir)) for d in args.draft or []]
    except ValueError as e:
        raise UsageError(str(e)) from None
    if not args.draft and not args.include:
        raise UsageError("give at least one --draft (or --include ngram / lookahead)")
    return bench_spec(args)


def _bench_agent_module():
    """bench/agent.py of this source checkout (`bench` is not an installed package), or None."""
    from pathlib import Path
    root = str(Path(__file__).resolve().parents[1])
    if Path(root, "bench", "agent.py").is_file() and root not in sys.path:
        sys.path.insert(0, root)
    try:
        import bench.agent
    except ImportError:
        return None
    return bench.agent


def cmd_bench_agent(args: argparse.Namespace) -> int:
    agent = _bench_agent_module()
    if agent is None:
        raise UsageError("`bench agent` needs a loopserve source checkout (bench/agent.py)")
    return agent.main(args)


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

    p = sub.add_parser("serve", help="OpenAI-compatible HTTP server (with a web playground)", description=(
        "Serve a model over an OpenAI-compatible HTTP API (/v1/chat/completions, /v1/completions, "
        "/v1/models), with /health, /metrics, /tokenize, /detokenize and a web playground at /."))
    _add_model_args(p)
    _add_serve_args(p)
    p.set_defaults(func=cmd_serve)

    p = sub.add_parser("bench", help="benchmarks and tuning helpers", description="Benchmarks and tuning helpers.")
    bench = p.add_subparsers(dest="bench_command", metavar="BENCH", required=True)
    b = bench.add_parser("spec", help="pick a draft model: acceptance and expected speedup per draft", description=(
        "Generate the prompts with the target and each draft model (speculative decoding, fixed k) and "
        "report acceptance, tokens per target forward, measured draft/verify step costs and the expected "
        "speedup, to pick a draft before deploying it. Prints JSON (and a table on stderr)."))
    b.add_argument("--target", required=True, help="target model alias or path")
    b.add_argument("--draft", action="append", help="a candidate draft model (repeatable); same tokenizer")
    b.add_argument("--prompts", required=True, help="JSONL (strings, {prompt} or {messages}) or text, one per line")
    b.add_argument("--include", nargs="*", choices=["ngram", "lookahead"], help="also measure these proposers")
    b.add_argument("--num-speculative-tokens", "-k", type=int, default=4, help="k (default: 4)")
    b.add_argument("--max-tokens", type=int, default=128, help="tokens per prompt (default: 128)")
    b.add_argument("--temperature", type=float, default=0.0, help="(default: 0 = greedy)")
    b.add_argument("--num-prompts", type=int, default=None, help="use only the first N prompts")
    b.add_argument("--dtype", default="auto", choices=["auto", "fp32", "bf16", "fp16"])
    b.add_argument("--kv-cache-bytes", type=_parse_bytes, default=None, help="KV pool size of each model")
    b.add_argument("--models-dir", default=None)
    b.add_argument("--out", default=None, help="also write the JSON report here")
    b.set_defaults(func=cmd_bench_spec)
    b = bench.add_parser("agent", help="agent-loop benchmark against an OpenAI-compatible server", description=(
        "Drive a running OpenAI-compatible server (loopserve, llama-server, vLLM) with concurrent synthetic "
        "agent sessions: a shared system prompt with tool schemas, a history growing by a reply and a tool "
        "result per step, tool pauses, optional multi-agent fan-out and a long cold prompt. Reports step "
        "latency, TTFT (cached vs uncached), ITL and prefix-cache reuse as JSON, plus a PNG plot."))
    agent = _bench_agent_module()
    if agent is not None:
        agent.add_arguments(b)
    b.set_defaults(func=cmd_bench_agent)
    # Further `bench` subcommands register on `bench` above.
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

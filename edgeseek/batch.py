"""Offline batch generation over JSONL: OpenAI's batch format in, OpenAI-shaped lines out.

Input lines, one request each:
    {"custom_id": "a", "method": "POST", "url": "/v1/chat/completions",
     "body": {"messages": [...], "max_tokens": 64, "temperature": 0, ...}}
    {"custom_id": "b", "prompt": "text"}                      (short form: raw completion)
    {"custom_id": "c", "messages": [...], "max_tokens": 32}   (short form: chat)
Output: one line per request as it completes, appended and flushed: {"id", "custom_id",
"response": {"status_code": 200, "body": <chat.completion or text_completion>}, "error": null}, or for
a bad line {"id", "custom_id" (or null), "response": null, "error": {"code", "message", "line"}}. Lines
are judged as OpenAI's API judges them: sampling numbers NaN, infinite or out of range, a role other
than system (or developer, its newer name) / user / assistant / tool, content other than a string or
text parts are bad lines; so are options edgeseek does not do (n > 1, tools, logprobs, ...), which
the server refuses too.
Custom ids already in the output file are skipped, so an interrupted run resumes where it stopped.
A line may carry "lora" (top level, or in the body): an adapter name given on the command line
(--lora NAME=FILE), an adapter file ("FILE" or "FILE:SCALE"), a list of them, or null for the base
model; without it the line runs with the command line's unnamed --lora adapters.

Up to `parallel` requests decode together in a `generation.BatchGenerator` (one forward pass per
step over every active sequence; the prompts admitted together prefilled in one pass); this module only reads,
judges and writes lines.
"""
from __future__ import annotations

import json
import math
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator

from .chat import chat_prompt_ids
from .errors import EdgeseekError
from .generation import BatchGenerator, Delta
from .sampler import SamplerConfig

URLS = {"/v1/chat/completions": "chat", "/v1/completions": "completion"}
# Request numbers as OpenAI's API judges them (vLLM's and llama.cpp's servers for top_k, min_p and
# repeat_penalty, which OpenAI lacks): name -> (SamplerConfig field, or None where the value is
# checked but not used; integer or not; least, most; least excluded).
SAMPLING = {
    "temperature": ("temperature", False, 0.0, 2.0, False),
    "top_p": ("top_p", False, 0.0, 1.0, False),
    "top_k": ("top_k", True, -1, None, False),  # -1 or 0: every token
    "min_p": ("min_p", False, 0.0, 1.0, False),
    "repeat_penalty": ("repeat_penalty", False, 0.0, None, True),  # logits are divided by it
    "seed": ("seed", True, 0, 2**63 - 1, False),  # numpy's generators take no negative seed
    "presence_penalty": (None, False, -2.0, 2.0, False),
    "frequency_penalty": (None, False, -2.0, 2.0, False),
}
ROLES = ("system", "user", "assistant", "tool")
ALIASES = {"developer": "system"}  # OpenAI's newer name for the system message (o1 and later models)
# Options that would change what the reply means and that edgeseek does not do: refused, not ignored.
UNSUPPORTED = {"n": lambda v: v not in (None, 1), "best_of": lambda v: v not in (None, 1),
               "logprobs": lambda v: v not in (None, False), "top_logprobs": lambda v: v not in (None, 0),
               "echo": lambda v: v not in (None, False), "suffix": lambda v: v not in (None, ""),
               "tools": lambda v: v not in (None, []), "functions": lambda v: v not in (None, []),
               "logit_bias": lambda v: v not in (None, {})}


@dataclass
class Request:
    custom_id: str
    line: int
    kind: str  # "chat" or "completion"
    prompt: object  # messages (list of dicts), text, or token ids
    max_tokens: int
    sampler: SamplerConfig
    stop: list[str]
    lora: list[str] | None = None  # adapter names or FILE[:SCALE] specs; None: the run's default adapters


@dataclass
class BadLine:
    line: int
    custom_id: str | None
    message: str


def parse_line(text: str, line: int, defaults: SamplerConfig, max_tokens: int) -> Request | BadLine:
    """One input line -> a Request, or a BadLine naming the problem."""
    try:
        obj = json.loads(text)
    except json.JSONDecodeError as e:
        return BadLine(line, None, f"line {line}: invalid JSON: {e.msg} at column {e.colno}")
    if not isinstance(obj, dict):
        return BadLine(line, None, f"line {line}: expected a JSON object, got {type(obj).__name__}")
    cid = obj.get("custom_id")
    if not isinstance(cid, str) or not cid:
        return BadLine(line, None, f"line {line}: missing custom_id (a non-empty string)")
    if "body" in obj or "url" in obj or "method" in obj:
        body, url = obj.get("body"), obj.get("url", "/v1/chat/completions")
        if obj.get("method", "POST") != "POST":
            return BadLine(line, cid, f"line {line}: method must be POST, got {obj.get('method')!r}")
        if url not in URLS:
            return BadLine(line, cid, f"line {line}: unsupported url {url!r}; supported: {', '.join(URLS)}")
        if not isinstance(body, dict):
            return BadLine(line, cid, f"line {line}: missing body (an object with messages or prompt)")
        kind = URLS[url]
    else:
        body = obj
        kind = "chat" if "messages" in obj else "completion"
    r = parse_body(kind, body, defaults, max_tokens)
    if isinstance(r, str):
        return BadLine(line, cid, f"line {line}: {r}")
    lora = body.get("lora", obj.get("lora", ...))
    if lora is ...:
        lora = None
    elif lora is None:
        lora = []
    elif isinstance(lora, str) and lora:
        lora = [lora]
    elif not (isinstance(lora, list) and all(isinstance(s, str) and s for s in lora)):
        return BadLine(line, cid, f"line {line}: lora must be an adapter name or file, a list of them, or null, "
                                  f"got {json.dumps(lora)[:40]}")
    return Request(cid, line, kind, *r, lora)


def parse_body(kind: str, body: dict, defaults: SamplerConfig, max_tokens: int):
    """A request body of /v1/chat/completions (kind "chat") or /v1/completions ("completion") ->
    (messages or prompt text, max_tokens, SamplerConfig, stop strings), or what is wrong with it.
    The server judges its requests by the same rules."""
    for name, bad in UNSUPPORTED.items():
        if bad(body.get(name)):
            return f"{name}={json.dumps(body[name])[:40]} is not supported"
    key = "messages" if kind == "chat" else "prompt"
    prompt = body.get(key)
    if kind == "chat":
        prompt = _messages(prompt)
        if isinstance(prompt, str):
            return prompt
    else:
        if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], str):
            prompt = prompt[0]  # one prompt in a list, as OpenAI's clients may send it
        ids = isinstance(prompt, list) and prompt and all(isinstance(t, int) and not isinstance(t, bool)
                                                          for t in prompt)
        if not ids and (not isinstance(prompt, str) or not prompt):
            return "missing prompt (or messages): a string, or a list of token ids"
    changes = {}
    for name, (option, integer, *_) in SAMPLING.items():
        if name not in body:
            continue
        problem = _bad_number(name, body[name])
        if problem:
            return problem
        if option is not None:
            changes[option] = int(body[name]) if integer else float(body[name])
    n = body.get("max_completion_tokens", body.get("max_tokens", max_tokens))
    if not isinstance(n, int) or isinstance(n, bool) or n < 1:
        return f"max_tokens must be a positive integer, got {json.dumps(n)}"
    stop = body.get("stop") or []
    stop = [stop] if isinstance(stop, str) else stop
    if not isinstance(stop, list) or not all(isinstance(s, str) for s in stop):
        return "stop must be a string or a list of strings"
    return prompt, n, defaults.updated(**changes), stop


def _bad_number(name: str, v) -> str | None:
    """What is wrong with the value of a sampling option, by SAMPLING's rules; None if nothing."""
    _, integer, least, most, open_least = SAMPLING[name]
    if not isinstance(v, (int, float)) or isinstance(v, bool):
        return f"{name} must be a number, got {json.dumps(v)[:40]}"
    if not math.isfinite(v):
        return f"{name} must be a finite number, got {json.dumps(v)}"
    if integer and v != int(v):
        return f"{name} must be an integer, got {v!r}"
    if most is not None and not least <= v <= most:
        return f"{name} must be between {least} and {most}, got {v!r}"
    if v < least or (open_least and v == least):
        return f"{name} must be {'above' if open_least else 'at least'} {least}, got {v!r}"
    return None


def _messages(messages) -> list[dict] | str:
    """Chat messages as OpenAI accepts them -> a copy with each content one string (text parts
    joined by newlines, as vLLM does), or what is wrong with them."""
    if not isinstance(messages, list) or not messages:
        return "messages must be a non-empty list of {role, content} objects"
    out = []
    for i, m in enumerate(messages):
        if not isinstance(m, dict):
            return f"messages[{i}] must be a {{role, content}} object, got {json.dumps(m)[:40]}"
        role = m.get("role")
        role = ALIASES.get(role, role) if isinstance(role, str) else role
        if role not in ROLES:
            return f"messages[{i}].role must be one of {', '.join(ROLES)}, got {json.dumps(m.get('role'))[:40]}"
        content = m.get("content")
        if isinstance(content, list) and content and all(
                isinstance(p, dict) and p.get("type") == "text" and isinstance(p.get("text"), str) for p in content):
            content = "\n".join(p["text"] for p in content)
        if not isinstance(content, str):
            return (f"messages[{i}].content must be a string or a list of text parts "
                    "({\"type\": \"text\", \"text\": ...}); other content is not supported")
        out.append({**m, "role": role, "content": content})
    return out


def text_lines(path: Path) -> Iterator[str]:
    """The lines of a JSONL file, each decoded from UTF-8; a file that is not UTF-8 text (a model
    file given as IN.jsonl, say) is an EdgeseekError naming it and the line."""
    with open(path, "rb") as f:
        for i, raw in enumerate(f, start=1):
            if i == 1 and raw.startswith(b"\xef\xbb\xbf"):  # a byte-order mark (editors on Windows write one)
                raw = raw[3:]
            try:
                yield raw.decode("utf-8")
            except UnicodeDecodeError:
                raise EdgeseekError(f"{path}: line {i} is not UTF-8 text (not a JSONL file?)") from None


def check_output(path: Path) -> None:
    """The output can be appended to: said before any model loads, naming it. Its folder is made."""
    if path.is_dir():
        raise EdgeseekError(f"{path}: is a folder; -o/--output takes the JSONL file the replies go to")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except (FileExistsError, NotADirectoryError):
        raise EdgeseekError(f"{path}: cannot make its folder {path.parent}: part of that path is a file") from None
    except OSError as e:
        raise EdgeseekError(f"{path}: cannot make its folder {path.parent}: {e.strerror or e}") from None


def answered(out_path: Path) -> tuple[set[str], set[int]]:
    """What an existing output file already holds: the custom_ids answered, and the input line
    numbers of errors that had no custom_id (a torn last line is ignored)."""
    ids, lines = set(), set()
    if out_path.exists():
        for text in text_lines(out_path):
            try:
                obj = json.loads(text)
                cid = obj.get("custom_id")
            except (json.JSONDecodeError, AttributeError):
                continue
            if cid is not None:
                ids.add(cid)
            elif isinstance(obj.get("error"), dict) and isinstance(obj["error"].get("line"), int):
                lines.add(obj["error"]["line"])
    return ids, lines


def read_requests(lines: Iterator[str], defaults: SamplerConfig, max_tokens: int,
                  skip: tuple[set[str], set[int]] = (set(), set())):
    """(requests to run, bad lines) from the input; duplicates of an earlier custom_id are bad lines.
    `skip` (from `answered`) leaves out what an earlier run already wrote."""
    skip_ids, skip_lines = skip
    seen: set[str] = set()
    good, bad = [], []
    for i, text in enumerate(lines, start=1):
        if not text.strip():
            continue
        r = parse_line(text, i, defaults, max_tokens)
        cid = r.custom_id
        if cid is not None and cid in seen:
            if i not in skip_lines:
                bad.append(BadLine(i, None, f"line {i}: duplicate custom_id {cid!r}"))
            continue
        if cid is not None:
            seen.add(cid)
        if (cid is not None and cid in skip_ids) or (cid is None and i in skip_lines):
            continue
        (bad if isinstance(r, BadLine) else good).append(r)
    return good, bad


def _result_line(req: Request, text: str, last: Delta, model_name: str) -> dict:
    """The output line of a finished request; `last` is its final Delta."""
    created = int(time.time())
    usage = {"prompt_tokens": last.prompt_tokens, "completion_tokens": last.generation_tokens,
             "total_tokens": last.prompt_tokens + last.generation_tokens}
    if req.kind == "chat":
        body = {"id": f"chatcmpl-{uuid.uuid4().hex[:24]}", "object": "chat.completion", "created": created,
                "model": model_name, "choices": [{"index": 0, "message": {"role": "assistant", "content": text},
                                                  "finish_reason": last.finish_reason}], "usage": usage}
    else:
        body = {"id": f"cmpl-{uuid.uuid4().hex[:24]}", "object": "text_completion", "created": created,
                "model": model_name, "choices": [{"index": 0, "text": text, "finish_reason": last.finish_reason}],
                "usage": usage}
    return {"id": f"batch_req_{uuid.uuid4().hex[:24]}", "custom_id": req.custom_id,
            "response": {"status_code": 200, "request_id": body["id"], "body": body}, "error": None}


def error_line(bad: BadLine, code: str = "invalid_request") -> dict:
    return {"id": f"batch_req_{uuid.uuid4().hex[:24]}", "custom_id": bad.custom_id, "response": None,
            "error": {"code": code, "message": bad.message, "line": bad.line}}


def use_lora(engine, specs: list[str]) -> dict[str, tuple]:
    """--lora values of a batch run: FILE[:SCALE] become the engine's default adapters;
    NAME=FILE[:SCALE] are read and returned by name, for the lines that ask for them."""
    from .lora import parse_spec
    named, default = {}, []
    for spec in specs:
        name, eq, rest = spec.partition("=")
        if eq and name and "/" not in name and rest:  # as lora.check_specs reads it
            named[name] = (engine.lora.get(*parse_spec(rest), name=name),)
        else:
            default.append(spec)
    engine.use_lora(default)
    return named


def _adapters(engine, req: Request, named: dict[str, tuple]) -> tuple | None:
    """The adapters of a request: None for the engine's default."""
    if req.lora is None:
        return None
    from .lora import parse_spec
    out = []
    for spec in req.lora:
        out += named[spec] if spec in named else [engine.lora.get(*parse_spec(spec))]
    return tuple(out)


def run(engine, requests: list[Request], emit: Callable[[dict], None], parallel: int = 32, n_ctx: int = 4096,
        on_token: Callable[[int], None] | None = None, named: dict[str, tuple] | None = None) -> int:
    """Runs the requests, up to `parallel` at a time; `emit` gets each output line as its request
    finishes, `on_token` the number of tokens each step sampled. Returns how many requests failed
    (a prompt too long for the context, an adapter that cannot be read, ...). `named`: adapters a
    line may ask for by name (use_lora)."""
    model_name = engine.path.name
    pending = list(requests)
    gen = BatchGenerator(engine)
    running: dict[str, tuple[Request, list[str]]] = {}  # custom_id -> (request, text so far)
    failed = 0

    def take(d: Delta) -> None:
        req, text = running[d.uid]
        text.append(d.text)
        if d.finish_reason:
            del running[d.uid]
            emit(_result_line(req, "".join(text), d, model_name))

    def admit(req: Request) -> None:
        nonlocal failed
        try:
            ids = _prompt_ids(engine, req)
            try:
                adapters = _adapters(engine, req, named or {})
                gen.queue(ids, max_tokens=req.max_tokens, sampler=req.sampler, stop=req.stop, n_ctx=n_ctx,
                          uid=req.custom_id, adapters=adapters)
            except EdgeseekError as e:  # the prompt does not fit
                raise EdgeseekError(f"line {req.line}: {e}") from None
        except EdgeseekError as e:
            failed += 1
            code = "context_length_exceeded" if "context" in str(e) else "invalid_request"
            emit(error_line(BadLine(req.line, req.custom_id, str(e)), code))
            return
        running[req.custom_id] = (req, [])

    def fill() -> None:
        n = 0
        while pending and len(gen) + n < parallel:
            req = pending.pop(0)
            admit(req)
            n += req.custom_id in running
        firsts = gen.prefill() if n else []
        if on_token and firsts:
            on_token(len(firsts))
        for d in firsts:
            take(d)

    fill()
    while gen:
        deltas = gen.step()
        if on_token:
            on_token(len(deltas))
        for d in deltas:
            take(d)
        fill()
    return failed


def _prompt_ids(engine, req: Request) -> list[int]:
    return prompt_ids_of(engine, req.kind, req.prompt)


def prompt_ids_of(engine, kind: str, prompt) -> list[int]:
    """The token ids of a request's prompt: text or token ids (completion), or messages through
    the model's chat template (chat). EdgeseekError names what is wrong."""
    if kind == "completion":
        if isinstance(prompt, list):
            bad = [t for t in prompt if not 0 <= t < engine.tokenizer.vocab_size]
            if bad:
                raise EdgeseekError(f"prompt token id {bad[0]} is outside the vocabulary "
                                    f"(0..{engine.tokenizer.vocab_size - 1})")
            return list(prompt)
        return engine.tokenizer.encode(prompt)
    if engine.chat_template is None:
        raise EdgeseekError(f"{engine.path.name} has no chat template: send prompt, not messages")
    return chat_prompt_ids(engine, prompt)

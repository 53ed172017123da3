"""`edgeseek serve`: OpenAI's HTTP API over a loaded engine (Starlette app, uvicorn server).

POST /v1/chat/completions and /v1/completions, streamed as server-sent events or not; GET
/v1/models and /health. Requests are judged by the batch runner's rules (`batch.parse_body`), then
handed to the `Scheduler` thread, which decodes every running request in one batch; this module only
turns HTTP into jobs and Deltas into OpenAI's objects. Errors have OpenAI's shape:
{"error": {"message", "type", "param", "code"}}. Text between <think> and </think> (R1-style
models) is returned as `reasoning_content`, as DeepSeek's API does.
"""
from __future__ import annotations

import asyncio
import hmac
import ipaddress
import json
import signal
import socket
import threading
import time
import uuid

import uvicorn
from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import JSONResponse, StreamingResponse
from starlette.routing import Route

from .batch import parse_body, prompt_ids_of
from .chat import ThinkSplitter, prompt_ids
from .errors import EdgeseekError
from .generation import Delta
from .sampler import SamplerConfig
from .scheduler import Job, Scheduler, ServerClosing

MAX_BODY = 8 << 20  # bytes of a request body: a long prompt is a few hundred KiB
MAX_STOP = 16  # stop strings of one request (OpenAI allows 4; llama.cpp's server has no limit)


class ApiError(Exception):
    """A request's failure, answered with OpenAI's error object."""

    def __init__(self, status: int, message: str, type: str = "invalid_request_error", param: str | None = None,
                 code: str | None = None):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type, param, code

    def response(self) -> JSONResponse:
        return JSONResponse({"error": self.body()}, status_code=self.status)

    def body(self) -> dict:
        return {"message": self.message, "type": self.type, "param": self.param, "code": self.code}


def _param_of(problem: str) -> str | None:
    """The request field a `parse_body` problem names ("temperature must be ..." -> temperature,
    "n=2 is not supported" -> n)."""
    word = problem.split(" ", 1)[0].split("=", 1)[0]
    return word if word.replace("_", "").replace("[", "").replace("]", "").replace(".", "").isalnum() else None


def _failure(e: BaseException) -> ApiError:
    """What a client is told about an exception that ended its job."""
    if isinstance(e, ApiError):
        return e
    if isinstance(e, ServerClosing):
        return ApiError(503, str(e), "server_error", code="server_shutting_down")
    if isinstance(e, MemoryError):
        return ApiError(500, f"out of memory: {e}", "server_error")
    if isinstance(e, EdgeseekError):
        return ApiError(400, str(e))
    return ApiError(500, f"internal error: {type(e).__name__}", "server_error")


class Reasoning:
    """A reply's text -> (reasoning_content, content): what R1-style models write between <think>
    and </think>, and the rest. `thinking` when the prompt already opened the block (DeepSeek-R1's
    template ends its generation prompt with "<think>\\n"). Whitespace that opens either part is
    dropped once a think block was seen, as DeepSeek's API returns them."""

    def __init__(self, thinking: bool = False):
        self.split = ThinkSplitter()
        self.split.thinking = thinking
        self.seen = thinking
        self.started = {"think": False, "answer": False}

    def feed(self, text: str, final: bool = False) -> tuple[str, str]:
        out = {"think": "", "answer": ""}
        for kind, part in self.split.feed(text) + (self.split.flush() if final else []):
            self.seen = self.seen or kind == "think"
            if self.seen and not self.started[kind]:
                part = part.lstrip()
            self.started[kind] = self.started[kind] or bool(part)
            out[kind] += part
        return out["think"], out["answer"]


class OpenAIServer:
    """The routes of the API over one engine and its scheduler."""

    def __init__(self, engine, scheduler: Scheduler, defaults: SamplerConfig | None = None,
                 max_tokens: int | None = None, api_key: str | None = None):
        self.engine = engine
        self.scheduler = scheduler
        self.defaults = defaults or SamplerConfig()
        self.max_tokens = max_tokens or engine.n_ctx
        self.api_key = api_key
        self.model = engine.path.name
        self.created = int(time.time())

    def app(self) -> Starlette:
        routes = [Route("/v1/chat/completions", self.chat, methods=["POST"]),
                  Route("/v1/completions", self.completions, methods=["POST"]),
                  Route("/v1/models", self.models, methods=["GET"]),
                  Route("/v1/models/{model:path}", self.model_info, methods=["GET"]),
                  Route("/health", self.health, methods=["GET"])]
        app = Starlette(routes=routes, exception_handlers={
            ApiError: lambda request, e: e.response(),
            HTTPException: _http_error,
            Exception: lambda request, e: _failure(e).response(),
        })
        return _Auth(app, self.api_key) if self.api_key else app

    # --- routes -----------------------------------------------------------------------------------
    async def models(self, request: Request) -> JSONResponse:
        return JSONResponse({"object": "list", "data": [self._model_object()]})

    def _model_object(self) -> dict:
        return {"id": self.model, "object": "model", "created": self.created, "owned_by": "edgeseek"}

    async def model_info(self, request: Request) -> JSONResponse:
        if request.path_params["model"] != self.model:
            raise ApiError(404, f"the model {request.path_params['model']!r} does not exist; this server has "
                           f"{self.model!r}", param="model", code="model_not_found")
        return JSONResponse(self._model_object())

    async def health(self, request: Request) -> JSONResponse:
        if request.scope.get(_Auth.ANONYMOUS):  # a load balancer's probe without the key: up, nothing more
            return JSONResponse({"status": "ok"})
        return JSONResponse({"status": "ok", "model": self.model, **self.scheduler.load()})

    async def chat(self, request: Request):
        return await self._complete(request, "chat")

    async def completions(self, request: Request):
        return await self._complete(request, "completion")

    async def _complete(self, request: Request, kind: str):
        body = await _json_body(request)
        stream, include_usage = _stream_options(body)
        ids, max_tokens, sampler, stop, thinking = await run_in_threadpool(self._prepare, kind, body)
        ignore_eos = body.get("ignore_eos", False)  # vLLM's and llama.cpp's extension, for benchmarks
        if not isinstance(ignore_eos, bool):
            raise ApiError(400, "ignore_eos must be true or false", param="ignore_eos")
        loop = asyncio.get_running_loop()
        events: asyncio.Queue = asyncio.Queue()

        def deliver(item) -> None:  # on the scheduler thread
            try:
                loop.call_soon_threadsafe(events.put_nowait, item)
            except RuntimeError:  # the event loop is closed: the server is gone
                pass

        job = Job(ids, max_tokens, sampler, stop, deliver, ignore_eos)
        if not self.scheduler.submit(job):
            s = self.scheduler
            raise ApiError(429, f"the server is busy: {s.parallel} requests running and {s.queue_limit} waiting; "
                           "retry later", "requests", code="rate_limit_exceeded")
        reply = _Reply(self.model, kind, len(ids), Reasoning(thinking) if kind == "chat" else None)
        if stream:
            return StreamingResponse(self._events(job, events, reply, include_usage), media_type="text/event-stream",
                                     headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        return await self._whole(request, job, events, reply)

    def _prepare(self, kind: str, body: dict):
        """A request body -> (prompt ids, max_tokens, sampler, stop strings, whether the prompt opened
        a think block); ApiError(400) naming what is wrong."""
        r = parse_body(kind, body, self.defaults, self.max_tokens)
        if isinstance(r, str):
            raise ApiError(400, r, param=_param_of(r))
        prompt, max_tokens, sampler, stop = r
        if max_tokens > self.max_tokens:
            name = "max_completion_tokens" if "max_completion_tokens" in body else "max_tokens"
            raise ApiError(400, f"{name} is {max_tokens}; this server allows at most {self.max_tokens}", param=name)
        if len(stop) > MAX_STOP:
            raise ApiError(400, f"stop has {len(stop)} strings; at most {MAX_STOP}", param="stop")
        thinking = False
        try:
            if kind == "chat":
                if self.engine.chat_template is None:
                    raise ApiError(400, f"{self.model} has no chat template: use /v1/completions", param="messages")
                rendered = self.engine.chat_template.render(prompt, add_generation_prompt=True)
                ids = prompt_ids(self.engine, rendered)
                thinking = rendered.rstrip().endswith(ThinkSplitter.OPEN)
            else:
                ids = prompt_ids_of(self.engine, kind, prompt)
        except EdgeseekError as e:
            raise ApiError(400, str(e), param="messages" if kind == "chat" else "prompt") from None
        n_ctx = self.engine.n_ctx
        if not ids:
            raise ApiError(400, "the prompt is empty", param="prompt")
        if len(ids) >= n_ctx:
            raise ApiError(400, f"this model's context is {n_ctx} tokens; the prompt has {len(ids)}, which leaves "
                           "no room for a reply", param="messages" if kind == "chat" else "prompt",
                           code="context_length_exceeded")
        if "max_tokens" not in body and "max_completion_tokens" not in body:
            max_tokens = min(max_tokens, n_ctx - len(ids))  # to the context's end
        return ids, max_tokens, sampler, stop, thinking

    async def _whole(self, request: Request, job: Job, events: asyncio.Queue, reply: "_Reply") -> JSONResponse:
        """Waits for the whole reply; a client that leaves meanwhile frees its slot at once."""
        gone = asyncio.ensure_future(_disconnected(request))
        try:
            while True:
                get = asyncio.ensure_future(events.get())
                done, _ = await asyncio.wait({get, gone}, return_when=asyncio.FIRST_COMPLETED)
                if get not in done:
                    get.cancel()
                    self.scheduler.cancel(job)
                    return JSONResponse(None, status_code=499)  # nobody reads it
                item = get.result()
                if isinstance(item, BaseException):
                    raise _failure(item)
                reply.add(item)
                if item.finish_reason:
                    return JSONResponse(reply.whole())
        finally:
            gone.cancel()

    async def _events(self, job: Job, events: asyncio.Queue, reply: "_Reply", include_usage: bool):
        """Server-sent events: OpenAI's chunk objects, then `data: [DONE]`. A client that leaves
        cancels this generator, which frees the job's slot."""
        done = False
        try:
            if reply.kind == "chat":
                yield _sse(reply.chunk({"role": "assistant", "content": ""}, None, include_usage))
            while not done:
                item = await events.get()
                if isinstance(item, BaseException):
                    done = True
                    yield _sse({"error": _failure(item).body()})
                    return
                done = item.finish_reason is not None
                for chunk in reply.add(item, include_usage):
                    yield _sse(chunk)
            if include_usage:
                yield _sse(reply.usage_chunk())
            yield "data: [DONE]\n\n"
        finally:
            if not done:
                self.scheduler.cancel(job)


class _Reply:
    """One request's reply as it grows, in OpenAI's objects (chat.completion[.chunk], text_completion)."""

    def __init__(self, model: str, kind: str, n_prompt: int, reasoning: Reasoning | None):
        self.model, self.kind, self.reasoning = model, kind, reasoning
        self.id = f"{'chatcmpl' if kind == 'chat' else 'cmpl'}-{uuid.uuid4().hex[:24]}"
        self.created = int(time.time())
        self.n_prompt = n_prompt
        self.text: list[str] = []
        self.thought: list[str] = []
        self.last: Delta | None = None

    def add(self, d: Delta, include_usage: bool = False) -> list[dict]:
        """Takes a Delta; returns the stream chunks it makes (none while text is held back)."""
        self.last = d
        final = d.finish_reason is not None
        if self.reasoning is not None:
            thought, text = self.reasoning.feed(d.text, final)
        else:
            thought, text = "", d.text
        self.thought.append(thought)
        self.text.append(text)
        if self.kind == "chat":
            delta = {**({"reasoning_content": thought} if thought else {}), **({"content": text} if text else {})}
            chunks = [self.chunk(delta, None, include_usage)] if delta else []
            if final:
                chunks.append(self.chunk({}, d.finish_reason, include_usage))
            return chunks
        if not text and not final:
            return []
        return [self._object("text_completion", [{"index": 0, "text": text, "logprobs": None,
                                                  "finish_reason": d.finish_reason}], include_usage)]

    def chunk(self, delta: dict, finish_reason: str | None, include_usage: bool) -> dict:
        return self._object("chat.completion.chunk", [{"index": 0, "delta": delta, "logprobs": None,
                                                       "finish_reason": finish_reason}], include_usage)

    def usage_chunk(self) -> dict:
        obj = self._object("chat.completion.chunk" if self.kind == "chat" else "text_completion", [])
        obj["usage"] = self.usage()
        return obj

    def whole(self) -> dict:
        text, thought = "".join(self.text), "".join(self.thought)
        if self.kind == "chat":
            message = {"role": "assistant", "content": text, **({"reasoning_content": thought} if thought else {})}
            choice = {"index": 0, "message": message, "logprobs": None, "finish_reason": self.last.finish_reason}
            obj = self._object("chat.completion", [choice])
        else:
            obj = self._object("text_completion", [{"index": 0, "text": text, "logprobs": None,
                                                    "finish_reason": self.last.finish_reason}])
        obj["usage"] = self.usage()
        return obj

    def usage(self) -> dict:
        n = self.last.generation_tokens if self.last else 0
        return {"prompt_tokens": self.n_prompt, "completion_tokens": n, "total_tokens": self.n_prompt + n,
                "prompt_tokens_details": {"cached_tokens": self.last.cached_tokens if self.last else 0}}

    def _object(self, kind: str, choices: list, include_usage: bool = False) -> dict:
        obj = {"id": self.id, "object": kind, "created": self.created, "model": self.model, "choices": choices}
        if include_usage:
            obj["usage"] = None  # OpenAI's stream: null on every chunk but the last
        return obj


def _sse(obj: dict) -> str:
    return f"data: {json.dumps(obj, ensure_ascii=False)}\n\n"


async def _json_body(request: Request) -> dict:
    """The request's JSON object, read up to MAX_BODY bytes."""
    length = request.headers.get("content-length", "")
    if length.isdigit() and int(length) > MAX_BODY:
        raise ApiError(413, f"the request body is {int(length)} bytes; at most {MAX_BODY}")
    data, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > MAX_BODY:
            raise ApiError(413, f"the request body is over {MAX_BODY} bytes")
        data.append(chunk)
    try:
        body = json.loads(b"".join(data))
    except UnicodeDecodeError:
        raise ApiError(400, "the request body is not UTF-8") from None
    except json.JSONDecodeError as e:
        raise ApiError(400, f"invalid JSON in the request body: {e.msg} at line {e.lineno} column {e.colno}") from None
    if not isinstance(body, dict):
        raise ApiError(400, f"the request body must be a JSON object, got {type(body).__name__}")
    return body


def _stream_options(body: dict) -> tuple[bool, bool]:
    stream = body.get("stream", False)
    if stream is None:
        stream = False
    if not isinstance(stream, bool):
        raise ApiError(400, f"stream must be true or false, got {json.dumps(stream)[:40]}", param="stream")
    options = body.get("stream_options") or {}
    if not isinstance(options, dict):
        raise ApiError(400, "stream_options must be an object", param="stream_options")
    usage = options.get("include_usage", False)
    if not isinstance(usage, bool):
        raise ApiError(400, "stream_options.include_usage must be true or false", param="stream_options")
    return stream, stream and usage


async def _disconnected(request: Request) -> None:
    """Returns when the client closes its connection (the request body already read)."""
    while (await request.receive())["type"] != "http.disconnect":
        pass


async def _http_error(request: Request, e: HTTPException) -> JSONResponse:
    if e.status_code == 404:
        message = f"no such endpoint: {request.method} {request.url.path}"
    elif e.status_code == 405:
        message = f"method {request.method} is not allowed on {request.url.path}"
    else:
        message = str(e.detail)
    return ApiError(e.status_code, message, code="not_found" if e.status_code == 404 else None).response()


class _Auth:
    """ASGI middleware: every HTTP request needs `Authorization: Bearer KEY` (401 otherwise), the
    scheme in any case (RFC 7235 section 2.1). GET /health answers without it, as load balancers
    probe it, but then says only that the server is up."""

    ANONYMOUS = "edgeseek.anonymous"  # set in the scope of a /health request without the key

    def __init__(self, app, key: str):
        self.app = app
        self.expected = key.encode()

    async def __call__(self, scope, receive, send):
        if scope["type"] == "http":
            got = dict(scope["headers"]).get(b"authorization", b"")
            scheme, _, token = got.strip().partition(b" ")
            ok = scheme.lower() == b"bearer" and hmac.compare_digest(token.strip(), self.expected)
            if not ok and scope["path"] == "/health":
                scope = {**scope, self.ANONYMOUS: True}
            elif not ok:
                message = "missing API key: send the header Authorization: Bearer KEY" if not got else \
                    "incorrect API key"
                await ApiError(401, message, code="invalid_api_key").response()(scope, receive, send)
                return
        await self.app(scope, receive, send)


# --- the server process -----------------------------------------------------------------------
def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def listen(host: str, port: int) -> socket.socket:
    """A listening socket on host:port (port 0: a free one); EdgeseekError on one line if it cannot."""
    try:
        family, kind, proto, _, addr = socket.getaddrinfo(host.strip("[]"), port, type=socket.SOCK_STREAM)[0]
        sock = socket.socket(family, kind, proto)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(addr)
        sock.listen(2048)
    except OSError as e:
        raise EdgeseekError(f"cannot listen on {host}:{port}: {e.strerror or e}") from None
    return sock


class _Uvicorn(uvicorn.Server):
    def handle_exit(self, sig, frame) -> None:
        """Ctrl+C (SIGINT) or SIGTERM: replies in flight end now, then uvicorn closes and `run`
        returns (uvicorn's own handler would raise the signal again once closed); a second Ctrl+C
        closes the connections without waiting."""
        self.on_exit()
        if self.should_exit and sig == signal.SIGINT:
            self.force_exit = True
        self.should_exit = True


class Server:
    """The server around a loaded engine: the scheduler thread and uvicorn on `sock`.

        server = Server(engine, listen("127.0.0.1", 0), parallel=8)
        server.start()          # in a thread; or server.run() in this one (until Ctrl+C)
        ...  # OpenAI(base_url=server.url, api_key="none")
        server.stop()
    """

    def __init__(self, engine, sock: socket.socket, *, parallel: int = 8, queue: int = 64, api_key: str | None = None,
                 defaults: SamplerConfig | None = None, max_tokens: int | None = None, keep: int | None = None):
        self.sock = sock
        self.scheduler = Scheduler(engine, parallel, queue, keep)
        self.api = OpenAIServer(engine, self.scheduler, defaults, max_tokens, api_key)
        host, port = sock.getsockname()[:2]
        self.url = f"http://{f'[{host}]' if ':' in host else host}:{port}/v1"
        config = uvicorn.Config(self.api.app(), log_level="warning", access_log=False, lifespan="off",
                                http="h11", ws="none", timeout_graceful_shutdown=5)
        self.uvicorn = _Uvicorn(config)
        self.uvicorn.on_exit = self.scheduler.close
        self._thread: threading.Thread | None = None

    def run(self) -> None:
        """Serves until Ctrl+C (or `stop`); every request in flight is ended on the way out."""
        self.scheduler.start()
        try:
            self.uvicorn.run(sockets=[self.sock])
        finally:
            self.scheduler.close()
            self.sock.close()

    def start(self, timeout: float = 30.0) -> "Server":
        self._thread = threading.Thread(target=self.run, name="edgeseek-server", daemon=True)
        self._thread.start()
        t0 = time.monotonic()
        while not self.uvicorn.started:
            if not self._thread.is_alive() or time.monotonic() - t0 > timeout:
                raise RuntimeError("the server did not start")
            time.sleep(0.02)
        return self

    def stop(self) -> None:
        self.scheduler.close(timeout=0)
        self.uvicorn.should_exit = True
        if self._thread is not None:
            self._thread.join(15)

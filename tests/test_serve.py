"""`edgeseek serve` driven by OpenAI's own Python client on 127.0.0.1: chat, streaming, completions,
errors and auth, reasoning_content, continuous batching under 32 concurrent streaming clients (the
texts equal one-at-a-time runs through the same engine), a client killed mid-stream, Ctrl+C."""
import dataclasses
import http.client
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import openai
import pytest
from openai import OpenAI
from typer.testing import CliRunner

import edgeseek
from edgeseek.app.cli import app
from edgeseek.chat import chat_prompt_ids
from edgeseek.chat_template import ChatTemplate
from edgeseek.scheduler import Job, Scheduler
from edgeseek.server import Reasoning, Server, listen

GREEDY = {"temperature": 0}
MINI = Path(__file__).resolve().parent.parent / "models" / "edgeseek-mini.Q8_0.gguf"


@pytest.fixture(scope="module")
def engine(smollm2_path):
    return edgeseek.load(smollm2_path, n_ctx=512)


def _start(engine, **options) -> Server:
    return Server(engine, listen("127.0.0.1", 0), **options).start()


@pytest.fixture(scope="module")
def server(engine):
    s = _start(engine, parallel=8, queue=64, max_tokens=256)
    yield s
    s.stop()


@pytest.fixture(scope="module")
def client(server):
    return OpenAI(base_url=server.url, api_key="none", max_retries=0, timeout=60)


def _http(method: str, url: str, body: bytes | None = None, headers: dict | None = None) -> tuple[int, dict]:
    """(status, JSON body) of a raw request: what the client library would not send."""
    req = urllib.request.Request(url, data=body, method=method,
                                 headers={"Content-Type": "application/json", **(headers or {})})
    try:
        with urllib.request.urlopen(req, timeout=30) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


def _health(server, **headers) -> dict:
    status, body = _http("GET", server.url.removesuffix("/v1") + "/health", headers=headers)
    assert status == 200, body
    return body


def _alone(engine, messages, max_tokens, **kw) -> str:
    """The reply of one request on its own, without the server."""
    ids = chat_prompt_ids(engine, messages)
    return edgeseek.generate(engine, ids, max_tokens=max_tokens, sampler=edgeseek.SamplerConfig.greedy(), **kw)


def _user(text):
    return [{"role": "user", "content": text}]


def test_chat_reply_and_usage(engine, client):
    messages = _user("What is 2+2?")
    r = client.chat.completions.create(model="any", messages=messages, max_tokens=12, **GREEDY)
    assert r.object == "chat.completion" and r.model == engine.path.name
    assert r.choices[0].message.role == "assistant"
    assert r.choices[0].message.content == _alone(engine, messages, 12)
    assert r.choices[0].finish_reason in ("stop", "length")
    assert r.usage.prompt_tokens == len(chat_prompt_ids(engine, messages))
    assert 0 < r.usage.completion_tokens <= 12
    assert r.usage.total_tokens == r.usage.prompt_tokens + r.usage.completion_tokens


def test_streamed_chat_equals_the_whole_reply(client):
    kw = dict(model="any", messages=_user("Name three colours."), max_completion_tokens=10, **GREEDY)
    whole = client.chat.completions.create(**kw)
    chunks = list(client.chat.completions.create(**kw, stream=True, stream_options={"include_usage": True}))
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == whole.choices[0].message.content
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == whole.choices[0].finish_reason
    assert not chunks[-1].choices and chunks[-1].usage.completion_tokens == whole.usage.completion_tokens
    assert all(c.usage is None for c in chunks[:-1])


def test_completions_stop_string_and_stream(engine, client):
    prompt = "One, two, three,"
    free = client.completions.create(model="any", prompt=prompt, max_tokens=8, **GREEDY).choices[0].text
    assert free == edgeseek.generate(engine, prompt, max_tokens=8, sampler=edgeseek.SamplerConfig.greedy())
    assert " five" in free
    r = client.completions.create(model="any", prompt=prompt, max_tokens=8, stop=[" five"], **GREEDY)
    assert r.object == "text_completion" and r.choices[0].finish_reason == "stop"
    assert r.choices[0].text == free[:free.index(" five")]
    streamed = client.completions.create(model="any", prompt=prompt, max_tokens=8, stop=" five", stream=True, **GREEDY)
    chunks = list(streamed)
    assert "".join(c.choices[0].text for c in chunks) == r.choices[0].text
    assert chunks[-1].choices[0].finish_reason == "stop"
    ids = engine.tokenizer.encode(prompt)  # a prompt of token ids, as OpenAI takes it
    assert client.completions.create(model="any", prompt=ids, max_tokens=8, **GREEDY).choices[0].text == free


def test_seeded_sampling_repeats(client):
    """The same seeded request twice, each reusing the prompt that an earlier one left cached: the
    same text. (A first request computes the prompt's last row inside the prompt's pass, a repeat in
    a step of its own, whose float sums may end in other last bits, as llama.cpp's server warns of
    its prompt cache; on a CPU without VNNI that can move a sampled token.)"""
    kw = dict(model="any", prompt="Once upon a time", max_tokens=8, temperature=1.0, top_p=0.9, seed=7)
    client.completions.create(**kw)
    assert client.completions.create(**kw).choices[0].text == client.completions.create(**kw).choices[0].text


def test_models_and_health(engine, client, server):
    assert [m.id for m in client.models.list()] == [engine.path.name]
    assert client.models.retrieve(engine.path.name).id == engine.path.name
    with pytest.raises(openai.NotFoundError):
        client.models.retrieve("gpt-4")
    h = _health(server)
    assert h["status"] == "ok" and h["parallel"] == 8 and h["running"] == 0


def test_next_turn_continues_the_cached_conversation(engine, client):
    first = _user("Tell me about Paris.")
    r1 = client.chat.completions.create(model="any", messages=first, max_tokens=10, **GREEDY)
    turn2 = first + [{"role": "assistant", "content": r1.choices[0].message.content},
                     {"role": "user", "content": "And London?"}]
    r2 = client.chat.completions.create(model="any", messages=turn2, max_tokens=10, **GREEDY)
    assert r2.usage.prompt_tokens_details.cached_tokens >= len(chat_prompt_ids(engine, first))
    # What a chat session replies with its one context kept between turns: the same prefix cached,
    # the rest prefilled (a prompt prefilled in two parts may round differently from one part).
    context, greedy = engine.new_context(), edgeseek.SamplerConfig.greedy()
    assert edgeseek.generate(engine, chat_prompt_ids(engine, first), max_tokens=10, sampler=greedy,
                             context=context) == r1.choices[0].message.content
    want = edgeseek.generate(engine, chat_prompt_ids(engine, turn2), max_tokens=10, sampler=greedy, context=context)
    assert r2.choices[0].message.content == want


@pytest.mark.parametrize("body, status, param, says", [
    (b"{not json", 400, None, "invalid JSON"),
    (b"[1, 2]", 400, None, "must be a JSON object"),
    (b'{"messages": []}', 400, "messages", "messages must be a non-empty list"),
    (b'{"messages": [{"role": "wizard", "content": "hi"}]}', 400, "messages[0].role", "role must be one of"),
    (b'{"messages": [{"role": "user", "content": "hi"}], "temperature": 5}', 400, "temperature", "between 0.0 and 2.0"),
    (b'{"messages": [{"role": "user", "content": "hi"}], "top_p": NaN}', 400, "top_p", "finite"),
    (b'{"messages": [{"role": "user", "content": "hi"}], "max_tokens": 100000}', 400, "max_tokens", "at most 256"),
    (b'{"messages": [{"role": "user", "content": "hi"}], "max_tokens": -1}', 400, "max_tokens", "positive integer"),
    (b'{"messages": [{"role": "user", "content": "hi"}], "n": 2}', 400, "n", "not supported"),
    (b'{"messages": [{"role": "user", "content": "hi"}], "tools": [{"type": "function"}]}', 400, "tools",
     "not supported"),
    (b'{"messages": [{"role": "user", "content": "hi"}], "stream": "yes"}', 400, "stream", "true or false"),
    (b'{"messages": [{"role": "user", "content": "hi"}], "stop": 5}', 400, "stop", "stop must be a string"),
])
def test_bad_requests_get_openai_errors(server, body, status, param, says):
    code, reply = _http("POST", server.url + "/chat/completions", body)
    assert code == status
    err = reply["error"]
    assert set(err) == {"message", "type", "param", "code"} and err["type"] == "invalid_request_error"
    assert err["param"] == param and says in err["message"], err


def test_errors_through_the_client_and_the_server_lives_on(client, server):
    with pytest.raises(openai.BadRequestError) as e:  # longer than the 512-token context
        client.completions.create(model="any", prompt="word " * 600, max_tokens=4)
    assert e.value.code == "context_length_exceeded"
    with pytest.raises(openai.NotFoundError):
        client.embeddings.create(model="any", input="hello")
    host, port = server.sock.getsockname()[:2]
    conn = http.client.HTTPConnection(host, port, timeout=10)  # says 9 MiB are coming, sends a little
    conn.putrequest("POST", "/v1/completions")
    conn.putheader("Content-Length", str(9 << 20))
    conn.endheaders(b"x" * 1000)
    r = conn.getresponse()
    assert r.status == 413 and "at most" in json.loads(r.read())["error"]["message"]
    conn.close()
    code, reply = _http("GET", server.url + "/chat/completions")
    assert code == 405 and reply["error"]["message"]
    assert client.completions.create(model="any", prompt="Hi", max_tokens=2).usage.completion_tokens >= 1


def test_api_key_is_required_on_every_request_but_health(engine):
    s = _start(engine, api_key="sesame")
    try:
        with pytest.raises(openai.AuthenticationError) as e:
            OpenAI(base_url=s.url, api_key="wrong", max_retries=0).models.list()
        assert e.value.status_code == 401 and e.value.code == "invalid_api_key"
        code, reply = _http("GET", s.url + "/models")
        assert code == 401 and "Authorization: Bearer" in reply["error"]["message"]
        good = OpenAI(base_url=s.url, api_key="sesame", max_retries=0)
        assert good.completions.create(model="any", prompt="Hi", max_tokens=2).choices[0].text is not None
        # A load balancer's probe needs no key and learns only that the server is up.
        assert _health(s) == _health(s, Authorization="Bearer wrong") == {"status": "ok"}
        assert _health(s, Authorization="Bearer sesame")["model"] == engine.path.name
        # The scheme is case-insensitive (RFC 7235): "bearer" as some clients send it.
        for header in ("bearer sesame", "BEARER sesame"):
            code, reply = _http("GET", s.url + "/models", headers={"Authorization": header})
            assert code == 200 and reply["data"][0]["id"] == engine.path.name, (header, reply)
        code, _ = _http("GET", s.url + "/models", headers={"Authorization": "Basic sesame"})
        assert code == 401
    finally:
        s.stop()


def test_queue_0_lets_no_request_wait(engine, monkeypatch):
    """--queue 0 with -P 1: while the slot is taken, by a request still prefilling its prompt too, the
    next request is refused at once (429) rather than waiting."""
    s = Scheduler(engine, parallel=1, queue=0)
    prefilling, go = threading.Event(), threading.Event()
    add = s.gen.add

    def slow_add(*args, **kw):
        prefilling.set()
        go.wait(10)
        return add(*args, **kw)

    monkeypatch.setattr(s.gen, "add", slow_add)
    ids, got = engine.tokenizer.encode("Hi"), []
    s.start()
    try:
        assert s.submit(Job(ids, 2, edgeseek.SamplerConfig.greedy(), [], got.append))
        assert prefilling.wait(10)
        assert not s.submit(Job(ids, 2, edgeseek.SamplerConfig.greedy(), [], got.append))
        assert s.load()["running"] == 1 and s.load()["waiting"] == 0
        go.set()
        _until(lambda: got and got[-1].finish_reason is not None)
        assert s.submit(Job(ids, 2, edgeseek.SamplerConfig.greedy(), [], got.append))  # the slot is free again
    finally:
        go.set()
        s.close()


def test_developer_role_is_the_system_message(engine, client):
    system = [{"role": "system", "content": "Answer in French."}, *_user("Name a colour.")]
    developer = [{"role": "developer", "content": "Answer in French."}, *_user("Name a colour.")]
    client.chat.completions.create(model="any", messages=system, max_tokens=8, **GREEDY)  # the prompt cached
    # The developer message renders as the system one: the same prompt, found whole in the prefix
    # cache, and the same reply as the system message's from the same cache state. (A reply from a
    # cached prompt may part from a freshly prefilled one's at a near tie: its last prompt row runs
    # in a step of its own, whose float sums round differently.)
    r = client.chat.completions.create(model="any", messages=developer, max_tokens=8, **GREEDY)
    again = client.chat.completions.create(model="any", messages=system, max_tokens=8, **GREEDY)
    assert r.usage.prompt_tokens == again.usage.prompt_tokens == len(chat_prompt_ids(engine, system))
    assert r.usage.prompt_tokens_details.cached_tokens == again.usage.prompt_tokens_details.cached_tokens \
        >= r.usage.prompt_tokens - 1
    assert r.choices[0].message.content == again.choices[0].message.content


def test_full_queue_answers_429_and_a_closed_stream_frees_its_slot(engine):
    s = _start(engine, parallel=1, queue=0)
    c = OpenAI(base_url=s.url, api_key="none", max_retries=0, timeout=30)
    try:
        stream = c.completions.create(model="any", prompt="Count: 1, 2,", max_tokens=400, stream=True)
        next(iter(stream))  # running: the one slot is taken
        with pytest.raises(openai.RateLimitError) as e:
            c.completions.create(model="any", prompt="Hi", max_tokens=2)
        assert e.value.status_code == 429 and e.value.code == "rate_limit_exceeded"
        stream.close()
        _until(lambda: _health(s)["running"] == 0)
        assert c.completions.create(model="any", prompt="Hi", max_tokens=2).usage.completion_tokens >= 1
    finally:
        s.stop()


def test_reasoning_split_across_chunks():
    r = Reasoning()
    parts = [r.feed(t) for t in ("<thi", "nk>\nLet me", " think.</th", "ink>\n\nThe answer", " is 4.")]
    parts.append(r.feed("", final=True))
    assert "".join(p[0] for p in parts) == "Let me think."
    assert "".join(p[1] for p in parts) == "The answer is 4."
    plain = Reasoning()
    assert plain.feed(" Hello <b>", final=True) == ("", " Hello <b>")  # no think block: text untouched


def test_reasoning_content_when_the_template_opens_a_think_block(engine):
    # DeepSeek-R1's template ends the generation prompt with "<think>\n": the reply starts thinking.
    r1 = dataclasses.replace(engine, chat_template=ChatTemplate(engine.chat_template.source + "<think>\n"))
    s = _start(r1)
    c = OpenAI(base_url=s.url, api_key="none", max_retries=0)
    try:
        messages = _user("Why is the sky blue?")
        want = _alone(r1, messages, 8)
        msg = c.chat.completions.create(model="any", messages=messages, max_tokens=8, **GREEDY).choices[0].message
        assert msg.content == "" and msg.reasoning_content == want.lstrip() and "</think>" not in want
        chunks = list(c.chat.completions.create(model="any", messages=messages, max_tokens=8, stream=True, **GREEDY))
        deltas = [ch.choices[0].delta for ch in chunks]
        assert "".join(getattr(d, "reasoning_content", None) or "" for d in deltas) == want.lstrip()
        assert not any(d.content for d in deltas)
    finally:
        s.stop()


PROMPTS = [f"Write one sentence about {t}." for t in
           ("the sea", "a mountain", "bread", "a library", "rain", "a train", "the moon", "a garden")]


@pytest.fixture
def unpooled(engine):
    """A server that prefills every prompt whole (no cache reuse), so that its replies can be held to
    one-request-at-a-time runs token for token."""
    s = _start(engine, parallel=8, queue=64, keep=0)
    yield s
    s.stop()


def test_32_concurrent_streaming_clients_equal_sequential_runs(engine, unpooled):
    server = unpooled
    client = OpenAI(base_url=server.url, api_key="none", max_retries=0, timeout=60)
    jobs = [(i, _user(f"Request {i}: {PROMPTS[i % 8]}")) for i in range(32)]

    def ask(job):
        i, messages = job
        chunks = list(client.chat.completions.create(model="any", messages=messages, max_tokens=6 + i % 5,
                                                     stream=True, **GREEDY))
        return "".join(c.choices[0].delta.content or "" for c in chunks), chunks[-1].choices[0].finish_reason

    before = _health(server)["steps"]
    t0 = time.monotonic()
    with ThreadPoolExecutor(32) as pool:
        got = list(pool.map(ask, jobs, timeout=120))
    assert time.monotonic() - t0 < 60
    assert all(reason in ("stop", "length") for _, reason in got)
    assert [text for text, _ in got] == [_alone(engine, m, 6 + i % 5) for i, m in jobs]
    h = _health(server)
    assert h["peak_batch"] == 8 and h["running"] == 0 and h["waiting"] == 0
    assert h["steps"] - before < sum(6 + i % 5 for i in range(32))  # sequences shared steps


CLIENT = """
import sys
from openai import OpenAI
c = OpenAI(base_url=sys.argv[1], api_key="none", max_retries=0)
for chunk in c.completions.create(model="any", prompt="Count: 1, 2,", max_tokens=250, stream=True):
    print(repr(chunk.choices[0].text), flush=True)
"""


def test_client_killed_mid_stream_leaves_the_server_serving(client, server):
    p = subprocess.Popen([sys.executable, "-c", CLIENT, server.url], stdout=subprocess.PIPE, text=True)
    try:
        assert p.stdout.readline()  # streaming
        _until(lambda: _health(server)["running"] == 1)
    finally:
        p.kill()
        p.wait()
    _until(lambda: _health(server)["running"] == 0)  # its slot freed, long before 250 tokens
    host, port = server.sock.getsockname()[:2]
    conn = http.client.HTTPConnection(host, port, timeout=10)  # a whole (unstreamed) reply nobody waits for
    conn.request("POST", "/v1/completions", json.dumps({"prompt": "Count: 1, 2,", "max_tokens": 250}),
                 {"Content-Type": "application/json"})
    _until(lambda: _health(server)["running"] == 1)
    conn.close()
    _until(lambda: _health(server)["running"] == 0)
    assert client.completions.create(model="any", prompt="Hi", max_tokens=3).usage.completion_tokens >= 1


def test_a_failing_step_fails_its_requests_not_the_server(client, server, monkeypatch):
    def broken():
        raise RuntimeError("a bug in a step")

    monkeypatch.setattr(server.scheduler.gen, "step", broken)
    with pytest.raises(openai.InternalServerError) as e:
        client.completions.create(model="any", prompt="Hi", max_tokens=5)
    assert e.value.status_code == 500 and "RuntimeError" in e.value.message
    assert client.completions.create(model="any", prompt="Hi", max_tokens=3).usage.completion_tokens >= 1


def _until(condition, timeout: float = 10.0) -> None:
    t0 = time.monotonic()
    while not condition():
        assert time.monotonic() - t0 < timeout, "timed out"
        time.sleep(0.05)


# --- the command --------------------------------------------------------------------------------
def test_public_host_without_api_key_is_refused():
    r = CliRunner().invoke(app, ["serve", "--host", "0.0.0.0"])
    assert r.exit_code == 1
    assert r.output.count("\n") == 1 and "--api-key" in r.output


@pytest.mark.parametrize("option, value, says", [("--port", "70000", "--port must be between 0 and 65535, got 70000"),
                                                 ("--port", "-1", "--port must be between 0 and 65535, got -1"),
                                                 ("--queue", "-1", "--queue must be at least 0, got -1"),
                                                 ("--temp", "-1", "--temp must be at least 0, got -1"),
                                                 ("-n", "0", "--max-tokens must be at least 1, got 0")])
def test_out_of_range_options_are_refused_before_listening(tmp_path, option, value, says):
    r = CliRunner().invoke(app, ["serve", str(tmp_path / "never-loaded.gguf"), option, value])
    assert r.exit_code == 1 and r.stderr == f"error: {says}\n", r.output


def test_serve_command_answers_then_stops_on_ctrl_c():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {**os.environ, "NO_COLOR": "1"}
    p = subprocess.Popen([sys.executable, "-m", "edgeseek.app.cli", "serve", str(MINI), "--port", str(port),
                          "--ctx", "256", "-P", "1"], stderr=subprocess.PIPE, text=True, env=env)
    try:
        url = f"http://127.0.0.1:{port}"
        t0 = time.monotonic()
        while True:
            assert p.poll() is None and time.monotonic() - t0 < 90, p.stderr.read() if p.poll() is not None else ""
            try:
                if _http("GET", url + "/health")[0] == 200:
                    break
            except OSError:  # not listening yet
                time.sleep(0.2)
        c = OpenAI(base_url=url + "/v1", api_key="none", max_retries=0)
        r = c.completions.create(model="any", prompt="The sea", max_tokens=4, **GREEDY)
        assert r.model == MINI.name and r.usage.completion_tokens >= 1
        p.send_signal(signal.SIGINT)
        assert p.wait(timeout=20) == 0
        said = p.stderr.read()
        assert "(1 request at a time, 64 waiting)" in said and "server stopped" in said, said
    finally:
        if p.poll() is None:
            p.kill()


def test_ignore_eos_runs_to_max_tokens(client):
    kw = dict(model="any", messages=_user("What is 2+2?"), max_tokens=24, **GREEDY)
    assert client.chat.completions.create(**kw).choices[0].finish_reason == "stop"  # EOS before 24 tokens
    r = client.chat.completions.create(**kw, extra_body={"ignore_eos": True})
    assert r.choices[0].finish_reason == "length" and r.usage.completion_tokens == 24


def test_mtp_model_served_in_batches_replies_as_plain_decoding():
    """edgeseek-mini with its MTP layer drafting: four requests verified together in each step give
    the greedy replies of plain one-at-a-time decoding; a next turn continues its cached prefix."""
    mtp = edgeseek.load(MINI, n_ctx=256, mtp="1")
    plain = edgeseek.load(MINI, n_ctx=256, mtp="off")
    asks = [_user(q) for q in ("What is the capital of France?", "Write a short poem about the sea.",
                               "Give three tips for learning a new language.", "Name a colour.")]
    for keep in (0, None):  # every prompt prefilled whole (comparable to plain runs); then caches kept
        s = _start(mtp, parallel=4, keep=keep)
        c = OpenAI(base_url=s.url, api_key="none", max_retries=0, timeout=60)

        def ask(messages):
            return c.chat.completions.create(model="any", messages=messages, max_tokens=24, **GREEDY)

        try:
            if keep == 0:
                with ThreadPoolExecutor(4) as pool:
                    got = list(pool.map(ask, asks))
                assert [r.choices[0].message.content for r in got] == [_alone(plain, m, 24) for m in asks]
                assert mtp.mtp.steps > 0 and mtp.mtp.accepted > 0  # drafts were made and kept
            else:
                turn2 = asks[0] + [{"role": "assistant", "content": ask(asks[0]).choices[0].message.content},
                                   {"role": "user", "content": "And Spain?"}]
                r2 = ask(turn2)
                assert r2.usage.prompt_tokens_details.cached_tokens > 0 and r2.usage.completion_tokens > 0
        finally:
            s.stop()

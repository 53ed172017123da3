"""The chat's conversation and slash commands driven as plain Python, no terminal: a ChatSession on
the tiny deepseek2 fixture (it carries a chat template)."""
import json
from pathlib import Path

import pytest

import edgeseek
from edgeseek.chat import ChatSession, build_messages, chat_prompt_ids, single_turn_ids
from edgeseek.errors import EdgeseekError
from edgeseek.sampler import SamplerConfig

MODEL = Path(__file__).parent / "fixtures" / "deepseek2" / "v3-q4_k_m.gguf"


@pytest.fixture(scope="module")
def engine():
    return edgeseek.load(MODEL)


@pytest.fixture
def session(engine):
    return ChatSession(engine, sampler=SamplerConfig.greedy(), max_tokens=4)


def reply(session, text):
    return "".join(r.text for r in session.send(text))


def test_help_and_unknown_and_leaving(session):
    assert "/set NAME VALUE" in session.command("/help").message
    assert session.command("/?").message == session.command("/help").message
    r = session.command("/frobnicate now")
    assert r.message == "Unknown command /frobnicate; /help lists them." and not r.leave and not r.error
    assert all(session.command(c).leave for c in ("/bye", "/exit", "/quit", "  /bye  "))


def test_set_changes_sampling_and_max_tokens(session):
    r = session.command("/set temperature 0.5")
    assert (r.message, r.error, session.sampler.temperature) == ("Set temperature = 0.5.", False, 0.5)
    assert session.command("/set temp 0").message == "Set temperature = 0."  # ollama's names too
    assert session.command("/set num_predict 7").message == "Set max_tokens = 7." and session.max_tokens == 7
    session.command("/set top_k 5")
    session.command("/set seed 42")
    assert (session.sampler.top_k, session.sampler.seed) == (5, 42)
    for line, message in [("/set nonsense 1", "unknown sampling option(s): nonsense"),
                          ("/set top_k 1.5", "top_k: not a number: '1.5'"),
                          ("/set max_tokens many", "max_tokens: not a number: 'many'"),
                          ("/set", "usage: /set NAME VALUE"), ("/set top_p", "usage: /set NAME VALUE")]:
        r = session.command(line)
        assert r.error and message in r.message, (line, r)
    assert (session.sampler.top_k, session.max_tokens) == (5, 7)  # failures change nothing


def test_system_prompt_shown_set_and_rendered(session, engine):
    assert session.command("/system").message == "(no system prompt)"
    reply(session, "Hello")
    r = session.command("/system   Answer briefly.")
    assert r.message == "System prompt set; conversation cleared." and session.messages == []
    assert session.command("/system").message == "Answer briefly."
    assert session.conversation() == [{"role": "system", "content": "Answer briefly."}]
    reply(session, "Hi")
    # the chat's first turn is the prompt `edgeseek generate -s` sends: one builder for both
    ids = single_turn_ids(engine, "Hi", system="Answer briefly.")
    assert session.context.tokens[:len(ids)] == ids
    assert ids == chat_prompt_ids(engine, build_messages("Answer briefly.", [{"role": "user", "content": "Hi"}]))


def test_stats_clear_and_turns_reuse_the_cache(session):
    assert session.command("/stats").message == "No reply yet." and session.command("/stats").stats is None
    reply(session, "Hello")
    first = session.command("/stats").stats
    assert first is session.last and first.finish_reason is not None and first.generation_tokens >= 1
    reply(session, "And then?")
    assert [m["role"] for m in session.messages] == ["user", "assistant"] * 2
    assert session.last.prompt_tokens < first.prompt_tokens + 12  # only the new turn's tokens ran
    r = session.command("/clear")
    assert r.message == "Conversation cleared." and session.messages == [] and session.last is None
    assert session.context.tokens == []


def test_save_and_load(session, tmp_path):
    saved = tmp_path / "conv.json"
    assert session.command("/save").message == "usage: /save FILE"
    assert session.command("/load").message == "usage: /load FILE"
    session.command("/system Be kind.")
    reply(session, "Hello")
    assert session.command(f"/save {saved}").message == f"Saved 2 messages to {saved}."
    data = json.loads(saved.read_text())
    assert data["system"] == "Be kind." and data["messages"] == session.messages
    session.command("/clear")
    session.system = None
    assert session.command(f"/load {saved}").message == f"Loaded 2 messages from {saved}."
    assert session.system == "Be kind." and session.messages == data["messages"]
    (tmp_path / "bad.json").write_text('{"messages": [{"role": "wizard", "content": "x"}]}')
    for line in (f"/load {tmp_path / 'bad.json'}", f"/load {tmp_path / 'missing.json'}"):
        r = session.command(line)
        assert r.error and "not a saved conversation" in r.message
    assert session.messages == data["messages"]  # a failed load changes nothing
    r = session.command(f"/save {tmp_path / 'no' / 'such' / 'dir.json'}")
    assert r.error and "No such file or directory" in r.message


def test_interrupted_reply_joins_the_conversation(session):
    stream = session.send("Hello")
    next(stream)
    stream.close()  # as Ctrl+C stops it after the first chunk
    assert [m["role"] for m in session.messages] == ["user", "assistant"]


def test_a_turn_stopped_while_its_prompt_is_rendered_leaves_no_message(session, monkeypatch):
    import edgeseek.chat

    def interrupted(*args):
        raise KeyboardInterrupt

    monkeypatch.setattr(edgeseek.chat, "chat_prompt_ids", interrupted)
    with pytest.raises(KeyboardInterrupt):
        next(session.send("Hello"))
    assert session.messages == []  # the next turn does not follow an unanswered one


def test_model_without_template_is_refused(engine, monkeypatch):
    monkeypatch.setattr(engine, "chat_template", None)
    with pytest.raises(EdgeseekError, match="no chat template"):
        ChatSession(engine)
    assert single_turn_ids(engine, "Hi", system="ignored") == engine.tokenizer.encode("Hi")

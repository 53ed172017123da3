"""The edgeseek command driven through Typer's runner on the real SmolLM2 model."""
import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from edgeseek.app.cli import app

GOLDEN = json.loads((Path(__file__).parent / "fixtures" / "smollm2" / "greedy.json").read_text())
runner = CliRunner()


@pytest.fixture(scope="module")
def first_tokens(smollm2_path):
    """The library's greedy reply to the first golden prompt, 8 tokens: what the CLI must print
    (the numerics are tested against llama.cpp in test_smollm2_greedy.py)."""
    import edgeseek
    from edgeseek.chat import prompt_ids

    engine = edgeseek.load(smollm2_path, n_ctx=512)
    messages = [{"role": "user", "content": GOLDEN["cases"][0]["prompt"]}]
    ids = prompt_ids(engine, engine.chat_template.render(messages))
    return edgeseek.generate(engine, ids, max_tokens=8, sampler=edgeseek.SamplerConfig.greedy())


def test_generate_prints_only_the_reply(smollm2_path, first_tokens):
    prompt = GOLDEN["cases"][0]["prompt"]
    r = runner.invoke(app, ["generate", str(smollm2_path), "-p", prompt, "--temp", "0", "-n", "8"])
    assert r.exit_code == 0, r.output
    assert r.stdout == first_tokens + "\n"


def test_generate_json_has_reply_and_stats(smollm2_path, first_tokens):
    prompt = GOLDEN["cases"][0]["prompt"]
    r = runner.invoke(app, ["generate", str(smollm2_path), "--temp", "0", "-n", "8", "--json"], input=prompt)
    assert r.exit_code == 0, r.output
    data = json.loads(r.stdout)
    assert data["text"] == first_tokens
    assert data["completion_tokens"] == 8 and data["finish_reason"] == "length"
    assert data["prompt_tokens"] == len(GOLDEN["cases"][0]["prompt_ids"])


def test_chat_session_with_slash_commands(smollm2_path, first_tokens, tmp_path):
    saved = tmp_path / "conv.json"
    script = "\n".join([
        "/help",
        "/set temperature 0",
        "/set nonsense 1",
        GOLDEN["cases"][0]["prompt"],
        "/stats",
        f"/save {saved}",
        "/clear",
        f"/load {saved}",
        "/bye",
    ]) + "\n"
    r = runner.invoke(app, ["chat", str(smollm2_path), "-n", "8"], input=script)
    assert r.exit_code == 0, r.output
    assert first_tokens in r.stdout
    assert "/set NAME VALUE" in r.stderr  # the help text
    assert "unknown sampling option(s): nonsense" in r.stderr
    assert "generation: 8 tok" in r.stderr  # the stats line
    conv = json.loads(saved.read_text())
    assert [m["role"] for m in conv["messages"]] == ["user", "assistant"]
    assert conv["messages"][1]["content"] == first_tokens
    assert "Loaded 2 messages" in r.stderr


def test_multiline_input_and_kv_reuse_across_turns(smollm2_path):
    script = '"""\nFirst line\nsecond line\n"""\nAnd another question?\n/bye\n'
    r = runner.invoke(app, ["chat", str(smollm2_path), "-n", "4", "--temp", "0"], input=script)
    assert r.exit_code == 0, r.output
    stats = [line for line in r.stderr.splitlines() if line.startswith("[ prompt:")]
    assert len(stats) == 2
    # The second turn processes only its new tokens, not the whole conversation again.
    n1 = int(stats[0].split("prompt: ")[1].split(" tok")[0])
    n2 = int(stats[1].split("prompt: ")[1].split(" tok")[0])
    assert n2 < n1 + 12


def test_user_mistakes_exit_nonzero_with_one_line(tmp_path):
    r = runner.invoke(app, ["generate", str(tmp_path / "missing.gguf"), "-p", "hi"])
    assert r.exit_code == 1
    assert "missing.gguf" in r.stderr and "Traceback" not in r.stderr
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(b"GGUF" + b"\x03\x00\x00\x00" + b"\x00" * 5)
    r = runner.invoke(app, ["inspect", str(bad)])
    assert r.exit_code == 1 and "bad.gguf" in r.stderr and "Traceback" not in r.stderr


def test_inspect_json(smollm2_path):
    r = runner.invoke(app, ["inspect", str(smollm2_path), "--json"])
    assert r.exit_code == 0, r.output
    info = json.loads(r.stdout)
    assert info["architecture"] == "llama" and info["layers"] == 30
    assert info["tensor_types"]["Q4_1"]["count"] > 0

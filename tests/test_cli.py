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


@pytest.fixture(scope="module")
def first_finish(smollm2_path):
    """Why the library's 8-token greedy reply ended: "length", or "stop" where the model's reply
    (the first token is a near tie: llama.cpp's margin 0.09) is 7 tokens and an end of turn."""
    import edgeseek
    from edgeseek.chat import prompt_ids

    engine = edgeseek.load(smollm2_path, n_ctx=512)
    ids = prompt_ids(engine, engine.chat_template.render([{"role": "user", "content": GOLDEN["cases"][0]["prompt"]}]))
    *_, last = edgeseek.stream_generate(engine, ids, max_tokens=8, sampler=edgeseek.SamplerConfig.greedy())
    return last.finish_reason


def test_generate_json_has_reply_and_stats(smollm2_path, first_tokens, first_finish):
    prompt = GOLDEN["cases"][0]["prompt"]
    r = runner.invoke(app, ["generate", str(smollm2_path), "--temp", "0", "-n", "8", "--json"], input=prompt)
    assert r.exit_code == 0, r.output
    data = json.loads(r.stdout)
    assert data["text"] == first_tokens
    assert data["completion_tokens"] == 8 and data["finish_reason"] == first_finish
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


@pytest.mark.parametrize("option, value", [("--top-p", "nan"), ("--temp", "inf"), ("--min-p", "2")])
def test_sampling_options_that_make_no_sense_are_one_line(smollm2_path, option, value):
    r = runner.invoke(app, ["generate", str(smollm2_path), "-p", "hi", "-n", "2", option, value])
    assert r.exit_code == 1 and "Traceback" not in r.stderr
    assert r.stderr.count("\n") == 1 and option.lstrip("-").replace("-", "_").replace("temp", "temperature") in r.stderr


def test_inspect_json(smollm2_path):
    r = runner.invoke(app, ["inspect", str(smollm2_path), "--json"])
    assert r.exit_code == 0, r.output
    info = json.loads(r.stdout)
    assert info["architecture"] == "llama" and info["layers"] == 30
    assert info["tensor_types"]["Q4_1"]["count"] > 0


def test_inspect_table_shows_human_units(smollm2_path):
    """Sizes in binary units, parameters in M/B, counts with separators; no raw byte counts."""
    info = json.loads(runner.invoke(app, ["inspect", str(smollm2_path), "--json"]).stdout)
    r = runner.invoke(app, ["inspect", str(smollm2_path)])
    assert r.exit_code == 0, r.output
    rows = _rows(r.stdout)
    assert rows["file size"] == "93.8 MiB"  # 98,362,432 bytes
    assert rows["parameters"] == rows["active parameters per token"] == "135 M"  # dense: all active
    assert rows["file type"] == "Q4_1 (3)"
    assert rows["context length"] == "8,192" and rows["layers"] == "30"
    types = {cells[0]: cells[1:] for line in r.stdout.splitlines()
             if len(cells := [c.strip() for c in line.strip("│ ").split("│")]) == 3}
    assert types["Q4_1"] == ["210", "63.3 MiB"] and types["F32"][1].endswith(" KiB")
    for exact in (info["file_bytes"], info["parameters"], info["tensor_types"]["Q4_1"]["bytes"]):
        assert str(exact) not in r.stdout


def test_inspect_json_keeps_exact_figures(smollm2_path):
    import gguf
    import numpy as np

    r = runner.invoke(app, ["inspect", str(smollm2_path), "--json"])
    info = json.loads(r.stdout)
    reader = gguf.GGUFReader(smollm2_path)
    assert info["file_bytes"] == smollm2_path.stat().st_size == 98362432
    assert info["parameters"] == sum(int(np.prod(t.shape)) for t in reader.tensors)
    assert sum(t["bytes"] for t in info["tensor_types"].values()) == sum(int(t.n_bytes) for t in reader.tensors)
    assert info["context_length"] == 8192 and info["file_type"] == 3


def test_inspect_table_of_a_moe_file():
    path = Path(__file__).parent / "fixtures" / "deepseek2" / "v3-q4_k_m.gguf"
    info = json.loads(runner.invoke(app, ["inspect", str(path), "--json"]).stdout)
    r = runner.invoke(app, ["inspect", str(path)])
    assert r.exit_code == 0, r.output
    rows = _rows(r.stdout)
    assert rows["experts"] == "16" and rows["experts used per token"] == "4" and rows["file type"] == "Q4_K_M (15)"
    assert rows["parameters"] == f"{info['parameters'] / 1000:.0f} K"
    assert rows["routed expert weights"] == f"{info['routed_expert_bytes'] / 1024:.0f} KiB"
    assert info["parameters_active_per_token"] < info["parameters"]


def _rows(table: str) -> dict:
    """The label -> value rows of inspect's first table (label and value are 2+ spaces apart)."""
    import re

    return dict(re.split(r"\s{2,}", line.strip(), maxsplit=1) for line in table.splitlines()
                if line.startswith(" ") and re.search(r"\S\s{2,}\S", line))


def test_names_in_messages_are_printed_as_they_are(tmp_path):
    """No :emoji: codes nor [markup] read in file names: an error and a batch message say them literally."""
    r = runner.invoke(app, ["generate", str(tmp_path / "a:smile:[bold]b.gguf"), "-p", "hi"])
    assert r.exit_code == 1 and "a:smile:[bold]b.gguf: no such file" in r.stderr, r.stderr
    src, dst = tmp_path / "[bold]in:smile:.jsonl", tmp_path / "[red]out.jsonl"
    src.write_text('{"custom_id": "a", "prompt": "hi"}\n')
    dst.write_text('{"custom_id": "a", "response": null, "error": null}\n')
    r = runner.invoke(app, ["batch", str(src), "-o", str(dst)])
    assert r.exit_code == 0 and f"every request of {src} is in {dst}." in r.stderr, r.stderr


@pytest.mark.parametrize("command", ["generate", "chat"])
@pytest.mark.parametrize("option, value, says", [("-n", "0", "--max-tokens must be at least 1, got 0"),
                                                 ("--temp", "-1", "--temp must be at least 0, got -1")])
def test_out_of_range_options_are_refused_before_loading(tmp_path, command, option, value, says):
    r = runner.invoke(app, [command, str(tmp_path / "never-loaded.gguf"), "-p" if command == "generate" else "-s",
                            "hi", option, value], input="")
    assert r.exit_code == 1 and r.stderr == f"error: {says}\n", r.output


FIXTURE = Path(__file__).parent / "fixtures" / "deepseek2" / "v3-q4_0.gguf"


@pytest.mark.parametrize("command, spec", [("generate", "missing.gguf"), ("batch", "missing.gguf:0.5"),
                                           ("batch", "sql=missing.gguf:0.5")])
def test_a_missing_lora_file_is_said_before_the_model_loads(tmp_path, monkeypatch, command, spec):
    import edgeseek.engine

    def never(*a, **k):
        raise AssertionError("the model was loaded")
    monkeypatch.setattr(edgeseek.engine, "load", never)
    monkeypatch.chdir(tmp_path)
    if command == "generate":
        args = ["generate", str(FIXTURE), "-p", "hi"]
    else:
        (tmp_path / "in.jsonl").write_text('{"custom_id": "a", "prompt": "hi"}\n')
        args = ["batch", str(FIXTURE), "in.jsonl", "-o", "out.jsonl"]
    r = runner.invoke(app, args + ["--lora", spec])
    assert r.exit_code == 1 and r.stderr == "error: missing.gguf: no such LoRA adapter file\n", r.output


def test_ctx_below_one_is_refused(tmp_path):
    r = runner.invoke(app, ["generate", str(tmp_path / "never-loaded.gguf"), "-p", "hi", "--ctx", "0"])
    assert r.exit_code == 1 and r.stderr == "error: --ctx must be at least 1, got 0\n", r.output


def test_ctrl_c_after_a_reply_or_in_a_command_stops_the_turn_not_the_chat(smollm2_path, monkeypatch):
    import edgeseek.app.cli as cli_module

    stats_line = cli_module._stats_line
    calls = []

    def interrupted_once(*args):
        calls.append(1)
        if len(calls) == 1:  # Ctrl+C lands as the first reply's stats line is printed
            raise KeyboardInterrupt
        return stats_line(*args)

    monkeypatch.setattr(cli_module, "_stats_line", interrupted_once)
    script = "Hello\n/stats\nAnd again?\n/bye\n"
    r = runner.invoke(app, ["chat", str(smollm2_path), "-n", "4", "--temp", "0"], input=script)
    assert r.exit_code == 0, r.output
    assert "[stopped]" in r.stderr
    assert r.stderr.count("[ prompt:") == 2  # /stats, then the second reply's stats line
    assert "generation: 4 tok" in r.stderr  # /stats: the first turn counted

"""`edgeseek batch` on the real SmolLM2 model: OpenAI batch lines and short forms, error lines,
resuming an interrupted run, and several sequences in one forward pass giving what one at a time
gives."""
import json

import numpy as np
import pytest
from typer.testing import CliRunner

import edgeseek
from edgeseek import batch as B
from edgeseek.app.cli import app
from edgeseek.sampler import SamplerConfig

runner = CliRunner()

GOOD = [
    {"custom_id": "q1", "method": "POST", "url": "/v1/chat/completions",
     "body": {"messages": [{"role": "user", "content": "What is 2+2?"}], "max_tokens": 12, "temperature": 0}},
    {"custom_id": "q2", "prompt": "The capital of France is", "max_tokens": 6, "temperature": 0},
    {"custom_id": "q3", "messages": [{"role": "user", "content": "Name a colour."}], "max_tokens": 10,
     "temperature": 0},
    {"custom_id": "q4", "method": "POST", "url": "/v1/completions",
     "body": {"prompt": "One, two, three,", "max_tokens": 8, "temperature": 0, "stop": [" six"]}},
]


def _write(path, lines):
    path.write_text("".join((line if isinstance(line, str) else json.dumps(line)) + "\n" for line in lines))


def _read(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


def _texts(rows):
    out = {}
    for r in rows:
        if r["response"]:
            c = r["response"]["body"]["choices"][0]
            out[r["custom_id"]] = c.get("text", c.get("message", {}).get("content"))
    return out


def test_mixed_file_good_and_bad_lines(smollm2_path, tmp_path):
    src, dst = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    _write(src, [GOOD[0], GOOD[1], "{not json", {"custom_id": "q1", "prompt": "again"},
                 {"custom_id": "q5", "method": "POST", "url": "/v1/chat/completions"}, GOOD[2]])
    r = runner.invoke(app, ["batch", str(smollm2_path), str(src), "-o", str(dst)])
    assert r.exit_code == 1, r.output  # some lines failed
    rows = _read(dst)
    assert len(rows) == 6
    errors = {r["error"]["line"]: r for r in rows if r["error"]}
    assert set(errors) == {3, 4, 5}
    assert "invalid JSON" in errors[3]["error"]["message"] and errors[3]["custom_id"] is None
    assert "duplicate custom_id 'q1'" in errors[4]["error"]["message"]
    assert errors[5]["custom_id"] == "q5" and "missing body" in errors[5]["error"]["message"]
    ok = [r for r in rows if r["response"]]
    assert sorted(r["custom_id"] for r in ok) == ["q1", "q2", "q3"]
    chat = next(r for r in ok if r["custom_id"] == "q1")["response"]["body"]
    assert chat["object"] == "chat.completion" and chat["choices"][0]["message"]["role"] == "assistant"
    assert chat["usage"]["completion_tokens"] <= 12 and chat["choices"][0]["finish_reason"] in ("stop", "length")


def test_interrupted_run_resumes_each_id_exactly_once(smollm2_path, tmp_path):
    src, dst = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    _write(src, GOOD + ["{broken"])
    engine = edgeseek.load(smollm2_path, n_ctx=512)
    reqs, bad = B.read_requests(src.read_text().splitlines(), SamplerConfig(), 16)
    written = []

    def emit(line):  # the process dies after the second answer
        if len(written) == 2:
            raise KeyboardInterrupt
        written.append(line)
        with open(dst, "a") as f:
            f.write(json.dumps(line) + "\n")

    with pytest.raises(KeyboardInterrupt):
        B.run(engine, reqs, emit, parallel=2)
    assert len(_read(dst)) == 2
    r = runner.invoke(app, ["batch", str(smollm2_path), str(src), "-o", str(dst)])
    assert r.exit_code == 1, r.output  # the broken line
    rows = _read(dst)
    ids = [r["custom_id"] for r in rows if r["response"]]
    assert sorted(ids) == ["q1", "q2", "q3", "q4"]  # each exactly once
    assert [r["error"]["line"] for r in rows if r["error"]] == [5]
    again = runner.invoke(app, ["batch", str(smollm2_path), str(src), "-o", str(dst)])
    assert again.exit_code == 0 and "Nothing to do" in again.output
    assert len(_read(dst)) == 5


def test_sequences_decoded_together_match_one_at_a_time(smollm2_path, tmp_path):
    src = tmp_path / "in.jsonl"
    _write(src, GOOD)
    outs = {}
    for p in (1, 4):
        dst = tmp_path / f"out{p}.jsonl"
        r = runner.invoke(app, ["batch", str(smollm2_path), str(src), "-o", str(dst), "-P", str(p)])
        assert r.exit_code == 0, r.output
        outs[p] = _texts(_read(dst))
    assert outs[1] == outs[4] and len(outs[1]) == 4
    assert " six" not in outs[1]["q4"]  # the stop string ends the reply and is not shown


def test_forward_rows_equals_separate_decode(smollm2_path):
    m = edgeseek.load(smollm2_path, n_ctx=64).model
    rng = np.random.default_rng(1)
    seqs = [rng.integers(0, m.config.vocab_size, n).astype(np.int32) for n in (3, 7, 5)]
    want = []
    for s in seqs:
        c = m.new_cache()
        m.forward(s[:-1], c)
        want.append(m.forward(s[-1:], c)[0])
    caches = []
    for s in seqs:
        c = m.new_cache()
        m.forward(s[:-1], c)
        caches.append(c)
    got = m.forward_rows(np.array([s[-1] for s in seqs]), caches)
    np.testing.assert_array_equal(got, np.stack(want))
    assert [c.pos for c in caches] == [3, 7, 5]


@pytest.mark.parametrize("line, message", [
    ('{"custom_id": "x", "prompt": "hi", "max_tokens": 0}', "max_tokens must be a positive integer"),
    ('{"custom_id": "x", "prompt": "hi", "temperature": "hot"}', "temperature must be a number"),
    ('{"custom_id": "x", "method": "GET", "url": "/v1/chat/completions", "body": {}}', "method must be POST"),
    ('{"custom_id": "x", "url": "/v1/embeddings", "body": {"input": "a"}}', "unsupported url"),
    ('{"prompt": "hi"}', "missing custom_id"),
    ('[1, 2]', "expected a JSON object"),
    ('{"custom_id": "x", "messages": []}', "messages must be a non-empty list"),
    ('{"custom_id": "x", "messages": [{"role": "user"}]}', "messages[0].content must be a string or a list of text"),
    # Numbers as OpenAI's API judges them: finite, in range, integers where integers are due.
    ('{"custom_id": "x", "prompt": "hi", "top_p": NaN}', "top_p must be a finite number, got NaN"),
    ('{"custom_id": "x", "prompt": "hi", "temperature": Infinity}', "temperature must be a finite number"),
    ('{"custom_id": "x", "prompt": "hi", "min_p": -Infinity}', "min_p must be a finite number"),
    ('{"custom_id": "x", "prompt": "hi", "frequency_penalty": NaN}', "frequency_penalty must be a finite number"),
    ('{"custom_id": "x", "prompt": "hi", "temperature": 2.5}', "temperature must be between 0.0 and 2.0, got 2.5"),
    ('{"custom_id": "x", "prompt": "hi", "temperature": -0.1}', "temperature must be between 0.0 and 2.0"),
    ('{"custom_id": "x", "prompt": "hi", "top_p": 1.5}', "top_p must be between 0.0 and 1.0, got 1.5"),
    ('{"custom_id": "x", "prompt": "hi", "min_p": 2}', "min_p must be between 0.0 and 1.0"),
    ('{"custom_id": "x", "prompt": "hi", "presence_penalty": 3}', "presence_penalty must be between -2.0 and 2.0"),
    ('{"custom_id": "x", "prompt": "hi", "top_k": 1.5}', "top_k must be an integer, got 1.5"),
    ('{"custom_id": "x", "prompt": "hi", "top_k": -2}', "top_k must be at least -1"),
    ('{"custom_id": "x", "prompt": "hi", "seed": -1}', "seed must be between 0 and"),
    ('{"custom_id": "x", "prompt": "hi", "repeat_penalty": 0}', "repeat_penalty must be above 0.0"),
    ('{"custom_id": "x", "prompt": "hi", "max_tokens": NaN}', "max_tokens must be a positive integer, got NaN"),
    # Roles and content as OpenAI takes them.
    ('{"custom_id": "x", "messages": [{"role": "wizard", "content": "hi"}]}',
     'messages[0].role must be one of system, user, assistant, tool, got "wizard"'),
    ('{"custom_id": "x", "messages": [{"role": "user", "content": "a"}, {"content": "b"}]}',
     "messages[1].role must be one of"),
    ('{"custom_id": "x", "messages": [{"role": "user", "content": 5}]}', "messages[0].content must be a string"),
    ('{"custom_id": "x", "messages": [{"role": "user", "content": null}]}', "messages[0].content must be a string"),
    ('{"custom_id": "x", "messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {}}]}]}',
     "messages[0].content must be a string or a list of text parts"),
    ('{"custom_id": "x", "messages": ["hi"]}', 'messages[0] must be a {role, content} object, got "hi"'),
    ('{"custom_id": "x", "messages": [{"role": ["user"], "content": "hi"}]}', "messages[0].role must be one of"),
    # What the server refuses with 400 is a bad line too, not silently one plain choice.
    ('{"custom_id": "x", "prompt": "hi", "n": 2}', "n=2 is not supported"),
    ('{"custom_id": "x", "messages": [{"role": "user", "content": "hi"}], "tools": [{"type": "function"}]}',
     'tools=[{"type": "function"}] is not supported'),
    ('{"custom_id": "x", "url": "/v1/chat/completions", "body": {"messages": [{"role": "user", "content": "hi"}], '
     '"logprobs": true}}', "logprobs=true is not supported"),
    ('{"custom_id": "x", "prompt": "hi", "logprobs": 3}', "logprobs=3 is not supported"),
])
def test_bad_lines_name_the_problem(line, message):
    r = B.parse_line(line, 7, SamplerConfig(), 16)
    assert isinstance(r, B.BadLine) and message in r.message and r.message.startswith("line 7:"), r


def test_openai_forms_that_are_accepted():
    line = json.dumps({"custom_id": "x", "messages": [
        {"role": "system", "content": [{"type": "text", "text": "Be brief."}, {"type": "text", "text": "Be kind."}]},
        {"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"},
        {"role": "tool", "content": "42", "tool_call_id": "c1"}],
        "temperature": 2, "top_p": 0, "top_k": 40.0, "seed": 7, "presence_penalty": -2, "min_p": 1})
    r = B.parse_line(line, 1, SamplerConfig(), 16)
    assert isinstance(r, B.Request), r
    assert r.prompt[0] == {"role": "system", "content": "Be brief.\nBe kind."}  # text parts joined, as vLLM does
    assert r.prompt[3]["tool_call_id"] == "c1"
    assert (r.sampler.temperature, r.sampler.top_p, r.sampler.top_k, r.sampler.seed) == (2.0, 0.0, 40, 7)


def test_developer_role_is_the_system_message():
    """OpenAI's newer name for "system": rendered by the chat template as the system message."""
    line = json.dumps({"custom_id": "x", "messages": [{"role": "developer", "content": "Be brief."},
                                                      {"role": "user", "content": "hi"}], "n": 1, "logprobs": False})
    r = B.parse_line(line, 1, SamplerConfig(), 16)
    assert isinstance(r, B.Request), r
    assert r.prompt == [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "hi"}]


def test_nan_sampling_and_unknown_role_never_generate(smollm2_path, tmp_path):
    src, dst = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    _write(src, ['{"custom_id": "nan", "prompt": "Once upon a time", "top_p": NaN}',
                 {"custom_id": "wiz", "messages": [{"role": "wizard", "content": "Cast a spell."}]}])
    r = runner.invoke(app, ["batch", str(smollm2_path), str(src), "-o", str(dst)])
    assert r.exit_code == 1, r.output
    rows = {row["custom_id"]: row for row in _read(dst)}
    assert set(rows) == {"nan", "wiz"} and all(row["response"] is None for row in rows.values())
    assert rows["nan"]["error"] == {"code": "invalid_request", "line": 1,
                                    "message": "line 1: top_p must be a finite number, got NaN"}
    assert "role must be one of system, user, assistant, tool" in rows["wiz"]["error"]["message"]


def test_help_usage_line_names_the_arguments_once():
    r = runner.invoke(app, ["batch", "--help"], env={"NO_COLOR": "1", "COLUMNS": "200"})
    assert r.exit_code == 0, r.output
    usage = next(line for line in r.stdout.splitlines() if "Usage:" in line)
    assert usage.rstrip().endswith("[OPTIONS] {[MODEL] IN.jsonl}"), usage  # no `[]` of the hidden argument


def test_output_folder_and_files_that_are_not_text_are_one_line_before_loading(tmp_path):
    src, binary = tmp_path / "in.jsonl", tmp_path / "weights.bin"
    _write(src, [GOOD[1]])
    binary.write_bytes(b"GGUF\x03\x00\x00\x00\xff\xfe\x00\x81" * 16)
    (tmp_path / "replies").mkdir()
    model = str(tmp_path / "never-loaded.gguf")  # the files are judged first: no model error
    for args, says in [([str(src), "-o", str(tmp_path / "replies")], "replies: is a folder; -o/--output takes"),
                       ([str(binary), "-o", str(tmp_path / "o.jsonl")], "weights.bin: line 1 is not UTF-8 text"),
                       ([str(src), "-o", str(binary)], "weights.bin: line 1 is not UTF-8 text"),
                       ([str(src), "-o", str(src / "o.jsonl")], "in.jsonl: part of that path is a file")]:
        r = runner.invoke(app, ["batch", model, *args])
        assert r.exit_code == 1 and not isinstance(r.exception, OSError), (args, r.exception)
        assert says in r.stderr and r.stderr.count("\n") == 1 and "never-loaded" not in r.stderr, (args, r.stderr)
    assert not (tmp_path / "o.jsonl").exists()


@pytest.mark.parametrize("option, value, says", [("-n", "0", "--max-tokens must be at least 1, got 0"),
                                                 ("--max-tokens", "-3", "--max-tokens must be at least 1, got -3"),
                                                 ("--temp", "-0.5", "--temp must be at least 0, got -0.5"),
                                                 ("-P", "0", "--parallel must be at least 1, got 0")])
def test_option_values_out_of_range_are_refused_before_loading(tmp_path, option, value, says):
    src = tmp_path / "in.jsonl"
    _write(src, [GOOD[1]])
    r = runner.invoke(app, ["batch", str(tmp_path / "never-loaded.gguf"), str(src), "-o", str(tmp_path / "o.jsonl"),
                            option, value])
    assert r.exit_code == 1 and r.stderr == f"error: {says}\n", r.output
    assert not (tmp_path / "o.jsonl").exists()


def test_a_byte_order_mark_before_the_first_line_is_not_an_error(tmp_path):
    src = tmp_path / "in.jsonl"
    src.write_bytes(b"\xef\xbb\xbf" + (json.dumps(GOOD[1]) + "\n" + json.dumps(GOOD[2]) + "\n").encode())
    reqs, bad = B.read_requests(B.text_lines(src), SamplerConfig(), 16)
    assert not bad and [r.custom_id for r in reqs] == ["q2", "q3"]

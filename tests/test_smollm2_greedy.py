"""End to end on a real trained model: SmolLM2-135M-Instruct Q4_1 generates, token for token, what
llama.cpp generates (goldens: tests/fixtures/make_smollm2_golden.py)."""
import json
from pathlib import Path

import pytest

import edgeseek
from edgeseek.chat import prompt_ids

GOLDEN = json.loads((Path(__file__).parent / "fixtures" / "smollm2" / "greedy.json").read_text())


@pytest.fixture(scope="module")
def engine(smollm2_path):
    return edgeseek.load(smollm2_path, n_ctx=512)


@pytest.mark.parametrize("case", GOLDEN["cases"], ids=lambda c: c["prompt"][:24])
def test_greedy_transcript_matches_llama_cpp(engine, case):
    messages = [{"role": "user", "content": case["prompt"]}]
    rendered = engine.chat_template.render(messages, add_generation_prompt=True)
    assert rendered == case["rendered"]
    ids = prompt_ids(engine, rendered)
    assert ids == case["prompt_ids"]
    out = []
    for r in edgeseek.stream_generate(engine, ids, max_tokens=GOLDEN["n_tokens"],
                                      sampler=edgeseek.SamplerConfig.greedy()):
        if r.token is not None:
            out.append(r.token)
    assert out == case["output_ids"]
    assert engine.tokenizer.decode(out) == case["output_text"]

"""End to end on a real trained model: SmolLM2-135M-Instruct Q4_1 greedy transcripts against
llama.cpp's (goldens: tests/fixtures/make_smollm2_golden.py, which records llama.cpp's margin
between its best and second-best logit at every step).

Both engines quantize activations to 8 bits the same way (bit-identical, tests/test_quant_*), but
not every float operation in the same order; through 30 layers that leaves a noise floor of about
one logit (changing edgeseek's SiLU by one ulp moves its own logits by up to 1.2). So the
transcripts must be identical wherever llama.cpp's choice is clear, and may part only at a step
where llama.cpp itself was within NOISE of its second choice, and then to that second choice.
"""
import json
from pathlib import Path

import pytest

import edgeseek
from edgeseek.chat import prompt_ids

GOLDEN = json.loads((Path(__file__).parent / "fixtures" / "smollm2" / "greedy.json").read_text())
NOISE = 0.5  # logits: SiLU moved by one ulp shifts edgeseek's own logits by 0.1-1.2


@pytest.fixture(scope="module")
def engine(smollm2_path):
    return edgeseek.load(smollm2_path, n_ctx=512)


@pytest.mark.parametrize("case", GOLDEN["cases"], ids=lambda c: c["prompt"][:24])
def test_greedy_transcript_follows_llama_cpp(engine, case):
    messages = [{"role": "user", "content": case["prompt"]}]
    rendered = engine.chat_template.render(messages, add_generation_prompt=True)
    assert rendered == case["rendered"]
    ids = prompt_ids(engine, rendered)
    assert ids == case["prompt_ids"]
    out = [r.token for r in edgeseek.stream_generate(engine, ids, max_tokens=GOLDEN["n_tokens"],
                                                     sampler=edgeseek.SamplerConfig.greedy())
           if r.token is not None]
    gold = case["output_ids"]
    first = next((i for i, (a, b) in enumerate(zip(out, gold)) if a != b), None)
    if first is None:
        assert out[: len(gold)] == gold
        return
    assert case["margins"][first] < NOISE, (first, case["margins"][first])
    assert out[first] == case["second_ids"][first]


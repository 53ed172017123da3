"""The numba kernels a model file needs, compiled at load time rather than at its first token.

numba compiles a kernel the first time it is called with new argument types and keeps the machine
code in its cache (beside the sources, or under NUMBA_CACHE_DIR); later runs load it in
milliseconds. So the first run after an install compiles every kernel of the file's formats:
seconds each, ~10 s for SmolLM2's Q4_1 + Q8_0 + F32 on 2 cores. `prepare` does it at load time
and says so through `notify` the moment the first compilation starts. numba's compiler holds the
GIL, so threads do not overlap it; processes do: once a compilation shows the cache is cold, the
other formats compile in worker processes (`python -m edgeseek.kernels`, fresh interpreters that
never import the caller's program, as multiprocessing's spawn would) while this one compiles the
first, and this process then loads their code from the cache.
"""
from __future__ import annotations

import os
import subprocess
import sys
from typing import Callable, Iterable

import numpy as np
import threadpoolctl
from numba.core import event

from edgeseek.quantize.registry import FORMATS, get_format


def prepare(qtypes: Iterable, n_many: int | tuple = 0, notify: Callable[[str], None] | None = None,
            extra: Callable[[], None] | None = None, workers: int | None = None) -> bool:
    """Compile (or load from numba's cache) the kernels of these quant types (those edgeseek has:
    loading the model names any other its layers use) and those `extra` runs (the backend's own);
    True if any kernel had to be compiled. `n_many`: matrices of one matmul_many call (experts per
    decode step, MLA's heads), an int or a tuple of them."""
    # block formats first (their kernels take longest), then the float ones
    formats = sorted({FORMATS[q] for q in qtypes if q in FORMATS},
                     key=lambda f: (f.qtype.value <= 1 or f.qtype.name == "BF16", f.qtype.name))
    workers = (os.cpu_count() or 1) - 1 if workers is None else workers
    listener = _FirstCompile(lambda: _on_cold(formats, n_many, notify, workers, listener))
    try:
        with event.install_listener("numba:run_pass", listener), np.errstate(all="ignore"):
            if formats:
                formats[0].warmup(n_many)
            if extra is not None:
                extra()
            for w in listener.workers:
                w.wait()  # a worker that failed leaves its formats to be compiled here
            for fmt in formats[1:]:
                fmt.warmup(n_many)  # from the cache the workers filled, or compiled here
    finally:
        for w in listener.workers:  # Ctrl+C or an error: no worker outlives prepare
            if w.poll() is None:
                w.kill()
    return listener.fired


def one_blas_thread() -> None:
    """numba's threads run the kernels; a second pool of BLAS threads (numpy's attention products)
    on the same few cores spins against them: decode fell from 34 to 7 tokens/s once those products
    grew past OpenBLAS's threading threshold. Set at run time, as an environment variable would only
    work before numpy has loaded its BLAS, and most programs import numpy first. Every BLAS loaded
    so far: call it once the libraries a run needs are in (numba brings scipy's own OpenBLAS)."""
    threadpoolctl.threadpool_limits(1, user_api="blas")


class _FirstCompile(event.Listener):
    """Calls `on_first` when the first compiler pass runs (a kernel loaded from the cache runs
    none); later events pass."""

    def __init__(self, on_first: Callable[[], None]):
        self.on_first, self.fired = on_first, False
        self.workers: list[subprocess.Popen] = []

    def on_start(self, ev):
        if not self.fired:
            self.fired = True
            self.on_first()

    def on_end(self, ev):
        pass


def _on_cold(formats, n_many, notify, workers, listener: _FirstCompile) -> None:
    if notify is not None:
        notify(f"compiling kernels for {', '.join(f.qtype.name for f in formats)} (first run only)")
    rest = [f.qtype.name for f in formats[1:]]
    n = min(workers, len(rest))
    for share in (rest[i::n] for i in range(n)):
        listener.workers.append(subprocess.Popen(
            [sys.executable, "-m", "edgeseek.kernels", "--n-many",
             ",".join(map(str, n_many if isinstance(n_many, tuple) else (n_many,))), "--parent", str(os.getpid()),
             *share],
            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))


def main(argv: list[str] | None = None) -> None:
    """A compile worker: warm the named formats' kernels into numba's cache."""
    import argparse

    from gguf import GGMLQuantizationType

    p = argparse.ArgumentParser(prog="python -m edgeseek.kernels", description=main.__doc__)
    p.add_argument("--n-many", type=lambda v: tuple(int(n) for n in v.split(",")), default=(0,))
    p.add_argument("--parent", type=int, help="stop between formats once this process is gone")
    p.add_argument("qtypes", nargs="+")
    a = p.parse_args(argv)
    with np.errstate(all="ignore"):
        for name in a.qtypes:
            if a.parent is not None and os.getppid() != a.parent:
                return  # the loading process was killed: no one waits for the rest
            get_format(GGMLQuantizationType[name]).warmup(a.n_many)


if __name__ == "__main__":
    main()

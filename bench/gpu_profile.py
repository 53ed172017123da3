"""Where a GPU step's time goes: one prompt and a few decode steps of a model on the GPU, with every
backend operation and kernel launcher timed (a device synchronization before and after each, so
the figures are inclusive wall times of eager execution, not of the graph); then the decode step
as its CUDA graph: replay time on the device (CUDA events) against the whole step on the host; and
each kernel's launches of one step replayed in a graph of their own (kernels.in_graph: what each
kernel costs inside the decode graph, without the eager figures' per-launch event overhead).

    python bench/gpu_profile.py MODEL.gguf [--prompt 512] [--steps 16] [--out profile.json]
"""
from __future__ import annotations

import argparse
import json
import time
from collections import defaultdict

import numpy as np


def wrap(owner, name: str, table: dict, sync) -> None:
    f = getattr(owner, name)

    def timed(*a, **k):
        sync()
        t = time.perf_counter()
        r = f(*a, **k)
        sync()
        table[name][0] += time.perf_counter() - t
        table[name][1] += 1
        return r

    setattr(owner, name, timed)


HOLD = r"""
extern "C" __global__ void hold(unsigned long long ns) {
    unsigned long long t0, t;
    asm volatile("mov.u64 %0, %%globaltimer;" : "=l"(t0));
    do { __nanosleep(1000); asm volatile("mov.u64 %0, %%globaltimer;" : "=l"(t)); } while (t - t0 < ns);
}
"""


def evented(plain, log: list, launches: list | None = None):
    """A kernel lookup (Kernels._fn) whose launches record CUDA events around them in log as (name,
    start, end); with `launches`, also each launch's arguments (they keep its buffers alive for a
    replay)."""
    import cupy

    def timed_fn(name):
        f = plain(name)

        def launch(grid, block, args, **kw):
            e0, e1 = cupy.cuda.Event(), cupy.cuda.Event()
            e0.record()
            f(grid, block, args, **kw)
            e1.record()
            log.append((name, e0, e1))
            if launches is not None:
                launches.append((name, f, grid, block, args, kw))
        return launch
    return timed_fn


def kernel_times(model, b, g, cache, steps: int) -> dict:
    """Per kernel name: device microseconds and launches per decode step, the sum, and the time
    between kernels (other work, or the host falling behind the holding kernel). The step runs as
    the graph was recorded (the decode graph's input and expert-id buffers: nothing in it waits
    for the host)."""
    import cupy
    hold = cupy.RawKernel(HOLD, "hold")
    kernels = b.kernels
    plain = kernels._fn
    log: list = []
    table: dict = defaultdict(lambda: [0.0, 0])
    gaps = 0.0
    launches: list = []
    kernels._fn = evented(plain, log, launches)
    b._step = g
    pos = np.array([cache.pos - 1])  # the graph's last step, run again (its cache entry rewritten)
    try:
        for _ in range(steps):
            log.clear()
            launches.clear()
            hold((1,), (1,), (np.uint64(60_000_000),))  # 60 ms: longer than the host takes to queue a step
            model.step(g.tok, pos, cache)
            cupy.cuda.Device().synchronize()
            for i, (name, e0, e1) in enumerate(log):
                table[name][0] += cupy.cuda.get_elapsed_time(e0, e1) * 1e3
                table[name][1] += 1
                if i:
                    gaps += cupy.cuda.get_elapsed_time(log[i - 1][2], e0) * 1e3
    finally:
        kernels._fn = plain
        b._step = None
    ops = {k: {"us_per_step": round(v[0] / steps, 1), "launches_per_step": v[1] / steps}
           for k, v in sorted(table.items(), key=lambda kv: -kv[1][0])}
    return {"sum_us": round(sum(v[0] for v in table.values()) / steps, 1), "between_us": round(gaps / steps, 1),
            "launches": sum(v[1] for v in table.values()) / steps, "by_kernel": ops,
            "in_graph": graph_times(launches)}


def prompt_times(model, b, tokens, repeat: int = 2) -> dict:
    """A prompt's forward as a user runs it (no synchronization but its own): its wall time; our
    kernels' device time (CUDA events around each launch, summed by name); `other_ms`, the rest of
    the evented span: CuPy's own operations, cuBLAS and the device's idle time together; and the
    host's profile (cProfile, top functions by own time: a large share waiting in a synchronize
    means the device was behind, a small one that the host sets the pace)."""
    import cProfile
    import io
    import pstats

    import cupy
    kernels = b.kernels
    plain = kernels._fn
    log: list = []
    sync = cupy.cuda.Device().synchronize
    walls = []
    for _ in range(repeat):
        cache = model.new_cache()
        sync()
        t = time.perf_counter()
        model.forward(tokens, cache)
        sync()
        walls.append(time.perf_counter() - t)
    cache = model.new_cache()
    prof = cProfile.Profile()
    sync()
    prof.enable()
    model.forward(tokens, cache)
    sync()
    prof.disable()
    text = io.StringIO()
    pstats.Stats(prof, stream=text).sort_stats("tottime").print_stats(30)
    kernels._fn = evented(plain, log)
    try:
        cache = model.new_cache()
        sync()
        e_start = cupy.cuda.Event()
        e_start.record()
        model.forward(tokens, cache)
        e_end = cupy.cuda.Event()
        e_end.record()
        sync()
    finally:
        kernels._fn = plain
    table: dict = defaultdict(lambda: [0.0, 0])
    for name, e0, e1 in log:
        table[name][0] += cupy.cuda.get_elapsed_time(e0, e1)
        table[name][1] += 1
    ours = sum(v[0] for v in table.values())
    span = cupy.cuda.get_elapsed_time(e_start, e_end)
    return {"tokens": len(tokens), "wall_ms": round(min(walls) * 1e3, 2), "evented_span_ms": round(span, 2),
            "our_kernels_ms": round(ours, 2), "other_ms": round(span - ours, 2),
            "by_kernel": {k: {"ms": round(v[0], 3), "launches": v[1]}
                          for k, v in sorted(table.items(), key=lambda kv: -kv[1][0])},
            "host_profile": text.getvalue().splitlines()[:60]}


def graph_times(launches: list, repeat: int = 20) -> dict:
    """Per kernel name, its launches of one decode step (their own arguments) captured `repeat`
    times over into a CUDA graph of their own and replayed: microseconds a step inside a graph,
    where the eager figures above carry each launch's event overhead. Also the whole step's
    launches as one graph (sum_us against the decode graph's replay)."""
    import cupy
    stream = cupy.cuda.Stream(non_blocking=True)

    def replay_us(group: list) -> float:
        with stream:
            stream.begin_capture()
            for _ in range(repeat):
                for _, f, grid, block, args, kw in group:
                    f(grid, block, args, **kw)
            graph = stream.end_capture()
        graph.launch(stream)
        e0, e1 = cupy.cuda.Event(), cupy.cuda.Event()
        e0.record(stream)
        for _ in range(3):
            graph.launch(stream)
        e1.record(stream)
        e1.synchronize()
        return cupy.cuda.get_elapsed_time(e0, e1) * 1e3 / (3 * repeat)

    by_name: dict = defaultdict(list)
    for launch in launches:
        by_name[launch[0]].append(launch)
    out = {name: {"us_per_step": round(replay_us(group), 1), "launches_per_step": len(group)}
           for name, group in by_name.items()}
    out = dict(sorted(out.items(), key=lambda kv: -kv[1]["us_per_step"]))
    return {"step_us": round(replay_us(launches), 1), "sum_us": round(sum(v["us_per_step"] for v in out.values()), 1),
            "by_kernel": out}


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("model")
    p.add_argument("--prompt", type=int, default=512)
    p.add_argument("--steps", type=int, default=16)
    p.add_argument("--gpu-budget", help="VRAM budget (default: all of the model on the GPU)")
    p.add_argument("--out")
    a = p.parse_args()
    import cupy

    import edgeseek
    from edgeseek.backends import cuda as C

    engine = edgeseek.load(a.model, n_ctx=a.prompt + a.steps + 64, device="cuda", gpu_budget=a.gpu_budget)
    model, b = engine.model, engine.backend
    sync = cupy.cuda.Device().synchronize
    rng = np.random.default_rng(0)
    prompt = rng.integers(100, model.config.vocab_size, a.prompt).astype(np.int32)
    cache = model.new_cache()
    model.forward(prompt, cache)  # warm-up: kernels compiled, pools grown
    result = {"prompt_device": prompt_times(model, b, prompt)}

    # 1. the graph: replays timed on the device and on the host
    t = time.perf_counter()
    for _ in range(a.steps):
        model.forward(np.array([7], np.int32), cache)
    host_ms = (time.perf_counter() - t) / a.steps * 1e3
    g = getattr(cache, "decode_graph", None)
    if g is not None and len(g.graphs) == 1:  # a chain waits for the host between its graphs
        start, end = cupy.cuda.Event(), cupy.cuda.Event()
        start.record(g.stream)
        for _ in range(a.steps):
            g.graphs[0].launch(g.stream)
        end.record(g.stream)
        end.synchronize()
        result["graph_replay_ms"] = cupy.cuda.get_elapsed_time(start, end) / a.steps
    result["decode_step_host_ms"] = host_ms
    result["graph_used"] = g is not None

    # 2. each kernel's device time in one decode step (eager, queued behind a holding kernel)
    b.graphs = False
    if g is not None:
        result["kernels"] = kernel_times(model, b, g, cache, a.steps)

    # 3. eager, every operation timed
    table: dict = defaultdict(lambda: [0.0, 0])
    for name in ("moe", "latent_step", "per_head", "rms_norm", "swiglu", "rope", "_prompt_experts",
                 "_grouped_experts", "_routed_on_host", "_plus_shared", "_router_logits", "_batched",
                 "causal_attention", "linears", "ffn"):
        if hasattr(b, name):
            wrap(b, name, table, sync)
    for name in ("mmv", "mmv_ids", "glu_ids", "down_ids", "dequant", "gemm_f16", "route", "mla_entry", "mla_decode", "scatter_add",
                 "silu_mul"):
        wrap(b.kernels, name, table, sync)
    for name in ("moe_glu_mma", "moe_down_mma", "moe_combine"):
        if hasattr(b.kernels, name):
            wrap(b.kernels, name, table, sync)
    for name in ("_queries", "_entries", "_attend", "_attend_few", "_output"):  # the MLA model's parts
        if hasattr(model, name):
            wrap(model, name, table, sync)
    wrap(C.DeviceMatrix, "__call__", table, sync)
    wrap(model, "attention", table, sync)
    wrap(model, "feed_forward", table, sync)
    for phase, tokens in (("prompt", prompt), ("decode", None)):
        table.clear()
        cache = model.new_cache()
        if phase == "decode":
            model.forward(prompt, cache)
            table.clear()
        sync()
        t = time.perf_counter()
        n = 1 if phase == "prompt" else a.steps
        for _ in range(n):
            model.forward(tokens if phase == "prompt" else np.array([7], np.int32), cache)
        sync()
        total = (time.perf_counter() - t) / n
        result[phase] = {"step_ms": total * 1e3,
                         "ops": {k: {"ms_per_step": v[0] / n * 1e3, "calls_per_step": v[1] / n}
                                 for k, v in sorted(table.items(), key=lambda kv: -kv[1][0])}}
    print(json.dumps(result, indent=1))
    if a.out:
        with open(a.out, "w") as f:
            json.dump(result, f, indent=1)


if __name__ == "__main__":
    main()

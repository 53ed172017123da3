"""The decode step's gate-up launch (glu_ids_<t>_q8: routed + shared experts, int8 activations) and
router_route under other block shapes: ROW_THREADS / GLU_THREADS / GLU_ROWS / MMV1_ROWS swapped in
the kernels' source, each kernel timed in a CUDA graph over 26 layers' distinct weights (V2-Lite: 6
experts of 1408 x 2048 + shared 2816 x 2048; router 64 x 2048 float32). On the GPU machine:

    python bench/gpu_block_shapes.py [glu] [router]
"""
import re, sys, numpy as np, cupy as cp
from pathlib import Path
here = Path("edgeseek/backends")
base = "\n".join((here / f).read_text() for f in ("cuda_kernels.cu", "cuda_decode.cu", "cuda_prompt.cu"))
L = 26
SIZES = {"q4_0": (32, 18, (0,)), "q4_k": (256, 144, (0, 2))}
def mat(kind, n, k, e=1):
    per, bb, doffs = SIZES[kind]
    nb = k // per
    raw = cp.random.randint(0, 256, (e, n, nb, bb), dtype=cp.int32).astype(cp.uint8)
    half = cp.asarray(np.frombuffer(np.float16(0.01).tobytes(), np.uint8))
    for o in doffs:
        raw[..., o:o + 2] = half
    return raw.reshape(e, n, nb * bb), nb * bb
D, F, E, k, FS = 2048, 1408, 64, 6, 2816
ids = cp.arange(k, dtype=cp.int32)
xq = cp.asarray(np.random.default_rng(0).integers(-127, 128, D).astype(np.int8))
xs = cp.asarray(np.abs(np.random.default_rng(1).standard_normal((D // 32, 2))).astype(np.float32) * 0.01)
null = np.uint64(0)
def timeit(launch, reps=20):
    s = cp.cuda.Stream(non_blocking=True)
    with s:
        launch(); s.synchronize()
        s.begin_capture()
        for l in range(L): launch(l)
        g = s.end_capture()
    g.launch(s); s.synchronize()
    e0, e1 = cp.cuda.Event(), cp.cuda.Event()
    e0.record(s)
    for _ in range(reps): g.launch(s)
    e1.record(s); e1.synchronize()
    return cp.cuda.get_elapsed_time(e0, e1) * 1e3 / reps / L
def module(threads, glu_rows, mmv1_rows):
    s = re.sub(r"#define ROW_THREADS \d+", f"#define ROW_THREADS {threads}", base)
    s = re.sub(r"#define GLU_THREADS \d+", f"#define GLU_THREADS {threads}", s)
    s = re.sub(r"#define GLU_ROWS \d+", f"#define GLU_ROWS {glu_rows}", s)
    s = re.sub(r"#define MMV1_ROWS \d+", f"#define MMV1_ROWS {mmv1_rows}", s)
    return cp.RawModule(code=s, options=("-std=c++17",))
which = sys.argv[1:] or ["glu", "router"]
if "glu" in which:
    for kind in ("q4_0", "q4_k"):
        G = [mat(kind, F, D, k) for _ in range(L)]; U = [mat(kind, F, D, k) for _ in range(L)]
        G2 = [mat(kind, FS, D) for _ in range(L)]; U2 = [mat(kind, FS, D) for _ in range(L)]
        h = cp.empty((k, F), np.float32); h2 = cp.empty((1, FS), np.float32)
        ref = None
        for threads, rows in [(128, 2), (128, 4), (128, 8), (64, 2), (64, 4), (64, 8), (256, 4), (256, 8), (32, 4), (32, 8)]:
            try:
                f = module(threads, rows, 4).get_function(f"glu_ids_{kind}_q8")
            except Exception as ex:
                print(kind, threads, rows, "compile failed", str(ex)[:300]); continue
            def g_(l=0):
                f(((FS + rows - 1) // rows, k + 1), (threads,), (G[l][0], U[l][0], np.int64(G[l][1]), np.int64(F * G[l][1]), ids, xq, xs,
                  np.int32(k), h, np.int32(F), np.int32(D), np.int32(k), G2[l][0], U2[l][0], np.int64(G2[l][1]), np.int32(FS), h2))
            us = timeit(g_)
            out = cp.concatenate([h.ravel(), h2.ravel()]).get()
            err = 0.0 if ref is None else float(np.abs(out - ref).max() / (np.abs(ref).max() + 1e-30))
            if ref is None: ref = out
            mb = 2 * (k * F + FS) * G[0][1] / 1e6
            print(f"glu {kind} threads {threads:3} rows {rows}: {us:6.2f} us a launch, {mb / us:.2f} TB/s (rel diff {err:.1e})", flush=True)
        del G, U, G2, U2
if "router" in which:
    W = [cp.asarray(np.random.default_rng(l).standard_normal((E, D)).astype(np.float32) * 0.02) for l in range(L)]
    x = cp.asarray(np.random.default_rng(9).standard_normal(D).astype(np.float32))
    logits = cp.empty(E, np.float32); counter = cp.zeros(4, np.uint32); rid = cp.empty(k, np.int32); rw = cp.empty(k, np.float32)
    for threads, rows in [(128, 4), (128, 2), (128, 1), (64, 1), (64, 2), (256, 4), (256, 2), (32, 1), (32, 2)]:
        try:
            f = module(threads, 2, rows).get_function("router_route")
        except Exception as ex:
            print("router", threads, rows, "compile failed", str(ex)[:300]); continue
        def r_(l=0):
            f(((E + rows - 1) // rows,), (threads,), (W[l], np.int64(4 * D), x, logits, np.int32(E), np.int32(D), null, np.int32(k),
              np.int32(1), np.int32(0), np.float32(1.0), counter, rid, rw))
        us = timeit(r_)
        print(f"router threads {threads:3} rows {rows}: {us:6.2f} us a launch  ids {rid.get().tolist()}", flush=True)

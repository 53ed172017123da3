"""Which library writes the CUDA backend's kernels: CuPy (RawKernel, CUDA C) or numba-cuda?

One kernel, written twice: the decode matrix-vector product of a Q4_0 matrix with a q8_1-quantized
activation vector, the way llama.cpp's ggml-cuda/mmvq.cu does it (one warp per output row, each lane
loading packed ints and multiplying them with dp4a, the lanes' partial sums reduced with warp
shuffles), on DeepSeek-V2-Lite's decode shapes: 2048x2048 (attention, shared experts), 1408x2048 (a
routed expert's gate/up) and 102400x2048 (the output head).

Weights: random Q4_0 in GGUF's block layout (18 bytes per 32 values: fp16 d, then 16 bytes qs; value j
is the low nibble of qs[j], value j+16 the high nibble; w = d * (q - 8)), repacked once at set-up into
two arrays for coalesced loads ("split" layout, the same bytes): the 16 qs bytes of each block
(int32 x 4, so one lane loads one block with one 16-byte load, and a warp 512 contiguous bytes) and the
fp16 scales ((N, K/32), 2 bytes each). The activation vector is quantized on the GPU to int8 per
32-block with a float32 scale d and the block sum s = d * sum(q) (q8_1-like; llama.cpp keeps d and
s as half2 and its s is the float sum of the block), so that a block contributes
d_w * (d_x * sum(q_w q_x) - 8 s_x) and the kernel's result equals W_deq @ x_hat exactly up to
float32 rounding.

Variants, all launched on one CuPy stream (numba through cuda.external_stream):
- cupy: cupy.RawModule (CUDA C through NVRTC, for the device's arch), __dp4a, int4 loads through
  __ldg, __launch_bounds__(128, 8);
- cupy_32reg: the same source with __launch_bounds__(128, 16): ptxas keeps to 32 registers and
  issues the second block's weight load late (see CUDA_SRC);
- numba: numba.cuda; numba-cuda exposes no dp4a (nothing in numba.cuda), so two @intrinsic's emit
  inline PTX: dp4a.s32.s32 and a 16-byte ld.global.nc.v4.s32;
- numba_pure: numba.cuda without intrinsics: four 4-byte loads per block and the byte products done
  with shifts and masks (what a numba kernel gets with no inline PTX);
- cublas_f32: for scale, cuBLAS's float32 GEMV on the dequantized matrix (cupy.dot), 7.1x the bytes.

Checked against numpy (float64): every row of the result is within float32 rounding of W_deq @ x_hat
(|y - ref| <= 1e-5 * (|W_deq| @ |x_hat|)), and within the bound that the int8 activation rounding
allows against the unquantized x (|y - W_deq @ x| <= |W_deq| @ (d_x/2) + the same float32 slack,
d_x being each element's block scale); the output is poisoned with NaN before each check.

Measured:
- kernel time per call: CUDA events around one launch queued behind a spin kernel (so the host's
  launch cost stays out), median of many; each launch reads another copy of the matrix (copies
  together over 4x the L2), so the weights come from HBM as in a decode step;
- GB/s of weight bytes (18 bytes per 32 weights) at that time, against the H200's ~4.8 TB/s and the
  device-to-device copy measured in the same run;
- Python-side launch cost: host seconds per launch over a loop of launches (the GPU keeps up, so
  this is the host's cost), for CuPy and for numba-cuda's ways to launch;
- 100 launches captured into a CUDA graph (CuPy's stream.begin_capture/end_capture, numba's kernels
  launched on the captured stream), replayed: time per launch inside the graph.

Standalone: not imported by edgeseek; needs a CUDA GPU with CuPy and numba-cuda (the GPU machine of
shared/device/README.md). Writes $OUT/gpu_kernel_choice.json (or --out) and prints a table.

    bash .device/setup && python3 bench/gpu_kernel_choice.py
"""
from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import platform
import sys
import time
import traceback

import numpy as np

SHAPES = [(2048, 2048), (1408, 2048), (102400, 2048)]  # (N, K): y = W @ x, W has N rows of K values
ROWS = 4  # output rows (warps) per thread block: 128 threads, as llama.cpp's mmvq at batch 1
QK = 32  # values per Q4_0 / q8_1 block
COLD_BYTES = 256 << 20  # the copies of a matrix that one timing cycles through: over 4x the L2
GRAPH_LAUNCHES = 100
H200_PEAK_GBPS = 4800.0

CUDA_SRC = r"""
#define FULL 0xffffffffu

__device__ __forceinline__ float half_to_float(unsigned short h) {
    float f;
    asm("cvt.f32.f16 %0, %1;" : "=f"(f) : "h"(h));
    return f;
}

// One warp per output row; lane l takes the blocks l, l + 32, ...: one 16-byte load of the block's
// qs, its fp16 scale, the activation block (32 int8 = two 16-byte loads) and its (d, s) pair.
// MIN_BLOCKS: with __launch_bounds__(128) alone ptxas keeps to 32 registers (full occupancy) and
// issues the second block's weight load only after the first block's dp4a's have waited for theirs;
// (128, 8) lets it take 40 and put all the weight loads in flight first.
extern "C" __global__ void __launch_bounds__(ROWS * 32, MIN_BLOCKS)
q4_0_q8_1_matvec(const int4* __restrict__ wq, const unsigned short* __restrict__ wd,
                 const int4* __restrict__ xq, const float2* __restrict__ xds,
                 float* __restrict__ y, const int nrows)
{
    const int lane = threadIdx.x & 31;
    const int row = blockIdx.x * ROWS + (threadIdx.x >> 5);
    if (row >= nrows) return;
    const int4* wr = wq + (size_t)row * NB;
    const unsigned short* dr = wd + (size_t)row * NB;
    float acc = 0.0f;
#pragma unroll
    for (int it = 0; it < (NB + 31) / 32; ++it) {
        const int b = lane + 32 * it;
        if (b < NB) {
            const int4 w = __ldg(wr + b);
            const float d = half_to_float(__ldg(dr + b));
            const int4 xa = __ldg(xq + 2 * b);      // values 0..15 of the block
            const int4 xb = __ldg(xq + 2 * b + 1);  // values 16..31
            const float2 ds = __ldg(xds + b);
            int s = __dp4a(w.x & 0x0F0F0F0F, xa.x, 0);
            s = __dp4a(w.y & 0x0F0F0F0F, xa.y, s);
            s = __dp4a(w.z & 0x0F0F0F0F, xa.z, s);
            s = __dp4a(w.w & 0x0F0F0F0F, xa.w, s);
            s = __dp4a((w.x >> 4) & 0x0F0F0F0F, xb.x, s);
            s = __dp4a((w.y >> 4) & 0x0F0F0F0F, xb.y, s);
            s = __dp4a((w.z >> 4) & 0x0F0F0F0F, xb.z, s);
            s = __dp4a((w.w >> 4) & 0x0F0F0F0F, xb.w, s);
            acc += d * (ds.x * (float)s - 8.0f * ds.y);
        }
    }
#pragma unroll
    for (int off = 16; off > 0; off >>= 1) acc += __shfl_xor_sync(FULL, acc, off);
    if (lane == 0) y[row] = acc;
}

// One thread per value, one warp per 32-block (k a multiple of 32, blockDim a multiple of 32).
extern "C" __global__ void quantize_q8_1(const float* __restrict__ x, signed char* __restrict__ xq,
                                         float2* __restrict__ xds, const int k)
{
    const int i = blockIdx.x * blockDim.x + threadIdx.x;
    const float v = i < k ? x[i] : 0.0f;
    float amax = fabsf(v);
#pragma unroll
    for (int off = 16; off > 0; off >>= 1) amax = fmaxf(amax, __shfl_xor_sync(FULL, amax, off));
    const float d = amax / 127.0f;
    const int q = amax == 0.0f ? 0 : (int)rintf(v / d);
    int sum = q;
#pragma unroll
    for (int off = 16; off > 0; off >>= 1) sum += __shfl_xor_sync(FULL, sum, off);
    if (i < k) {
        xq[i] = (signed char)q;
        if ((threadIdx.x & 31) == 0) xds[i >> 5] = make_float2(d, d * (float)sum);
    }
}

extern "C" __global__ void empty0() {}
extern "C" __global__ void empty1(float* a) {}
extern "C" __global__ void empty6(const int* a, const unsigned short* b, const int* c, const float* d,
                                  float* e, const int n) {}

// Holds the stream for ns nanoseconds, so that what is queued behind it runs back to back.
extern "C" __global__ void spin(const unsigned long long ns)
{
    unsigned long long t0, t;
    asm volatile("mov.u64 %0, %%globaltimer;" : "=l"(t0));
    do { asm volatile("mov.u64 %0, %%globaltimer;" : "=l"(t)); } while (t - t0 < ns);
}
"""


# ---------------------------------------------------------------------------------------------
# Host side: the Q4_0 matrix, its repacking, the references (numpy only)


def random_q4_0(n: int, k: int, rng: np.random.Generator) -> np.ndarray:
    """(n, k/32, 18) uint8: random Q4_0 blocks in GGUF's layout (fp16 d little-endian, 16 bytes qs)."""
    nb = k // QK
    blocks = np.empty((n, nb, 18), dtype=np.uint8)
    d = rng.uniform(0.002, 0.02, size=(n, nb)).astype(np.float16)
    d *= np.where(rng.random((n, nb)) < 0.5, -1, 1).astype(np.float16)  # Q4_0's d can be negative
    blocks[..., :2] = d.view(np.uint8).reshape(n, nb, 2)
    blocks[..., 2:] = rng.integers(0, 256, size=(n, nb, 16), dtype=np.uint8)
    return blocks


def repack_split(blocks: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """GGUF blocks -> (qs as int32, flat: 4 per block, rows after each other; d as fp16, flat)."""
    qs = np.ascontiguousarray(blocks[..., 2:]).view(np.int32).reshape(-1)
    d = np.ascontiguousarray(blocks[..., :2]).view(np.float16).reshape(-1)
    return qs, d


def dequantize_rows(blocks: np.ndarray) -> np.ndarray:
    """float64 (rows, k) from GGUF Q4_0 blocks: x = d * (q - 8), q[j] low nibble, q[j+16] high."""
    d = np.ascontiguousarray(blocks[..., :2]).view(np.float16)[..., 0].astype(np.float64)
    qs = blocks[..., 2:]
    q = np.concatenate([qs & 0x0F, qs >> 4], axis=-1).astype(np.float64) - 8.0
    return (q * d[..., None]).reshape(blocks.shape[0], -1)


def quantize_q8_1_ref(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """numpy q8_1 of a float32 vector, as the kernels do it (float32 d = amax/127, q = rint(x/d))."""
    xb = x.reshape(-1, QK).astype(np.float32)
    amax = np.abs(xb).max(axis=1)
    d = (amax / np.float32(127)).astype(np.float32)
    with np.errstate(divide="ignore", invalid="ignore"):
        q = np.where(amax[:, None] == 0, 0, np.rint(xb / d[:, None]))
    return q.astype(np.int8).reshape(-1), d


def references(blocks: np.ndarray, x: np.ndarray, x_hat: np.ndarray, d_x: np.ndarray, chunk=8192):
    """float64 W_deq @ x_hat, W_deq @ x, the rounding bound |W_deq| @ (d_x/2) and |W_deq| @ |x_hat|."""
    n = blocks.shape[0]
    half_step = np.repeat(np.abs(d_x).astype(np.float64) / 2, QK)
    out = {key: np.empty(n) for key in ("exact", "true", "bound", "scale")}
    for r0 in range(0, n, chunk):
        w = dequantize_rows(blocks[r0:r0 + chunk])
        aw = np.abs(w)
        out["exact"][r0:r0 + chunk] = w @ x_hat
        out["true"][r0:r0 + chunk] = w @ x.astype(np.float64)
        out["bound"][r0:r0 + chunk] = aw @ half_step
        out["scale"][r0:r0 + chunk] = aw @ np.abs(x_hat)
    return out


FP32_SLACK = 1e-5  # float32 rounding of a kernel's sums, relative to |W_deq| @ |x_hat| of the row


def check(y: np.ndarray, ref: dict) -> dict:
    written = bool(np.all(np.isfinite(y)))
    y64 = y.astype(np.float64)
    slack = FP32_SLACK * ref["scale"]
    err_exact = np.abs(y64 - ref["exact"])
    err_true = np.abs(y64 - ref["true"])
    ok_exact = bool(written and np.all(err_exact <= slack))
    ok_bound = bool(written and np.all(err_true <= ref["bound"] + slack))
    return {
        "ok": ok_exact and ok_bound,
        "all_rows_written": written,
        "within_fp32_of_W_deq_at_x_hat": ok_exact,
        "max_err_over_scale_vs_x_hat": float(np.max(err_exact / ref["scale"])) if written else None,
        "within_int8_rounding_bound_vs_x": ok_bound,
        "max_err_over_bound_vs_x": float(np.max(err_true / (ref["bound"] + slack))) if written else None,
        "rel_l2_err_vs_x": float(np.linalg.norm(y64 - ref["true"]) / np.linalg.norm(ref["true"]))
        if written else None,
    }


# ---------------------------------------------------------------------------------------------
# numba-cuda kernels (imported only here: the module loads without numba-cuda)


def numba_intrinsics():
    """dp4a and a 16-byte load as numba intrinsics emitting inline PTX: numba.cuda has neither."""
    from llvmlite import ir
    from numba import types
    from numba.cuda import cgutils
    from numba.cuda.extending import intrinsic

    @intrinsic
    def dp4a(typingctx, a, b, c):
        sig = types.int32(types.int32, types.int32, types.int32)

        def codegen(context, builder, sig, args):
            i32 = ir.IntType(32)
            asm = ir.InlineAsm(ir.FunctionType(i32, [i32, i32, i32]),
                               "dp4a.s32.s32 $0, $1, $2, $3;", "=r,r,r,r")
            return builder.call(asm, args)

        return sig, codegen

    @intrinsic
    def load_int4(typingctx, arr, idx):
        """arr[idx : idx + 4] of a 1-D int32 array in one ld.global.nc.v4 (idx a multiple of 4)."""
        if not (isinstance(arr, types.Array) and arr.dtype == types.int32 and arr.ndim == 1
                and isinstance(idx, types.Integer)):
            return None
        ret = types.UniTuple(types.int32, 4)
        sig = ret(arr, idx)

        def codegen(context, builder, sig, args):
            aryty, idxty = sig.args
            ary = context.make_array(aryty)(context, builder, value=args[0])
            index = context.cast(builder, args[1], idxty, types.intp)
            ptr = cgutils.get_item_pointer(context, builder, aryty, ary, [index], wraparound=False)
            i32 = ir.IntType(32)
            fnty = ir.FunctionType(ir.LiteralStructType([i32] * 4), [ptr.type])
            asm = ir.InlineAsm(fnty, "ld.global.nc.v4.s32 {$0, $1, $2, $3}, [$4];", "=r,=r,=r,=r,l")
            res = builder.call(asm, [ptr])
            vals = [builder.extract_value(res, i) for i in range(4)]
            return context.make_tuple(builder, ret, vals)

        return sig, codegen

    return dp4a, load_int4


def numba_kernels(nb: int, rows: int, use_intrinsics: bool) -> dict:
    """The matvec (the same algorithm as CUDA_SRC's) and the q8_1 quantizer, as numba.cuda kernels."""
    from numba import cuda, float32, int32
    from numba.cuda import libdevice

    if use_intrinsics:
        dp4a, load4 = numba_intrinsics()
    else:
        @cuda.jit(device=True)
        def dp4a(a, b, c):  # sum of the 4 byte products, a's bytes unsigned (0..15), b's signed
            s = c
            for k in range(4):
                ab = (a >> (8 * k)) & 0xFF
                bb = (b >> (8 * k)) & 0xFF
                s += ab * (bb - ((bb & 0x80) << 1))
            return s

        @cuda.jit(device=True)
        def load4(arr, i):
            return arr[i], arr[i + 1], arr[i + 2], arr[i + 3]

    iters = (nb + 31) // 32
    lo = 0x0F0F0F0F

    @cuda.jit
    def matvec(wq, wd, xq, xds, y, nrows):
        tid = cuda.threadIdx.x
        lane = tid & 31
        row = cuda.blockIdx.x * rows + (tid >> 5)
        if row >= nrows:
            return
        base = row * nb
        acc = float32(0.0)
        for it in range(iters):
            b = lane + 32 * it
            if b < nb:
                w0, w1, w2, w3 = load4(wq, (base + b) * 4)
                d = float32(wd[base + b])
                a0, a1, a2, a3 = load4(xq, 8 * b)
                c0, c1, c2, c3 = load4(xq, 8 * b + 4)
                s = dp4a(w0 & lo, a0, 0)
                s = dp4a(w1 & lo, a1, s)
                s = dp4a(w2 & lo, a2, s)
                s = dp4a(w3 & lo, a3, s)
                s = dp4a((w0 >> 4) & lo, c0, s)
                s = dp4a((w1 >> 4) & lo, c1, s)
                s = dp4a((w2 >> 4) & lo, c2, s)
                s = dp4a((w3 >> 4) & lo, c3, s)
                acc += d * (xds[2 * b] * float32(s) - float32(8.0) * xds[2 * b + 1])
        off = 16
        while off > 0:
            acc += cuda.shfl_xor_sync(0xFFFFFFFF, acc, off)
            off >>= 1
        if lane == 0:
            y[row] = acc

    @cuda.jit
    def quantize(x, xq, xds, k):
        i = cuda.grid(1)
        v = x[i] if i < k else float32(0.0)
        amax = abs(v)
        off = 16
        while off > 0:
            amax = max(amax, cuda.shfl_xor_sync(0xFFFFFFFF, amax, off))
            off >>= 1
        d = amax / float32(127.0)
        q = int32(0)
        if amax != float32(0.0):
            q = int32(libdevice.rintf(v / d))
        total = q
        off = 16
        while off > 0:
            total += cuda.shfl_xor_sync(0xFFFFFFFF, total, off)
            off >>= 1
        if i < k:
            xq[i] = q
            if (cuda.threadIdx.x & 31) == 0:
                xds[2 * (i >> 5)] = d
                xds[2 * (i >> 5) + 1] = d * float32(total)

    return {"matvec": matvec, "quantize": quantize}


# ---------------------------------------------------------------------------------------------
# Timing helpers (CuPy events on one stream)


class Timer:
    def __init__(self, cp, stream, spin):
        self.cp, self.stream, self.spin = cp, stream, spin

    def hold(self, ns: int):
        self.spin((1,), (1,), (np.uint64(ns),))

    def kernel_us(self, launch, reps: int, spin_ns: int = 1_000_000) -> dict:
        """Median device time of one launch: events around it, queued behind a spin kernel."""
        cp, s = self.cp, self.stream
        for i in range(3):
            launch(i)
        s.synchronize()
        pairs = [(cp.cuda.Event(), cp.cuda.Event()) for _ in range(reps)]
        enqueue = []
        for r, (e0, e1) in enumerate(pairs):
            self.hold(spin_ns)
            t0 = time.perf_counter()
            e0.record(s)
            launch(r)
            e1.record(s)
            enqueue.append(time.perf_counter() - t0)
        s.synchronize()
        t = np.array([cp.cuda.get_elapsed_time(e0, e1) * 1e3 for e0, e1 in pairs])
        return {"median_us": float(np.median(t)), "min_us": float(t.min()),
                "p90_us": float(np.percentile(t, 90)), "reps": reps,
                # the spin must outlast the host's enqueueing, or the host's time leaks in
                "max_enqueue_us": float(max(enqueue) * 1e6), "spin_us": spin_ns / 1e3}

    def graph_us(self, launch, n: int = GRAPH_LAUNCHES, reps: int = 30, poison=None, verify=None) -> dict:
        """n launches captured into a CUDA graph; median replay time / n. With poison and verify: the
        output poisoned, one replay, then verify() says whether the replayed launches wrote it right."""
        cp, s = self.cp, self.stream
        s.synchronize()
        s.begin_capture()
        try:
            for i in range(n):
                launch(i)
        finally:
            g = s.end_capture()
        g.upload(s)
        g.launch(s)
        s.synchronize()
        ev = [(cp.cuda.Event(), cp.cuda.Event()) for _ in range(reps)]
        host = []
        for e0, e1 in ev:
            e0.record(s)
            t0 = time.perf_counter()
            g.launch(s)
            host.append(time.perf_counter() - t0)
            e1.record(s)
        s.synchronize()
        t = np.array([cp.cuda.get_elapsed_time(e0, e1) * 1e3 for e0, e1 in ev])
        out = {"per_launch_us": float(np.median(t) / n), "replay_us": float(np.median(t)),
               "launches": n, "reps": reps, "host_graph_launch_us": float(np.median(host) * 1e6)}
        if verify is not None:
            poison()
            g.launch(s)
            s.synchronize()
            out["replay_output_ok"] = verify()
        return out

    def host_us(self, launch, n: int = 2000) -> dict:
        """Host seconds per launch over n launches (the GPU keeps up: kernels shorter than that)."""
        s = self.stream
        for i in range(20):
            launch(i)
        s.synchronize()
        best = []
        total = []
        for _ in range(3):
            t0 = time.perf_counter()
            for i in range(n):
                launch(i)
            t1 = time.perf_counter()
            s.synchronize()
            t2 = time.perf_counter()
            best.append((t1 - t0) / n)
            total.append((t2 - t0) / n)
        return {"host_us_per_launch": float(min(best) * 1e6), "with_sync_us_per_launch": float(min(total) * 1e6),
                "launches": n}


# ---------------------------------------------------------------------------------------------


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default=None, help="JSON path (default: $OUT/gpu_kernel_choice.json, "
                    "else bench/results/gpu_kernel_choice.json)")
    ap.add_argument("--reps", type=int, default=200, help="timed launches per kernel figure")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    out_path = args.out or (os.path.join(os.environ["OUT"], "gpu_kernel_choice.json") if os.environ.get("OUT")
                            else os.path.join(os.path.dirname(os.path.abspath(__file__)), "results",
                                              "gpu_kernel_choice.json"))
    os.environ.setdefault("NUMBA_CUDA_LOW_OCCUPANCY_WARNINGS", "0")
    try:
        import cupy as cp
        import numba
        from numba import cuda
    except ImportError as e:
        print(f"gpu_kernel_choice: needs CuPy and numba-cuda on a CUDA machine ({e})", file=sys.stderr)
        return 2
    if not cuda.is_available():
        print("gpu_kernel_choice: no CUDA device", file=sys.stderr)
        return 2

    from importlib import metadata

    def version(dist):
        try:
            return metadata.version(dist)
        except metadata.PackageNotFoundError:
            return None

    rng = np.random.default_rng(args.seed)
    props = cp.cuda.runtime.getDeviceProperties(0)
    name = props["name"].decode() if isinstance(props["name"], bytes) else str(props["name"])
    report = {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "gpu": {"name": name, "compute_capability": f"{props['major']}.{props['minor']}",
                "multiprocessors": props.get("multiProcessorCount"), "l2_bytes": props.get("l2CacheSize"),
                "memory_bytes": props.get("totalGlobalMem"), "peak_GBps_datasheet": H200_PEAK_GBPS},
        "versions": {"python": platform.python_version(), "numpy": np.__version__, "cupy": cp.__version__,
                     "numba": numba.__version__, "numba_cuda": version("numba-cuda"),
                     "cuda_core": version("cuda-core"), "cuda_bindings": version("cuda-bindings"),
                     "cuda_runtime": cp.cuda.runtime.runtimeGetVersion(),
                     "cuda_driver": cp.cuda.runtime.driverGetVersion(),
                     "nvrtc": ".".join(map(str, cp.cuda.nvrtc.getVersion()))},
        "method": {
            "layout": "split: qs int32x4 per block (16-byte loads, 512 contiguous bytes per warp) + fp16 "
                      "scales (N, K/32); bytes as in GGUF (18 per 32 weights)",
            "kernel": f"one warp per row, {ROWS} rows per 128-thread block, 8 dp4a per 32-block, "
                      "warp-shuffle reduction",
            "activation": "q8_1-like: int8 per 32-block, float32 d = amax/127, s = d*sum(q)",
            "kernel_time": "CUDA events around one launch queued behind a spin kernel; median",
            "cold": f"each timed launch reads another copy of the matrix (copies >= {COLD_BYTES >> 20} MiB)",
            "graph": f"{GRAPH_LAUNCHES} launches captured (CuPy stream capture, relaxed mode), "
                     "median replay time / launches",
            "tolerance": f"|y - W_deq@x_hat| <= {FP32_SLACK} * |W_deq|@|x_hat| per row, and "
                         "|y - W_deq@x| <= |W_deq|@(d_x/2) + that slack",
        },
        "ceilings": {}, "quantize_q8_1": {}, "shapes": {}, "launch_overhead": {}, "findings": {},
        "errors": [],
    }

    def save():
        os.makedirs(os.path.dirname(os.path.abspath(out_path)), exist_ok=True)
        with open(out_path, "w") as f:
            json.dump(report, f, indent=1)

    def attempt(label, fn):
        try:
            return fn()
        except Exception as e:  # one failing variant must not lose the others' figures
            report["errors"].append({"where": label, "error": f"{type(e).__name__}: {e}",
                                     "traceback": traceback.format_exc()[-3000:]})
            print(f"[{label}] FAILED: {type(e).__name__}: {e}", flush=True)
            return None

    stream = cp.cuda.Stream(non_blocking=True)
    nb_stream = cuda.external_stream(stream.ptr)
    k = SHAPES[0][1]
    assert all(kk == k for _, kk in SHAPES), "one K: the kernels are compiled for K/32 blocks"
    nb = k // QK

    with stream:
        t0 = time.perf_counter()
        opts = ("-std=c++17", f"-DNB={nb}", f"-DROWS={ROWS}")
        mod = cp.RawModule(code=CUDA_SRC, options=opts + ("-DMIN_BLOCKS=8",))
        cu_matvec = mod.get_function("q4_0_q8_1_matvec")
        # 16 blocks of 128 threads: full occupancy, 32 registers, as with no minimum (see CUDA_SRC)
        cu_matvec32 = cp.RawModule(code=CUDA_SRC, options=opts + ("-DMIN_BLOCKS=16",)).get_function(
            "q4_0_q8_1_matvec")
        cu_quant = mod.get_function("quantize_q8_1")
        spin = mod.get_function("spin")
        spin((1,), (1,), (np.uint64(1000),))
        stream.synchronize()
        report["compile_s"] = {"cupy_module": time.perf_counter() - t0}
        report["cupy_kernel_attributes"] = {
            name: {a: f.attributes.get(a) for a in ("num_regs", "local_size_bytes", "binary_version")}
            for name, f in (("cupy", cu_matvec), ("cupy_32reg", cu_matvec32))}
        timer = Timer(cp, stream, spin)
        nbk = {}
        for variant, intr in (("numba", True), ("numba_pure", False)):
            kernels = attempt(f"{variant}: build", lambda intr=intr: numba_kernels(nb, ROWS, intr))
            if kernels:
                nbk[variant] = kernels

        def empty_kernels():
            """Launch cost of kernels that do nothing, with 0, 1 and the matvec's 6 arguments."""
            from numba import cuda as ncuda

            @ncuda.jit
            def nb_empty0():
                pass

            @ncuda.jit
            def nb_empty1(a):
                pass

            @ncuda.jit
            def nb_empty6(a, b, c, d, e, n):
                pass

            a = [cp.zeros(1024, dtype=t) for t in (cp.int32, cp.float16, cp.int32, cp.float32, cp.float32)]
            na = [ncuda.as_cuda_array(v, sync=False) for v in a]
            out = {}
            for m, f in (("empty0", mod.get_function("empty0")), ("empty1", mod.get_function("empty1")),
                         ("empty6", mod.get_function("empty6"))):
                cargs = {"empty0": (), "empty1": (a[3],), "empty6": (*a, np.int32(1024))}[m]
                out[f"cupy_{m}"] = timer.host_us(lambda i, f=f, cargs=cargs: f((1,), (32,), cargs))
            for m, f, nargs in (("empty0", nb_empty0, ()), ("empty1", nb_empty1, (na[3],)),
                                ("empty6", nb_empty6, (*na, 1024))):
                c = f[1, 32, nb_stream]
                out[f"numba_{m}"] = timer.host_us(lambda i, c=c, nargs=nargs: c(*nargs))
            return out

        # --- ceiling: device-to-device copy (bytes read + written)
        def copy_ceiling():
            a = cp.empty(1 << 28, dtype=cp.float32)
            a.fill(1.0)
            b = cp.empty_like(a)
            r = timer.kernel_us(lambda i: cp.copyto(b, a), reps=20, spin_ns=200_000)
            return {"bytes": 2 * a.nbytes, "median_us": r["median_us"],
                    "GBps": 2 * a.nbytes / (r["median_us"] * 1e-6) / 1e9}

        report["ceilings"]["d2d_copy"] = attempt("d2d copy", copy_ceiling)
        save()

        # --- the activation: quantized on the GPU by both kernels, compared with numpy
        x = rng.standard_normal(k).astype(np.float32)
        x_d = cp.asarray(x)
        q_ref, d_ref = quantize_q8_1_ref(x)
        xq = {"cupy": cp.zeros(k, dtype=cp.int8), "numba": cp.zeros(k, dtype=cp.int8)}
        xds = {"cupy": cp.zeros(2 * nb, dtype=cp.float32), "numba": cp.zeros(2 * nb, dtype=cp.float32)}
        qblocks = (k + 127) // 128

        def cu_quantize(i=0):
            cu_quant((qblocks,), (128,), (x_d, xq["cupy"], xds["cupy"], np.int32(k)))

        def quant_check(key):
            q, ds = xq[key].get(), xds[key].get().reshape(-1, 2)
            return {"q_equal_numpy": int(np.sum(q == q_ref)), "of": k,
                    "d_equal_numpy": bool(np.array_equal(ds[:, 0], d_ref)),
                    "s_rel_err": float(np.max(np.abs(ds[:, 1] - d_ref * q.reshape(-1, QK).sum(1, dtype=np.int64))
                                              / np.maximum(np.abs(d_ref) * 127 * QK, 1e-30)))}

        def q_cupy():
            cu_quantize()
            stream.synchronize()
            return {"check": quant_check("cupy"), "time": timer.kernel_us(cu_quantize, reps=50)}

        report["quantize_q8_1"]["cupy"] = attempt("cupy quantize", q_cupy)
        if "numba" in nbk:
            nb_x, nb_xq, nb_xds = (cuda.as_cuda_array(a, sync=False) for a in (x_d, xq["numba"], xds["numba"]))
            qcfg = nbk["numba"]["quantize"][qblocks, 128, nb_stream]

            def nb_quantize(i=0):
                qcfg(nb_x, nb_xq, nb_xds, k)

            def q_numba():
                nb_quantize()
                stream.synchronize()
                return {"check": quant_check("numba"), "time": timer.kernel_us(nb_quantize, reps=50)}

            report["quantize_q8_1"]["numba"] = attempt("numba quantize", q_numba)
        cu_quantize()
        stream.synchronize()
        # every matvec reads the CuPy-quantized activation; x_hat is what they multiply
        xq_h, ds_h = xq["cupy"].get(), xds["cupy"].get().reshape(-1, 2)
        x_hat = (xq_h.reshape(-1, QK).astype(np.float64) * ds_h[:, :1].astype(np.float64)).reshape(-1)
        xq32 = xq["cupy"].view(cp.int32)
        xds_c = xds["cupy"]
        nb_xq32c = cuda.as_cuda_array(xq32, sync=False) if nbk else None
        nb_xdsc = cuda.as_cuda_array(xds_c, sync=False) if nbk else None
        save()

        # --- the matvec on each shape
        for n, kk in SHAPES:
            key = f"{n}x{kk}"
            print(f"--- {key}", flush=True)
            t0 = time.perf_counter()
            blocks = random_q4_0(n, kk, rng)
            qs, d = repack_split(blocks)
            ref = references(blocks, x, x_hat, ds_h[:, 0])
            wbytes = blocks.nbytes
            copies = max(2, min(200, math.ceil(COLD_BYTES / wbytes)))
            wq_c = [cp.asarray(qs)]
            wd_c = [cp.asarray(d)]
            for _ in range(copies - 1):
                wq_c.append(wq_c[0].copy())
                wd_c.append(wd_c[0].copy())
            y = cp.empty(n, dtype=cp.float32)
            res = {"weight_bytes": wbytes, "copies": copies, "setup_s": time.perf_counter() - t0, "variants": {}}
            report["shapes"][key] = res
            grid = (n + ROWS - 1) // ROWS

            def cu_launch(i, grid=grid, n=n, wq_c=wq_c, wd_c=wd_c, y=y, copies=copies, f=cu_matvec):
                j = i % copies
                f((grid,), (ROWS * 32,), (wq_c[j], wd_c[j], xq32, xds_c, y, np.int32(n)))

            launches = {"cupy": cu_launch,
                        "cupy_32reg": lambda i, cu_launch=cu_launch: cu_launch(i, f=cu_matvec32)}
            for variant, kernels in nbk.items():
                nb_wq = [cuda.as_cuda_array(a, sync=False) for a in wq_c]
                nb_wd = [cuda.as_cuda_array(a, sync=False) for a in wd_c]
                nb_y = cuda.as_cuda_array(y, sync=False)
                cfg = kernels["matvec"][grid, ROWS * 32, nb_stream]

                def nb_launch(i, cfg=cfg, nb_wq=nb_wq, nb_wd=nb_wd, nb_y=nb_y, n=n, copies=copies):
                    j = i % copies
                    cfg(nb_wq[j], nb_wd[j], nb_xq32c, nb_xdsc, nb_y, n)

                launches[variant] = nb_launch

            for variant, launch in launches.items():
                def run_variant(launch=launch):
                    r = {}
                    for j in (0, copies - 1):  # the first and the last copy: all written, all right
                        y.fill(np.nan)
                        t0 = time.perf_counter()
                        launch(j)
                        stream.synchronize()
                        if j == 0:  # numba compiles at its first launch
                            r["first_launch_s"] = time.perf_counter() - t0
                        r[f"check_copy{j}"] = check(y.get(), ref)
                    r["ok"] = all(v["ok"] for name, v in r.items() if name.startswith("check"))
                    r["kernel"] = timer.kernel_us(launch, reps=args.reps)
                    r["GBps"] = wbytes / (r["kernel"]["median_us"] * 1e-6) / 1e9
                    r["graph"] = timer.graph_us(launch, poison=lambda: y.fill(np.nan),
                                                verify=lambda: check(y.get(), ref)["ok"])
                    r["graph_GBps"] = wbytes / (r["graph"]["per_launch_us"] * 1e-6) / 1e9
                    return r

                res["variants"][variant] = attempt(f"{key} {variant}", run_variant)
                save()

            # cuBLAS float32 GEMV on the dequantized matrix, for scale (its own copies: 4 bytes/weight)
            def run_cublas():
                w32 = dequantize_rows(blocks[: min(n, 8192)]).astype(np.float32)
                wf = cp.asarray(np.resize(w32, (n, kk)))  # repeated rows for the head: same bytes moved
                f_bytes = wf.nbytes
                fc = max(2, min(64, math.ceil(COLD_BYTES / f_bytes)))
                wfs = [wf] + [wf.copy() for _ in range(fc - 1)]
                xf = cp.asarray(x)
                yf = cp.empty(n, dtype=cp.float32)

                def mv(i):
                    cp.dot(wfs[i % fc], xf, out=yf)

                mv(0)
                stream.synchronize()
                ok = bool(np.allclose(yf.get()[:8192], (w32.astype(np.float64) @ x)[: min(n, 8192)],
                                      rtol=1e-4, atol=1e-4))
                r = {"ok": ok, "weight_bytes": f_bytes, "copies": fc, "kernel": timer.kernel_us(mv, reps=100)}
                r["GBps"] = f_bytes / (r["kernel"]["median_us"] * 1e-6) / 1e9
                try:
                    r["graph"] = timer.graph_us(mv)
                    r["graph_GBps"] = f_bytes / (r["graph"]["per_launch_us"] * 1e-6) / 1e9
                except NotImplementedError as e:  # CuPy: cuBLAS's setStream refuses a capturing stream
                    report["findings"]["cublas_in_stream_capture"] = f"{type(e).__name__}: {e}"
                r["host"] = timer.host_us(mv, n=500)
                del wfs, wf
                return r

            res["variants"]["cublas_f32"] = attempt(f"{key} cublas", run_cublas)
            save()

            # --- Python-side launch cost, on the expert's shape (its kernel is shorter than a launch)
            if (n, kk) == (1408, 2048):
                lo = report["launch_overhead"]
                lo["shape"] = key
                lo["cupy_rawkernel"] = attempt("host cupy", lambda: timer.host_us(cu_launch))
                if "numba" in nbk:
                    kern = nbk["numba"]["matvec"]
                    nb_wq = [cuda.as_cuda_array(a, sync=False) for a in wq_c]
                    nb_wd = [cuda.as_cuda_array(a, sync=False) for a in wd_c]
                    nb_y = cuda.as_cuda_array(y, sync=False)

                    def args_of(i):
                        j = i % copies
                        return (nb_wq[j], nb_wd[j], nb_xq32c, nb_xdsc, nb_y, n)

                    lo["numba_dispatch"] = attempt(
                        "host numba dispatch",
                        lambda: timer.host_us(lambda i: kern[grid, ROWS * 32, nb_stream](*args_of(i))))
                    cfg = kern[grid, ROWS * 32, nb_stream]
                    lo["numba_configured"] = attempt(
                        "host numba configured", lambda: timer.host_us(lambda i: cfg(*args_of(i))))

                    def low_level():
                        from cuda.core import LaunchConfig
                        from cuda.core import launch as core_launch
                        from numba.cuda.cudadrv import driver as nbdriver

                        kobj = next(iter(kern.overloads.values()))
                        core_stream = nbdriver._to_core_stream(nb_stream)
                        out = {"numba_kernel_launch": timer.host_us(
                            lambda i: kobj.launch(args_of(i), (grid, 1, 1), (ROWS * 32, 1, 1), core_stream, 0))}
                        # the arguments marshalled once per copy, then cuda.core's launch alone
                        packed = []
                        for j in range(copies):
                            kargs, retr = [], []
                            for t, v in zip(kobj.argument_types, args_of(j)):
                                kobj._prepare_args(t, v, core_stream, retr, kargs)
                            packed.append(kargs)
                        lcfg = LaunchConfig(grid=(grid, 1, 1), block=(ROWS * 32, 1, 1), shmem_size=0)
                        fn = kobj._codelibrary.get_cufunc().kernel
                        out["numba_prepacked_cuda_core_launch"] = timer.host_us(
                            lambda i: core_launch(core_stream, lcfg, fn, *packed[i % copies]))
                        y.fill(np.nan)
                        core_launch(core_stream, lcfg, fn, *packed[0])
                        stream.synchronize()
                        out["prepacked_check_ok"] = check(y.get(), ref)["ok"]
                        return out

                    r = attempt("host numba low level", low_level)
                    if r:
                        lo.update(r)
                    # what passing CuPy arrays straight to a numba kernel costs (typed from
                    # __cuda_array_interface__ on every call, and synchronized on its stream)
                    lo["numba_dispatch_cupy_arrays"] = attempt(
                        "host numba cupy arrays",
                        lambda: timer.host_us(lambda i: cfg(wq_c[i % copies], wd_c[i % copies], xq32, xds_c, y, n),
                                              n=500))
                    lo["empty_kernels"] = attempt("host empty kernels", empty_kernels)
                save()
            launches.clear()
            cp.get_default_memory_pool().free_all_blocks()

    save()
    print_table(report)
    print(f"wrote {out_path}")
    return 0 if not report["errors"] else 1


def print_table(report):
    peak = report["gpu"]["peak_GBps_datasheet"]
    cop = (report["ceilings"].get("d2d_copy") or {}).get("GBps")
    print(f"\n{report['gpu']['name']}  (d2d copy {cop and round(cop)} GB/s; datasheet {peak:.0f})")
    print("| shape | variant | ok | kernel us | GB/s | % of 4.8 TB/s | in-graph us/launch | in-graph GB/s |")
    print("|---|---|---|---|---|---|---|---|")
    for key, res in report["shapes"].items():
        for variant, r in res["variants"].items():
            if not r:
                print(f"| {key} | {variant} | FAILED | | | | | |")
                continue
            g = r.get("graph") or {}
            print(f"| {key} | {variant} | {r.get('ok')} | {r['kernel']['median_us']:.2f} | {r['GBps']:.0f} | "
                  f"{100 * r['GBps'] / peak:.0f}% | {g.get('per_launch_us', float('nan')):.2f} | "
                  f"{r.get('graph_GBps', float('nan')):.0f} |")
    print("\nlaunch overhead (host us per launch):")
    items = list(report["launch_overhead"].items())
    items += list((report["launch_overhead"].get("empty_kernels") or {}).items())
    for k, v in items:
        if isinstance(v, dict) and "host_us_per_launch" in v:
            print(f"  {k}: {v['host_us_per_launch']:.2f} (with sync {v['with_sync_us_per_launch']:.2f})")
    for k, v in report["findings"].items():
        print(f"finding {k}: {v}")
    for k, v in report["quantize_q8_1"].items():
        if v:
            print(f"quantize {k}: {v['time']['median_us']:.2f} us, check {v['check']}")
    for e in report["errors"]:
        print("ERROR", e["where"], e["error"])


if __name__ == "__main__":
    sys.exit(main())

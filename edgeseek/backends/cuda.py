"""The CUDA backend: weights in VRAM in their file quantization, the GGUF blocks as they are, read
by our own kernels (cuda_kernels.cu, compiled by NVRTC through CuPy); activations and caches are CuPy
arrays. Decode products run on the blocks (one warp per output row, all of a layer's selected experts
in one launch through a device array of ids, as llama.cpp's MMVQ does); prompts dequantize tiles to
float16 and multiply with cuBLAS. Routed experts that the VRAM budget leaves out stay with the CPU's
expert store and run there on the CPU kernels: the token's activation crosses PCIe, not the weights,
while the GPU computes the layer's other experts (ktransformers' and Fiddler's split).

Importing this module imports CuPy: edgeseek imports it only when a model is loaded on the GPU.
`probe()` (no CuPy import when the extra is absent) says whether that can work here.
"""
from __future__ import annotations

import ctypes
import importlib.util
from pathlib import Path

import numpy as np
from gguf import GGMLQuantizationType as Q
from numba import njit, prange

from edgeseek.errors import EdgeseekError, UnsupportedError
from edgeseek.models.common import ffn, plus
from edgeseek.models import moe as moe_math
from edgeseek.models.moe import route
from edgeseek.placement import PREFILL_TILE

from .normed import Normed, rows

SUFFIX = {Q.F32: "f32", Q.F16: "f16", Q.BF16: "bf16", Q.Q4_0: "q4_0", Q.Q4_1: "q4_1", Q.Q5_0: "q5_0",
          Q.Q5_1: "q5_1", Q.Q8_0: "q8_0", Q.Q4_K: "q4_k", Q.Q5_K: "q5_k", Q.Q6_K: "q6_k"}
# formats whose one-token products also run on int8 activations (cuda_kernels.cu <kernel>_<t>_q8)
INT8_TYPES = frozenset({Q.Q4_0, Q.Q4_1, Q.Q5_0, Q.Q5_1, Q.Q8_0, Q.Q4_K, Q.Q5_K, Q.Q6_K})
# (routed, shared) down formats of a K-quant mix that one int8 down launch takes (down_ids_<t>_<t2>_q8):
# routed rows not a multiple of 256 fall back to Q5_0, Q5_1 or Q8_0 (llama.cpp's llama-quant.cpp), and
# a layer's two downs may take different K-quants
MIXED_DOWN = frozenset((a, b) for a in (Q.Q5_0, Q.Q5_1, Q.Q8_0, Q.Q4_K, Q.Q5_K, Q.Q6_K)
                       for b in (Q.Q4_K, Q.Q5_K, Q.Q6_K) if a != b)
MMV_MAX_TOKENS = 8  # rows a decode product takes at once; more tokens go through the grouped products
WARPS = 4  # output rows per block of the per-warp decode products (128 threads)
ROW_THREADS = 128  # threads a block of mmv1, mmv_ids, glu and down (cuda_kernels.cu)
MMV1_ROWS, GLU_ROWS = 4, 2  # rows a block of mmv1 and down, of glu
DOWN_THREADS = 256  # threads a block of the int8 down products (cuda_kernels.cu)
GLU_THREADS = 64  # threads a block of the int8 gate-up products (cuda_kernels.cu)
MLA_SPLITS = 16  # blocks per head of the decode attention (cuda_decode.cu)
STAGE_MAX = 16384  # values a product's blocks quantize (and normalize) for themselves (cuda_kernels.cu)
NORM_ROUTE_MAX = 8192  # D of the router launch that makes the layer's norm (cuda_decode.cu)
MAX_HEADS = 4096  # query heads the decode attention kernels count splits for
EXPERT_TILE = 2 * PREFILL_TILE  # float16 values of one projection's experts a prompt dequantizes at once
GM_BM, GM_BN, GM_BK = 64, 64, 64  # a prompt's grouped expert products (cuda_prompt.cu): pairs, rows, values a tile
PLAN_EXPERTS = 256  # experts a layer moe_plan sorts pairs for (cuda_prompt.cu)
# A prompt of this many tokens runs the pairs of experts left on the CPU on the GPU all the same, their
# blocks copied over PCIe for the step (llama.cpp copies a CPU-held expert's weights from a batch of 32)
STREAM_MIN_TOKENS = 32
STREAM_BYTES = 96 << 20  # VRAM those copies take at a time (placement.WORKSPACE holds it)
# those copies go through two page-locked host buffers of STREAM_BYTES, filled by the CPU's threads
# while the GPU copies and multiplies the other: a copy from pageable memory (the file's mapping)
# runs at what the driver's one staging thread reaches (10 GB/s against 54 on the H100 machine)


CUDA_R_16F, CUDA_R_32F, CUBLAS_COMPUTE_32F, CUBLAS_GEMM_DEFAULT = 2, 0, 68, -1


class DeviceError(EdgeseekError):
    pass


def _cublas():
    try:
        from cupy_backends.cuda.libs import cublas
    except ImportError:  # older layouts
        from cupy.cuda import cublas
    return cublas


def probe() -> str | None:
    """None when the CUDA backend can run here, else why not (one line, the fix where there is one)."""
    if importlib.util.find_spec("cupy") is None:
        return "the cuda extra is not installed (pip install 'edgeseek[cuda]'; 'edgeseek[cuda12]' for CUDA 12 drivers)"
    try:
        import cupy
    except Exception as e:  # a broken install: say what CuPy said
        return f"CuPy does not import: {str(e).splitlines()[0]}"
    try:
        n = cupy.cuda.runtime.getDeviceCount()
    except cupy.cuda.runtime.CUDARuntimeError as e:
        if "InsufficientDriver" in str(e):
            try:
                ctypes.CDLL("libcuda.so.1")
            except OSError:
                return "no NVIDIA driver found (libcuda.so.1 is not installed): no usable GPU"
            need, have = cupy.cuda.runtime.runtimeGetVersion(), cupy.cuda.runtime.driverGetVersion()
            return (f"the NVIDIA driver is too old: it supports CUDA {_version(have)}, this CuPy needs CUDA "
                    f"{_version(need)}; update the driver, or install edgeseek[cuda12] for a CUDA 12 driver")
        if "NoDevice" in str(e) or "not found" in str(e).lower():
            return "no NVIDIA GPU found"
        return f"CUDA is not usable: {e}"
    return None if n > 0 else "no NVIDIA GPU found"


def _version(v: int) -> str:
    return f"{v // 1000}.{v % 1000 // 10}"


def _pairs_by_expert(slot: np.ndarray, on_gpu: np.ndarray):
    """The (token, choice) pairs whose expert is in VRAM, grouped by its slot, in token order within
    a slot: tok, which (P,) each; and the slots present, the first pair and the pair count of each."""
    tok, which = np.nonzero(on_gpu)
    order = np.argsort(slot[tok, which], kind="stable")
    tok, which = tok[order], which[order]
    experts, start, count = np.unique(slot[tok, which], return_index=True, return_counts=True)
    return tok, which, experts, start, count


def _grouped_shape(m) -> bool:
    """A matrix (N, K) the grouped kernels take: quantized or 16-bit blocks (float32 keeps exact
    float32 products), K a multiple of GM_BK, N even."""
    n, k = m.shape
    return m.qtype != Q.F32 and k % GM_BK == 0 and n % 2 == 0


def _grouped_fits(gate, up, down) -> bool:
    """Whether a prompt's experts can run through the grouped kernels: gate and up of one format
    and shape, down their transpose's shape, each a shape the kernels take."""
    (F, D), (D2, F2) = gate.shape, down.shape
    return (gate.qtype == up.qtype and up.shape == gate.shape and (D2, F2) == (D, F)
            and _grouped_shape(gate) and _grouped_shape(down))


def _expert_tiles(experts: np.ndarray, start: np.ndarray, count: np.ndarray) -> np.ndarray:
    """(n_tiles, 3) (expert, first pair, pairs): each expert's run of pairs (sorted by expert) cut
    into tiles of at most GM_BM pairs, in expert order."""
    per = -(-count // GM_BM)  # tiles an expert
    first = np.repeat(start, per) + GM_BM * (np.arange(per.sum()) - np.repeat(np.cumsum(per) - per, per))
    return np.stack([np.repeat(experts, per), first, np.minimum(GM_BM, np.repeat(start + count, per) - first)], 1)


def _launch_grid(n: int, per: int) -> int:
    return (n + per - 1) // per


def _fuses(shared, gate, up, down, int8: bool) -> bool:
    """The shared experts (gate, up, down) can join the routed experts' launches: device matrices
    of the routed experts' formats and widths; on int8 activations a shared down of a MIXED_DOWN
    pair's other format too."""
    if shared is None or not all(isinstance(m, DeviceMatrix) for m in shared):
        return False
    g2, u2, d2 = shared
    return (g2.qtype == u2.qtype == gate.qtype == up.qtype
            and (d2.qtype == down.qtype or int8 and (down.qtype, d2.qtype) in MIXED_DOWN)
            and g2.shape == u2.shape and g2.shape[1] == gate.shape[1] and d2.shape == (down.shape[0], g2.shape[0]))


def route_fuses(router, weight) -> bool:
    """Whether one token's router product and choice go in one launch (router_route: route_topk's
    one-warp choice, float32 router weights)."""
    return (router.n_expert <= 256 and router.n_group <= 1 and router.n_used <= 32
            and weight.dtype == np.float32 and weight.shape == (router.n_expert, weight.shape[1]))


def ids_threads(k: int) -> int:
    """Threads a row of mmv_ids: a power of two <= 32 giving each about 4 pieces of 16 values."""
    t = 1
    while t < 32 and 2 * t * 4 * 16 <= k:
        t *= 2
    return t


class Kernels:
    """cuda_kernels.cu compiled once (CuPy keeps the binary in its disk cache) and typed launchers.
    The emulation in tests/ implements the same methods with numpy."""

    def __init__(self):
        import cupy
        self.cp = cupy
        here = Path(__file__).parent
        src = "\n".join((here / f).read_text() for f in ("cuda_kernels.cu", "cuda_decode.cu", "cuda_prompt.cu"))
        self.module = cupy.RawModule(code=src, options=("-std=c++17",))
        self._fns: dict[str, object] = {}
        # the split attention kernels' per-head counts of finished splits (each launch leaves them 0)
        self.counters = cupy.zeros(MAX_HEADS, np.uint32)

    def _fn(self, name: str):
        f = self._fns.get(name)
        if f is None:
            f = self._fns[name] = self.module.get_function(name)
        return f

    def mmv(self, qtype, w, row_bytes: int, x, y, n: int, k: int, t: int, add=None, res=None) -> None:
        """y (T, N) = res + (add + x @ W.T); add, res (T, N) or None."""
        null = np.uint64(0)
        add, res = null if add is None else add, null if res is None else res
        if t == 1:  # a block for a few rows: their loads all in flight at once
            self._fn(f"mmv1_{SUFFIX[qtype]}")((_launch_grid(n, MMV1_ROWS),), (ROW_THREADS,),
                                               (w, np.int64(row_bytes), x, y, np.int32(n), np.int32(k), add, res))
            return
        self._fn(f"mmv_{SUFFIX[qtype]}")((_launch_grid(n, WARPS),), (32 * WARPS,),
                                          (w, np.int64(row_bytes), x, y, np.int32(n), np.int32(k), np.int32(t),
                                           add, res))

    def mmv_ids(self, qtype, w, row_bytes: int, expert_bytes: int, ids, x, x_div: int, y, n: int, k: int,
                p: int, x_stride: int | None = None) -> None:
        """x_stride: floats from one activation row to the next (default k: packed rows)."""
        tpr = ids_threads(k)
        self._fn(f"mmv_ids_{SUFFIX[qtype]}")(
            (_launch_grid(n, ROW_THREADS // tpr), p), (ROW_THREADS,),
            (w, np.int64(row_bytes), np.int64(expert_bytes), ids, x, np.int32(x_div),
             np.int64(k if x_stride is None else x_stride), y, np.int32(n), np.int32(k), np.int32(p), np.int32(tpr)))

    def glu_ids(self, qtype, wg, wu, row_bytes: int, expert_bytes: int, ids, x, x_div: int, h, n: int, k: int,
                p: int, shared=None) -> None:
        """h (P, N) = silu(wg[ids[p]] @ x[p // x_div]) * (wu[ids[p]] @ x[p // x_div]), one launch;
        shared = (wg2, wu2, row_bytes2, n2, h2): also h2 (T, N2) = silu(wg2 @ x[t]) * (wu2 @ x[t]) for
        the T rows of x, in the same launch."""
        null = np.uint64(0)
        wg2, wu2, rb2, n2, h2 = shared if shared is not None else (null, null, 0, 0, null)
        t2 = 0 if shared is None else len(x)
        self._fn(f"mmv_glu_ids_{SUFFIX[qtype]}")(
            (_launch_grid(max(n, n2), GLU_ROWS), p + t2), (ROW_THREADS,),
            (wg, wu, np.int64(row_bytes), np.int64(expert_bytes), ids, x, np.int32(x_div), h, np.int32(n),
             np.int32(k), np.int32(p), wg2, wu2, np.int64(rb2), np.int32(n2), h2))

    def down_ids(self, qtype, w, row_bytes: int, expert_bytes: int, ids, h, weights, add, y, n: int, k: int,
                 t: int, used: int, shared=None, res=None) -> None:
        """y (T, N) = res + ((add + sum over each token's `used` pairs of weights[p] * w[ids[p]] @ h[p])
        + w2 @ h2[t]) with shared = (w2, row_bytes2, k2, h2 (T, k2)); add, res, shared None: none."""
        null = np.uint64(0)
        w2, rb2, k2, h2 = shared if shared is not None else (null, 0, 0, null)
        self._fn(f"mmv_down_ids_{SUFFIX[qtype]}")(
            (_launch_grid(n, MMV1_ROWS), t), (ROW_THREADS,),
            (w, np.int64(row_bytes), np.int64(expert_bytes), ids, h, weights,
             add if add is not None else null, y, np.int32(n), np.int32(k), np.int32(used), w2, np.int64(rb2),
             np.int32(k2), h2, res if res is not None else null))

    # --- INT8_TYPES on int8 activations: q8 = (xq int8 (n,), xs float32 (n // 32, 2)) --------------
    def quantize_q8(self, x):
        """x float32, contiguous, a multiple of 32 values -> its q8_1 (xq, xs)."""
        n = x.size
        xq, xs = self.cp.empty(n, np.int8), self.cp.empty((n // 32, 2), np.float32)
        self._fn("quantize_q8_1")((_launch_grid(n, 128),), (128,), (x, xq, xs, np.int64(n)))
        return xq, xs

    def mmv1_q8(self, qtype, w, row_bytes: int, q8, y, n: int, k: int, add=None, res=None) -> None:
        """y (N,) = res + (add + W @ x) for one token of x as q8."""
        null = np.uint64(0)
        self._fn(f"mmv1_{SUFFIX[qtype]}_q8")((_launch_grid(n, MMV1_ROWS),), (ROW_THREADS,),
                                            (w, np.int64(row_bytes), *q8, y, np.int32(n), np.int32(k),
                                             null if add is None else add, null if res is None else res))

    def mmv1_sq8(self, qtype, w, row_bytes: int, x, norm, y, n: int, k: int, add=None, res=None) -> None:
        """y (N,) = res + (add + W @ x) for one token of x (K,) float32, quantized by the launch's own
        blocks after rms_norm by norm = (weight, eps) where given (K <= STAGE_MAX)."""
        null = np.uint64(0)
        nw, eps = norm if norm is not None else (null, 0.0)
        self._fn(f"mmv1_{SUFFIX[qtype]}_sq8")((_launch_grid(n, MMV1_ROWS),), (ROW_THREADS,),
                                             (w, np.int64(row_bytes), x, nw, np.float32(eps), y, np.int32(n),
                                              np.int32(k), null if add is None else add, null if res is None else res),
                                             shared_mem=k + k // 4)

    def mmv3_sq8(self, qtype, mats, x, norm, ys, k: int) -> None:
        """mmv3_q8 on one token of x (K,) float32 quantized by the launch's own blocks, after rms_norm
        by norm = (weight, eps) where given."""
        null = np.uint64(0)
        nw, eps = norm if norm is not None else (null, 0.0)
        args = [a for (w, rb, n), y in zip(mats, ys) for a in (w, np.int64(rb), y, np.int32(n))]
        args += [null, np.int64(0), null, np.int32(0)] * (3 - len(mats))
        blocks = sum(_launch_grid(n, MMV1_ROWS) for _, _, n in mats)
        self._fn(f"mmv3_{SUFFIX[qtype]}_sq8")((blocks,), (ROW_THREADS,), (*args, x, nw, np.float32(eps), np.int32(k)),
                                             shared_mem=k + k // 4)

    def mmv3_q8(self, qtype, mats, q8, ys, k: int) -> None:
        """ys[i] (N_i,) = mats[i] @ x for two or three (W, row_bytes, N) of one format on x as q8."""
        null = np.uint64(0)
        args = [a for (w, rb, n), y in zip(mats, ys) for a in (w, np.int64(rb), y, np.int32(n))]
        args += [null, np.int64(0), null, np.int32(0)] * (3 - len(mats))
        blocks = sum(_launch_grid(n, MMV1_ROWS) for _, _, n in mats)
        self._fn(f"mmv3_{SUFFIX[qtype]}_q8")((blocks,), (ROW_THREADS,), (*args, *q8, np.int32(k)))

    def glu_q8(self, qtype, wg, wu, row_bytes: int, expert_bytes: int, ids, q8, x_div: int, h, n: int, k: int,
               p: int, t: int, shared=None) -> None:
        """glu_ids on the T rows of x as q8 (shared as glu_ids')."""
        null = np.uint64(0)
        wg2, wu2, rb2, n2, h2 = shared if shared is not None else (null, null, 0, 0, null)
        t2 = 0 if shared is None else t
        self._fn(f"glu_ids_{SUFFIX[qtype]}_q8")(
            (_launch_grid(max(n, n2), GLU_ROWS), p + t2), (GLU_THREADS,),
            (wg, wu, np.int64(row_bytes), np.int64(expert_bytes), ids, *q8, np.int32(x_div), h, np.int32(n),
             np.int32(k), np.int32(p), wg2, wu2, np.int64(rb2), np.int32(n2), h2))

    def down_q8(self, qtype, w, row_bytes: int, expert_bytes: int, ids, hq8, weights, add, y, n: int, k: int,
                t: int, used: int, shared=None, res=None) -> None:
        """down_ids on h as q8; shared = (qtype2, w2, row_bytes2, k2, h2 as q8): qtype2 qtype or, with
        qtype, a MIXED_DOWN pair."""
        null = np.uint64(0)
        qtype2, w2, rb2, k2, hq2 = shared if shared is not None else (qtype, null, 0, 0, (null, null))
        name = SUFFIX[qtype] if qtype2 == qtype else f"{SUFFIX[qtype]}_{SUFFIX[qtype2]}"
        self._fn(f"down_ids_{name}_q8")(
            (_launch_grid(n, MMV1_ROWS), t), (DOWN_THREADS,),
            (w, np.int64(row_bytes), np.int64(expert_bytes), ids, *hq8, weights, null if add is None else add, y,
             np.int32(n), np.int32(k), np.int32(used), w2, np.int64(rb2), np.int32(k2), *hq2,
             null if res is None else res))

    def dequant(self, qtype, w, row_bytes: int, rows, n_rows: int, k: int, out) -> None:
        """out (n_rows, k) float32 or float16 <- rows `rows` (int32 on the device, or None: 0..n_rows-1)."""
        kind = "f16" if out.dtype == np.float16 else "f32"
        units = n_rows * (k // 32)  # one thread per 32 values
        self._fn(f"dequant_{SUFFIX[qtype]}_{kind}")(
            (_launch_grid(units, 256),), (256,),
            (w, np.int64(row_bytes), rows if rows is not None else np.uint64(0), np.int32(n_rows), np.int32(k), out))

    def gemm_f16(self, x16, w16, y) -> None:
        """y (T, N) float32 = x16 (T, K) @ w16 (N, K).T, float16 operands, float32 accumulation and
        output (cuBLAS GemmEx); with a leading batch axis on all three, one strided-batched call."""
        cublas = _cublas()
        batched = x16.ndim == 3
        b = x16.shape[0] if batched else 1
        t, k = x16.shape[-2:]
        n = w16.shape[-2]
        handle = self.cp.cuda.device.get_cublas_handle()
        cublas.setStream(handle, self.cp.cuda.get_current_stream().ptr)
        cublas.setPointerMode(handle, cublas.CUBLAS_POINTER_MODE_HOST)
        one, zero = np.array(1.0, np.float32), np.array(0.0, np.float32)
        # row-major Y = X W^T is column-major Y^T = W X^T: A = W (op T), B = X (op N)
        if not batched:
            cublas.gemmEx(handle, cublas.CUBLAS_OP_T, cublas.CUBLAS_OP_N, n, t, k,
                          one.ctypes.data, w16.data.ptr, CUDA_R_16F, k, x16.data.ptr, CUDA_R_16F, k,
                          zero.ctypes.data, y.data.ptr, CUDA_R_32F, n, CUBLAS_COMPUTE_32F, CUBLAS_GEMM_DEFAULT)
            return
        cublas.gemmStridedBatchedEx(handle, cublas.CUBLAS_OP_T, cublas.CUBLAS_OP_N, n, t, k,
                                    one.ctypes.data, w16.data.ptr, CUDA_R_16F, k, n * k,
                                    x16.data.ptr, CUDA_R_16F, k, t * k,
                                    zero.ctypes.data, y.data.ptr, CUDA_R_32F, n, t * n, b,
                                    CUBLAS_COMPUTE_32F, CUBLAS_GEMM_DEFAULT)

    def gemm_f16_kn(self, x16, w16, y) -> None:
        """y (M, N) float32 = x16 (M, K) @ w16 (K, N), float16 operands, float32 accumulation (cuBLAS
        GemmEx; w16's rows contiguous: a cache's latents)."""
        cublas = _cublas()
        m, k = x16.shape
        n = w16.shape[1]
        handle = self.cp.cuda.device.get_cublas_handle()
        cublas.setStream(handle, self.cp.cuda.get_current_stream().ptr)
        cublas.setPointerMode(handle, cublas.CUBLAS_POINTER_MODE_HOST)
        one, zero = np.array(1.0, np.float32), np.array(0.0, np.float32)
        # row-major Y = X W is column-major Y^T = W^T X^T: A = W as stored (op N, ld N), B = X (op N, ld K)
        cublas.gemmEx(handle, cublas.CUBLAS_OP_N, cublas.CUBLAS_OP_N, n, m, k,
                      one.ctypes.data, w16.data.ptr, CUDA_R_16F, w16.strides[0] // 2, x16.data.ptr, CUDA_R_16F, k,
                      zero.ctypes.data, y.data.ptr, CUDA_R_32F, n, CUBLAS_COMPUTE_32F, CUBLAS_GEMM_DEFAULT)

    def scatter_add(self, out, rows, values) -> None:
        """out[rows[i]] += values[i] (rows may repeat)."""
        self.cp.add.at(out, rows, values)  # cupyx.scatter_add is deprecated for it

    def route(self, logits, bias, router, ids, w) -> None:
        """models/moe.route on the device: logits (T, E) -> ids (T, k) int32, w (T, k) float32."""
        t, e = logits.shape
        self._fn("route_topk")((t,), (256,), (
            logits, bias if bias is not None else np.uint64(0), np.int32(e), np.int32(router.n_used),
            np.int32(router.gating), np.int32(router.n_group), np.int32(router.n_group_used),
            np.int32(bool(router.norm_weights)), np.float32(router.scale), ids, w))

    def router_route(self, w, x, logits, bias, router, ids, wts) -> None:
        """One token's router logits (E,) = w (E, D) float32 @ x (1, D) and models/moe.route's choice
        (ids, wts (1, k)) in one launch; for routers route_fuses takes."""
        e, d = w.shape
        self._fn("router_route")((_launch_grid(e, MMV1_ROWS),), (ROW_THREADS,), (
            w, np.int64(4 * d), x, logits, np.int32(e), np.int32(d), bias if bias is not None else np.uint64(0),
            np.int32(router.n_used), np.int32(router.gating), np.int32(bool(router.norm_weights)),
            np.float32(router.scale), self.counters, ids, wts))

    def norm_router_route(self, x, norm, y, q8, w, logits, bias, router, ids, wts) -> None:
        """router_route on rms_norm(x (1, D), *norm), which the launch also leaves in y (1, D) and as
        q8 (xq, xs) for the experts' products (D <= NORM_ROUTE_MAX, a multiple of 32)."""
        e, d = w.shape
        self._fn("norm_router_route")((_launch_grid(e, MMV1_ROWS),), (ROW_THREADS,), (
            x, norm[0], np.float32(norm[1]), y, *q8, w, np.int64(4 * d), logits, np.int32(e), np.int32(d),
            bias if bias is not None else np.uint64(0), np.int32(router.n_used), np.int32(router.gating),
            np.int32(bool(router.norm_weights)), np.float32(router.scale), self.counters, ids, wts))

    def store_row(self, src, dst, pos) -> None:
        n = src.size
        self._fn("store_row_f16")((_launch_grid(n, 256),), (256,), (src, dst, pos, np.int32(n)))

    def mla_decode(self, q_lat, q_pe, cache_c, cache_kpe, pos, scale: float):
        h, c = q_lat.shape
        s_max, r = cache_kpe.shape
        scores = self.cp.empty((h, s_max), np.float32)
        part = self.cp.empty((h, MLA_SPLITS, c + 2), np.float32)
        out = self.cp.empty((1, h, c), np.float32)
        self._fn("mla_decode")((h, MLA_SPLITS), (256,), (q_lat, q_pe, cache_c, cache_kpe, pos, scores, part,
                                                          np.int32(c), np.int32(r), np.int32(s_max), np.float32(scale),
                                                          self.counters, out))
        return out

    def mla_entry(self, q, kv, norm_w, eps: float, rope, pos, n_head: int, nope: int, cache_c, cache_kpe):
        """q (H, N + R), kv (C + R) of a new token -> q_pe (H, R) roped; the normalized latent and
        the roped k_pe stored at pos in one layer's cache (fp16)."""
        r, c = cache_kpe.shape[-1], cache_c.shape[-1]
        q_pe = self.cp.empty((n_head, r), np.float32)
        self._fn("mla_entry")((n_head + 1,), (256,), (q, kv, norm_w, np.float32(eps), rope.cos, rope.sin, pos,
                                                       np.int32(rope.kind == "neox"), np.int32(rope.dim),
                                                       np.int32(n_head), np.int32(nope), np.int32(r), np.int32(c),
                                                       q_pe, cache_c, cache_kpe))
        return q_pe

    def store_kv(self, k, v, k_cache, v_cache, pos) -> None:
        g, d = k.shape
        self._fn("store_kv_f16")((_launch_grid(g * d, 256),), (256,), (k, v, k_cache, v_cache,
                                                                        np.int64(k_cache.strides[0] // 2), pos,
                                                                        np.int32(g), np.int32(d)))

    def gqa_decode(self, q, k_cache, v_cache, pos, group: int, scale: float):
        """q (H, d) against positions 0..pos[0] of the caches (G, s_max, d) -> (H, d)."""
        h, d = q.shape
        s_max = k_cache.shape[1]
        scores = self.cp.empty((h, s_max), np.float32)
        part = self.cp.empty((h, MLA_SPLITS, d + 2), np.float32)
        out = self.cp.empty((h, d), np.float32)
        self._fn("gqa_decode")((h, MLA_SPLITS), (256,), (q, k_cache, v_cache, np.int64(k_cache.strides[0] // 2), pos,
                                                          np.int32(group), scores, part, np.int32(d), np.int32(s_max),
                                                          np.float32(scale), self.counters, out))
        return out

    def rms_norm(self, x, w, eps: float, q8: bool = False):
        """x (R, D) float32, rows of unit stride (packed or not) -> x / rms(x) * w, packed; q8: and
        that as q8 ((y, (xq, xs)); D <= 2048, a multiple of 32)."""
        r, d = x.shape
        y = self.cp.empty((r, d), np.float32)
        args = (x, np.int64(x.strides[0] // 4), w, y, np.int32(d), np.float32(eps))
        if not q8:
            self._fn("rms_norm_f32")((r,), (256,), args)
            return y
        xq, xs = self.cp.empty(r * d, np.int8), self.cp.empty((r * d // 32, 2), np.float32)
        self._fn("rms_norm_q8")((r,), (256,), args + (xq, xs))
        return y, (xq, xs)

    def rope(self, x, y, positions, cos, sin, dim: int, neox: bool) -> None:
        t, h, hd = x.shape
        self._fn("rope_f32")((t * h,), (128,), (x, y, np.int32(t), np.int32(h), np.int64(x.strides[0] // 4),
                                                 np.int64(x.strides[1] // 4), np.int32(hd), np.int32(dim), cos, sin,
                                                 positions, np.int32(neox)))

    def moe_glu_mma(self, qtype, wg, wu, row_bytes: int, expert_bytes: int, tiles, n_tiles: int, x16, a_rows, h16,
                    n: int, k: int) -> None:
        """h16 (P, N) float16 = silu(gate @ x) * (up @ x) for the pairs of `tiles` (cuda_prompt.cu)."""
        self._fn(f"moe_glu_mma_{SUFFIX[qtype]}")(
            (_launch_grid(n, GM_BN), n_tiles), (128,),
            (wg, wu, np.int64(row_bytes), np.int64(expert_bytes), tiles, x16, a_rows, h16, np.int32(n), np.int32(k)))

    def moe_down_mma(self, qtype, w, row_bytes: int, expert_bytes: int, tiles, n_tiles: int, h16, wp, y, n: int,
                     k: int) -> None:
        """y (P, N) float32 = wp[p] * (down @ h16[p]) for the pairs of `tiles`."""
        self._fn(f"moe_down_mma_{SUFFIX[qtype]}")(
            (_launch_grid(n, GM_BN), n_tiles), (128,),
            (w, np.int64(row_bytes), np.int64(expert_bytes), tiles, h16, wp, y, np.int32(n), np.int32(k)))

    def moe_plan(self, ids, w, p: int, k: int, e: int, max_tiles: int, tiles, a_rows, wp, pos, hist) -> None:
        """A prompt layer's pairs sorted by expert on the device (cuda_prompt.cu moe_plan)."""
        self._fn("moe_plan")((1,), (1024,), (ids, w, np.int32(p), np.int32(k), np.int32(e), np.int32(max_tiles),
                                            tiles, a_rows, wp, pos, hist))

    def causal_softmax(self, a, b, heads: int, start: int, scale: float, p16=None) -> None:
        """softmax(scale * (a + b)) of row r of a (rows, S) over keys 0 .. start + r // heads, 0 past
        them, into p16 (rows, S) float16, or back into a."""
        rows, s = a.shape
        self._fn("causal_softmax")((rows,), (256,), (a, b, np.int32(heads), np.int64(s), np.int64(start),
                                                     np.float32(scale), p16 if p16 is not None else np.uint64(0)))

    def moe_combine(self, y, pos, k: int, out) -> None:
        """out[t] += the rows pos[t] (>= 0) of y, in order."""
        t, n = out.shape
        self._fn("moe_combine")((_launch_grid(n, 256), t), (256,), (y, pos, np.int32(k), out, np.int32(n)))

    def silu_mul(self, g, u):
        h = self.cp.empty_like(g)
        n = g.size
        self._fn("silu_mul_f32")((_launch_grid(n, 256),), (256,), (g, u, h, np.int64(n)))
        return h


class _ByIdentity:
    """Another form of an array, remembered by the array's identity for its last `keep` arrays
    (the array is held, so its id stays its own while remembered)."""

    def __init__(self, keep: int):
        self.keep = keep
        self._of: dict[int, tuple] = {}

    def get(self, a):
        known = self._of.get(id(a))
        return known[1] if known is not None and known[0] is a else None

    def put(self, a, form) -> None:
        self._of[id(a)] = (a, form)
        while len(self._of) > self.keep:
            del self._of[next(iter(self._of))]


class DeviceMatrix:
    """A (N, K) weight in VRAM as the file's blocks: (N, row_bytes) uint8."""

    def __init__(self, backend, qtype, raw, shape: tuple[int, int], name: str):
        self.b, self.qtype, self.raw, self.shape, self.name = backend, qtype, raw, shape, name
        self.row_bytes = raw.shape[-1]

    @property
    def nbytes(self) -> int:
        return int(self.raw.nbytes)

    def grouped(self, x16):
        """W @ x for the rows of x16 (T, K) float16 -> (T, N) float32, through the grouped kernels
        as the one expert of a stack (backend.grouped_fits)."""
        n, kk = self.shape
        y = self.b.xp.empty((len(x16), n), np.float32)
        tiles, n_tiles, ones, _ = self.b.one_matrix(len(x16))
        self.b.kernels.moe_down_mma(self.qtype, self.raw, self.row_bytes, 0, tiles, n_tiles, x16, ones, y, n, kk)
        return y

    def __call__(self, x, add=None, res=None):
        """W @ x, plus add then res ((T, N) each, or None) where given: a few tokens add them in
        the product's own launch."""
        xp, k = self.b.xp, self.b.kernels
        n, kk = self.shape
        norm = None
        if isinstance(x, Normed):
            x, norm = (x.x, (x.weight, x.eps)) if self.b.stages(x.x, self.qtype) and x.x.size == kk \
                else (self.b.rows(x), None)
        one = x.ndim == 1
        staged = self.b.stages(x, self.qtype) and x.size == kk  # quantized (and normalized) by its own blocks
        q8 = self.b.q8_of(x, new=not staged) if self.qtype in INT8_TYPES and x.size == kk and norm is None else None
        given = x  # (a prompt's float16 copy is made once an array: half)
        x = xp.ascontiguousarray(x.reshape(-1, kk), dtype=np.float32)
        t = len(x)
        if q8 is not None or staged:
            y = xp.empty((1, n), np.float32)
            add, res = (None if a is None else xp.ascontiguousarray(a.reshape(1, n), dtype=np.float32) for a in (add, res))
            if q8 is not None:
                k.mmv1_q8(self.qtype, self.raw, self.row_bytes, q8, y, n, kk, add, res)
            else:  # quantized (and normalized) by the product's own blocks
                k.mmv1_sq8(self.qtype, self.raw, self.row_bytes, x, norm, y, n, kk, add, res)
            return y[0] if one else y
        if t <= MMV_MAX_TOKENS:
            y = xp.empty((t, n), np.float32)
            k.mmv(self.qtype, self.raw, self.row_bytes, x, y, n, kk, t,
                  *(None if a is None else xp.ascontiguousarray(a.reshape(t, n), dtype=np.float32) for a in (add, res)))
            return y[0] if one else y
        if self.qtype == Q.F32:
            y = x @ self.raw.view(np.float32).T
        elif self.b.grouped_fits(self):  # a prompt: the grouped products on the blocks, as one expert
            y = self.grouped(self.b.half(given if given.ndim == 2 else x))
        else:  # float16 tiles of the weight through cuBLAS, PREFILL_TILE values at a time
            y = xp.empty((t, n), np.float32)
            x16 = x.astype(np.float16)
            step = max(1, PREFILL_TILE // kk)
            for r0 in range(0, n, step):
                r1 = min(n, r0 + step)
                w16 = xp.empty((r1 - r0, kk), np.float16)
                k.dequant(self.qtype, self.raw[r0:r1], self.row_bytes, None, r1 - r0, kk, w16)
                part = xp.empty((t, r1 - r0), np.float32)
                k.gemm_f16(x16, w16, part)
                y[:, r0:r1] = part
        y = plus(y, add, res)
        return y[0] if one else y


class DeviceEmbedding:
    def __init__(self, backend, qtype, raw, shape: tuple[int, int]):
        self.b, self.qtype, self.raw, self.shape = backend, qtype, raw, shape

    def __call__(self, ids):
        """ids (T,) int32 on the device (backend.tokens checked their range)."""
        out = self.b.xp.empty((len(ids), self.shape[1]), np.float32)
        if len(ids):
            self.b.kernels.dequant(self.qtype, self.raw, self.raw.shape[-1], ids, len(ids), self.shape[1], out)
        return out


def _address(a) -> int:
    return a.data.ptr if hasattr(a.data, "ptr") else a.ctypes.data  # CuPy, or numpy (the tests' emulation)


def _rows_of(xp, x):
    """x (T, H, K) float32 as the products' activation rows: (array, floats from one row to the
    next), read in place where the rows sit at one 16-byte-aligned stride (q's first values of each
    head, inside the (T, H, N + R) projection), else packed."""
    t, h, k = x.shape
    s0, s1, s2 = (v // 4 for v in x.strides)
    if x.dtype == np.float32 and s2 == 1 and (t == 1 or s0 == h * s1) and s1 % 4 == 0 and _address(x) % 16 == 0:
        return x, s1
    return xp.ascontiguousarray(x.reshape(t * h, k)), k


def _format_check(gguf, t):
    if t.qtype not in SUFFIX:
        raise UnsupportedError(f"{gguf.path}: tensor {t.name!r}: type {t.qtype.name} has no GPU kernel "
                               f"(supported: {', '.join(s.upper() for s in SUFFIX.values())})")


class CUDABackend:
    """Everything the model asks of the hardware, on one NVIDIA GPU."""

    device = "cuda"

    def __init__(self, kernels=None, xp=None):
        if xp is None:
            import cupy as xp
        self.xp = xp
        self.kernels = kernels if kernels is not None else Kernels()
        self.uploaded = 0  # bytes of weights put in VRAM
        self.graphs = kernels is None  # decode steps as CUDA graphs (not on emulated kernels)
        self._step = None  # the _DecodeGraph being captured: its device buffers replace host inputs
        self._aranges: dict[int, object] = {}
        self._host_copies: dict[int, tuple] = {}  # id -> (device array, its host copy)
        self.vocab = None
        # products of a few tokens of the INT8_TYPES on int8 activations (dp4a); the norms' outputs
        # quantized in the norm's own launch, remembered by identity (the array held, so its id
        # stays its own)
        self.int8 = hasattr(self.kernels, "quantize_q8")
        self._quantized = _ByIdentity(8)  # a norm's output -> its q8
        # a prompt's routed experts through the grouped kernels of cuda_prompt.cu (False: the
        # dequantized tiles and cuBLAS, kept for float32 files and as the tests' second opinion)
        self.prompt_mma = hasattr(self.kernels, "moe_glu_mma")
        self._usage: list = []  # (store, layer, device pair counts) of prompts not yet read back
        self._halves = _ByIdentity(4)  # an activation -> its float16 copy
        self._stream: dict[int, object] = {}  # projection -> a buffer of experts copied in for a prompt
        self._staging: list = []  # two page-locked host buffers for those copies, and their events
        self._one_matrix: dict[int, tuple] = {}  # rows -> one_matrix's bookkeeping
        self._splits: dict[tuple, _SplitLayer] = {}  # (store, layer) -> a split layer's decode buffers

    # --- weights ---------------------------------------------------------------------------
    def upload(self, a: np.ndarray):
        d = self.xp.asarray(np.ascontiguousarray(a))
        self.uploaded += int(d.nbytes)
        return d

    def matrix(self, gguf, name: str, shape: tuple[int, int]) -> DeviceMatrix:
        t = gguf.tensor(name, shape)
        _format_check(gguf, t)
        m = DeviceMatrix(self, t.qtype, self.upload(t.raw), t.shape, name)
        gguf.release_pages(t)
        return m

    def dense(self, gguf, name: str, shape: tuple[int, ...] | None = None):
        from .cpu import tensor_format
        t = gguf.tensor(name, shape)
        fmt = tensor_format(gguf, t)
        host = fmt.dequantize(np.ascontiguousarray(t.raw).reshape(-1, fmt.type_size)).reshape(t.shape)
        return self.upload(host.astype(np.float32))

    def heads(self, gguf, name: str, shape: tuple[int, int, int]) -> "DeviceExperts":
        """(H, R, K) per-head matrices as the file's blocks: a stack the ids kernel takes like experts."""
        t = gguf.tensor(name, shape)
        _format_check(gguf, t)
        m = DeviceExperts(self, t.qtype, self.upload(t.raw), t.shape[1:], name)
        gguf.release_pages(t)
        return m

    def embedding(self, gguf, name: str, shape: tuple[int, int]) -> DeviceEmbedding:
        t = gguf.tensor(name, shape)
        _format_check(gguf, t)
        self.vocab = t.shape[0]
        return DeviceEmbedding(self, t.qtype, self.upload(t.raw), t.shape)

    # --- products --------------------------------------------------------------------------
    def per_head(self, w, x):
        xp, x = self.xp, self.rows(x)
        t, h, k = x.shape
        if isinstance(w, DeviceExperts):  # quantized heads
            if t > MMV_MAX_TOKENS:
                w = w.dense()
            else:
                return w.ids(self._arange(h, t), *_rows_of(xp, x)).reshape(t, h, -1)  # (T, H, R)
        if t > MMV_MAX_TOKENS:
            return xp.matmul(x.transpose(1, 0, 2), w.transpose(0, 2, 1)).transpose(1, 0, 2)  # (T, H, R)
        # a float32 stack (the legacy attn_kv_b split) as F32 blocks, through the same one-launch product
        return self.per_head(DeviceExperts(self, Q.F32, w.view(np.uint8), w.shape[1:], "heads"), x)

    def _arange(self, n: int, repeat: int = 1):
        """0..n-1 repeated, int32 on the device, made once (a captured step keeps reading it)."""
        key = (n, repeat)
        a = self._aranges.get(key)
        if a is None:
            a = self._aranges[key] = self.persistent(np.tile(np.arange(n, dtype=np.int32), repeat))
        return a

    def persistent(self, host: np.ndarray):
        """A device copy from the default pool, also while a decode graph is being recorded (its
        own pool goes with the graph)."""
        if self.xp is np:
            return host.copy()
        import cupy
        with cupy.cuda.using_allocator(cupy.get_default_memory_pool().malloc):
            return cupy.asarray(host)

    def pinned(self, shape, dtype, zero: bool = True) -> np.ndarray:
        """Page-locked host memory (a plain array on emulated kernels): what a captured step's copies
        to and from the host read and write, and a long prompt's staging buffers (not zeroed)."""
        if self.xp is np:
            return np.zeros(shape, dtype)
        import cupyx
        a = cupyx.empty_pinned(shape, dtype)
        if zero:
            a[...] = 0
        return a

    def experts_rows(self, x, triples, rows, delta=None):
        return None

    def experts_runs(self, x, triples, counts):
        return None

    def latent_decode_rows(self, q_lat, q_pe, lat_new, k_pe_new, caches_c, caches_k_pe, pos, scale: float):
        return None

    def moe(self, x, router_weight, router, bias, store, layer: int, lora=None, shared=None, residual=None):
        """A decode step whose layer has every expert in VRAM routes on the device and runs the
        chosen experts as one launch per projection, the shared experts' products in the same
        launches: nothing waits for the host; a decode step whose layer has experts on the CPU
        waits for the host once, between the two launches (_split_step). A prompt's layer with
        every expert in VRAM routes on the device, runs the shared experts while the choices
        cross, then the grouped products (_grouped_experts). Otherwise route on the host (a few dozen values), then the experts
        in VRAM (one launch per projection for a few tokens, grouped products for a prompt) while
        the experts left on the CPU run there on the host copy of x; the shared experts after them."""
        xp, k = self.xp, self.kernels
        T = len(x)
        if T == 1 and not store.all_on_device(layer):
            return self._split_step(x, router_weight, router, bias, store, layer, shared, residual)
        if T <= MMV_MAX_TOKENS and store.all_on_device(layer):
            n = router.n_used
            # a captured step routes straight into the step's buffer, read after each replay
            ids = self._step.routed(layer) if self._step is not None and T == 1 else xp.empty((T, n), np.int32)
            w = xp.empty((T, n), np.float32)
            x = self._route(x, router_weight, router, bias, ids, w)
            if self._step is None:
                store.count(layer, self.host(ids))
            finish = self._routed_glu(x, ids.reshape(-1), n, store.device(layer), shared)
            return finish(w, None, residual)
        x = self.rows(x)
        logits = self._router_logits(x, router_weight)
        if T > MMV_MAX_TOKENS and store.all_on_device(layer) and self.prompt_mma and _grouped_fits(*store.device(layer)) \
                and router.n_expert <= PLAN_EXPERTS:
            # a prompt with every expert in VRAM: routed, sorted into tiles and run on the device,
            # nothing waits for the host (the usage counts follow with the logits: _count_usage)
            n = router.n_used
            ids, w = xp.empty((T, n), np.int32), xp.empty((T, n), np.float32)
            k.route(logits, bias, router, ids, w)
            out = self.ffn(x, *shared) if shared is not None else xp.zeros_like(x)
            self._planned_experts(x, ids, w, store.device(layer), out, store, layer)
            return plus(out, residual=residual)
        return self._plus_shared(x, self._routed_on_host(x, logits, router, bias, store, layer), shared, residual)

    def _route(self, x, router_weight, router, bias, ids, w):
        """The router's top-k of a few tokens on the device into ids and w (T, k): the logits and
        the choice in one launch where the router's shape allows, which also makes a Normed x's
        norm -> x (T, D) float32, contiguous (normalized)."""
        xp, k = self.xp, self.kernels
        one = len(x) == 1 and route_fuses(router, router_weight)
        logits = xp.empty((1, router.n_expert), np.float32) if one else None
        if one and isinstance(x, Normed) and x.shape[1] <= NORM_ROUTE_MAX:  # (a Normed is _stageable)
            d = x.shape[1]
            y, q8 = xp.empty((1, d), np.float32), (xp.empty(d, np.int8), xp.empty((d // 32, 2), np.float32))
            k.norm_router_route(x.x, (x.weight, x.eps), y, q8, router_weight, logits, bias, router, ids, w)
            self._quantized.put(y, q8)
            x.y = y  # the Normed's rows from now on
            return y
        x = xp.ascontiguousarray(self.rows(x), dtype=np.float32)
        if one:
            k.router_route(router_weight, x, logits, bias, router, ids, w)
        else:
            k.route(self._router_logits(x, router_weight), bias, router, ids, w)
        return x

    def _routed_glu(self, x, slots, n: int, projections, shared):
        """The gate-up launch of a few tokens' pairs (row p // n of x through expert slots[p]), the
        shared experts' in the same launch where _fuses -> finish(w, add, residual), which queues the
        down launch: residual + (add + each token's pairs weighted by w (T, n) + the shared experts).
        Split so that the CPU's experts can run between the two."""
        gate, up, down = projections
        if _fuses(shared, gate, up, down, self.int8):
            xp, T = self.xp, len(x)
            g2, u2, d2 = shared
            P, N, N2 = len(slots), gate.shape[0], g2.shape[0]
            hh = xp.empty(P * N + T * N2, np.float32)  # both experts' hidden rows: quantized in one launch
            h, h2 = hh[:P * N].reshape(P, N), hh[P * N:].reshape(T, N2)
            gate.glu(up, slots, x, x_div=n, shared=(g2, u2, h2), out=h)
            q8 = None
            if down.qtype in INT8_TYPES and self.int8 and N % 32 == 0 and N2 % 32 == 0:
                (hq, hs), cut = self.kernels.quantize_q8(hh), P * N
                q8 = ((hq[:cut], hs[:cut // 32]), (hq[cut:], hs[cut // 32:]))
            return lambda w, add, residual: down.down(slots, h, w, add=add, shared=(d2, h2), res=residual, q8=q8)
        h = gate.glu(up, slots, x, x_div=n)
        return lambda w, add, residual: self._plus_shared(x, down.down(slots, h, w, add=add), shared, residual)

    def _split_step(self, x, router_weight, router, bias, store, layer: int, shared, residual):
        """One decode token of a layer whose experts are split between VRAM and the CPU (or all on
        the CPU), without Python between the GPU's launches: routed on the device; the token's row
        and its choices copied to page-locked host memory; the gate-up of every pair queued on the
        GPU (a pair whose expert is on the CPU reads expert slot 0 with weight 0: the launch's shape
        never depends on the routing), or the shared experts where the layer has none in VRAM; the
        host waits for the copies only, runs the CPU's experts (_SplitLayer.run) while the GPU runs
        its own part, and their sum crosses back to join the down launch. In a captured step the
        wait is a cut between graphs (_DecodeGraph.cut): the host's part runs after the GPU's own
        part is launched, before the graph that copies the sum back."""
        n, D = router.n_used, x.shape[1]
        key = (id(store), layer)
        s = self._splits.get(key)
        if s is None or s.store is not store:
            s = self._splits[key] = _SplitLayer(self, store, layer, D, n)
        x = self._route(x, router_weight, router, bias, s.ids, s.w)
        self._copy(x, s.host_x, to_host=True)
        self._copy(s.choice, s.host_choice, to_host=True)
        beside = s.table is not None or shared is not None  # the GPU has a part of its own
        copied = self._host_mark() if beside else None
        finish = None
        if s.table is not None:
            finish = self._routed_glu(x, s.table[s.ids].reshape(-1), n, store.device(layer), shared)
            w_gpu = s.w * s.on_gpu[s.ids]
        elif shared is not None:
            y_shared = self.ffn(x, *shared)
        self._on_host(s.run, copied, beside)
        self._copy(s.out, s.host_out, to_host=False)
        if finish is not None:
            return finish(w_gpu, s.out, residual)
        return plus(s.out + y_shared if shared is not None else s.out, residual=residual)

    def _copy(self, a, host: np.ndarray, to_host: bool) -> None:
        """Queue a copy on the current stream between device array a and host memory (page-locked
        for a copy that returns at once): into host where to_host, else into a."""
        if self.xp is np:
            if to_host:
                host[...] = a.reshape(host.shape)
            else:
                a[...] = host.reshape(a.shape)
            return
        import cupy
        rt = cupy.cuda.runtime
        dst, src, kind = ((host.ctypes.data, a.data.ptr, rt.memcpyDeviceToHost) if to_host
                          else (a.data.ptr, host.ctypes.data, rt.memcpyHostToDevice))
        rt.memcpyAsync(dst, src, a.nbytes, kind, cupy.cuda.get_current_stream().ptr)

    def _host_mark(self):
        """Mark the work queued so far, for a host's part (_on_host) that waits for it and no more:
        an event on the stream, or, while a decode step is being captured, the end of a graph
        whose replay the host waits for."""
        if self._step is not None and self._step.capturing:
            self._step.cut(wait=True)
            return None
        return self._event()

    def _event(self):
        """An event recorded on the current stream now (None on emulated kernels, which run at once)."""
        if self.xp is np:
            return None
        assert self._step is None or not self._step.capturing, "an event while a decode step is captured"
        event = self.xp.cuda.Event(disable_timing=True)
        event.record()
        return event

    def _on_host(self, fn, mark=None, beside: bool = False) -> None:
        """Run fn on the host once the work queued up to mark (_host_mark) is done, while the work
        queued after it runs on the GPU (beside); without a mark, once everything queued is done.
        While a decode step is being captured, fn runs between the replays of the graph so far and
        the graph of what follows."""
        if self._step is not None and self._step.capturing:
            self._step.cut(wait=not beside, fn=fn)
            return
        if self.xp is not np:
            (mark if beside else self.xp.cuda.get_current_stream()).synchronize()
        fn()

    def _planned_experts(self, x, ids, w, projections, out, store, layer: int) -> None:
        """A prompt's routed experts, every one in VRAM (a slot is the expert's id): moe_plan sorts
        the pairs into tiles on the device, the grouped products run on as many tiles as the pairs
        could need (those left empty return at once), moe_combine adds each token's rows to out in
        routing order. The layer's pair counts per expert wait on the device until the host next
        reads an array (host()), then go to the store's usage profile."""
        xp, k = self.xp, self.kernels
        T, used = ids.shape
        P, E = T * used, projections[0].raw.shape[0]
        max_tiles = P // GM_BM + min(E, P)
        book = xp.empty(3 * max_tiles + 3 * P + E, np.int32)  # tiles, a_rows, wp, pos, hist
        t1 = 3 * max_tiles
        tiles, a_rows, wp = book[:t1], book[t1:t1 + P], book[t1 + P:t1 + 2 * P].view(np.float32)
        pos, hist = book[t1 + 2 * P:t1 + 3 * P], book[t1 + 3 * P:]
        k.moe_plan(ids, w, P, used, E, max_tiles, tiles, a_rows, wp, pos, hist)
        self._usage.append((store, layer, hist))
        self._tiled_products(x, projections, tiles, max_tiles, a_rows, wp, pos, P, used, out)

    def _count_usage(self) -> None:
        """The pair counts the device kept (_planned_experts) into the stores' usage profiles, in
        one copy."""
        usage, self._usage = self._usage, []
        if not usage:
            return
        hists = [h for _, _, h in usage]
        hists = np.concatenate(hists) if self.xp is np else self.xp.concatenate(hists).get()
        at = 0
        for store, layer, h in usage:
            store.count_hist(layer, hists[at:at + len(h)])
            at += len(h)

    def _plus_shared(self, x, out, shared, residual):
        """residual + (out + the shared experts' ffn of x)."""
        if shared is not None:
            return self.ffn(x, *shared, add=out, residual=residual)
        return plus(out, residual=residual)

    def _routed_on_host(self, x, logits, router, bias, store, layer: int):
        """The routed experts of a layer routed on the host: those in VRAM here, the others on the CPU."""
        xp, T = self.xp, len(x)
        D = x.shape[1]
        if T > 1 and store.all_on_device(layer):
            # a prompt whose experts are all in VRAM: routed on the device, only the choices cross
            n = router.n_used
            both = xp.empty((2, T, n), np.int32)
            self.kernels.route(logits, bias, router, both[0], both[1].view(np.float32))
            both = self.host(both)
            ids, weights, host_x = both[0], both[1].view(np.float32), None
        else:
            both = self.host(xp.concatenate([x.reshape(-1), logits.reshape(-1)]))  # one copy, one wait
            host_x, host_logits = both[:T * D].reshape(T, D), both[T * D:].reshape(T, -1)
            ids, weights = route(host_logits, router, None if bias is None else self._host_copy(bias))  # (T, k)
        store.count(layer, ids)
        slot = store.slots(layer)[ids]  # (T, k): the expert's index in VRAM, -1 on the CPU
        on_gpu = slot >= 0
        out = xp.zeros_like(x)
        if on_gpu.any():
            gate, up, down = store.device(layer)
            tok, which = np.nonzero(on_gpu)  # pairs in token order
            if T <= MMV_MAX_TOKENS:
                p = len(tok)
                s = xp.asarray(slot[tok, which].astype(np.int32))
                xg = xp.ascontiguousarray(x[xp.asarray(tok)])  # (p, D): each pair's token
                y = down.ids(s, gate.glu(up, s, xg))  # (p, D)
                mix = np.zeros((T, p), np.float32)
                mix[tok, np.arange(p)] = weights[tok, which]
                out += xp.asarray(mix) @ y
            else:
                self._prompt_experts(x, slot, on_gpu, weights, store.device(layer), out)
        if not on_gpu.all():
            if T >= STREAM_MIN_TOKENS and all(t.qtype in SUFFIX for t in store.cpu_store.tensors[layer]):
                self._streamed_experts(x, ids, weights, ~on_gpu, store, layer, out)
            else:
                out += xp.asarray(store.cpu_part(host_x, ids, weights, ~on_gpu, layer))
        return out

    def _streamed_experts(self, x, ids, weights, mask, store, layer: int, out) -> None:
        """A prompt's pairs (mask) whose experts stay on the CPU, run on the GPU all the same: their
        blocks copied from the CPU's store (the file's bytes, as the load uploads them) a buffer of
        STREAM_BYTES at a time, each bufferful through the grouped products as experts in VRAM are. A
        V2-Lite layer's 64 experts are 311 MB of Q4_0, ~12 ms over PCIe 4, where the CPU's products
        of a 512-token prompt's pairs take far longer; copies queue on the stream, so a buffer is
        refilled only after the products that read it."""
        tensors = store.cpu_store.tensors[layer]
        experts = np.unique(ids[mask])
        n_buf = int(max(1, min(len(experts), STREAM_BYTES // sum(t.raw[0].nbytes for t in tensors))))
        bufs = [self._stream_buffer(i, t.raw.shape[1:], n_buf) for i, t in enumerate(tensors)]
        where = np.full(store.n_expert, -1, np.int64)
        for c0 in range(0, len(experts), n_buf):
            chunk = experts[c0:c0 + n_buf]
            self._staged_copy(c0 // n_buf % 2, [t.raw for t in tensors], chunk, bufs)
            where[:] = -1
            where[chunk] = np.arange(len(chunk))
            slot = where[ids]
            projections = tuple(DeviceExperts(self, t.qtype, buf[:len(chunk)], t.shape[1:], t.name)
                                for t, buf in zip(tensors, bufs))
            self._prompt_experts(x, slot, mask & (slot >= 0), weights, projections, out)

    def _stream_buffer(self, i: int, shape: tuple[int, int], n: int):
        """Projection i's buffer of at least n experts of (rows, row_bytes) blocks, kept for later prompts."""
        b = self._stream.get(i)
        if b is None or b.shape[1:] != shape or len(b) < n:
            b = self._stream[i] = self.xp.empty((n, *shape), np.uint8)
        return b

    def _staged_copy(self, i: int, raws: list, chunk: np.ndarray, bufs: list) -> None:
        """The experts chunk of each projection's blocks raws[j] (E, rows, row bytes) into bufs[j]
        through page-locked buffer i: once the GPU has copied out what the buffer held last, the
        CPU's threads gather the experts into it (_gather_experts), then one copy per projection
        queues on the stream and an event marks when the buffer is free again."""
        n = len(chunk)
        size = n * sum(raw[0].nbytes for raw in raws)
        if not self._staging or len(self._staging[0][0]) < size:  # (an expert above STREAM_BYTES: one at a time)
            for _, done in self._staging:  # the copies out of the buffers replaced
                if done is not None:
                    done.synchronize()
            self._staging = [[self.pinned(max(size, STREAM_BYTES), np.uint8, zero=False), None] for _ in range(2)]
        host, done = self._staging[i]
        if done is not None:
            done.synchronize()
        at = 0
        for raw, buf in zip(raws, bufs):
            part = host[at:at + n * raw[0].nbytes].reshape(n, *raw.shape[1:])
            _gather_experts(np.asarray(raw), chunk, part)
            self._copy(buf[:n], part, to_host=False)
            at += part.nbytes
        self._staging[i][1] = self._event()

    def _host_copy(self, a) -> np.ndarray:
        """A host copy of a small device array that never changes (a router's selection bias), made once."""
        c = self._host_copies.get(id(a))
        if c is None or c[0] is not a:
            c = self._host_copies[id(a)] = (a, self.host(a))
        return c[1]

    def _prompt_experts(self, x, slot, on_gpu, weights, projections, out) -> None:
        """A prompt's routed experts in VRAM: grouped products on the file's blocks where the
        formats allow (_grouped_experts), else dequantized tiles through cuBLAS (_tiled_experts)."""
        gate, up, down = projections
        if self.prompt_mma and _grouped_fits(gate, up, down):
            self._grouped_experts(x, slot, on_gpu, weights, projections, out)
        else:
            self._tiled_experts(x, slot, on_gpu, weights, projections, out)

    def _grouped_experts(self, x, slot, on_gpu, weights, projections, out) -> None:
        """The pairs (token, expert) of the experts in VRAM sorted by expert on the host and cut into
        tiles of GM_BM pairs of one expert, then the grouped products (_tiled_products). The weights
        are read from their blocks by the tiles, never dequantized into VRAM; the bookkeeping crosses
        to the device in one copy."""
        T, used = slot.shape
        tok, which, experts, start, count = _pairs_by_expert(slot, on_gpu)
        P = len(tok)
        tiles = _expert_tiles(experts, start, count)
        pos = np.full((T, used), -1, np.int64)
        pos[tok, which] = np.arange(P)  # each (token, choice)'s pair
        w_of = weights[tok, which].astype(np.float32).view(np.int32)
        host = np.concatenate([tok, tiles.reshape(-1), pos.reshape(-1), w_of]).astype(np.int32)
        dev = self.xp.asarray(host)
        a_rows, d_tiles = dev[:P], dev[P:P + tiles.size]
        d_pos, wp = dev[P + tiles.size:P + tiles.size + pos.size], dev[P + tiles.size + pos.size:].view(np.float32)
        self._tiled_products(x, projections, d_tiles, len(tiles), a_rows, wp, d_pos, P, used, out)

    def _tiled_products(self, x, projections, tiles, n_tiles: int, a_rows, wp, pos, P: int, used: int, out) -> None:
        """The grouped products of a prompt's P sorted pairs: gate, up and silu in one launch (float16
        hidden rows), down times each pair's weight wp in a second, each token's rows added to out in
        routing order (pos) in a third."""
        xp, k = self.xp, self.kernels
        gate, up, down = projections
        F, D = gate.shape
        h16 = xp.empty((P, F), np.float16)
        k.moe_glu_mma(gate.qtype, gate.raw, up.raw, gate.raw.shape[-1], gate.expert_bytes, tiles, n_tiles,
                      self.half(x), a_rows, h16, F, D)
        y = xp.empty((P, D), np.float32)
        k.moe_down_mma(down.qtype, down.raw, down.raw.shape[-1], down.expert_bytes, tiles, n_tiles, h16, wp, y, D, F)
        k.moe_combine(y, pos, used, out)

    def _tiled_experts(self, x, slot, on_gpu, weights, projections, out) -> None:
        """A prompt's routed experts in VRAM: the experts' tokens gathered into a padded (experts,
        most tokens, D) batch, their weights dequantized to float16 as many experts at a time as
        EXPERT_TILE values allow (a V2-Lite layer's 64 experts in three groups), one
        strided-batched cuBLAS product per projection and group; then each (token, expert) row
        weighted and added to its token. The bookkeeping is vectorized and crosses to the device
        once per group."""
        xp, k = self.xp, self.kernels
        gate, up, down = projections
        F, D = gate.shape
        tok, which, experts, start, count = _pairs_by_expert(slot, on_gpu)
        j_of = np.repeat(np.arange(len(experts)), count)  # each pair's expert, as an index into experts
        rank = np.arange(len(tok)) - start[j_of]  # each pair's place among its expert's tokens
        w_of = weights[tok, which].astype(np.float32)
        per_group = max(1, EXPERT_TILE // (F * D))
        for g0 in range(0, len(experts), per_group):
            ex, ct = experts[g0:g0 + per_group], count[g0:g0 + per_group]
            n, tmax = len(ex), int(ct.max())
            m = slice(start[g0], start[g0] + int(ct.sum()))  # this group's pairs
            row = (j_of[m] - g0) * tmax + rank[m]  # each pair's row in the padded batch
            idx = np.zeros(n * tmax, np.int64)  # padding rows repeat token 0; their outputs are never read
            idx[row] = tok[m]
            host = np.concatenate([idx, row, tok[m]]).astype(np.int64)
            dev = xp.asarray(host)
            d_idx, d_row, d_tok = dev[:n * tmax], dev[n * tmax:n * tmax + len(row)], dev[n * tmax + len(row):]
            xg = x[d_idx].reshape(n, tmax, D)
            h = k.silu_mul(self._batched(gate, ex, xg), self._batched(up, ex, xg))  # (n, tmax, F)
            y = self._batched(down, ex, h).reshape(n * tmax, D)  # (n * tmax, D)
            k.scatter_add(out, d_tok, y[d_row] * xp.asarray(w_of[m])[:, None])

    def _batched(self, proj, experts: np.ndarray, x):
        """x (n, T, K) through experts (n,) of one projection -> (n, T, N) float32: float16
        operands on the tensor cores, float32 where the file's weights are float32."""
        xp, k = self.xp, self.kernels
        N, K = proj.shape
        rows = (experts[:, None] * N + np.arange(N)[None, :]).reshape(-1).astype(np.int32)
        exact = proj.qtype == Q.F32
        w = xp.empty((len(experts), N, K), np.float32 if exact else np.float16)
        flat = proj.raw.reshape(-1, proj.raw.shape[-1])  # (E*N, row_bytes)
        k.dequant(proj.qtype, flat, flat.shape[-1], xp.asarray(rows), len(rows), K, w)
        if exact:
            return xp.matmul(x, w.transpose(0, 2, 1))
        y = xp.empty((len(experts), x.shape[1], N), np.float32)
        k.gemm_f16(x.astype(np.float16), w, y)
        return y

    def _router_logits(self, x, w):
        """x (T, D) @ w (E, D).T: few tokens through the decode kernel (no cuBLAS: capturable)."""
        if len(x) > MMV_MAX_TOKENS:
            return x @ w.T
        e, d = w.shape
        y = self.xp.empty((len(x), e), np.float32)
        self.kernels.mmv(Q.F32, w.view(np.uint8), 4 * d, self.xp.ascontiguousarray(x), y, e, d, len(x))
        return y

    def normed(self, x, weight, eps: float):
        """rms_norm(x, weight, eps) for the products that follow: one decode token's as a Normed,
        which the int8 products and the router normalize in their own launches."""
        if len(x) == 1 and x.ndim == 2 and x.dtype == np.float32 and x.flags.c_contiguous and self._stageable(x):
            return Normed(x, weight, eps, self.rms_norm)
        return self.rms_norm(x, weight, eps)

    rows = staticmethod(rows)  # x, or a Normed's rows, normalized now (once)

    def _stageable(self, x) -> bool:
        """Whether x is one token's row that an int8 launch's blocks can quantize for themselves."""
        k = x.shape[-1]
        return self.int8 and x.size == k and k % 32 == 0 and k <= STAGE_MAX

    def stages(self, x, qtype) -> bool:
        """Whether the int8 products of qtype quantize x (1, K) in their own blocks (mmv1_sq8)."""
        return qtype in INT8_TYPES and self._stageable(x)

    def rms_norm(self, x, weight, eps: float):
        x = self.rows(x)
        if not (x.ndim == 2 and x.dtype == np.float32 and x.strides[1] == 4 and x.strides[0] % 4 == 0):
            x = self.xp.ascontiguousarray(x.reshape(-1, x.shape[-1]), dtype=np.float32)
        r, d = x.shape
        if not (self.int8 and r <= MMV_MAX_TOKENS and d % 32 == 0 and d <= 2048):
            return self.kernels.rms_norm(x, weight, eps)  # a row slice (MLA's latent) read in place
        y, q8 = self.kernels.rms_norm(x, weight, eps, q8=True)
        self._quantized.put(y, q8)
        return y

    def half(self, x):
        """x (T, K) as float16 for the grouped products, converted once where several read it (a
        norm's output: q and kv_a, the shared and the routed experts)."""
        x = self.rows(x)
        h = self._halves.get(x)
        if h is None:
            h = self.xp.ascontiguousarray(x, dtype=np.float16)
            self._halves.put(x, h)
        return h

    def grouped_fits(self, m) -> bool:
        """Whether a prompt's product with matrix m runs through the grouped kernels (as an expert
        of one): a DeviceMatrix of a block or 16-bit format, K a multiple of GM_BK, N even."""
        return self.prompt_mma and isinstance(m, DeviceMatrix) and _grouped_shape(m)

    def one_matrix(self, t: int):
        """The grouped kernels' bookkeeping for t rows through one matrix: tiles (expert 0, first
        row, rows) on the device and their count, every row's weight 1, the rows 0..t-1; made once
        a row count."""
        c = self._one_matrix.get(t)
        if c is None:
            first = GM_BM * np.arange(-(-t // GM_BM))
            tiles = np.stack([np.zeros_like(first), first, np.minimum(GM_BM, t - first)], 1).astype(np.int32)
            c = (self.persistent(tiles.reshape(-1)), len(tiles), self.persistent(np.ones(t, np.float32)),
                 self._arange(t))
            self._one_matrix[t] = c
            while len(self._one_matrix) > 16:
                del self._one_matrix[next(iter(self._one_matrix))]
        return c

    def q8_of(self, x, new: bool = True):
        """x (T, K) as q8 for the int8 products: the norm's copy where x is a norm's output, else
        quantized now (unless not new); None where the int8 path is off or K is not a multiple of 32."""
        x = self.rows(x)
        if not self.int8 or x.shape[-1] % 32:
            return None
        known = self._quantized.get(x)
        if known is not None or not new:
            return known
        return self.kernels.quantize_q8(self.xp.ascontiguousarray(x, dtype=np.float32))

    def linears(self, ws, x):
        """[w(x) for w in ws]; two or three matrices of one int8 format and width on one token (a
        layer's q and kv_a; q, k and v) in one launch, x quantized once: by the launch's own blocks
        where it can (and normalized there, where x is a Normed)."""
        one = ws[0]
        if not (1 < len(ws) <= 3 and x.ndim == 2 and len(x) == 1 and all(isinstance(w, DeviceMatrix) for w in ws)
                and one.qtype in INT8_TYPES and all(w.qtype == one.qtype and w.shape[1] == one.shape[1] for w in ws)):
            x = self.rows(x)
            return [w(x) for w in ws]
        mats, k = [(w.raw, w.row_bytes, w.shape[0]) for w in ws], one.shape[1]
        ys = [self.xp.empty((1, w.shape[0]), np.float32) for w in ws]
        if isinstance(x, Normed) and self.stages(x.x, one.qtype):
            self.kernels.mmv3_sq8(one.qtype, mats, x.x, (x.weight, x.eps), ys, k)
            return ys
        x = self.rows(x)
        staged = self.stages(x, one.qtype)
        q8 = self.q8_of(x, new=not staged)
        if q8 is not None:
            self.kernels.mmv3_q8(one.qtype, mats, q8, ys, k)
        elif staged:
            self.kernels.mmv3_sq8(one.qtype, mats, self.xp.ascontiguousarray(x, dtype=np.float32), None, ys, k)
        else:
            return [w(x) for w in ws]
        return ys

    def linear(self, w, x, residual=None):
        if residual is None:
            return w(x)
        return w(x, res=residual) if isinstance(w, DeviceMatrix) else plus(w(x), residual=residual)

    def ffn(self, x, gate, up, down, add=None, residual=None):
        """A dense or shared SwiGLU feed-forward; a few tokens through the fused gate-up kernel (the
        matrices as stacks of one) and the down product adding `add` and `residual` in its launch,
        a prompt through the grouped kernels (gate-up with SiLU, then down: the matrices as an
        expert of one), else the cuBLAS tiles."""
        x = self.rows(x)
        if len(x) > MMV_MAX_TOKENS and gate.qtype == up.qtype and gate.shape == up.shape \
                and all(self.grouped_fits(m) for m in (gate, up, down)):
            # a prompt: gate, up and silu in one grouped launch, down in another, on the blocks
            t, (n, kk) = len(x), gate.shape
            tiles, n_tiles, _, rows = self.one_matrix(t)
            h16 = self.xp.empty((t, n), np.float16)
            self.kernels.moe_glu_mma(gate.qtype, gate.raw, up.raw, gate.row_bytes, 0, tiles, n_tiles, self.half(x),
                                     rows, h16, n, kk)
            return plus(down.grouped(h16), add, residual)
        if not (len(x) <= MMV_MAX_TOKENS and all(isinstance(m, DeviceMatrix) for m in (gate, up, down))):
            return plus(ffn(x, gate, up, down, self.swiglu), add, residual)
        zeros = self._arange(1, len(x))  # every row through expert 0: the matrix itself
        n, kk = gate.shape
        h = self.xp.empty((len(x), n), np.float32)
        q8 = self.q8_of(x) if gate.qtype == up.qtype and gate.qtype in INT8_TYPES else None
        if q8 is not None:
            self.kernels.glu_q8(gate.qtype, gate.raw, up.raw, gate.row_bytes, 0, zeros, q8, 1, h, n, kk, len(x),
                                len(x))
        elif gate.qtype == up.qtype:
            self.kernels.glu_ids(gate.qtype, gate.raw, up.raw, gate.row_bytes, 0, zeros,
                                 self.xp.ascontiguousarray(x, dtype=np.float32), 1, h, n, kk, len(x))
        else:
            h = self.swiglu(gate(x), up(x))
        return down(h, add=add, res=residual)

    def swiglu(self, g, u):
        return self.kernels.silu_mul(self.xp.ascontiguousarray(g), self.xp.ascontiguousarray(u))

    def rope(self, rope, x, positions):
        xp = self.xp
        if x.strides[-1] != 4 or x.dtype != np.float32:
            x = xp.ascontiguousarray(x, dtype=np.float32)
        if isinstance(positions, np.ndarray):
            positions = xp.asarray(positions.astype(np.int32))
        y = xp.empty(x.shape, np.float32)
        self.kernels.rope(x, y, positions, rope.cos, rope.sin, rope.dim, rope.kind == "neox")
        return y

    def latent_decode(self, q_lat, q_pe, lat_new, k_pe_new, cache_c, cache_k_pe, pos, scale: float):
        return None  # a decode step's attention is latent_step's; several tokens take the model's math

    def latent_step(self, q, kv, norm_w, eps: float, rope, q_lat, cache_c, cache_k_pe, pos, scale: float):
        """One token's MLA attention in three launches: the cache entry and the rotary query
        (mla_entry: rope, latent norm, both stores), then the split attention that merges its
        own splits."""
        H, C = q_lat.shape
        r = cache_k_pe.shape[-1]
        if C % 8 or C + r > 1024 or H > MAX_HEADS or q.shape[0] != H or rope.dim > r:
            return None  # the kernel's vector loads, shared query and counters
        xp, k = self.xp, self.kernels
        if isinstance(pos, np.ndarray):
            pos = xp.asarray(pos[:1].astype(np.int32))
        q = xp.ascontiguousarray(q, dtype=np.float32)
        q_pe = k.mla_entry(q, xp.ascontiguousarray(kv, dtype=np.float32), norm_w, eps, rope, pos, H,
                           q.shape[1] - r, cache_c, cache_k_pe)
        return k.mla_decode(xp.ascontiguousarray(q_lat), q_pe, cache_c, cache_k_pe, pos, scale)

    def _check_ids(self, ids: np.ndarray) -> None:
        if self.vocab is not None and ids.size and (ids.min() < 0 or ids.max() >= self.vocab):
            raise ValueError(f"token id out of range [0, {self.vocab})")

    def tokens(self, ids):
        ids = np.asarray(ids)
        self._check_ids(ids)
        return self.xp.asarray(ids.astype(np.int32))

    def positions(self, pos: np.ndarray):
        if self._step is not None:
            return self._step.pos
        return self.xp.asarray(pos.astype(np.int32))

    def replay(self, model, tokens, cache):
        """A decode step as a CUDA graph: captured once per cache (after one eager run that
        compiles every kernel and fills the graph's memory pool), replayed with the token and the
        position written into its input buffers; where routed experts run on the CPU, a chain of
        graphs with the host's part between them (_split_step)."""
        if not self.graphs or not getattr(model, "graph_safe", False):
            return None
        self._check_ids(np.asarray(tokens))
        g = getattr(cache, "decode_graph", None)
        if g is None:
            g = cache.decode_graph = _DecodeGraph(self, model, cache)
        return g.run(int(tokens[0]), cache.pos)

    def host(self, x) -> np.ndarray:
        x = self.rows(x)
        x = x if isinstance(x, np.ndarray) else x.get()
        self._count_usage()
        return x

    def kv_decode(self, q, k_new, v_new, k_cache, v_cache, pos, scale: float):
        """Store and attend in two kernels that read the position from the device (capturable)."""
        G, Hg, d = q.shape
        if d > 256 or G * Hg > MAX_HEADS:
            return None
        xp, k = self.xp, self.kernels
        if isinstance(pos, np.ndarray):
            pos = xp.asarray(pos[:1].astype(np.int32))
        k.store_kv(xp.ascontiguousarray(k_new, dtype=np.float32), xp.ascontiguousarray(v_new, dtype=np.float32),
                   k_cache, v_cache, pos)
        return k.gqa_decode(xp.ascontiguousarray(q.reshape(G * Hg, d), dtype=np.float32), k_cache, v_cache, pos, Hg,
                            scale).reshape(G, Hg, d)

    def latent_attention(self, q_lat, q_pe, cache_c, cache_k_pe, start: int, scale: float):
        """A prompt's MLA attention in the absorbed form over the float16 cache as stored, on the
        tensor cores as llama.cpp's: the two score products (float16 queries, float32 sums), one
        kernel that adds, scales, masks and normalizes them into float16 weights, their product
        with the latents."""
        xp, k = self.xp, self.kernels
        T, H, C = q_lat.shape
        S = len(cache_c)
        if cache_c.dtype != np.float16 or cache_k_pe.dtype != np.float16:
            return None
        a, b = xp.empty((T * H, S), np.float32), xp.empty((T * H, S), np.float32)
        k.gemm_f16(xp.ascontiguousarray(q_lat.reshape(T * H, C), dtype=np.float16), cache_c, a)
        k.gemm_f16(xp.ascontiguousarray(q_pe.reshape(T * H, -1), dtype=np.float16), cache_k_pe, b)
        p16 = xp.empty((T * H, S), np.float16)
        k.causal_softmax(a, b, H, start, scale, p16)
        o = xp.empty((T * H, C), np.float32)
        k.gemm_f16_kn(p16, cache_c, o)
        return o.reshape(T, H, C)

    def causal_attention(self, q, k, v, start: int, scale: float):
        from edgeseek.models.common import softmax
        xp = self.xp
        T, S = q.shape[2], k.shape[1]
        scores = xp.matmul(q, k[:, None].transpose(0, 1, 3, 2)) * scale  # (G, H, T, S)
        if T > 1:
            mask = xp.asarray(np.arange(S)[None, :] > (start + np.arange(T))[:, None])  # (T, S)
            scores = xp.where(mask, -np.inf, scores)
        return xp.matmul(softmax(scores), v[:, None])  # (G, H, T, dv)

    def pack(self, matrices, gguf=None) -> int:
        return sum(m.nbytes for m in matrices)  # in VRAM since load

    def warmup(self) -> None:
        """The CUDA module compiles when Kernels is made; the host's gather of a long prompt's CPU
        experts (_staged_copy) is compiled (or loaded from numba's cache) here, not by that prompt."""
        _gather_experts(np.zeros((2, 1, 1), np.uint8), np.zeros(1, np.int64), np.zeros((1, 1, 1), np.uint8))

    # --- the device ------------------------------------------------------------------------
    def memory(self) -> tuple[int, int]:
        """(free, total) bytes of the GPU's memory."""
        import cupy
        return tuple(int(v) for v in cupy.cuda.runtime.memGetInfo())

    def name(self) -> str:
        import cupy
        props = cupy.cuda.runtime.getDeviceProperties(cupy.cuda.Device().id)
        name = props["name"]
        return name.decode() if isinstance(name, bytes) else str(name)

    def used(self) -> int:
        """Bytes this process holds in VRAM: weights, caches, workspace (CuPy's pool)."""
        import cupy
        return int(cupy.get_default_memory_pool().total_bytes())


class DeviceExperts:
    """One routed-expert projection (gate, up or down) of one layer for the experts in VRAM:
    (E_gpu, N, row_bytes) blocks."""

    def __init__(self, backend, qtype, raw, shape: tuple[int, int], name: str):
        self.b, self.qtype, self.raw, self.shape, self.name = backend, qtype, raw, shape, name

    @property
    def expert_bytes(self) -> int:
        return self.raw.shape[1] * self.raw.shape[2]

    def ids(self, slots, x, x_stride: int | None = None, x_div: int = 1):
        """Row p // x_div of x through expert slots[p] -> (P, N), one launch; x_stride: floats from
        one row of x to the next (x then as the kernel reads it, else packed here)."""
        n, kk = self.shape
        p = len(slots)
        y = self.b.xp.empty((p, n), np.float32)
        if x_stride is None:
            x = self.b.xp.ascontiguousarray(x)
        self.b.kernels.mmv_ids(self.qtype, self.raw, self.raw.shape[-1], self.expert_bytes, slots, x, x_div, y, n,
                               kk, p, x_stride)
        return y

    def glu(self, up, slots, x, x_div: int = 1, shared=None, out=None):
        """silu(self @ x) * (up @ x) for row p // x_div of x through expert slots[p] -> (P, N) (in
        `out` where given): gate (self) and up in one launch where they share a format, else two and
        silu_mul. shared = (gate2, up2, h2): DeviceMatrix gate and up of this format (_fuses) whose
        silu-mul of each row of x goes to h2 (T, N2) in the same launch. The INT8_TYPES run on x as
        int8."""
        b = self.b
        n, kk = self.shape
        p = len(slots)
        if up.qtype != self.qtype or up.raw.shape != self.raw.shape:
            x = b.xp.ascontiguousarray(x)
            return b.kernels.silu_mul(self.ids(slots, x, x_div=x_div), up.ids(slots, x, x_div=x_div))
        q8 = b.q8_of(x) if self.qtype in INT8_TYPES else None
        x = b.xp.ascontiguousarray(x)
        h = b.xp.empty((p, n), np.float32) if out is None else out
        if shared is not None:
            g2, u2, h2 = shared
            shared = (g2.raw, u2.raw, g2.row_bytes, g2.shape[0], h2)
        if q8 is not None:
            b.kernels.glu_q8(self.qtype, self.raw, up.raw, self.raw.shape[-1], self.expert_bytes, slots, q8, x_div, h,
                             n, kk, p, len(x), shared)
        else:
            b.kernels.glu_ids(self.qtype, self.raw, up.raw, self.raw.shape[-1], self.expert_bytes, slots, x, x_div, h,
                              n, kk, p, shared)
        return h

    def down(self, slots, h, weights, add=None, shared=None, res=None, q8=None):
        """Each token's pairs (T * used rows of h, slots, weights (T, used)) through this projection,
        weighted and summed per token (+ add) -> (T, N), one launch; shared = (down2, h2): plus
        down2 @ h2[t] (a DeviceMatrix of this format, or on int8 activations of a MIXED_DOWN pair's
        other format: _fuses), then res, in the same launch. The INT8_TYPES run on h (and h2) as int8:
        q8 = (h's, h2's) where the caller quantized them, else quantized here."""
        b = self.b
        t, used = weights.shape
        n, kk = self.shape
        xp = b.xp
        y = xp.empty((t, n), np.float32)
        h = xp.ascontiguousarray(h)
        weights = xp.ascontiguousarray(weights, dtype=np.float32)
        if res is not None:
            res = xp.ascontiguousarray(res.reshape(t, n), dtype=np.float32)
        int8 = (self.qtype in INT8_TYPES and b.int8 and kk % 32 == 0
                and (shared is None or shared[1].shape[-1] % 32 == 0))
        if int8:
            if q8 is None:
                q8 = (b.q8_of(h), None if shared is None else b.q8_of(shared[1]))
            d2 = None if shared is None else shared[0]
            two = None if d2 is None else (d2.qtype, d2.raw, d2.row_bytes, d2.shape[1], q8[1])
            b.kernels.down_q8(self.qtype, self.raw, self.raw.shape[-1], self.expert_bytes, slots, q8[0], weights, add,
                              y, n, kk, t, used, two, res)
            return y
        if shared is not None:
            d2, h2 = shared
            assert d2.qtype == self.qtype, "a shared down of another format runs on int8 activations only"
            shared = (d2.raw, d2.row_bytes, d2.shape[1], h2)
        b.kernels.down_ids(self.qtype, self.raw, self.raw.shape[-1], self.expert_bytes, slots, h, weights, add, y, n,
                           kk, t, used, shared, res)
        return y

    def dense(self):
        """The whole stack as float32 (E, N, K), made once (per-head matrices in prompts)."""
        d = getattr(self, "_dense", None)
        if d is None:
            e = self.raw.shape[0]
            n, k = self.shape
            d = self.b.xp.empty((e, n, k), np.float32)
            flat = self.raw.reshape(e * n, -1)
            self.b.kernels.dequant(self.qtype, flat, flat.shape[-1], None, e * n, k, d)
            self._dense = d
        return d


class TieredExperts:
    """The routed experts in three tiers: those the GPU plan chose in VRAM, every other one with
    the CPU's store (RAM, or read from the file under --ram-budget). Counting, the usage profile
    and the CPU tier's statistics are the CPU store's; the split of each step's pairs is added."""

    def __init__(self, backend, gguf, cpu_store, plan):
        from .cpu import CPUBackend
        self.cpu = CPUBackend()
        self.cpu_store = cpu_store
        self.n_expert = cpu_store.n_expert
        self._slots: dict[int, np.ndarray] = {}
        self._device: dict[int, tuple[DeviceExperts, DeviceExperts, DeviceExperts]] = {}
        self.vram_bytes = 0
        self.pairs_gpu = self.pairs_cpu = 0  # router choices served by each tier, since the last stats
        for layer, tensors in cpu_store.tensors.items():
            chosen = plan.on_gpu.get(layer, np.zeros(0, np.int64))
            slots = np.full(self.n_expert, -1, np.int64)
            slots[chosen] = np.arange(len(chosen))
            self._slots[layer] = slots
            if len(chosen):
                triple = []
                for t in tensors:
                    _format_check(gguf, t)
                    raw = t.raw if len(chosen) == self.n_expert else t.raw[chosen]
                    d = backend.upload(raw)
                    self.vram_bytes += int(d.nbytes)
                    triple.append(DeviceExperts(backend, t.qtype, d, t.shape[1:], t.name))
                    gguf.release_pages(t)
                self._device[layer] = tuple(triple)

    @property
    def counts(self):
        return self.cpu_store.counts

    def slots(self, layer: int) -> np.ndarray:
        return self._slots[layer]

    def layers(self):
        return self._slots.keys()

    def all_on_device(self, layer: int) -> bool:
        """Every expert of the layer in VRAM, in id order (a slot is the expert's id)."""
        d = self._device.get(layer)
        return d is not None and d[0].raw.shape[0] == self.n_expert

    def device(self, layer: int):
        return self._device[layer]

    def begin_step(self) -> None:
        self.cpu_store.begin_step()

    def count(self, layer: int, ids) -> None:
        self.cpu_store.count(layer, ids)
        n_gpu = int((self._slots[layer][np.asarray(ids)] >= 0).sum())
        self.pairs_gpu += n_gpu
        self.pairs_cpu += np.asarray(ids).size - n_gpu

    def count_hist(self, layer: int, hist: np.ndarray) -> None:
        """A prompt's pairs of one layer as counts per expert (E,), all served from VRAM."""
        self.cpu_store.counts[layer] += hist
        self.pairs_gpu += int(hist.sum())

    def count_layers(self, layers: list[int], ids: np.ndarray) -> None:
        """One token's choices in several layers: ids (len(layers), k), all served from VRAM."""
        np.add.at(self.cpu_store.counts, (np.asarray(layers)[:, None], ids), 1)
        self.pairs_gpu += ids.size

    def take_counts(self) -> np.ndarray:
        return self.cpu_store.take_counts()

    def cpu_part(self, x: np.ndarray, ids: np.ndarray, weights: np.ndarray, mask: np.ndarray, layer: int) -> np.ndarray:
        """sum over the masked (token, slot) pairs of weight * expert(x[token]), on the CPU -> (T, D)
        (the pairs counted already: count). A decode step: the token's CPU experts in two kernel
        calls (experts_rows), their weighted sum one product, without the CPU path's bookkeeping
        (950 -> 862 us a V2-Lite layer's host part on 2 threads), its moe where a store reading from
        disk still has reads pending; several tokens expert by expert, each with its rows (measured
        faster than moe's runs of one row per pair: 87 against 111 ms for a 512-token prompt's 60%
        of a V2-Lite layer's pairs on 2 threads)."""
        if len(x) == 1:  # a decode step, between two graphs of a captured step: no bookkeeping
            sel = np.flatnonzero(mask[0])
            groups = list(self.cpu_store.fetch_groups(layer, ids[0, sel]))
            if len(groups) == 1:  # every expert at hand (a store reading from disk yields a group a read)
                js = np.array([j for j, _ in groups[0]])
                ys = self.cpu.experts_rows(x, [t for _, t in groups[0]], np.zeros(len(js), np.int64))
                if ys is not None:
                    return (weights[0, sel[js]] @ ys)[None]
            return moe_math.moe(x, ids[:, sel], weights[:, sel], self.cpu_store, layer, self.cpu, count=False)
        out = np.zeros_like(x)
        tok, which = np.nonzero(mask)
        experts = np.unique(ids[tok, which])
        for group in self.cpu_store.fetch_groups(layer, experts):
            for j, (gate, up, down) in group:
                sel = ids[tok, which] == experts[j]
                t_e, c_e = tok[sel], which[sel]
                out[t_e] += ffn(x[t_e], gate, up, down) * weights[t_e, c_e][:, None]
        return out

    def pack(self, gguf=None) -> int:
        return self.vram_bytes

    def pack_cpu(self) -> int:
        """Put the CPU tier's experts that a cache did not give (packed_cache.attach) into the CPU
        kernels' layout now, as llama.cpp repacks its CPU weights at load, rather than at the first
        tokens that meet them (a long prompt's pairs run on the GPU: it packs none of them); on
        numba's thread-safe threading layers, with its threads. Bytes packed."""
        from edgeseek.expert_store import MmapExpertStore
        if not isinstance(self.cpu_store, MmapExpertStore):
            return 0  # a store reading from disk packs each expert as it reads it
        todo = [m for layer, slots in self._slots.items()
                for triple in self.cpu_store.experts(layer, np.flatnonzero(slots < 0))
                for m in triple if m._packed is None]
        if not todo:
            return 0
        import numba
        try:
            safe = numba.threading_layer() in ("omp", "tbb")  # packers with a parallel loop, from threads
        except ValueError:  # no parallel kernel has run yet
            safe = False
        from concurrent.futures import ThreadPoolExecutor
        with ThreadPoolExecutor(numba.get_num_threads() if safe else 1) as pool:
            list(pool.map(lambda m: m.packed, todo))
        return sum(m.nbytes for m in todo)

    def prefetch(self, layer: int, ids) -> None:
        pass

    def stats(self) -> dict:
        s = dict(self.cpu_store.stats())
        s.update(vram_expert_bytes=self.vram_bytes, expert_pairs_gpu=self.pairs_gpu, expert_pairs_cpu=self.pairs_cpu)
        self.pairs_gpu = self.pairs_cpu = 0
        return s

    def close(self) -> None:
        self.cpu_store.close()



GATHER_PIECE = 1 << 18  # bytes one thread copies at a time (_gather_experts)


@njit(parallel=True, cache=True)
def _gather_experts(src, ids, dst):
    # dst[i] = src[ids[i]]: (E, rows, row bytes) uint8 blocks of the experts ids, copied as runs of
    # GATHER_PIECE bytes of the flat arrays in parallel (a run of one dimension is a plain copy: a
    # row or an expert as a 2-D slice copies byte by byte, 4-5 GB/s on 16 threads against ~50)
    per = src.shape[1] * src.shape[2]
    s, d = src.reshape(src.shape[0] * per), dst.reshape(dst.shape[0] * per)
    pieces = (per + GATHER_PIECE - 1) // GATHER_PIECE
    for job in prange(len(ids) * pieces):
        i, a = job // pieces, job % pieces * GATHER_PIECE
        b = min(per, a + GATHER_PIECE)
        d[i * per + a:i * per + b] = s[ids[i] * per + a:ids[i] * per + b]


class _SplitLayer:
    """A split layer's decode buffers (_split_step), made once: the choices as the router writes them
    (ids, then w's float32 bits), page-locked host copies of the token's row and the choices, the
    CPU's sum on the host and on the device; for a layer with experts in VRAM each expert's slot
    there (0 for the CPU's) and whether it is there (1.0 or 0.0). `run` is the host's part."""

    def __init__(self, b, store, layer: int, d: int, n: int):
        self.store, self.layer, self.n = store, layer, n
        self.choice = b.persistent(np.zeros(2 * n, np.int32))
        self.ids, self.w = self.choice[:n].reshape(1, n), self.choice[n:].view(np.float32).reshape(1, n)
        self.out = b.persistent(np.zeros((1, d), np.float32))
        self.host_x, self.host_choice, self.host_out = (
            b.pinned((1, d), np.float32), b.pinned(2 * n, np.int32), b.pinned((1, d), np.float32))
        slots = store.slots(layer)
        on = slots >= 0
        self.table = self.on_gpu = None
        if on.any():
            self.table = b.persistent(np.where(on, slots, 0).astype(np.int32))
            self.on_gpu = b.persistent(on.astype(np.float32))

    def run(self) -> None:
        """The CPU's experts of the token: counted, then those not in VRAM computed into host_out."""
        n, store = self.n, self.store
        ids = self.host_choice[:n].astype(np.int64).reshape(1, n)
        w = self.host_choice[n:].view(np.float32).reshape(1, n)
        store.count(self.layer, ids)
        on_cpu = store.slots(self.layer)[ids] < 0
        if on_cpu.any():
            self.host_out[...] = store.cpu_part(self.host_x, ids, w, on_cpu, self.layer)
        else:
            self.host_out[...] = 0


class _DecodeGraph:
    """One sequence's decode step captured as CUDA graphs: token and position in device buffers,
    every intermediate in a memory pool of its own (kept with the graphs, so that nothing else is
    ever placed where a replay writes), the logits and each layer's expert choices read back after
    a replay. A step whose layers run experts on the CPU is a chain: a graph up to each such layer's
    wait for the host, the host's part (cut), the next graph."""

    def __init__(self, backend, model, cache):
        import cupy
        self.b, self.model, self.cache = backend, model, cache
        xp = backend.xp
        self.inputs = xp.zeros(2, np.int32)  # token and position: one copy to the device per step
        self.tok, self.pos = self.inputs[0:1], self.inputs[1:2]
        self.pool = cupy.cuda.MemoryPool()
        self.stream = cupy.cuda.Stream(non_blocking=True)
        c = model.config
        self.ids = xp.zeros((c.n_layer, max(1, getattr(c, "n_expert_used", 0))), np.int32)  # each layer's choice
        self.moe_layers: list[int] = []
        self.graphs: list = []  # the chain's graphs, replayed in order
        self.host_calls: list = []  # after graph i: whether the host waits for it, what it runs then
        self.capturing = False
        self.logits = None

    def routed(self, layer: int):
        """The step's buffer (1, k) for a layer's expert ids, read after each replay (asked for only
        while the step is recorded)."""
        self.moe_layers.append(layer)
        return self.ids[layer:layer + 1]

    def cut(self, wait: bool = True, fn=None) -> None:
        """While capturing: the graph so far ends here and the capture goes on into the next graph;
        after its replay the host waits for it (wait), then runs fn (while the next graph runs if
        the host did not wait: fn's own graph is the one after)."""
        self.graphs.append(self.stream.end_capture())
        self.host_calls.append((wait, fn))
        self.stream.begin_capture()

    def _record(self, pos: int):
        """Run the step eagerly (warm-up), then under capture, with the input buffers as written."""
        import cupy
        self.b._step = self
        try:
            with cupy.cuda.using_allocator(self.pool.malloc), self.stream:
                self.model.step(self.tok, np.array([pos]), self.cache)  # compiles, fills the pool
                self.stream.synchronize()
                self.moe_layers = []  # the layers the captured step routes, not the warm-up's
                self.stream.begin_capture()
                self.capturing = True
                try:
                    self.logits = self.model.step(self.tok, np.array([pos]), self.cache)
                finally:
                    self.capturing = False
                    self.graphs.append(self.stream.end_capture())
        finally:
            self.b._step = None

    def run(self, token: int, pos: int) -> np.ndarray:
        if not self.graphs:
            import cupyx
            self.inputs.set(np.array([token, pos], np.int32), stream=self.stream)
            self._record(pos)
            # page-locked copies of what a replay reads and leaves for the host: copied
            # asynchronously, then one synchronization
            self.host_inputs = cupyx.empty_pinned(2, np.int32)
            self.host_logits = cupyx.empty_pinned(self.logits.shape, np.float32)
            self.host_ids = cupyx.empty_pinned(self.ids.shape, np.int32)
        self.host_inputs[0], self.host_inputs[1] = token, pos
        self.inputs.set(self.host_inputs, stream=self.stream)
        for g, (wait, fn) in zip(self.graphs, self.host_calls):
            g.launch(self.stream)
            if wait:
                self.stream.synchronize()
            if fn is not None:
                fn()
        self.graphs[-1].launch(self.stream)
        self.logits.get(stream=self.stream, out=self.host_logits, blocking=False)
        store = getattr(self.model, "experts", None)
        counted = store is not None and self.moe_layers
        if counted:
            self.ids.get(stream=self.stream, out=self.host_ids, blocking=False)
        self.stream.synchronize()
        if counted:
            store.count_layers(self.moe_layers, self.host_ids[self.moe_layers])
        return self.host_logits.copy()

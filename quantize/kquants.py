"""Pieces shared by the K-quant formats (Q4_K, Q5_K, Q6_K): llama.cpp's rounding and scale search,
fp16 conversion inside numba, the block quantizer of Q4_K and Q5_K, and the prompt kernels' dot
products over unpacked levels.

Source: llama.cpp ggml/src/ggml-quants.c (nearest_int, make_qkx2_quants, make_qx_quants,
get_scale_min_k4, quantize_row_q4_K_ref, quantize_row_q5_K_ref). llama.cpp builds that file
without FMA contraction or fast-math, so every float32 operation below keeps C's order; numba
compiles without fast-math, so no fusing happens.
"""
from __future__ import annotations

import math

import numpy as np
from numba import njit, prange

QK_K = 256  # values per super-block

F32 = np.float32
GROUP_MAX_EPS = F32(1e-15)


# --- fp16 <-> fp32 (numba has no float16) ----------------------------------------------------


@njit(cache=True, inline="always")
def f16_to_f32(h):
    """IEEE half bits (uint16) -> float32, exact."""
    h = np.int64(h)
    sign = F32(-1.0) if h & 0x8000 else F32(1.0)
    exp = (h >> 10) & 0x1F
    mant = h & 0x3FF
    if exp == 0:
        return sign * F32(math.ldexp(mant, -24))
    if exp == 31:
        return sign * F32(np.inf) if mant == 0 else F32(np.nan)
    return sign * F32(math.ldexp(mant | 0x400, exp - 25))


@njit(cache=True, inline="always")
def f32_to_f16(f):
    """float32 -> IEEE half bits, round to nearest even (GGML_FP32_TO_FP16, numpy's astype)."""
    a = abs(np.float64(f))  # exact
    sign = 0x8000 if math.copysign(1.0, f) < 0 else 0
    if a != a:
        return np.uint16(0x7E00 | sign)
    if a >= 65520.0:  # rounds up to infinity
        return np.uint16(0x7C00 | sign)
    if a < 6.103515625e-05:  # below 2**-14: subnormal, units of 2**-24
        return np.uint16(sign | int(np.rint(a * 16777216.0)))
    _, e2 = math.frexp(a)  # a = m * 2**e2, m in [0.5, 1)
    e = e2 - 1
    m = int(np.rint(math.ldexp(a, 10 - e)))  # in [1024, 2048]; 2048 carries into the exponent
    return np.uint16(sign | (((e + 15) << 10) + m - 1024))


@njit(cache=True, inline="always")
def nearest_int(f):
    """llama.cpp's nearest_int: adds 1.5 * 2**23 in float32, i.e. round half to even, for
    |f| <= 4194303 (the range llama.cpp asserts)."""
    return int(np.rint(f))


# --- scale search (make_qkx2_quants, make_qx_quants) -------------------------------------------


@njit(cache=True)
def make_qkx2_quants(nmax, x, weights, L, Laux, rmin, rdelta, nstep):
    """Scale and min of x (n,) for levels 0..nmax, fitting x ~ scale * L - min by weighted least
    squares over nstep + 1 trial scales. Writes L (uint8); returns (scale, min). use_mad = false."""
    n = x.shape[0]
    xmin = x[0]
    xmax = x[0]
    sum_w = weights[0]
    sum_x = sum_w * x[0]
    for i in range(1, n):
        if x[i] < xmin:
            xmin = x[i]
        if x[i] > xmax:
            xmax = x[i]
        w = weights[i]
        sum_w += w
        sum_x += w * x[i]
    if xmin > 0:
        xmin = F32(0.0)
    if xmax == xmin:
        for i in range(n):
            L[i] = 0
        return F32(0.0), -xmin
    fnmax = F32(nmax)
    iscale = fnmax / (xmax - xmin)
    scale = F32(1.0) / iscale
    best_error = F32(0.0)
    for i in range(n):
        q = min(max(nearest_int(iscale * (x[i] - xmin)), 0), nmax)
        L[i] = q
        diff = scale * F32(q) + xmin - x[i]
        best_error += weights[i] * (diff * diff)
    for step in range(nstep + 1):
        iscale = (rmin + rdelta * F32(step) + fnmax) / (xmax - xmin)
        sum_l = F32(0.0)
        sum_l2 = F32(0.0)
        sum_xl = F32(0.0)
        for i in range(n):
            q = min(max(nearest_int(iscale * (x[i] - xmin)), 0), nmax)
            Laux[i] = q
            w = weights[i]
            fl = F32(q)
            sum_l += w * fl
            sum_l2 += w * fl * fl
            sum_xl += w * fl * x[i]
        D = sum_w * sum_l2 - sum_l * sum_l
        if D > 0:
            this_scale = (sum_w * sum_xl - sum_x * sum_l) / D
            this_min = (sum_l2 * sum_x - sum_l * sum_xl) / D
            if this_min > 0:
                this_min = F32(0.0)
                this_scale = sum_xl / sum_l2
            cur_error = F32(0.0)
            for i in range(n):
                diff = this_scale * F32(Laux[i]) + this_min - x[i]
                cur_error += weights[i] * (diff * diff)
            if cur_error < best_error:
                for i in range(n):
                    L[i] = Laux[i]
                best_error = cur_error
                scale = this_scale
                xmin = this_min
    return scale, -xmin


@njit(cache=True)
def make_qx_quants(nmax, x, L):
    """Symmetric scale of x (n,) for levels -nmax..nmax-1 weighted by x**2 (rmse_type 1, no
    importance): 19 trial scales around nmax / max|x|. Writes L = level + nmax; returns scale."""
    n = x.shape[0]
    xmax = F32(0.0)
    amax = F32(0.0)
    for i in range(n):
        ax = abs(x[i])
        if ax > amax:
            amax = ax
            xmax = x[i]
    if amax < GROUP_MAX_EPS:
        for i in range(n):
            L[i] = 0
        return F32(0.0)
    fnmax = F32(nmax)
    iscale = -fnmax / xmax
    sumlx = F32(0.0)
    suml2 = F32(0.0)
    for i in range(n):
        q = min(max(nearest_int(iscale * x[i]), -nmax), nmax - 1)
        L[i] = q + nmax
        w = x[i] * x[i]
        fl = F32(q)
        sumlx += w * x[i] * fl
        suml2 += w * fl * fl
    scale = sumlx / suml2 if suml2 != 0 else F32(0.0)
    best = scale * sumlx
    for step in range(-9, 10):
        if step == 0:
            continue
        iscale = -(fnmax + F32(0.1) * F32(step)) / xmax
        sumlx = F32(0.0)
        suml2 = F32(0.0)
        for i in range(n):
            q = min(max(nearest_int(iscale * x[i]), -nmax), nmax - 1)
            w = x[i] * x[i]
            fl = F32(q)
            sumlx += w * x[i] * fl
            suml2 += w * fl * fl
        if suml2 > 0 and sumlx * sumlx > best * suml2:
            for i in range(n):
                L[i] = min(max(nearest_int(iscale * x[i]), -nmax), nmax - 1) + nmax
            scale = sumlx / suml2
            best = scale * sumlx
    return scale


# --- 6-bit scales and mins of Q4_K / Q5_K (12 bytes for 8 sub-blocks) --------------------------


@njit(cache=True, inline="always")
def scale_min_k4(j, s):
    """Scale and min of sub-block j (0..7) from the 12 packed bytes s (get_scale_min_k4)."""
    if j < 4:
        return s[j] & 63, s[j + 4] & 63
    return (s[j + 4] & 0xF) | ((s[j - 4] >> 6) << 4), (s[j + 4] >> 4) | ((s[j] >> 6) << 4)


@njit(cache=True)
def pack_scale_min_k4(ls, lm, s):
    """Inverse of scale_min_k4: 6-bit scales ls (8,) and mins lm (8,) -> 12 bytes s."""
    for j in range(12):
        s[j] = 0
    for j in range(8):
        if j < 4:
            s[j] = ls[j]
            s[j + 4] = lm[j]
        else:
            s[j + 4] = (ls[j] & 0xF) | ((lm[j] & 0xF) << 4)
            s[j - 4] |= (ls[j] >> 4) << 6
            s[j] |= (lm[j] >> 4) << 6


# --- quantize Q4_K / Q5_K (quantize_row_q4_K_ref / quantize_row_q5_K_ref, no importance matrix) --


@njit(cache=True)
def _scale_min_block(x, y, L, Laux, weights, scales, mins, ls, lm, nmax, rmin, nstep):
    # x (256,) float32 -> y (type_size,) uint8: d, dmin, the 8 packed 6-bit scales and mins, then
    # the levels 0..nmax: their low four bits as nibbles in the last 128 bytes (byte l of group g:
    # values 64g + l, 64g + 32 + l), their fifth bits (nmax 31) in bytes 16..47 (bit j of byte l:
    # value 32j + l). The two formats differ in nmax, rmin and nstep only.
    max_scale = F32(0.0)
    max_min = F32(0.0)
    for j in range(8):
        xs = x[32 * j: 32 * j + 32]
        sum_x2 = F32(0.0)
        for l in range(32):
            sum_x2 += xs[l] * xs[l]
        av_x = np.sqrt(sum_x2 / F32(32.0))
        for l in range(32):
            weights[l] = av_x + abs(xs[l])
        scales[j], mins[j] = make_qkx2_quants(nmax, xs, weights, L[32 * j: 32 * j + 32], Laux,
                                              rmin, F32(0.1), nstep)
        if scales[j] > max_scale:
            max_scale = scales[j]
        if mins[j] > max_min:
            max_min = mins[j]
    inv_scale = F32(63.0) / max_scale if max_scale > 0 else F32(0.0)
    inv_min = F32(63.0) / max_min if max_min > 0 else F32(0.0)
    for j in range(8):
        ls[j] = min(63, nearest_int(inv_scale * scales[j]) & 0xFF)  # C stores into uint8 first
        lm[j] = min(63, nearest_int(inv_min * mins[j]) & 0xFF)
    pack_scale_min_k4(ls, lm, y[4:16])
    hd = f32_to_f16(max_scale / F32(63.0))
    hm = f32_to_f16(max_min / F32(63.0))
    y[0], y[1], y[2], y[3] = hd & 0xFF, hd >> 8, hm & 0xFF, hm >> 8
    d = f16_to_f32(hd)
    dmin = f16_to_f32(hm)
    for j in range(8):
        sc, m = scale_min_k4(j, y[4:16])
        dj = d * F32(sc)
        if dj == 0:
            continue  # keeps the levels make_qkx2_quants chose, as llama.cpp does
        dm = dmin * F32(m)
        for l in range(32):
            L[32 * j + l] = min(max(nearest_int((x[32 * j + l] + dm) / dj), 0), nmax)
    qs = y.shape[0] - 128
    if nmax > 15:
        y[16:48] = 0
    for g in range(4):
        for l in range(32):
            lo, hi = L[64 * g + l], L[64 * g + 32 + l]
            y[qs + 32 * g + l] = (lo & 0xF) | ((hi & 0xF) << 4)
            if nmax > 15:
                y[16 + l] |= ((lo >> 4) << (2 * g)) | ((hi >> 4) << (2 * g + 1))


@njit(parallel=True, cache=True)
def quantize_scale_min(x, out, nmax, rmin, nstep):
    """x (n, 256) float32 -> out (n, 144 | 176) uint8: Q4_K blocks (nmax 15, rmin -1, nstep 20) or
    Q5_K blocks (nmax 31, rmin -0.5, nstep 15), bit-identical to llama.cpp's reference quantizers."""
    n = x.shape[0]
    for c in prange((n + 15) // 16):  # 16 blocks per task: the scratch arrays once per task
        L = np.empty(QK_K, np.uint8)
        Laux = np.empty(32, np.uint8)
        weights = np.empty(32, np.float32)
        scales = np.empty(8, np.float32)
        mins = np.empty(8, np.float32)
        ls = np.empty(8, np.uint8)
        lm = np.empty(8, np.uint8)
        for i in range(16 * c, min(16 * c + 16, n)):
            _scale_min_block(x[i], out[i], L, Laux, weights, scales, mins, ls, lm, nmax, rmin, nstep)


# --- prompt kernels: levels unpacked once per super-block, reused for every token ------------


@njit(cache=True)
def dot_levels32(lv, sc, x, isum):
    """isum[r] = sum_j sc[j, r] * sum_l lv[32j + l, r] * x[32j + l]: one super-block of unpacked
    levels lv (256, tile) uint8 with 8 sub-blocks of 32, scales sc (8, tile), x (256,) int8.
    The sums run as loops of 8 so that LLVM unrolls them and vectorizes across the rows."""
    isum[:] = 0
    for j in range(8):
        w = lv[32 * j: 32 * j + 32]
        xs = x[32 * j: 32 * j + 32]
        for r in range(isum.shape[0]):
            s = 0
            for l in range(0, 8):
                s += np.int32(w[l, r]) * np.int32(xs[l])
            for l in range(8, 16):
                s += np.int32(w[l, r]) * np.int32(xs[l])
            for l in range(16, 24):
                s += np.int32(w[l, r]) * np.int32(xs[l])
            for l in range(24, 32):
                s += np.int32(w[l, r]) * np.int32(xs[l])
            isum[r] += np.int32(s) * np.int32(sc[j, r])


@njit(cache=True)
def dot_levels16(lv, sc, x, isum):
    """As dot_levels32 for 16 sub-blocks of 16 (Q6_K), two sub-blocks at a time."""
    isum[:] = 0
    for j in range(0, 16, 2):
        w = lv[16 * j: 16 * j + 32]
        xs = x[16 * j: 16 * j + 32]
        for r in range(isum.shape[0]):
            s0 = 0
            s1 = 0
            for l in range(0, 8):
                s0 += np.int32(w[l, r]) * np.int32(xs[l])
                s1 += np.int32(w[16 + l, r]) * np.int32(xs[16 + l])
            for l in range(8, 16):
                s0 += np.int32(w[l, r]) * np.int32(xs[l])
                s1 += np.int32(w[16 + l, r]) * np.int32(xs[16 + l])
            isum[r] += np.int32(s0) * np.int32(sc[j, r]) + np.int32(s1) * np.int32(sc[j + 1, r])

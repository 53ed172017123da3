// The device side of a decode step that runs as one CUDA graph: the router, the latent KV cache's
// store and MLA's absorbed attention read the token's position from device memory, so that the
// graph captured at one position replays at every later one. Compiled after cuda_kernels.cu (one
// NVRTC module: its typedefs and h2f / f2h are used here).
//
// route_topk(const float* logits, const float* bias, int E, int k, int gating, int n_group,
//            int n_group_used, int norm, float scale, int* ids, float* w)
//     models/moe.py's route() for T rows of router logits (T, E): probabilities by softmax
//     (gating 1) or sigmoid (2); selection scores + bias (NULL: none); group-limited (the n_group_used
//     groups of highest top-2 sum); the top k (ties: lower id first); weights the unbiased
//     probabilities, normalized to sum 1 when norm, times scale unless scale is 0 or 1.
//     block (256, 1, 1), grid (T, 1, 1); E <= 1024, n_group <= 64, k <= 32.
// router_route(const uchar* W, ll row_bytes, const float* x, float* logits, int E, int D,
//              const float* bias, int k, int gating, int norm, float scale, unsigned* counter, int* ids,
//              float* w)
//     One token's router and route_topk in one launch: logits (E,) = W (E, D) float32 @ x (D,) as
//     mmv1_f32 computes them, then the last block to finish (counter: zero before the launch and
//     left zero) chooses as route_topk does (the same ids and weights, to the bit). E <= 256, no
//     expert groups, k <= 32. block (128, 1, 1), grid (ceil(E / 4), 1, 1).
// norm_router_route(const float* x, const float* nw, float eps, float* y, char* xq, float2* xs,
//                   W, ll row_bytes, logits, E, D, bias, k, gating, norm, scale, counter, ids, w)
//     router_route on the rms_norm of the layer's input x (D,) by nw (eps), which every block makes
//     for itself (stage_q8); the first block also writes it, y (D,) float32 and q8_1 (xq, xs), for
//     the experts' products: the norm costs no launch of its own. D <= 8192, a multiple of 32; block
//     and grid as router_route's.
// store_row_f16(const float* src, u16* dst, const int* pos, int n)
//     dst[pos[0] * n + i] = fp16(src[i]) for i < n: the new token's cache entry.
//     block (256, 1, 1), grid (ceil(n / 256), 1, 1).
// mla_decode(const float* q_lat, const float* q_pe, const u16* cache_c, const u16* cache_kpe,
//            const int* pos, float* scores, float* part, int C, int R, int s_max, float scale,
//            unsigned* counters, float* out)
//     One new token against positions 0..pos[0] of one layer's cache: cache_c (s_max, C) and
//     cache_kpe (s_max, R) fp16; q_lat (H, C), q_pe (H, R) float32; scores (H, s_max) scratch;
//     out (H, C) = softmax(scale * (q_lat c^T + q_pe kpe^T)) c, split over the positions; the last
//     split of a head to finish merges the head's parts (counters (H,) uint32, zero before the
//     launch and left zero). C a multiple of 8 and C + R <= 1024. block (256, 1, 1),
//     grid (H, MLA_SPLITS, 1); part (H, MLA_SPLITS, C + 2) scratch.
// mla_entry(const float* q, const float* kv, const float* norm_w, float eps, const float* cos_t,
//           const float* sin_t, const int* pos, int neox, int dim, int H, int N, int R, int C,
//           float* q_pe, u16* cache_c, u16* cache_kpe)
//     A new token's cache entry and rotary query, as rope_f32, rms_norm_f32 and store_row_f16 leave
//     them, in one launch: block h < H ropes the last R values of head h of q (H, N + R) into
//     q_pe (H, R); block H normalizes the latent kv[0:C] by norm_w into cache_c[pos[0]] (s_max, C)
//     and ropes kv[C:C + R] into cache_kpe[pos[0]] (s_max, R), fp16. block (256, 1, 1),
//     grid (H + 1, 1, 1).
//     (store_kv_f16, gqa_decode and rope_f32 at the end of this file.)

#define NEG_INF __int_as_float(0xff800000)

__device__ __forceinline__ float warp_max(float v) {
    for (int o = 16; o > 0; o >>= 1) v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, o));
    return v;
}

__device__ __forceinline__ float warp_add(float v) {
    for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
    return v;
}

// all 256 threads of the block call it; red holds 8 floats
__device__ __forceinline__ float block_max(float v, float* red) {
    v = warp_max(v);
    if ((threadIdx.x & 31) == 0) red[threadIdx.x >> 5] = v;
    __syncthreads();
    float r = red[0];
    for (int i = 1; i < 8; ++i) r = fmaxf(r, red[i]);
    __syncthreads();
    return r;
}

__device__ __forceinline__ float block_add(float v, float* red) {
    v = warp_add(v);
    if ((threadIdx.x & 31) == 0) red[threadIdx.x >> 5] = v;
    __syncthreads();
    float r = 0.0f;
    for (int i = 0; i < 8; ++i) r += red[i];
    __syncthreads();
    return r;
}

// exp(sc[s] - max) in place over a split's positions s0..s1-1 -> the split's max and sum of
// exponentials. All 256 threads call it; its barriers also publish sc[] to the whole block.
__device__ __forceinline__ void split_softmax(float* sc, int s0, int s1, float* red, float& m, float& sum) {
    m = NEG_INF;
    for (int s = s0 + threadIdx.x; s < s1; s += 256) m = fmaxf(m, sc[s]);
    m = block_max(m, red);
    sum = 0.0f;
    for (int s = s0 + threadIdx.x; s < s1; s += 256) {
        const float e = expf(sc[s] - m);
        sc[s] = e;
        sum += e;
    }
    sum = block_add(sum, red);
}

#define MLA_SPLITS 16  // blocks per head of the split decode attention
#define MLA_VECS 4     // 16-byte vectors of a latent row per lane (C <= 32 * 4 * 8 = 1024)

// The merge of a head's splits: out (C) from part (MLA_SPLITS, C + 2) (running max, sum, values).
// Read through volatile: the other splits wrote their parts in this launch, from other blocks.
__device__ __forceinline__ void combine_splits(const float* part, float* __restrict__ out, int C) {
    const volatile float* p = part;
    float m = NEG_INF;
    for (int b = 0; b < MLA_SPLITS; ++b) m = fmaxf(m, p[b * (C + 2) + C]);
    float l = 0.0f;
    float f[MLA_SPLITS];
#pragma unroll
    for (int b = 0; b < MLA_SPLITS; ++b) {
        const float mb = p[b * (C + 2) + C];
        f[b] = mb == NEG_INF ? 0.0f : expf(mb - m);
        l += f[b] * p[b * (C + 2) + C + 1];
    }
    for (int i = threadIdx.x; i < C; i += 256) {
        float acc = 0.0f;
#pragma unroll
        for (int b = 0; b < MLA_SPLITS; ++b) acc += f[b] * p[b * (C + 2) + i];
        out[i] = acc / l;
    }
}

// Called by every thread of a split's block once its part is written: true in the last block of
// head h to get here (it then merges the head; the counter is back at 0 for the next launch).
__device__ __forceinline__ bool last_split(unsigned* counters, int h) {
    __shared__ unsigned ticket;
    __threadfence();  // this block's part is visible to the whole device before it is counted
    __syncthreads();
    if (threadIdx.x == 0) ticket = atomicAdd(counters + h, 1u);
    __syncthreads();
    if (ticket != MLA_SPLITS - 1) return false;
    __threadfence();
    if (threadIdx.x == 0) counters[h] = 0;
    return true;
}

// route_topk for E <= 256 experts without groups, by one warp: each lane holds the experts
// lane, lane + 32, ... in registers and the k rounds of argmax are warp shuffles (a block's k rounds
// of barriers took 5 us of a 2.2 ms decode step, 26 times).
#define ROUTE_HELD 8

__device__ __forceinline__ void route_warp(const float* __restrict__ logits, const float* __restrict__ bias, int E,
                                           int k, int gating, int norm, float scale, int* __restrict__ ids,
                                           float* __restrict__ w) {
    const int lane = threadIdx.x & 31;
    float p[ROUTE_HELD], sel[ROUTE_HELD];
    float m = NEG_INF;
#pragma unroll
    for (int i = 0; i < ROUTE_HELD; ++i) {
        const int e = lane + 32 * i;
        p[i] = e < E ? logits[e] : NEG_INF;
        m = fmaxf(m, p[i]);
    }
    if (gating == 1) {  // softmax, as models/common.softmax: exp(x - max) / sum
        m = warp_max(m);
        float s = 0.0f;
#pragma unroll
        for (int i = 0; i < ROUTE_HELD; ++i) {
            p[i] = lane + 32 * i < E ? expf(p[i] - m) : 0.0f;
            s += p[i];
        }
        s = warp_add(s);
#pragma unroll
        for (int i = 0; i < ROUTE_HELD; ++i) p[i] = p[i] / s;
    } else {
#pragma unroll
        for (int i = 0; i < ROUTE_HELD; ++i) p[i] = lane + 32 * i < E ? 1.0f / (1.0f + expf(-p[i])) : 0.0f;
    }
#pragma unroll
    for (int i = 0; i < ROUTE_HELD; ++i) {
        const int e = lane + 32 * i;
        sel[i] = e < E ? p[i] + (bias ? bias[e] : 0.0f) : NEG_INF;
    }
    float mine = 0.0f;  // lane j: the weight of round j's expert
    for (int j = 0; j < k; ++j) {  // k rounds of a warp argmax, lower id on ties
        float v = NEG_INF, pv = 0.0f;
        int vi = 0x7fffffff;
#pragma unroll
        for (int i = 0; i < ROUTE_HELD; ++i) {
            const int e = lane + 32 * i;
            if (e < E && (sel[i] > v || (sel[i] == v && e < vi))) { v = sel[i]; vi = e; pv = p[i]; }
        }
        for (int o = 16; o > 0; o >>= 1) {
            const float ov = __shfl_xor_sync(0xffffffffu, v, o);
            const int oi = __shfl_xor_sync(0xffffffffu, vi, o);
            const float op = __shfl_xor_sync(0xffffffffu, pv, o);
            if (ov > v || (ov == v && oi < vi)) { v = ov; vi = oi; pv = op; }
        }
        if (vi >= E) { vi = 0; pv = p[0]; pv = __shfl_sync(0xffffffffu, pv, 0); }  // fewer than k: never with a valid config
#pragma unroll
        for (int i = 0; i < ROUTE_HELD; ++i)
            if (lane + 32 * i == vi) sel[i] = NEG_INF;
        if (lane == j) mine = pv;
        if (lane == 0) ids[j] = vi;
    }
    if (norm) {
        float s = 0.0f;  // in round order, as the block path sums them
        for (int j = 0; j < k; ++j) s += __shfl_sync(0xffffffffu, mine, j);
        s = fmaxf(s, 6.103515625e-5f);
        mine = mine / s;
    }
    if (scale != 0.0f && scale != 1.0f) mine = mine * scale;
    if (lane < k) w[lane] = mine;
}

// The choice of router_route and norm_router_route, once every block's logits are written: the
// last block to get here (counter: zero before the launch and left zero) routes.
__device__ __forceinline__ void route_last(const float* logits, int E, const float* __restrict__ bias, int k,
                                           int gating, int norm, float scale, unsigned* __restrict__ counter,
                                           int* __restrict__ ids, float* __restrict__ w) {
    __shared__ unsigned ticket;
    __shared__ float all[32 * ROUTE_HELD];
    __threadfence();  // this block's logits are visible to the whole device before it is counted
    __syncthreads();
    if (threadIdx.x == 0) ticket = atomicAdd(counter, 1u);
    __syncthreads();
    if (ticket != gridDim.x - 1) return;
    __threadfence();
    const volatile float* v = logits;  // written by other blocks of this launch: not through the read-only path
    for (int e = threadIdx.x; e < E; e += ROW_THREADS) all[e] = v[e];
    __syncthreads();
    if (threadIdx.x < 32) route_warp(all, bias, E, k, gating, norm, scale, ids, w);
    if (threadIdx.x == 0) *counter = 0;
}

extern "C" __global__ void __launch_bounds__(ROW_THREADS, 8)
router_route(const u8* __restrict__ W, ll row_bytes, const float* __restrict__ x, float* __restrict__ logits, int E,
             int D, const float* __restrict__ bias, int k, int gating, int norm, float scale,
             unsigned* __restrict__ counter, int* __restrict__ ids, float* __restrict__ w) {
    mmv1<F32>(W, row_bytes, x, logits, E, D, nullptr, nullptr);
    route_last(logits, E, bias, k, gating, norm, scale, counter, ids, w);
}

#define NORM_ROUTE_MAX 8192  // D of norm_router_route: the normalized row in shared memory

extern "C" __global__ void __launch_bounds__(ROW_THREADS)
norm_router_route(const float* __restrict__ x, const float* __restrict__ nw, float eps, float* __restrict__ y,
                  u8* __restrict__ xq, f32x2* __restrict__ xs, const u8* __restrict__ W, ll row_bytes,
                  float* __restrict__ logits, int E, int D, const float* __restrict__ bias, int k, int gating,
                  int norm, float scale, unsigned* __restrict__ counter, int* __restrict__ ids,
                  float* __restrict__ w) {
    __shared__ __align__(16) float ys[NORM_ROUTE_MAX];
    const bool first = blockIdx.x == 0;
    prefetch_rows(W, row_bytes, blockIdx.x * MMV1_ROWS, MMV1_ROWS, E);
    stage_q8(x, nw, eps, D, ys, first ? xq : nullptr, first ? xs : nullptr);
    if (first)
        for (int i = threadIdx.x; i < D; i += ROW_THREADS) y[i] = ys[i];
    mmv1<F32>(W, row_bytes, ys, logits, E, D, nullptr, nullptr);
    route_last(logits, E, bias, k, gating, norm, scale, counter, ids, w);
}

extern "C" __global__ void __launch_bounds__(256)
route_topk(const float* __restrict__ logits, const float* __restrict__ bias, int E, int k, int gating, int n_group,
           int n_group_used, int norm, float scale, int* __restrict__ ids, float* __restrict__ w) {
    if (E <= 32 * ROUTE_HELD && n_group <= 1 && k <= 32) {
        if (threadIdx.x < 32)
            route_warp(logits + (ll)blockIdx.x * E, bias, E, k, gating, norm, scale, ids + blockIdx.x * k,
                       w + blockIdx.x * k);
        return;
    }
    __shared__ float probs[1024];
    __shared__ float sel[1024];
    __shared__ float red[8];
    __shared__ float best_v[8];
    __shared__ int best_i[8];
    __shared__ int keep[64];
    const int tid = threadIdx.x;
    logits += (ll)blockIdx.x * E;
    ids += blockIdx.x * k;
    w += blockIdx.x * k;

    if (gating == 1) {  // softmax, as models/common.softmax: exp(x - max) / sum
        float m = NEG_INF;
        for (int e = tid; e < E; e += 256) m = fmaxf(m, logits[e]);
        m = block_max(m, red);
        float s = 0.0f;
        for (int e = tid; e < E; e += 256) {
            float v = expf(logits[e] - m);
            probs[e] = v;
            s += v;
        }
        s = block_add(s, red);
        for (int e = tid; e < E; e += 256) probs[e] = probs[e] / s;
    } else {
        for (int e = tid; e < E; e += 256) probs[e] = 1.0f / (1.0f + expf(-logits[e]));
    }
    __syncthreads();
    for (int e = tid; e < E; e += 256) sel[e] = probs[e] + (bias ? bias[e] : 0.0f);
    __syncthreads();

    if (n_group > 1) {  // keep the n_group_used groups whose two best scores sum highest
        const int per = E / n_group;
        if (tid == 0) {
            float top2[64];
            for (int g = 0; g < n_group; ++g) {
                float a = NEG_INF, b = NEG_INF;
                for (int j = 0; j < per; ++j) {
                    float v = sel[g * per + j];
                    if (v > a) { b = a; a = v; } else if (v > b) { b = v; }
                }
                top2[g] = a + b;
                keep[g] = 0;
            }
            for (int r = 0; r < n_group_used; ++r) {
                int bi = -1;
                for (int g = 0; g < n_group; ++g)
                    if (!keep[g] && (bi < 0 || top2[g] > top2[bi])) bi = g;
                keep[bi] = 1;
            }
        }
        __syncthreads();
        for (int e = tid; e < E; e += 256)
            if (!keep[e / per]) sel[e] = NEG_INF;
        __syncthreads();
    }

    for (int j = 0; j < k; ++j) {  // k rounds of a block argmax, lower id on ties
        float v = NEG_INF;
        int vi = 0x7fffffff;
        for (int e = tid; e < E; e += 256)
            if (sel[e] > v || (sel[e] == v && e < vi)) { v = sel[e]; vi = e; }
        for (int o = 16; o > 0; o >>= 1) {
            float ov = __shfl_xor_sync(0xffffffffu, v, o);
            int oi = __shfl_xor_sync(0xffffffffu, vi, o);
            if (ov > v || (ov == v && oi < vi)) { v = ov; vi = oi; }
        }
        if ((tid & 31) == 0) { best_v[tid >> 5] = v; best_i[tid >> 5] = vi; }
        __syncthreads();
        if (tid == 0) {
            float bv = best_v[0];
            int bi = best_i[0];
            for (int i = 1; i < 8; ++i)
                if (best_v[i] > bv || (best_v[i] == bv && best_i[i] < bi)) { bv = best_v[i]; bi = best_i[i]; }
            if (bi >= E) bi = 0;  // fewer than k selectable experts: never with a valid config
            ids[j] = bi;
            w[j] = probs[bi];
            sel[bi] = NEG_INF;
        }
        __syncthreads();
    }
    if (tid == 0) {
        if (norm) {
            float s = 0.0f;
            for (int j = 0; j < k; ++j) s += w[j];
            s = fmaxf(s, 6.103515625e-5f);
            for (int j = 0; j < k; ++j) w[j] = w[j] / s;
        }
        if (scale != 0.0f && scale != 1.0f)
            for (int j = 0; j < k; ++j) w[j] = w[j] * scale;
    }
}

extern "C" __global__ void __launch_bounds__(256)
store_row_f16(const float* __restrict__ src, u16* __restrict__ dst, const int* __restrict__ pos, int n) {
    const int i = blockIdx.x * 256 + threadIdx.x;
    if (i < n) dst[(ll)pos[0] * n + i] = f2h(src[i]);
}

// Split over the cached positions (flash-decoding): block (h, b) of grid (H, MLA_SPLITS) takes
// positions b*chunk .. (b+1)*chunk - 1 of 0..pos[0] and leaves its running max, its sum of
// exponentials and its unnormalized output in part (H, MLA_SPLITS, C + 2); the last split of a
// head to finish merges the head's splits. Lanes read cache rows as 16-byte vectors (8 fp16 values).
extern "C" __global__ void __launch_bounds__(256)
mla_decode(const float* __restrict__ q_lat, const float* __restrict__ q_pe, const u16* __restrict__ cache_c,
           const u16* __restrict__ cache_kpe, const int* __restrict__ pos, float* __restrict__ scores,
           float* __restrict__ part, int C, int R, int s_max, float scale, unsigned* __restrict__ counters,
           float* __restrict__ o) {
    __shared__ float red[8];
    __shared__ float qs[1024];  // q_lat (C) then q_pe (R) of this head
    __shared__ __align__(16) float wsum[8 * MLA_VECS * 256];  // each warp's weighted latents (C <= 1024)
    const int h = blockIdx.x, b = blockIdx.y, tid = threadIdx.x, warp = tid >> 5, lane = tid & 31;
    const int S = pos[0] + 1;
    const int chunk = (S + MLA_SPLITS - 1) / MLA_SPLITS;
    const int s0 = b * chunk, s1 = min(S, s0 + chunk);
    float* out = part + ((ll)h * MLA_SPLITS + b) * (C + 2);
    for (int i = tid; i < C; i += 256) qs[i] = q_lat[(ll)h * C + i];
    for (int i = tid; i < R; i += 256) qs[C + i] = q_pe[(ll)h * R + i];
    __syncthreads();
    float* sc = scores + (ll)h * s_max;
    for (int s = s0 + warp; s < s1; s += 16) {  // a warp per cached position, two at a time
        const int s2 = min(s + 8, s1 - 1);  // the second (a repeat of the last where there is none)
        const u32x4* c = (const u32x4*)(cache_c + (ll)s * C);
        const u32x4* c2 = (const u32x4*)(cache_c + (ll)s2 * C);
        float acc = 0.0f, acc2 = 0.0f;
#pragma unroll 2
        for (int v = lane; v < C / 8; v += 32) {  // 8 values per 16-byte vector
            const u32x4 t = c[v], t2 = c2[v];
            const u32 w[4] = {t.x, t.y, t.z, t.w}, w2[4] = {t2.x, t2.y, t2.z, t2.w};
            const float* q = qs + 8 * v;
#pragma unroll
            for (int j = 0; j < 4; ++j) {
                acc += q[2 * j] * h2f((u16)(w[j] & 0xFFFFu)) + q[2 * j + 1] * h2f((u16)(w[j] >> 16));
                acc2 += q[2 * j] * h2f((u16)(w2[j] & 0xFFFFu)) + q[2 * j + 1] * h2f((u16)(w2[j] >> 16));
            }
        }
        const u16 *kp = cache_kpe + (ll)s * R, *kp2 = cache_kpe + (ll)s2 * R;
        for (int i = lane; i < R; i += 32) {
            acc += qs[C + i] * h2f(kp[i]);
            acc2 += qs[C + i] * h2f(kp2[i]);
        }
        acc = warp_add(acc);
        acc2 = warp_add(acc2);
        if (lane == 0) {
            sc[s] = acc * scale;
            if (s + 8 < s1) sc[s + 8] = acc2 * scale;
        }
    }
    __syncthreads();
    float m, sum;
    split_softmax(sc, s0, s1, red, m, sum);
    // the split's weighted latents: warp w takes positions s0 + w, s0 + w + 8, ..., a lane 8 channels
    // of each 16-byte vector it reads (all of a position's row in one warp-wide load), then the 8
    // warps' sums are added through shared memory
    float a[MLA_VECS][8];
#pragma unroll
    for (int vi = 0; vi < MLA_VECS; ++vi)
#pragma unroll
        for (int e = 0; e < 8; ++e) a[vi][e] = 0.0f;
#pragma unroll 4
    for (int s = s0 + warp; s < s1; s += 8) {
        const float p = sc[s];
        const u32x4* c = (const u32x4*)(cache_c + (ll)s * C);
#pragma unroll
        for (int vi = 0; vi < MLA_VECS; ++vi) {
            const int v = lane + 32 * vi;
            if (v < C / 8) {
                const u32x4 t = c[v];
                const u32 w[4] = {t.x, t.y, t.z, t.w};
#pragma unroll
                for (int j = 0; j < 4; ++j) {
                    a[vi][2 * j] += p * h2f((u16)(w[j] & 0xFFFFu));
                    a[vi][2 * j + 1] += p * h2f((u16)(w[j] >> 16));
                }
            }
        }
    }
    float* ws = wsum + warp * C;
#pragma unroll
    for (int vi = 0; vi < MLA_VECS; ++vi) {
        const int v = lane + 32 * vi;
        if (v < C / 8) {
            f32x4* dst = (f32x4*)(ws + 8 * v);
            dst[0] = f32x4{a[vi][0], a[vi][1], a[vi][2], a[vi][3]};
            dst[1] = f32x4{a[vi][4], a[vi][5], a[vi][6], a[vi][7]};
        }
    }
    __syncthreads();
    for (int i = tid; i < C; i += 256) {
        float t = 0.0f;
#pragma unroll
        for (int w = 0; w < 8; ++w) t += wsum[w * C + i];
        out[i] = t;
    }
    if (tid == 0) {
        out[C] = m;  // -inf for an empty split
        out[C + 1] = sum;
    }
    if (last_split(counters, h)) combine_splits(part + (ll)h * MLA_SPLITS * (C + 2), o + (ll)h * C, C);
}

// store_kv_f16(const float* k, const float* v, u16* k_cache, u16* v_cache, ll head_stride,
//              const int* pos, int n_heads, int d)
//     A grouped-query layer's new entry: k_cache[g * head_stride + pos[0] * d + i] = fp16(k[g * d + i])
//     for g < n_heads, i < d, the same for v. block (256, 1, 1), grid (ceil(n_heads * d / 256), 1, 1).
extern "C" __global__ void __launch_bounds__(256)
store_kv_f16(const float* __restrict__ k, const float* __restrict__ v, u16* __restrict__ k_cache,
             u16* __restrict__ v_cache, ll head_stride, const int* __restrict__ pos, int n_heads, int d) {
    const int i = blockIdx.x * 256 + threadIdx.x;
    if (i >= n_heads * d) return;
    const ll at = (ll)(i / d) * head_stride + (ll)pos[0] * d + i % d;
    k_cache[at] = f2h(k[i]);
    v_cache[at] = f2h(v[i]);
}

// gqa_decode(const float* q, const u16* k_cache, const u16* v_cache, ll head_stride, const int* pos,
//            int group, float* scores, float* part, int d, int s_max, float scale, unsigned* counters,
//            float* o)
//     One new token of a grouped-query layer (llama, qwen2) against positions 0..pos[0] of its fp16
//     caches (n_kv_heads, s_max, d) (head g at g * head_stride): q (H, d) float32, query head h reads
//     kv head h / group. Split over positions as mla_decode, into part (H, MLA_SPLITS, d + 2), merged
//     by its last split into o (H, d) (counters as mla_decode). d <= 256. block (256, 1, 1),
//     grid (H, MLA_SPLITS, 1).
extern "C" __global__ void __launch_bounds__(256)
gqa_decode(const float* __restrict__ q, const u16* __restrict__ k_cache, const u16* __restrict__ v_cache,
           ll head_stride, const int* __restrict__ pos, int group, float* __restrict__ scores,
           float* __restrict__ part, int d, int s_max, float scale, unsigned* __restrict__ counters,
           float* __restrict__ o) {
    __shared__ float red[8];
    __shared__ float qs[256];
    __shared__ float acc_s[256];
    const int h = blockIdx.x, b = blockIdx.y, tid = threadIdx.x, warp = tid >> 5, lane = tid & 31;
    const u16* kc = k_cache + (ll)(h / group) * head_stride;
    const u16* vc = v_cache + (ll)(h / group) * head_stride;
    const int S = pos[0] + 1;
    const int chunk = (S + MLA_SPLITS - 1) / MLA_SPLITS;
    const int s0 = b * chunk, s1 = min(S, s0 + chunk);
    float* out = part + ((ll)h * MLA_SPLITS + b) * (d + 2);
    for (int i = tid; i < d; i += 256) qs[i] = q[(ll)h * d + i];
    __syncthreads();
    float* sc = scores + (ll)h * s_max;
    for (int s = s0 + warp; s < s1; s += 8) {  // a warp per cached position
        const u16* kr = kc + (ll)s * d;
        float acc = 0.0f;
        for (int i = lane; i < d; i += 32) acc += qs[i] * h2f(kr[i]);
        acc = warp_add(acc);
        if (lane == 0) sc[s] = acc * scale;
    }
    __syncthreads();
    float m, sum;
    split_softmax(sc, s0, s1, red, m, sum);
    // 256 / d groups of threads share the positions (a thread per channel in each), then add up
    const int groups = 256 / d, grp = tid / d, i = tid - grp * d;
    float a = 0.0f;
    if (grp < groups)
        for (int s = s0 + grp; s < s1; s += groups) a += sc[s] * h2f(vc[(ll)s * d + i]);
    acc_s[tid] = a;
    __syncthreads();
    if (tid < d) {
        float t = 0.0f;
        for (int g = 0; g < groups; ++g) t += acc_s[g * d + tid];
        out[tid] = t;
    }
    if (tid == 0) {
        out[d] = m;  // -inf for an empty split
        out[d + 1] = sum;
    }
    if (last_split(counters, h)) combine_splits(part + (ll)h * MLA_SPLITS * (d + 2), o + (ll)h * d, d);
}

// rope_f32(const float* x, float* y, int T, int H, ll st, ll sh, int head_dim, int dim,
//          const float* cos, const float* sin, const int* pos, int neox)
//     models/common.Rope: x (T, H, head_dim) at x[t * st + h * sh + i] (values of a head contiguous)
//     -> y (T, H, head_dim) contiguous, the first dim values of each head rotated by the angles of
//     position pos[t] (tables cos, sin: (positions, dim / 2)), adjacent pairs (neox 0) or halves
//     (neox 1), the rest copied. block (128, 1, 1), grid (T * H, 1, 1).
// value i of one head rotated: x the head's head_dim values, angles of one position (dim / 2 each)
__device__ __forceinline__ float rope_value(const float* __restrict__ xr, int i, int dim, const float* __restrict__ c,
                                            const float* __restrict__ s, int neox) {
    const int half = dim / 2;
    if (i >= dim) return xr[i];
    if (!neox) {
        const int j = i >> 1;
        const float a = xr[2 * j], b = xr[2 * j + 1];
        return (i & 1) ? a * s[j] + b * c[j] : a * c[j] - b * s[j];
    }
    const int j = i < half ? i : i - half;
    const float a = xr[j], b = xr[j + half];
    return i < half ? a * c[j] - b * s[j] : a * s[j] + b * c[j];
}

extern "C" __global__ void __launch_bounds__(128)
rope_f32(const float* __restrict__ x, float* __restrict__ y, int T, int H, ll st, ll sh, int head_dim, int dim,
         const float* __restrict__ cos_t, const float* __restrict__ sin_t, const int* __restrict__ pos, int neox) {
    const int th = blockIdx.x, t = th / H, h = th % H, half = dim / 2;
    const float* xr = x + (ll)t * st + (ll)h * sh;
    float* yr = y + (ll)th * head_dim;
    const float* c = cos_t + (ll)pos[t] * half;
    const float* s = sin_t + (ll)pos[t] * half;
    for (int i = threadIdx.x; i < head_dim; i += blockDim.x) yr[i] = rope_value(xr, i, dim, c, s, neox);
}

extern "C" __global__ void __launch_bounds__(256)
mla_entry(const float* __restrict__ q, const float* __restrict__ kv, const float* __restrict__ norm_w, float eps,
          const float* __restrict__ cos_t, const float* __restrict__ sin_t, const int* __restrict__ pos, int neox,
          int dim, int H, int N, int R, int C, float* __restrict__ q_pe, u16* __restrict__ cache_c,
          u16* __restrict__ cache_kpe) {
    __shared__ float partial[32];
    const int h = blockIdx.x, p = pos[0], half = dim / 2;
    const float* c = cos_t + (ll)p * half;
    const float* s = sin_t + (ll)p * half;
    if (h < H) {
        const float* xr = q + (ll)h * (N + R) + N;
        for (int i = threadIdx.x; i < R; i += blockDim.x) q_pe[(ll)h * R + i] = rope_value(xr, i, dim, c, s, neox);
        return;
    }
    const float scale = rms_scale(kv, C, eps, partial);
    for (int i = threadIdx.x; i < C; i += blockDim.x) cache_c[(ll)p * C + i] = f2h(kv[i] * scale * norm_w[i]);
    for (int i = threadIdx.x; i < R; i += blockDim.x) cache_kpe[(ll)p * R + i] = f2h(rope_value(kv + C, i, dim, c, s, neox));
}

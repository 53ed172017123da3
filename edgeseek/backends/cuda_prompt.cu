// A prompt's routed experts on the tensor cores: grouped matrix products straight from the file's
// blocks. Compiled with cuda_kernels.cu (appended to it: its formats' Q::half, h2f, f2h, u32x4).
//
// The pairs (token, expert) of a prompt's layer are sorted by expert (on the device, moe_plan, where
// every expert is in VRAM; on the host where some run on the CPU), then cut into tiles of at most
// GM_BM pairs of one expert: tiles (n_tiles, 3) int32 = (expert, first pair,
// pairs); a tile of no pairs is skipped (its blocks return at once). A block multiplies one tile by GM_BN rows of its expert's matrix: it dequantizes the
// rows' blocks GM_BK values at a time into shared memory as float16 (each value as
// dequant_<t>_f16 leaves it), gathers the tile's activation rows beside them, and runs
// mma.sync m16n8k16 (float16 operands, float32 sums) over them; so the weights are read from
// VRAM once a tile, never written out dequantized.
//
// moe_glu_mma_<t>(const uchar* Wg, const uchar* Wu, ll row_bytes, ll expert_bytes, const int* tiles,
//                 const ushort* x16, const int* a_rows, ushort* h16, int N, int K)
//     h16[p] (N,) = f16(silu(Wg[e] @ x16[a_rows[p]]) * (Wu[e] @ x16[a_rows[p]])) for every pair p
//     of every tile (e its expert); x16 (T, K) float16. block (128, 1, 1),
//     grid (ceil(N / GM_BN), n_tiles, 1); K a multiple of GM_BK.
// moe_down_mma_<t>(const uchar* W, ll row_bytes, ll expert_bytes, const int* tiles, const ushort* h16,
//                  const float* wp, float* y, int N, int K)
//     y[p] (N,) = wp[p] * (W[e] @ h16[p]): the pair's down projection times its routing weight.
//     Same launch shape.
// moe_combine(const float* y, const int* pos, int k, float* out, int N)
//     out[t] += sum_{j < k, pos[t k + j] >= 0} y[pos[t k + j]] in j order (no atomics: the same sums
//     every run). block (256, 1, 1), grid (ceil(N / 256), T, 1).
// moe_plan(const int* ids, const float* w, int P, int k, int E, int max_tiles, int* tiles,
//          int* a_rows, float* wp, int* pos, int* hist)
//     a layer's (token, choice) pairs sorted into tiles on the device (below). block (1024), grid (1).
// causal_softmax(float* a, const float* b, int H, ll S, ll start, float scale, ushort* p16)
//     a prompt's attention weights from its two score products (below). block (256), grid (rows).
// A dense matrix of a prompt (q, kv_a, the attention output, shared experts) runs through the same
// kernels as expert 0 of one, its rows as tiles of one expert (expert_bytes 0, weights 1).

#define GM_BM 64          // pairs a tile
#define GM_BN 64          // weight rows a block
#define GM_BK 64          // values of K a step: two 32-value units
#define GM_LDS (GM_BK + 8)  // float16 a shared row: 144 bytes, 16-byte aligned, fragment loads without bank conflicts

__device__ __forceinline__ void mma16816(float (&c)[4], const u32 (&a)[4], u32 b0, u32 b1) {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
        "{%0,%1,%2,%3};"
        : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}

__device__ __forceinline__ u32 lds32(const u16* p) { return *(const u32*)p; }

// GM_BM rows of activations (row r: src + row(r) * K + k0, float16), zero past `count`
template <class Row>
__device__ __forceinline__ void gm_load_a(u16* __restrict__ sA, const u16* __restrict__ src, Row row, int count,
                                          int K, int k0) {
#pragma unroll
    for (int i = 0; i < GM_BM * GM_BK / 8 / 128; ++i) {
        const int c = threadIdx.x + 128 * i;  // 16-byte chunk
        const int r = c / (GM_BK / 8), c8 = c % (GM_BK / 8);
        u32x4 v = {0u, 0u, 0u, 0u};
        if (r < count) v = *(const u32x4*)(src + (ll)row(r) * K + k0 + 8 * c8);
        *(u32x4*)(sA + r * GM_LDS + 8 * c8) = v;
    }
}

// GM_BN rows of W (from row n0) dequantized: values k0 .. k0 + GM_BK as float16, zero past N
template <class Q>
__device__ __forceinline__ void gm_load_w(u16* __restrict__ sW, const u8* __restrict__ W, ll row_bytes, int n0,
                                          int N, int k0) {
#pragma unroll
    for (int i = 0; i < GM_BN * (GM_BK / 16) / 128; ++i) {
        const int it = threadIdx.x + 128 * i;  // (row, unit, half)
        const int r = it / (GM_BK / 16), u = (it / 2) % (GM_BK / 32), h = it % 2;
        u32 w[8] = {0u, 0u, 0u, 0u, 0u, 0u, 0u, 0u};
        if (n0 + r < N) {
            float v[16];
            Q::half(W + (ll)(n0 + r) * row_bytes, (k0 >> 5) + u, h, v);
#pragma unroll
            for (int j = 0; j < 8; ++j) w[j] = (u32)f2h(v[2 * j]) | ((u32)f2h(v[2 * j + 1]) << 16);
        }
        u32x4* p = (u32x4*)(sW + r * GM_LDS + 32 * u + 16 * h);
        p[0] = u32x4{w[0], w[1], w[2], w[3]};
        p[1] = u32x4{w[4], w[5], w[6], w[7]};
    }
}

// acc[mi][ni] += A (warp's 32 rows) @ W (warp's 32 rows)^T over the GM_BK values in shared memory.
// Warp w covers tile rows 32 (w / 2) .. +32 and weight rows 32 (w % 2) .. +32: 2 x 4 m16n8 tiles.
__device__ __forceinline__ void gm_mma(float (&acc)[2][4][4], const u16* __restrict__ sA, const u16* __restrict__ sW) {
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
    const int g = lane >> 2, t = lane & 3;
    const u16* a0 = sA + (32 * (warp >> 1) + g) * GM_LDS + 2 * t;
    const u16* b0 = sW + (32 * (warp & 1) + g) * GM_LDS + 2 * t;
#pragma unroll
    for (int ks = 0; ks < GM_BK; ks += 16) {
        u32 a[2][4];
#pragma unroll
        for (int mi = 0; mi < 2; ++mi) {
            const u16* p = a0 + 16 * mi * GM_LDS + ks;
            a[mi][0] = lds32(p);
            a[mi][1] = lds32(p + 8 * GM_LDS);
            a[mi][2] = lds32(p + 8);
            a[mi][3] = lds32(p + 8 * GM_LDS + 8);
        }
#pragma unroll
        for (int ni = 0; ni < 4; ++ni) {
            const u16* p = b0 + 8 * ni * GM_LDS + ks;
            const u32 b_lo = lds32(p), b_hi = lds32(p + 8);
#pragma unroll
            for (int mi = 0; mi < 2; ++mi) mma16816(acc[mi][ni], a[mi], b_lo, b_hi);
        }
    }
}

// fragment value c[2 half + i] of m16n8 tile (mi, ni): tile row gm_row(mi, half), weight row gm_col(ni) + i
__device__ __forceinline__ int gm_row(int mi, int half) {
    return 32 * (threadIdx.x >> 6) + 16 * mi + ((threadIdx.x & 31) >> 2) + 8 * half;
}
__device__ __forceinline__ int gm_col(int ni) { return 32 * ((threadIdx.x >> 5) & 1) + 8 * ni + 2 * (threadIdx.x & 3); }

// f(r, n, mi, ni, half) for each pair of output values of the thread (tile row r < count, weight
// rows n and n + 1 < N): fragment values [mi][ni][2 half] and [2 half + 1]
template <class F>
__device__ __forceinline__ void gm_epilogue(int count, int n0, int N, F f) {
#pragma unroll
    for (int mi = 0; mi < 2; ++mi)
#pragma unroll
        for (int half = 0; half < 2; ++half) {
            const int r = gm_row(mi, half);
            if (r >= count) continue;
#pragma unroll
            for (int ni = 0; ni < 4; ++ni) {
                const int n = n0 + gm_col(ni);
                if (n >= N) continue;
                f(r, n, mi, ni, half);
            }
        }
}

template <class Q>
__device__ __forceinline__ void moe_glu_mma(const u8* __restrict__ Wg, const u8* __restrict__ Wu, ll row_bytes,
                                            ll expert_bytes, const int* __restrict__ tiles,
                                            const u16* __restrict__ x16, const int* __restrict__ a_rows,
                                            u16* __restrict__ h16, int N, int K) {
    __shared__ __align__(16) u16 sA[GM_BM * GM_LDS];
    __shared__ __align__(16) u16 sG[GM_BN * GM_LDS];
    __shared__ __align__(16) u16 sU[GM_BN * GM_LDS];
    const int* tile = tiles + 3 * blockIdx.y;
    const ll e = tile[0];
    const int p0 = tile[1], count = tile[2], n0 = blockIdx.x * GM_BN;
    if (count <= 0) return;  // a tile of no pairs
    const u8* wg = Wg + e * expert_bytes;
    const u8* wu = Wu + e * expert_bytes;
    const int* rows = a_rows + p0;
    float ag[2][4][4] = {}, au[2][4][4] = {};
    for (int k0 = 0; k0 < K; k0 += GM_BK) {
        gm_load_a(sA, x16, [&](int r) { return rows[r]; }, count, K, k0);
        gm_load_w<Q>(sG, wg, row_bytes, n0, N, k0);
        gm_load_w<Q>(sU, wu, row_bytes, n0, N, k0);
        __syncthreads();
        gm_mma(ag, sA, sG);
        gm_mma(au, sA, sU);
        __syncthreads();
    }
    gm_epilogue(count, n0, N, [&](int r, int n, int mi, int ni, int half) {
        const float g0 = ag[mi][ni][2 * half], g1 = ag[mi][ni][2 * half + 1];
        const float h0 = g0 / (1.0f + expf(-g0)) * au[mi][ni][2 * half];
        const float h1 = g1 / (1.0f + expf(-g1)) * au[mi][ni][2 * half + 1];
        *(u32*)(h16 + (ll)(p0 + r) * N + n) = (u32)f2h(h0) | ((u32)f2h(h1) << 16);
    });
}

template <class Q>
__device__ __forceinline__ void moe_down_mma(const u8* __restrict__ W, ll row_bytes, ll expert_bytes,
                                             const int* __restrict__ tiles, const u16* __restrict__ h16,
                                             const float* __restrict__ wp, float* __restrict__ y, int N, int K) {
    __shared__ __align__(16) u16 sA[GM_BM * GM_LDS];
    __shared__ __align__(16) u16 sW[GM_BN * GM_LDS];
    const int* tile = tiles + 3 * blockIdx.y;
    const ll e = tile[0];
    const int p0 = tile[1], count = tile[2], n0 = blockIdx.x * GM_BN;
    if (count <= 0) return;  // a tile of no pairs
    const u8* w = W + e * expert_bytes;
    float acc[2][4][4] = {};
    for (int k0 = 0; k0 < K; k0 += GM_BK) {
        gm_load_a(sA, h16, [&](int r) { return p0 + r; }, count, K, k0);
        gm_load_w<Q>(sW, w, row_bytes, n0, N, k0);
        __syncthreads();
        gm_mma(acc, sA, sW);
        __syncthreads();
    }
    gm_epilogue(count, n0, N, [&](int r, int n, int mi, int ni, int half) {
        const float w = wp[p0 + r];
        *(f32x2*)(y + (ll)(p0 + r) * N + n) = f32x2{w * acc[mi][ni][2 * half], w * acc[mi][ni][2 * half + 1]};
    });
}

extern "C" __global__ void __launch_bounds__(256)
    moe_combine(const float* __restrict__ y, const int* __restrict__ pos, int k, float* __restrict__ out, int N) {
    const int n = blockIdx.x * 256 + threadIdx.x;
    if (n >= N) return;
    const ll t = blockIdx.y;
    float s = out[t * N + n];
    for (int j = 0; j < k; ++j) {
        const int p = pos[t * k + j];
        if (p >= 0) s += y[(ll)p * N + n];
    }
    out[t * N + n] = s;
}

// The bookkeeping of a prompt's layer whose experts are all in VRAM, on the device (no host round
// trip between the router and the products): ids (P = T k) int32 from route_topk, w (P) their
// weights. One block (PLAN_THREADS): each expert's pair count (hist, E: the usage profile),
// the tiles (max_tiles, 3) of at most GM_BM pairs of one expert in expert order, the rest of them
// empty (count 0: their blocks return at once); a_rows (P): each sorted pair's token, wp (P) its
// weight, pos (P): each (token, choice)'s pair. Pairs of one expert keep token order, as the host's
// stable sort: a chunk of PLAN_THREADS pairs at a time, each warp's ranks by __match_any_sync,
// the warps' counts added in warp order. E <= PLAN_EXPERTS.
#define PLAN_THREADS 1024
#define PLAN_EXPERTS 256
#define PLAN_WARPS (PLAN_THREADS / WARP_SIZE)

extern "C" __global__ void __launch_bounds__(PLAN_THREADS)
    moe_plan(const int* __restrict__ ids, const float* __restrict__ w, int P, int k, int E, int max_tiles,
             int* __restrict__ tiles, int* __restrict__ a_rows, float* __restrict__ wp, int* __restrict__ pos,
             int* __restrict__ hist) {
    __shared__ int base[PLAN_EXPERTS];              // next free pair of each expert
    __shared__ int warp_at[PLAN_WARPS][PLAN_EXPERTS];  // a chunk's pairs of each expert by warp, then their first place
    const int tid = threadIdx.x, lane = tid & (WARP_SIZE - 1), warp = tid >> 5;
    for (int e = tid; e < E; e += PLAN_THREADS) base[e] = 0;
    __syncthreads();
    for (int p = tid; p < P; p += PLAN_THREADS) atomicAdd(&base[ids[p]], 1);
    __syncthreads();
    if (tid == 0) {  // counts -> first pairs; the tiles in expert order
        int at = 0, t = 0;
        for (int e = 0; e < E; ++e) {
            const int c = base[e];
            hist[e] = c;
            base[e] = at;
            for (int j = 0; j < c && t < max_tiles; j += GM_BM, ++t) {
                tiles[3 * t] = e;
                tiles[3 * t + 1] = at + j;
                tiles[3 * t + 2] = min(GM_BM, c - j);
            }
            at += c;
        }
        for (; t < max_tiles; ++t) tiles[3 * t] = tiles[3 * t + 1] = tiles[3 * t + 2] = 0;
    }
    for (int p0 = 0; p0 < P; p0 += PLAN_THREADS) {
        for (int i = tid; i < PLAN_WARPS * E; i += PLAN_THREADS) warp_at[i / E][i % E] = 0;
        __syncthreads();
        const int p = p0 + tid;
        const int e = p < P ? ids[p] : -1;
        const unsigned same = __match_any_sync(FULL_MASK, e);
        const int rank = __popc(same & ((1u << lane) - 1u));
        if (e >= 0 && rank == 0) warp_at[warp][e] = __popc(same);
        __syncthreads();
        for (int x = tid; x < E; x += PLAN_THREADS) {  // each expert's warps in order
            int at = base[x];
            for (int v = 0; v < PLAN_WARPS; ++v) {
                const int c = warp_at[v][x];
                warp_at[v][x] = at;
                at += c;
            }
            base[x] = at;
        }
        __syncthreads();
        if (e >= 0) {
            const int q = warp_at[warp][e] + rank;
            a_rows[q] = p / k;
            wp[q] = w[p];
            pos[p] = q;
        }
        __syncthreads();
    }
}

// A prompt's attention weights: row r of a (rows, S) and b (rows, S) belongs to the query at
// position start + r / H (H heads a token), which sees keys 0 .. start + r / H; a[r] becomes
// softmax(scale * (a[r] + b[r])) over those keys, 0 past them: MLA's two score products (latent,
// rope part) added, scaled, masked and normalized in one pass over the scores, written to p16
// (rows, S) as float16 (the operand of the product with the latents), or back to a where p16 is
// NULL. block (256), grid (rows). exp(v - max) / sum as models/common.softmax.
__device__ __forceinline__ float block_reduce(float v, float* red, bool is_max) {
    for (int off = 16; off > 0; off >>= 1) {
        const float o = __shfl_xor_sync(FULL_MASK, v, off);
        v = is_max ? fmaxf(v, o) : v + o;
    }
    const int warp = threadIdx.x >> 5;
    __syncthreads();  // red free from an earlier reduction
    if ((threadIdx.x & 31) == 0) red[warp] = v;
    __syncthreads();
    float r = red[0];
    for (int w = 1; w < (int)(blockDim.x >> 5); ++w) r = is_max ? fmaxf(r, red[w]) : r + red[w];
    return r;
}

extern "C" __global__ void __launch_bounds__(256)
    causal_softmax(float* __restrict__ a, const float* __restrict__ b, int H, ll S, ll start, float scale,
                   u16* __restrict__ p16) {
    __shared__ float red[8];
    const ll r = blockIdx.x;
    float* row = a + r * S;
    const float* other = b + r * S;
    const ll seen = min(S, start + r / H + 1);
    float m = __int_as_float(0xff800000);
    for (ll j = threadIdx.x; j < seen; j += 256) m = fmaxf(m, scale * (row[j] + other[j]));
    m = block_reduce(m, red, true);
    float sum = 0.0f;
    for (ll j = threadIdx.x; j < seen; j += 256) {
        const float e = expf(scale * (row[j] + other[j]) - m);
        row[j] = e;
        sum += e;
    }
    sum = block_reduce(sum, red, false);
    const float inv = 1.0f / sum;
    if (p16) {
        u16* out = p16 + r * S;
        for (ll j = threadIdx.x; j < S; j += 256) out[j] = f2h(j < seen ? row[j] * inv : 0.0f);
    } else {
        for (ll j = threadIdx.x; j < S; j += 256) row[j] = j < seen ? row[j] * inv : 0.0f;
    }
}

#define PROMPT_KERNELS(name, Q)                                                                          \
    extern "C" __global__ void __launch_bounds__(128)                                                   \
        moe_glu_mma_##name(const u8* __restrict__ Wg, const u8* __restrict__ Wu, ll row_bytes,          \
                           ll expert_bytes, const int* __restrict__ tiles, const u16* __restrict__ x16, \
                           const int* __restrict__ a_rows, u16* __restrict__ h16, int N, int K) {       \
        moe_glu_mma<Q>(Wg, Wu, row_bytes, expert_bytes, tiles, x16, a_rows, h16, N, K);                 \
    }                                                                                                   \
    extern "C" __global__ void __launch_bounds__(128)                                                   \
        moe_down_mma_##name(const u8* __restrict__ W, ll row_bytes, ll expert_bytes,                    \
                            const int* __restrict__ tiles, const u16* __restrict__ h16,                 \
                            const float* __restrict__ wp, float* __restrict__ y, int N, int K) {        \
        moe_down_mma<Q>(W, row_bytes, expert_bytes, tiles, h16, wp, y, N, K);                           \
    }

PROMPT_KERNELS(f16, F16)
PROMPT_KERNELS(bf16, BF16)
PROMPT_KERNELS(q4_0, Q4_0)
PROMPT_KERNELS(q4_1, Q4_1)
PROMPT_KERNELS(q5_0, Q5_0)
PROMPT_KERNELS(q5_1, Q5_1)
PROMPT_KERNELS(q8_0, Q8_0)
PROMPT_KERNELS(q4_k, Q4_K)
PROMPT_KERNELS(q5_k, Q5_K)
PROMPT_KERNELS(q6_k, Q6_K)

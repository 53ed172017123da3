// CUDA kernels of edgeseek's GPU backend. Compiled at run time by NVRTC through
// cupy.RawModule(code=..., options=("-std=c++17",)); CuPy adds -ftz=true, which changes nothing
// here but for float32 subnormals. Deliberately no #include (user machines may lack the CUDA
// headers) and no fast math: dequantized values are bit-exact with gguf-py's quants.py.
//
// Type suffixes <t> (ggml type id): f32 (0) f16 (1) bf16 (30) q4_0 (2) q4_1 (3) q5_0 (6) q5_1 (7)
// q8_0 (8) q4_k (12) q5_k (13) q6_k (14).
//
// Arguments shared by the kernels below:
//   W          raw GGUF tensor bytes as uploaded, (rows, row_bytes) uint8, contiguous, 16-byte
//              aligned (a CuPy allocation is 256); row_bytes = K / block_values * block_bytes
//   K          values per row: a multiple of 32 (of 256 for q4_k q5_k q6_k)
//   x, y, out  contiguous float32 (fp16 for dequant_<t>_f16), row-major, 16-byte aligned
//   ll         long long (numpy.int64 on the Python side); int = numpy.int32; float = numpy.float32
//
// mmv_<t>(const uchar* W, ll row_bytes, const float* x, float* y, int N, int K, int T,
//         const float* add, const float* res)
//     y (T, N) = res + (add + x (T, K) @ W (N, K)^T) for 1 <= T <= 8 tokens (decode); add and res
//     (T, N), or NULL (numpy.uint64(0)) for none: a residual folded into the product that ends a
//     block, in the order the unfused graph adds (x + (routed + shared)).
//     block (128, 1, 1), grid ((N + 3) / 4, 1, 1): one warp per row of W. Static shared memory
//     (36 KiB: the block's activations, a chunk of 1024 values per token), none to pass at launch.
// mmv_ids_<t>(const uchar* W, ll row_bytes, ll expert_bytes, const int* ids, const float* x,
//             int x_div, ll x_stride, float* y, int N, int K, int P, int tpr)
//     W (E, N, K) stacked experts, expert_bytes = N * row_bytes; for pair p < P:
//     y[p] (N,) = W[ids[p]] (N, K) @ x[p / x_div] (K,)   (x_div = n_used for gate/up, 1 for down)
//     where activation row r starts at x + r * x_stride (a multiple of 4: K for packed rows).
//     tpr threads a row (a power of two <= 32; ids_threads in cuda.py: about 4 pieces of 16 values
//     each). block (128, 1, 1), grid (ceil(N / (128 / tpr)), P, 1), P <= 65535.
// mmv1_<t>(const uchar* W, ll row_bytes, const float* x, float* y, int N, int K, const float* add,
//         const float* res)
//     y (N,) = res + (add + W (N, K) @ x (K,)): one token, a block of 128 threads for 4 rows (the
//     rows' 16-value pieces spread over the block's threads). block (128, 1, 1),
//     grid (ceil(N / 4), 1, 1).
// mmv_glu_ids_<t>(const uchar* Wg, const uchar* Wu, ll row_bytes, ll expert_bytes, const int* ids,
//                 const float* x, int x_div, float* h, int N, int K, int P)
//     h[p] (N,) = silu(Wg[ids[p]] @ x[p / x_div]) * (Wu[ids[p]] @ x[p / x_div]): gate, up and
//     silu_mul in one launch (gate and up of one format and shape). A plain matrix is a stack of
//     one: ids all 0, expert_bytes 0, x_div 1. block (128, 1, 1), grid (ceil(N / 2), P, 1): a block
//     two rows (of gate and of up). Trailing (const uchar* Wg2, const uchar* Wu2, ll row_bytes2,
//     int N2, float* h2): the shared experts' gate and up (N2, K) of the same format in the same
//     launch, pairs P .. P + T - 1 (token p - P) -> h2 (T, N2); grid (ceil(max(N, N2) / 2), P + T, 1).
//     Wg2 = NULL: none.
// mmv_down_ids_<t>(const uchar* W, ll row_bytes, ll expert_bytes, const int* ids, const float* h,
//                  const float* w, const float* add, float* y, int N, int K, int k)
//     y[t] (N,) = add[t] + sum_{j < k} w[t k + j] * W[ids[t k + j]] @ h[t k + j]: a token's k routed
//     experts' down projections weighted and summed (add = NULL: none). block (128, 1, 1),
//     grid (ceil(N / 4), T, 1): a block four rows, the k experts' pieces spread over its threads.
//     Trailing (const uchar* W2, ll row_bytes2, int K2, const float* h2, const float* res): the
//     shared experts' down (N, K2) of the same format on h2 (T, K2) and the residual, in the order
//     the unfused graph adds: y = res + ((add + routed) + W2 @ h2). W2, res = NULL: none.
// The quantized formats <t> (q4_0 q4_1 q5_0 q5_1 q8_0 q4_k q5_k q6_k) on int8 activations (q8_1:
// xq (rows, K) int8, xs (rows, K / 32, 2) float32 (d, d * sum(q)); quantize_q8_1 or rms_norm_q8 make
// them), launched as their float versions:
// mmv1_<t>_q8(W, ll row_bytes, const char* xq, const float2* xs, float* y, int N, int K,
//             const float* add, const float* res)                        as mmv1_<t>
// glu_ids_<t>_q8(Wg, Wu, ll row_bytes, ll expert_bytes, const int* ids, xq, xs, int x_div, float* h,
//                int N, int K, int P, Wg2, Wu2, ll row_bytes2, int N2, float* h2)  as mmv_glu_ids_<t>
// down_ids_<t>_q8(W, ll row_bytes, ll expert_bytes, const int* ids, hq, hs, const float* w,
//                 const float* add, float* y, int N, int K, int k, W2, ll row_bytes2, int K2, hq2, hs2,
//                 const float* res)                                        as mmv_down_ids_<t>
// down_ids_<t>_<t2>_q8(...)  as down_ids_<t>_q8 with the shared experts' W2 of format <t2>, for the
//     pairs of a K-quant mix (<t> q5_0 q5_1 q8_0 q4_k q5_k q6_k, <t2> another of q4_k q5_k q6_k)
// mmv3_<t>_q8(W, ll row_bytes, float* y, int N, W2, ll row_bytes2, float* y2, int N2, W3, ll row_bytes3,
//             float* y3, int N3, xq, xs, int K)
//     mmv1_<t>_q8 of two or three matrices of one format and width on the same token (a layer's q
//     and kv_a; q, k and v) in one launch: blocks 0 .. ceil(N / 4) - 1 the first, then the second's,
//     then the third's (N3 = 0: none). grid (ceil(N / 4) + ceil(N2 / 4) + ceil(N3 / 4), 1, 1).
// mmv1_<t>_sq8(W, ll row_bytes, const float* x, const float* nw, float eps, float* y, int N, int K,
//              const float* add, const float* res)
// mmv3_<t>_sq8(W, row_bytes, y, N, W2, row_bytes2, y2, N2, W3, row_bytes3, y3, N3, const float* x,
//              const float* nw, float eps, int K)
//     mmv1_<t>_q8 and mmv3_<t>_q8 on one token's float32 x (K,), which every block quantizes to q8_1
//     in its shared memory, after normalizing it as rms_norm_f32 does where the norm weight nw is
//     given (NULL: x as it is): no launch of its own for the norm or the quantization. K <= 16384, a
//     multiple of 32; grids as mmv1_<t>_q8's and mmv3_<t>_q8's, K + K / 4 bytes of dynamic shared
//     memory.
// quantize_q8_1(const float* x, char* xq, float2* xs, ll n)
//     n values (a multiple of 32) -> q8_1. block (128, 1, 1), grid (ceil(n / 128), 1, 1).
// dequant_<t>_f32(const uchar* W, ll row_bytes, const int* rows, int n_rows, int K, float* out)
// dequant_<t>_f16(const uchar* W, ll row_bytes, const int* rows, int n_rows, int K, ushort* out)
//     out (n_rows, K) = row (rows ? rows[r] : r) of W, dequantized (fp16: rounded to nearest even;
//     a cupy float16 array passes as ushort*).
//     One thread per 32-value unit: block (256, 1, 1), grid (ceil(n_rows * (K / 32) / 256), 1, 1)
//     (any block size works; threads past n_rows * K / 32 return). rows = NULL: numpy.uint64(0).
// rms_norm_f32(const float* x, ll x_stride, const float* w, float* y, int D, float eps)
//     y (R, D) = x / sqrt(mean(x^2) + eps) * w for each row, as llama.cpp (x * scale, then * w);
//     row r of x starts at x + r * x_stride (D for packed rows). block (256, 1, 1), grid (R, 1, 1):
//     one block per row. y may be x (with x_stride D).
// rms_norm_q8(const float* x, ll x_stride, const float* w, float* y, int D, float eps, char* xq,
//             float2* xs)
//     rms_norm_f32 that also writes y as q8_1 (xq (R, D), xs (R, D / 32, 2)); D <= 2048, a multiple
//     of 32.
// silu_mul_f32(const float* g, const float* u, float* h, ll n)
//     h = g / (1 + exp(-g)) * u over n values. block (256, 1, 1), grid (ceil(n / 256), 1, 1) or
//     fewer blocks (the kernel strides over the grid). h may be g or u.

typedef long long ll;
typedef unsigned long long ull;
typedef unsigned int u32;
typedef unsigned short u16;
typedef unsigned char u8;

// 16-byte vectors of our own: no dependence on the vector types of the CUDA headers
struct alignas(16) u32x4 { u32 x, y, z, w; };
struct alignas(16) f32x4 { float x, y, z, w; };
struct alignas(8) f32x2 { float x, y; };
struct alignas(8) u32x2 { u32 x, y; };

#define WARP_SIZE 32
#define MMV_WARPS 4       // rows of W per mmv block, one per warp
#define MMV_MAX_T 8       // tokens per mmv launch
#define FULL_MASK 0xffffffffu

// --- scalars ------------------------------------------------------------------------------------

__device__ __forceinline__ float h2f(u16 h) {
    float f;
    asm("cvt.f32.f16 %0, %1;" : "=f"(f) : "h"(h));
    return f;
}

__device__ __forceinline__ u16 f2h(float f) {
    u16 h;
    asm("cvt.rn.f16.f32 %0, %1;" : "=h"(h) : "f"(f));
    return h;
}

__device__ __forceinline__ float bf2f(u32 b) { return __uint_as_float(b << 16); }

__device__ __forceinline__ u32 byte_of(u32 w, int i) { return (w >> (8 * i)) & 0xFFu; }

// --- loads --------------------------------------------------------------------------------------

__device__ __forceinline__ u32 load_u16(const u8* p) { return *(const u16*)p; }

// N little-endian words from a 2-byte aligned address (blocks of 18, 22, 34 and 210 bytes): aligned
// 32-bit loads joined by a funnel shift. Reads only aligned words holding at least one of the
// 4N bytes, so never past the allocation's last aligned word.
template <int N>
__device__ __forceinline__ void load_words(const u8* p, u32 (&w)[N]) {
    const u32* a = (const u32*)((ull)p & ~3ull);
    const u32 shift = ((u32)(ull)p & 2u) * 8u;  // 0 or 16
    u32 lo = a[0];
#pragma unroll
    for (int i = 0; i < N; ++i) {
        const u32 hi = (i + 1 < N || shift) ? a[i + 1] : 0u;
        w[i] = __funnelshift_r(lo, hi, shift);
        lo = hi;
    }
}

// N words from a 16-byte aligned address
template <int N>
__device__ __forceinline__ void load_words16(const u8* p, u32 (&w)[N]) {
    static_assert(N % 4 == 0, "whole 16-byte vectors");
    const u32x4* v = (const u32x4*)p;
#pragma unroll
    for (int i = 0; i < N / 4; ++i) {
        const u32x4 t = v[i];
        w[4 * i] = t.x; w[4 * i + 1] = t.y; w[4 * i + 2] = t.z; w[4 * i + 3] = t.w;
    }
}

// --- int8 activations ----------------------------------------------------------------------------
// The one-token products of the quantized formats also run on activations quantized per 32 values
// as llama.cpp's MMVQ does (q8_1, ggml-common.h block_q8_1: int8 q = rint(x / d), d = amax / 127, and
// d * sum(q)): four weight levels meet four activations in one dp4a. Each format's dot_q8 (beside
// its half, below) takes item it = 2u + h, the 16 values of half h of unit u, against a Q8Piece: the
// levels' integer dot, then the block's scales in float (ggml-cuda vecdotq.cuh, vec_dot_<t>_q8_1).
// An offset or a min common to a unit's levels (Q4_0's -8, Q5_0's -16, Q4_1's and Q5_1's m, Q4_K's
// and Q5_K's dmin * m) comes off as half the block's d * sum(q) an item: a unit's two items together
// take it off exactly. Q6_K's -32 meets a scale of 16 values, so it takes the item's own sum of q
// (Q8_SUM).

__device__ __forceinline__ int dp4a(u32 a, u32 b, int c) {
    int r;
    asm("dp4a.s32.s32 %0, %1, %2, %3;" : "=r"(r) : "r"(a), "r"(b), "r"(c));
    return r;
}

// Item it's 16 int8 activations as two runs of 8 (lo, hi), their q8_1 block's (d, d * sum(q)) and,
// where the format asks (Q8_SUM), their own sum of q: loaded once, they serve every row of a block.
// Formats whose item bytes hold nibble pairs (Q8_SPLIT: Q4_0 .. Q5_1, low nibbles values
// 8h .. 8h + 7 of the block, high ones 16 + 8h ..) take the runs at 8h and 16 + 8h, the others
// values 16h .. 16h + 15.
struct Q8Piece {
    u32x2 lo, hi;
    f32x2 ds;
    int sum;
    template <class Q>
    __device__ __forceinline__ void load(const u8* __restrict__ xq, const f32x2* __restrict__ xs, int it) {
        const int blk = it >> 1, h = it & 1;
        const u8* q = xq + 32 * (ll)blk + (Q::Q8_SPLIT ? 8 * h : 16 * h);
        lo = *(const u32x2*)q;
        hi = *(const u32x2*)(q + (Q::Q8_SPLIT ? 16 : 8));
        ds = xs[blk];
        if constexpr (Q::Q8_SUM) {
            constexpr u32 ones = 0x01010101u;
            sum = dp4a(ones, hi.y, dp4a(ones, hi.x, dp4a(ones, lo.y, dp4a(ones, lo.x, 0))));
        }
    }
};

// 16 levels, one byte each in the item's order (those of lo, then of hi) . the piece's activations
__device__ __forceinline__ int dot_levels(const u32 (&lv)[4], const Q8Piece& x) {
    int s = dp4a(lv[0], x.lo.x, 0);
    s = dp4a(lv[1], x.lo.y, s);
    s = dp4a(lv[2], x.hi.x, s);
    return dp4a(lv[3], x.hi.y, s);
}

// the levels of 8 bytes of nibble pairs w0 w1: low nibbles, then high
__device__ __forceinline__ void nibble_levels(u32 w0, u32 w1, u32 (&lv)[4]) {
    lv[0] = w0 & 0x0F0F0F0Fu;
    lv[1] = w1 & 0x0F0F0F0Fu;
    lv[2] = (w0 >> 4) & 0x0F0F0F0Fu;
    lv[3] = (w1 >> 4) & 0x0F0F0F0Fu;
}

// --- formats: values 32u + 16h .. 32u + 16h + 15 of a row -------------------------------------------
// A row is read in units of 32 values (u): a whole block of the 32-value types, sub-block u % 8 of a
// Q4_K/Q5_K block, two 16-value scale groups of Q6_K. Each format decodes half h (0, 1) of unit u,
// 16 values: the products hold 16 decoded weights at a time, not 32 (the 64 registers of
// __launch_bounds__(128, 8)); the second half's loads of shared bytes hit L1. Arithmetic in
// gguf-py's order with the _rn intrinsics (no FMA contraction), so that every value equals
// gguf.quants.dequantize to the bit.

// Quantized formats first gather the 16 unsigned levels of a half unit, one byte each, in 4 words
// lv; level<BIAS>(lv, l) = (float)(level l - BIAS), exactly: a byte permute builds 0x4B0000qq, the
// float 2^23 + q, and one subtraction removes 2^23 + BIAS. Two full-rate instructions, where an
// int -> float conversion runs at 16 per clock and SM on sm_90.
template <int BIAS>
__device__ __forceinline__ float level(const u32 (&lv)[4], int l) {
    const float f = __uint_as_float(__byte_perm(lv[l >> 2], 0x4B000000u, 0x7440u + (l & 3)));
    return __fsub_rn(f, (float)(8388608 + BIAS));
}

// fifth bits: bit k of x (k < 4) -> bit 4 of byte k
__device__ __forceinline__ u32 spread4(u32 x) { return ((x * 0x00204081u) & 0x01010101u) << 4; }

struct F32 {
    __device__ static __forceinline__ void half(const u8* row, int u, int h, float (&v)[16]) {
        const f32x4* p = (const f32x4*)(row + 128 * (ll)u + 64 * h);
#pragma unroll
        for (int i = 0; i < 4; ++i) {
            const f32x4 t = p[i];
            v[4 * i] = t.x; v[4 * i + 1] = t.y; v[4 * i + 2] = t.z; v[4 * i + 3] = t.w;
        }
    }
};

struct F16 {
    __device__ static __forceinline__ void half(const u8* row, int u, int h, float (&v)[16]) {
        u32 w[8];
        load_words16(row + 64 * (ll)u + 32 * h, w);
#pragma unroll
        for (int i = 0; i < 8; ++i) {
            v[2 * i] = h2f((u16)(w[i] & 0xFFFFu));
            v[2 * i + 1] = h2f((u16)(w[i] >> 16));
        }
    }
};

struct BF16 {
    __device__ static __forceinline__ void half(const u8* row, int u, int h, float (&v)[16]) {
        u32 w[8];
        load_words16(row + 64 * (ll)u + 32 * h, w);
#pragma unroll
        for (int i = 0; i < 8; ++i) {
            v[2 * i] = bf2f(w[i] & 0xFFFFu);
            v[2 * i + 1] = __uint_as_float(w[i] & 0xFFFF0000u);
        }
    }
};

// block_q4_0 (18 B): d, qs[16]; value j = low nibble of qs[j], j + 16 = high; x = d * (q - 8)
struct Q4_0 {
    static constexpr bool Q8_SPLIT = true, Q8_SUM = false;
    __device__ static __forceinline__ void half(const u8* row, int u, int h, float (&v)[16]) {
        const u8* b = row + 18 * (ll)u;
        const float d = h2f((u16)load_u16(b));
        u32 lv[4];
        load_words(b + 2, lv);
#pragma unroll
        for (int i = 0; i < 4; ++i) lv[i] = (lv[i] >> (4 * h)) & 0x0F0F0F0Fu;
#pragma unroll
        for (int l = 0; l < 16; ++l) v[l] = __fmul_rn(d, level<8>(lv, l));
    }
    // item it: qs bytes 8h .. 8h + 7
    __device__ static __forceinline__ float dot_q8(const u8* row, int it, const Q8Piece& x) {
        const u8* b = row + 18 * (ll)(it >> 1);
        u32 w[2], lv[4];
        load_words(b + 2 + 8 * (it & 1), w);
        const float d = h2f((u16)load_u16(b));
        nibble_levels(w[0], w[1], lv);
        return d * (x.ds.x * (float)dot_levels(lv, x) - 4.0f * x.ds.y);
    }
};

// block_q4_1 (20 B, 4-byte aligned): d, m, qs[16]; x = d * q + m
struct Q4_1 {
    static constexpr bool Q8_SPLIT = true, Q8_SUM = false;
    __device__ static __forceinline__ void half(const u8* row, int u, int h, float (&v)[16]) {
        const u32* b = (const u32*)(row + 20 * (ll)u);
        const u32 dm = b[0];
        const float d = h2f((u16)(dm & 0xFFFFu)), m = h2f((u16)(dm >> 16));
        u32 lv[4];
#pragma unroll
        for (int i = 0; i < 4; ++i) lv[i] = (b[1 + i] >> (4 * h)) & 0x0F0F0F0Fu;
#pragma unroll
        for (int l = 0; l < 16; ++l) v[l] = __fadd_rn(__fmul_rn(d, level<0>(lv, l)), m);
    }
    __device__ static __forceinline__ float dot_q8(const u8* row, int it, const Q8Piece& x) {
        const u32* b = (const u32*)(row + 20 * (ll)(it >> 1));
        const u32 dm = b[0];
        const u32* qs = b + 1 + 2 * (it & 1);
        const float d = h2f((u16)(dm & 0xFFFFu)), m = h2f((u16)(dm >> 16));
        u32 lv[4];
        nibble_levels(qs[0], qs[1], lv);
        return d * (x.ds.x * (float)dot_levels(lv, x)) + 0.5f * m * x.ds.y;
    }
};

// block_q5_0 (22 B): d, qh (uint32, bit j = fifth bit of value j), qs[16]; x = d * (q - 16)
struct Q5_0 {
    static constexpr bool Q8_SPLIT = true, Q8_SUM = false;
    __device__ static __forceinline__ void half(const u8* row, int u, int h, float (&v)[16]) {
        const u8* b = row + 22 * (ll)u;
        const float d = h2f((u16)load_u16(b));
        u32 w[5];  // qh, qs[0:16]
        load_words(b + 2, w);
        u32 lv[4];
#pragma unroll
        for (int i = 0; i < 4; ++i)
            lv[i] = ((w[1 + i] >> (4 * h)) & 0x0F0F0F0Fu) | spread4((w[0] >> (16 * h + 4 * i)) & 0xF);
#pragma unroll
        for (int l = 0; l < 16; ++l) v[l] = __fmul_rn(d, level<16>(lv, l));
    }
    // item it: qs bytes 8h .. 8h + 7, fifth bits 8h .. 8h + 7 and 16 + 8h .. of qh
    __device__ static __forceinline__ float dot_q8(const u8* row, int it, const Q8Piece& x) {
        const u8* b = row + 22 * (ll)(it >> 1);
        const int h = it & 1;
        u32 qh[1], w[2], lv[4];
        load_words(b + 2, qh);
        load_words(b + 6 + 8 * h, w);
        const float d = h2f((u16)load_u16(b));
        const u32 fifth = qh[0] >> (8 * h);
        nibble_levels(w[0], w[1], lv);
#pragma unroll
        for (int i = 0; i < 4; ++i) lv[i] |= spread4((fifth >> (4 * (i & 1) + 16 * (i >> 1))) & 0xF);
        return d * (x.ds.x * (float)dot_levels(lv, x) - 8.0f * x.ds.y);
    }
};

// block_q5_1 (24 B, 8-byte aligned): d, m, qh (uint32), qs[16]; x = d * q + m
struct Q5_1 {
    static constexpr bool Q8_SPLIT = true, Q8_SUM = false;
    __device__ static __forceinline__ void half(const u8* row, int u, int h, float (&v)[16]) {
        const u32* b = (const u32*)(row + 24 * (ll)u);
        const u32 dm = b[0], qh = b[1];
        const float d = h2f((u16)(dm & 0xFFFFu)), m = h2f((u16)(dm >> 16));
        u32 lv[4];
#pragma unroll
        for (int i = 0; i < 4; ++i)
            lv[i] = ((b[2 + i] >> (4 * h)) & 0x0F0F0F0Fu) | spread4((qh >> (16 * h + 4 * i)) & 0xF);
#pragma unroll
        for (int l = 0; l < 16; ++l) v[l] = __fadd_rn(__fmul_rn(d, level<0>(lv, l)), m);
    }
    __device__ static __forceinline__ float dot_q8(const u8* row, int it, const Q8Piece& x) {
        const u32* b = (const u32*)(row + 24 * (ll)(it >> 1));
        const int h = it & 1;
        const u32 dm = b[0], fifth = b[1] >> (8 * h);
        const u32* qs = b + 2 + 2 * h;
        const float d = h2f((u16)(dm & 0xFFFFu)), m = h2f((u16)(dm >> 16));
        u32 lv[4];
        nibble_levels(qs[0], qs[1], lv);
#pragma unroll
        for (int i = 0; i < 4; ++i) lv[i] |= spread4((fifth >> (4 * (i & 1) + 16 * (i >> 1))) & 0xF);
        return d * (x.ds.x * (float)dot_levels(lv, x)) + 0.5f * m * x.ds.y;
    }
};

// block_q8_0 (34 B): d, int8 qs[32]; x = q * d. Byte b ^ 0x80 is the int8 plus 128.
struct Q8_0 {
    static constexpr bool Q8_SPLIT = false, Q8_SUM = false;
    __device__ static __forceinline__ void half(const u8* row, int u, int h, float (&v)[16]) {
        const u8* b = row + 34 * (ll)u;
        const float d = h2f((u16)load_u16(b));
        u32 lv[4];
        load_words(b + 2 + 16 * h, lv);
#pragma unroll
        for (int i = 0; i < 4; ++i) lv[i] ^= 0x80808080u;
#pragma unroll
        for (int l = 0; l < 16; ++l) v[l] = __fmul_rn(level<128>(lv, l), d);
    }
    // item it: qs[16h:][:16], signed levels as dp4a.s32 takes them
    __device__ static __forceinline__ float dot_q8(const u8* row, int it, const Q8Piece& x) {
        const u8* b = row + 34 * (ll)(it >> 1);
        u32 w[4];
        load_words(b + 2 + 16 * (it & 1), w);
        const float d = h2f((u16)load_u16(b));
        return d * (x.ds.x * (float)dot_levels(w, x));
    }
};

// 6-bit scale and min of sub-block j of Q4_K/Q5_K from scales[12] = words s0 s1 s2
// (gguf-py Q4_K.get_scale_min, ggml-quants.c get_scale_min_k4)
__device__ __forceinline__ void scale_min_k4(int j, u32 s0, u32 s1, u32 s2, u32& sc, u32& m) {
    const int i = j & 3;
    const u32 a = byte_of(s0, i), b = byte_of(s1, i), c = byte_of(s2, i);
    sc = j < 4 ? (a & 63) : ((c & 0xF) | ((a >> 6) << 4));
    m = j < 4 ? (b & 63) : ((c >> 4) | ((b >> 6) << 4));
}

// d * sc and dmin * m of sub-block j from the first 16 bytes of a Q4_K/Q5_K block
__device__ __forceinline__ void scales_k4(const u8* b, int j, float& dsc, float& dm) {
    const u32x4 h = *(const u32x4*)b;  // d | dmin << 16, scales[0:4], [4:8], [8:12]
    u32 sc, m;
    scale_min_k4(j, h.y, h.z, h.w, sc, m);
    dsc = __fmul_rn(h2f((u16)(h.x & 0xFFFFu)), (float)sc);
    dm = __fmul_rn(h2f((u16)(h.x >> 16)), (float)m);
}

// block_q4_K (144 B, 16-byte aligned): d, dmin, scales[12], qs[128]; sub-block j reads
// qs[32 * (j / 2):][:32], low nibbles if j is even; x = (d * sc) * q - dmin * m
struct Q4_K {
    static constexpr bool Q8_SPLIT = false, Q8_SUM = false;
    __device__ static __forceinline__ void half(const u8* row, int u, int h, float (&v)[16]) {
        const u8* b = row + 144 * (ll)(u >> 3);
        const int j = u & 7;
        float dsc, dm;
        scales_k4(b, j, dsc, dm);
        u32 lv[4];
        load_words16(b + 16 + 32 * (j >> 1) + 16 * h, lv);
#pragma unroll
        for (int i = 0; i < 4; ++i) lv[i] = (lv[i] >> (4 * (j & 1))) & 0x0F0F0F0Fu;
#pragma unroll
        for (int l = 0; l < 16; ++l) v[l] = __fsub_rn(__fmul_rn(dsc, level<0>(lv, l)), dm);
    }
    __device__ static __forceinline__ float dot_q8(const u8* row, int it, const Q8Piece& x) {
        const int u = it >> 1, j = u & 7;
        const u8* b = row + 144 * (ll)(u >> 3);
        float dsc, dm;
        scales_k4(b, j, dsc, dm);
        u32 lv[4];
        load_words16(b + 16 + 32 * (j >> 1) + 16 * (it & 1), lv);
#pragma unroll
        for (int i = 0; i < 4; ++i) lv[i] = (lv[i] >> (4 * (j & 1))) & 0x0F0F0F0Fu;
        return dsc * (x.ds.x * (float)dot_levels(lv, x)) - 0.5f * dm * x.ds.y;
    }
};

// block_q5_K (176 B, 16-byte aligned): d, dmin, scales[12], qh[32], qs[128]; as Q4_K, and value l
// of sub-block j has fifth bit (qh[l] >> j) & 1
struct Q5_K {
    static constexpr bool Q8_SPLIT = false, Q8_SUM = false;
    __device__ static __forceinline__ void half(const u8* row, int u, int h, float (&v)[16]) {
        float dsc, dm;
        u32 lv[4];
        levels(row, u, h, dsc, dm, lv);
#pragma unroll
        for (int l = 0; l < 16; ++l) v[l] = __fsub_rn(__fmul_rn(dsc, level<0>(lv, l)), dm);
    }
    // the 16 five-bit levels of half h of unit u, one a byte, and the sub-block's d * sc, dmin * m
    __device__ static __forceinline__ void levels(const u8* row, int u, int h, float& dsc, float& dm,
                                                  u32 (&lv)[4]) {
        const u8* b = row + 176 * (ll)(u >> 3);
        const int j = u & 7;
        scales_k4(b, j, dsc, dm);
        u32 qh[4];
        load_words16(b + 16 + 16 * h, qh);
        load_words16(b + 48 + 32 * (j >> 1) + 16 * h, lv);
#pragma unroll
        for (int i = 0; i < 4; ++i)
            lv[i] = ((lv[i] >> (4 * (j & 1))) & 0x0F0F0F0Fu) | (((qh[i] >> j) & 0x01010101u) << 4);
    }
    __device__ static __forceinline__ float dot_q8(const u8* row, int it, const Q8Piece& x) {
        float dsc, dm;
        u32 lv[4];
        levels(row, it >> 1, it & 1, dsc, dm, lv);
        return dsc * (x.ds.x * (float)dot_levels(lv, x)) - 0.5f * dm * x.ds.y;
    }
};

// block_q6_K (210 B): ql[128], qh[64], int8 scales[16], d. Value i = 128 k + 32 s + l (half-block
// k, quarter s, l < 32): low 4 bits ql[64 k + 32 (s & 1) + l] >> 4 (s >> 1), high 2 bits
// qh[32 k + l] >> 2 s; x = (d * scales[i / 16]) * (q - 32). Unit g = u % 8 is quarter g & 3 of
// half-block g >> 2 (gguf-py Q6_K.dequantize_blocks, ggml-quants.c dequantize_row_q6_K).
struct Q6_K {
    static constexpr bool Q8_SPLIT = false, Q8_SUM = true;
    __device__ static __forceinline__ void half(const u8* row, int u, int h, float (&v)[16]) {
        u32 lv[4];
        const float d = levels(row, u, h, lv);
#pragma unroll
        for (int l = 0; l < 16; ++l) v[l] = __fmul_rn(d, level<32>(lv, l));
    }
    // item it: scale group 2g + h, the -32 taken off the integer dot with the item's sum of q
    __device__ static __forceinline__ float dot_q8(const u8* row, int it, const Q8Piece& x) {
        u32 lv[4];
        const float d = levels(row, it >> 1, it & 1, lv);
        return d * (x.ds.x * (float)(dot_levels(lv, x) - 32 * x.sum));
    }
    // the 16 six-bit levels of half h of unit u, one a byte, and their scale group's d * scale
    __device__ static __forceinline__ float levels(const u8* row, int u, int h, u32 (&lv)[4]) {
        const u8* b = row + 210 * (ll)(u >> 3);
        const int g = u & 7, k = g >> 2, s = g & 3;
        u32 qh[4];
        load_words(b + 64 * k + 32 * (s & 1) + 16 * h, lv);
        load_words(b + 128 + 32 * k + 16 * h, qh);
#pragma unroll
        for (int i = 0; i < 4; ++i)
            lv[i] = ((lv[i] >> (4 * (s >> 1))) & 0x0F0F0F0Fu) | (((qh[i] >> (2 * s)) & 0x03030303u) << 4);
        return __fmul_rn(h2f((u16)load_u16(b + 208)), (float)(signed char)b[192 + 2 * g + h]);
    }
};

// --- decode products ----------------------------------------------------------------------------

__device__ __forceinline__ float warp_sum(float s) {
#pragma unroll
    for (int off = WARP_SIZE / 2; off > 0; off >>= 1) s += __shfl_xor_sync(FULL_MASK, s, off);
    return s;
}

// dot of 16 decoded weights with x[0:16]; four partial sums for latency and accuracy
__device__ __forceinline__ float dot16(const float (&w)[16], const float* __restrict__ x) {
    const f32x4* p = (const f32x4*)x;
    float s0 = 0.0f, s1 = 0.0f, s2 = 0.0f, s3 = 0.0f;
#pragma unroll
    for (int i = 0; i < 4; ++i) {
        const f32x4 t = p[i];
        s0 += w[4 * i] * t.x;
        s1 += w[4 * i + 1] * t.y;
        s2 += w[4 * i + 2] * t.z;
        s3 += w[4 * i + 3] * t.w;
    }
    return (s0 + s1) + (s2 + s3);
}

// Activations go through shared memory a chunk of 32 units (1024 values per token) at a time: the
// block loads each chunk once for its 4 rows, coalesced, and each lane then reads the 32 values of
// its unit. Read straight from global memory, a warp's 16-byte loads at a 128-byte stride cost one
// L1 wavefront per lane and bound the products far below memory bandwidth. A unit's values sit
// XS_STRIDE floats apart: the 8 lanes of a quarter warp hit 8 distinct groups of 4 banks.
#define XS_STRIDE 36                // floats per unit: 32 values and 4 of padding
#define XS_TOKEN (32 * XS_STRIDE)   // floats per token and chunk

// One warp: acc[t] = its lanes' share of row . x[t * K:][:K] for t < T <= MAX_T. Lane l decodes
// units l, l + 32, ... once and multiplies each by the T activation rows. Every warp of the block
// calls it (the chunks are loaded together); those with active = false (rows past N) only load.
template <class Q, int MAX_T>
__device__ __forceinline__ void mmv_acc(const u8* __restrict__ row, bool active, const float* __restrict__ x,
                                        float* xs, int K, int T, float (&acc)[MAX_T]) {
    const int lane = threadIdx.x & (WARP_SIZE - 1);
    const int units = K >> 5;
#pragma unroll
    for (int t = 0; t < MAX_T; ++t) acc[t] = 0.0f;
#pragma unroll 1  // one unit in flight per lane: more would pass the 64 registers
    for (int base = 0; base < units; base += WARP_SIZE) {
        const int n_units = min(WARP_SIZE, units - base);
        __syncthreads();  // the previous chunk is consumed
        for (int t = 0; t < T; ++t) {
            const f32x4* src = (const f32x4*)(x + (ll)t * K + 32 * base);
            f32x4* dst = (f32x4*)(xs + t * XS_TOKEN);
            for (int i = threadIdx.x; i < 8 * n_units; i += blockDim.x) dst[(i >> 3) * (XS_STRIDE / 4) + (i & 7)] = src[i];
        }
        __syncthreads();
        if (active && lane < n_units) {
#pragma unroll
            for (int h = 0; h < 2; ++h) {
                float w[16];
                Q::half(row, base + lane, h, w);
                const float* xu = xs + lane * XS_STRIDE + 16 * h;
#pragma unroll
                for (int t = 0; t < MAX_T; ++t)
                    if (t < T) acc[t] += dot16(w, xu + t * XS_TOKEN);
            }
        }
    }
}

// One warp: y[t * y_stride] = res + (add + row . x[t * K:][:K]) for t < T <= MAX_T (lane 0 writes;
// add, res: values at the same offsets as y, or NULL for none).
template <class Q, int MAX_T>
__device__ __forceinline__ void mmv_warp(const u8* __restrict__ row, bool active, const float* __restrict__ x,
                                         float* xs, float* __restrict__ y, ll y_stride, int K, int T,
                                         const float* __restrict__ add = nullptr,
                                         const float* __restrict__ res = nullptr) {
    const int lane = threadIdx.x & (WARP_SIZE - 1);
    float acc[MAX_T];
    mmv_acc<Q, MAX_T>(row, active, x, xs, K, T, acc);
    if (!active) return;  // whole warps
#pragma unroll
    for (int t = 0; t < MAX_T; ++t) {
        if (t < T) {  // T is the same for the whole warp
            float s = warp_sum(acc[t]);
            if (lane == 0) {
                if (add) s = add[t * y_stride] + s;
                if (res) s = res[t * y_stride] + s;
                y[t * y_stride] = s;
            }
        }
    }
}

template <class Q>
__device__ __forceinline__ void mmv(const u8* __restrict__ W, ll row_bytes, const float* __restrict__ x,
                                    float* __restrict__ y, int N, int K, int T, const float* __restrict__ add,
                                    const float* __restrict__ res) {
    __shared__ float xs[MMV_MAX_T * XS_TOKEN];
    const int n = blockIdx.x * MMV_WARPS + (threadIdx.x >> 5);
    const bool active = n < N;
    const u8* row = W + min(n, N - 1) * row_bytes;
    const float* a = add ? add + n : nullptr;
    const float* r = res ? res + n : nullptr;
    // T is uniform over the grid: one specialisation per power of two, guarded up to T
    if (T <= 1) mmv_warp<Q, 1>(row, active, x, xs, y + n, N, K, T, a, r);
    else if (T <= 2) mmv_warp<Q, 2>(row, active, x, xs, y + n, N, K, T, a, r);
    else if (T <= 4) mmv_warp<Q, 4>(row, active, x, xs, y + n, N, K, T, a, r);
    else mmv_warp<Q, MMV_MAX_T>(row, active, x, xs, y + n, N, K, T, a, r);
}

// --- a block a few rows ---------------------------------------------------------------------------
// The products of a single token and a layer's routed experts give each group of R output rows a
// block of ROW_THREADS threads. A row is cut into items of 16 values (half a unit); thread i takes
// items i, i + ROW_THREADS, ..., loads the item's 16 activations once and multiplies them by the R
// rows' weights: a block's loads are contiguous, every thread has its loads in flight together, and
// an activation loaded from L1 serves R rows (float32 activations read once a row would move 7x the
// bytes of the Q4_0 weights through L1). The per-warp kernels above walk a row's units one after
// another behind a barrier each (20 us for six experts' down rows that take 3 us to read).
// Sums: float32, each thread's items in order, then the warps' shares in a fixed order
// (deterministic run to run, not the per-warp kernels' order).
#define ROW_THREADS 128
#define ROW_WARPS (ROW_THREADS / WARP_SIZE)
#define MMV1_ROWS 4   // rows a block of mmv1 and mmv_down_ids
#define GLU_ROWS 2    // rows a block of mmv_glu_ids (each with its gate and up row)
// threads a block of the int8 down products: a V2-Lite row is 6 x 1408 + 2816 values, 704 items,
// and each thread's items follow one another (each waiting on its loads): 256 threads halve that
// chain (Q4_0 8.2 -> 7.0 us a launch, Q5_0 + Q6_K 12.3 -> 10.1; 512 threads and 2 or 8 rows slower)
#define DOWN_THREADS 256
// threads a block of the int8 gate-up products: a V2-Lite row (K = 2048) is 128 items, one a thread
// at 128 threads; two a thread at 64 give each thread two loads in flight and twice the blocks an SM
// (12.0 -> 10.4 us a Q4_0 launch of six experts and the shared ones, H200; 4 or 8 rows a block at
// 128 threads: 11.3, 11.8)
#define GLU_THREADS 64

__device__ __forceinline__ void load16(const float* __restrict__ x, float (&v)[16]) {
    const f32x4* p = (const f32x4*)x;
#pragma unroll
    for (int i = 0; i < 4; ++i) {
        const f32x4 t = p[i];
        v[4 * i] = t.x; v[4 * i + 1] = t.y; v[4 * i + 2] = t.z; v[4 * i + 3] = t.w;
    }
}

__device__ __forceinline__ void store16(float* __restrict__ out, const float (&v)[16]) {
    f32x4* p = (f32x4*)out;
#pragma unroll
    for (int i = 0; i < 4; ++i) p[i] = f32x4{v[4 * i], v[4 * i + 1], v[4 * i + 2], v[4 * i + 3]};
}

__device__ __forceinline__ void store16(u16* __restrict__ out, const float (&v)[16]) {
    u32 w[8];
#pragma unroll
    for (int k = 0; k < 8; ++k) w[k] = (u32)f2h(v[2 * k]) | ((u32)f2h(v[2 * k + 1]) << 16);
    u32x4* p = (u32x4*)out;
    p[0] = u32x4{w[0], w[1], w[2], w[3]};
    p[1] = u32x4{w[4], w[5], w[6], w[7]};
}

// 16 decoded weights . 16 activations in registers; four partial sums as dot16
__device__ __forceinline__ float dot16r(const float (&w)[16], const float (&x)[16]) {
    float s0 = 0.0f, s1 = 0.0f, s2 = 0.0f, s3 = 0.0f;
#pragma unroll
    for (int i = 0; i < 4; ++i) {
        s0 += w[4 * i] * x[4 * i];
        s1 += w[4 * i + 1] * x[4 * i + 1];
        s2 += w[4 * i + 2] * x[4 * i + 2];
        s3 += w[4 * i + 3] * x[4 * i + 3];
    }
    return (s0 + s1) + (s2 + s3);
}

// item it of a row . its activations x[16 it:][:16]
template <class Q>
__device__ __forceinline__ float item_dot(const u8* __restrict__ row, int it, const float* __restrict__ x) {
    float w[16], v[16];
    Q::half(row, it >> 1, it & 1, w);
    load16(x + 16 * it, v);
    return dot16r(w, v);
}

// acc[r] += item it of rows[r] . x's item, for r < R (the activations loaded once)
template <class Q, int R>
__device__ __forceinline__ void items_dot(const u8* const (&rows)[R], int it, const float* __restrict__ x,
                                          float (&acc)[R]) {
    float v[16];
    load16(x + 16 * it, v);
#pragma unroll
    for (int r = 0; r < R; ++r) {
        float w[16];
        Q::half(rows[r], it >> 1, it & 1, w);
        acc[r] += dot16r(w, v);
    }
}

// the block's sums of each thread's acc[r], in thread 0 (red: R * ROW_WARPS floats of shared memory)
template <int R, int WARPS = ROW_WARPS>
__device__ __forceinline__ void block_sums(float (&acc)[R], float* red) {
    const int warp = threadIdx.x >> 5;
#pragma unroll
    for (int r = 0; r < R; ++r) {
        const float s = warp_sum(acc[r]);
        if ((threadIdx.x & (WARP_SIZE - 1)) == 0) red[r * WARPS + warp] = s;
    }
    __syncthreads();
    if (threadIdx.x == 0) {
#pragma unroll
        for (int r = 0; r < R; ++r) {
            float t = 0.0f;
#pragma unroll
            for (int w = 0; w < WARPS; ++w) t += red[r * WARPS + w];
            acc[r] = t;
        }
    }
}

// The ends of the one-token products, float and int8 alike: the block's partial sums added up
// (block_sums), then thread 0 writes the block's rows.
// y[n] = res[n] + (add[n] + acc[r]) for rows n = n0 + r < N (add, res NULL: none)
template <int R>
__device__ __forceinline__ void finish_rows(float (&acc)[R], float* red, const float* __restrict__ add,
                                            const float* __restrict__ res, float* __restrict__ y, int n0, int N) {
    block_sums<R>(acc, red);
    if (threadIdx.x == 0) {
#pragma unroll
        for (int r = 0; r < R; ++r) {
            const int n = n0 + r;
            if (n < N) {
                float s = acc[r];
                if (add) s = add[n] + s;
                if (res) s = res[n] + s;
                y[n] = s;
            }
        }
    }
}

// out[n] = silu(gate sum) * (up sum) for rows n = n0 + r < rows_n; acc: gate sums, then up sums
template <int R, int WARPS = ROW_WARPS>
__device__ __forceinline__ void finish_glu(float (&acc)[2 * R], float* red, float* __restrict__ out, int n0,
                                           int rows_n) {
    block_sums<2 * R, WARPS>(acc, red);
    if (threadIdx.x == 0) {
#pragma unroll
        for (int r = 0; r < R; ++r) {
            const int n = n0 + r;
            const float g = acc[r], u = acc[R + r];
            if (n < rows_n) out[n] = g / (1.0f + expf(-g)) * u;
        }
    }
}

// y[t N + n] = res + ((add + routed sum) + shared sum) for rows n = n0 + r < N, the unfused graph's
// order; acc: the routed sums, then the shared row's (with_shared false: none)
template <int R, int WARPS = ROW_WARPS>
__device__ __forceinline__ void finish_down(float (&acc)[2 * R], float* red, const float* __restrict__ add,
                                            const float* __restrict__ res, bool with_shared, float* __restrict__ y,
                                            int t, int n0, int N) {
    block_sums<2 * R, WARPS>(acc, red);
    if (threadIdx.x == 0) {
#pragma unroll
        for (int r = 0; r < R; ++r) {
            const int n = n0 + r;
            if (n < N) {
                const ll at = (ll)t * N + n;
                float s = add ? add[at] + acc[r] : acc[r];
                if (with_shared) s = s + acc[R + r];
                if (res) s = res[at] + s;
                y[at] = s;
            }
        }
    }
}

// A glu block's rows: gate rows, then up rows, of expert ids[p] (of the shared experts' Wg2, Wu2
// where `shared`), rows n0 .. n0 + R - 1 clamped to rows_n - 1
template <int R>
__device__ __forceinline__ void glu_rows(const u8* (&rows)[2 * R], const u8* __restrict__ Wg,
                                         const u8* __restrict__ Wu, ll row_bytes, ll expert_bytes,
                                         const int* __restrict__ ids, const u8* __restrict__ Wg2,
                                         const u8* __restrict__ Wu2, ll row_bytes2, bool shared, int p, int n0,
                                         int rows_n) {
#pragma unroll
    for (int r = 0; r < R; ++r) {
        const int n = min(n0 + r, rows_n - 1);
        const ll off = shared ? (ll)n * row_bytes2 : (ll)ids[p] * expert_bytes + (ll)n * row_bytes;
        rows[r] = (shared ? Wg2 : Wg) + off;
        rows[R + r] = (shared ? Wu2 : Wu) + off;
    }
}

// Row n of expert ids[p] . x[p / x_div] -> y[p, n], tpr threads a row (a power of two <= 32, set by
// the host from K: MLA's per-head products have K = 128 or 512, where a warp a row would leave most
// lanes idle), thread r of a row taking items r, r + tpr, ...; ROW_THREADS / tpr rows a block (the
// rows of a warp read the same activations: one load serves them all).
template <class Q>
__device__ __forceinline__ void mmv_ids(const u8* __restrict__ W, ll row_bytes, ll expert_bytes,
                                        const int* __restrict__ ids, const float* __restrict__ x, int x_div,
                                        ll x_stride, float* __restrict__ y, int N, int K, int P, int tpr) {
    const int p = blockIdx.y;
    const int r = threadIdx.x & (tpr - 1);
    const int n = blockIdx.x * (ROW_THREADS / tpr) + threadIdx.x / tpr;
    const bool active = n < N;
    const u8* row = W + (ll)ids[p] * expert_bytes + (ll)min(n, N - 1) * row_bytes;
    const float* xp = x + (ll)(p / x_div) * x_stride;
    const int items = K >> 4;
    float s = 0.0f;
    if (active) {
#pragma unroll 4
        for (int it = r; it < items; it += tpr) s += item_dot<Q>(row, it, xp);
    }
    for (int off = tpr >> 1; off > 0; off >>= 1) s += __shfl_xor_sync(FULL_MASK, s, off);
    if (active && r == 0) y[(ll)p * N + n] = s;
}

// y[n] = res[n] + (add[n] + row n . x) for the block's MMV1_ROWS rows: one token (T = 1),
// grid (ceil(N / MMV1_ROWS), 1, 1)
template <class Q>
__device__ __forceinline__ void mmv1(const u8* __restrict__ W, ll row_bytes, const float* __restrict__ x,
                                     float* __restrict__ y, int N, int K, const float* __restrict__ add,
                                     const float* __restrict__ res) {
    constexpr int R = MMV1_ROWS;
    __shared__ float red[R * ROW_WARPS];
    const int n0 = blockIdx.x * R;
    const u8* rows[R];
#pragma unroll
    for (int r = 0; r < R; ++r) rows[r] = W + (ll)min(n0 + r, N - 1) * row_bytes;
    const int items = K >> 4;
    float acc[R];
#pragma unroll
    for (int r = 0; r < R; ++r) acc[r] = 0.0f;
    for (int it = threadIdx.x; it < items; it += ROW_THREADS) items_dot<Q, R>(rows, it, x, acc);
    finish_rows<R>(acc, red, add, res, y, n0, N);
}

// silu(gate . x) * (up . x) for the block's GLU_ROWS rows of expert ids[p], gate and up of one
// format and shape, the silu_mul of silu_mul_f32. Pairs p >= P, where Wg2 is given, are the shared
// experts' (Wg2, Wu2: (N2, K), one pair a token, x row p - P, out h2): a MoE layer's two gate-up
// products in one launch. Grid (ceil(max(N, N2) / GLU_ROWS), P (+ P2), 1).
template <class Q>
__device__ __forceinline__ void mmv_glu_ids(const u8* __restrict__ Wg, const u8* __restrict__ Wu, ll row_bytes,
                                            ll expert_bytes, const int* __restrict__ ids,
                                            const float* __restrict__ x, int x_div, float* __restrict__ h, int N,
                                            int K, int P, const u8* __restrict__ Wg2, const u8* __restrict__ Wu2,
                                            ll row_bytes2, int N2, float* __restrict__ h2) {
    constexpr int R = GLU_ROWS;
    __shared__ float red[2 * R * ROW_WARPS];
    const int n0 = blockIdx.x * R, p = blockIdx.y;
    const bool shared = p >= P;
    const int rows_n = shared ? N2 : N;
    if (n0 >= rows_n) return;  // the whole block: the grid covers the longer of the two
    const u8* rows[2 * R];  // gate rows, then up rows
    glu_rows<R>(rows, Wg, Wu, row_bytes, expert_bytes, ids, Wg2, Wu2, row_bytes2, shared, p, n0, rows_n);
    const float* xp = x + (ll)(shared ? p - P : p / x_div) * K;
    float* out = shared ? h2 + (ll)(p - P) * N2 : h + (ll)p * N;
    const int items = K >> 4;
    float acc[2 * R];
#pragma unroll
    for (int r = 0; r < 2 * R; ++r) acc[r] = 0.0f;
    for (int it = threadIdx.x; it < items; it += ROW_THREADS) items_dot<Q, 2 * R>(rows, it, xp, acc);
    finish_glu<R>(acc, red, out, n0, rows_n);
}

// A token's routed experts' down projections, weighted and summed: row n of token t is
// res + ((add + sum over j < k of w[t k + j] * (W[ids[t k + j]] row n . h[t k + j])) + W2 row n . h2[t])
// (add, res, W2: NULL for none; W2 (N, K2) the shared experts' down, h2 (T, K2)): the k experts' items
// and the shared row's are one range that the block's threads share, MMV1_ROWS rows a block.
// Grid (ceil(N / MMV1_ROWS), T, 1).
template <class Q>
__device__ __forceinline__ void mmv_down_ids(const u8* __restrict__ W, ll row_bytes, ll expert_bytes,
                                             const int* __restrict__ ids, const float* __restrict__ h,
                                             const float* __restrict__ w, const float* __restrict__ add,
                                             float* __restrict__ y, int N, int K, int k, const u8* __restrict__ W2,
                                             ll row_bytes2, int K2, const float* __restrict__ h2,
                                             const float* __restrict__ res) {
    constexpr int R = MMV1_ROWS;
    __shared__ float red[2 * R * ROW_WARPS];
    const int n0 = blockIdx.x * R, t = blockIdx.y;
    const int items = K >> 4, routed = k * items;
    const int total = routed + (W2 ? K2 >> 4 : 0);
    float acc[2 * R];  // routed sums, then the shared row's
#pragma unroll
    for (int r = 0; r < 2 * R; ++r) acc[r] = 0.0f;
    for (int i = threadIdx.x; i < total; i += ROW_THREADS) {
        const u8* rows[R];
        float part[R];
#pragma unroll
        for (int r = 0; r < R; ++r) part[r] = 0.0f;
        if (i < routed) {
            const int j = i / items, it = i - j * items;
            const int p = t * k + j;
#pragma unroll
            for (int r = 0; r < R; ++r) rows[r] = W + (ll)ids[p] * expert_bytes + (ll)min(n0 + r, N - 1) * row_bytes;
            items_dot<Q, R>(rows, it, h + (ll)p * K, part);
            const float wp = w[p];
#pragma unroll
            for (int r = 0; r < R; ++r) acc[r] += wp * part[r];
        } else {
#pragma unroll
            for (int r = 0; r < R; ++r) rows[r] = W2 + (ll)min(n0 + r, N - 1) * row_bytes2;
            items_dot<Q, R>(rows, i - routed, h2 + (ll)t * K2, part);
#pragma unroll
            for (int r = 0; r < R; ++r) acc[R + r] += part[r];
        }
    }
    finish_down<R>(acc, red, add, res, W2 != nullptr, y, t, n0, N);
}

// --- products on int8 activations -------------------------------------------------------------------
// mmv1, mmv_glu_ids and mmv_down_ids of the quantized formats on activations as q8_1 (int8
// activations, above), the same blocks, items and sums: an item's Q8Piece loaded once serves the
// block's rows. The float products spend about four instructions a weight decoding it (byte permute,
// subtract, scale, multiply-add): on the routed experts' products that is the limit, not the memory
// (26 MB of Q4_0 gate-up weights at 1.3 TB/s).

// y[n] = res[n] + (add[n] + row n . x) for MMV1_ROWS rows a block (rows 4 block ..), x as q8_1;
// grid (ceil(N / 4))
template <class Q>
__device__ __forceinline__ void mmv1_q8(const u8* __restrict__ W, ll row_bytes, const u8* __restrict__ xq,
                                        const f32x2* __restrict__ xs, float* __restrict__ y, int N, int K,
                                        const float* __restrict__ add, const float* __restrict__ res,
                                        int block) {
    constexpr int R = MMV1_ROWS;
    __shared__ float red[R * ROW_WARPS];
    const int n0 = block * R;
    const u8* rows[R];
#pragma unroll
    for (int r = 0; r < R; ++r) rows[r] = W + (ll)min(n0 + r, N - 1) * row_bytes;
    float acc[R];
#pragma unroll
    for (int r = 0; r < R; ++r) acc[r] = 0.0f;
    for (int it = threadIdx.x; it < (K >> 4); it += ROW_THREADS) {
        Q8Piece x;
        x.load<Q>(xq, xs, it);
#pragma unroll
        for (int r = 0; r < R; ++r) acc[r] += Q::dot_q8(rows[r], it, x);
    }
    finish_rows<R>(acc, red, add, res, y, n0, N);
}

// --- activations staged by the product's own blocks ---------------------------------------------------
// A token's float32 activations quantized to q8_1 by every block of the product that reads them,
// into its shared memory, instead of by a launch of their own (rms_norm_q8, quantize_q8_1) before
// it: a decode step's norms and its attention output cost a launch each, and a launch inside a
// graph costs more than the block's re-reading 8 KB of activations from L2. Where a norm weight is
// given the values are normalized first (rms_norm_f32's x * scale * w; the sums of squares in each
// thread's items' order, then the warps' in order, so the scale may differ from rms_norm_f32's by
// an ulp).
#define STAGE_MAX 16384  // values a block stages (V3's attention output: 128 heads x 128)
// The launches that stage x give their blocks K + K / 4 bytes of dynamic shared memory (cuda.py
// stage_bytes): the q8 values, then a (d, d * sum(q)) pair of floats a 32.

// Item it's 16 values v (zeros where not valid) -> ys where given, and q8_1 into xq, xs where xq is
// given: the item's pair (it ^ 1, the neighbouring lane) shares the block's amax and sum.
__device__ __forceinline__ void stage_item(float (&v)[16], int it, bool valid, float* ys, u8* xq, f32x2* xs) {
    if (ys && valid) store16(ys + 16 * it, v);
    if (!xq) return;
    float amax = 0.0f;
#pragma unroll
    for (int i = 0; i < 16; ++i) amax = fmaxf(amax, fabsf(v[i]));
    amax = fmaxf(amax, __shfl_xor_sync(FULL_MASK, amax, 1));
    const float d = amax / 127.0f;
    u32 packed[4] = {0u, 0u, 0u, 0u};
    int sum = 0;
#pragma unroll
    for (int i = 0; i < 16; ++i) {
        const int q = amax == 0.0f ? 0 : __float2int_rn(v[i] / d);
        sum += q;
        packed[i >> 2] |= ((u32)q & 0xFFu) << (8 * (i & 3));
    }
    sum += __shfl_xor_sync(FULL_MASK, sum, 1);
    if (valid) {
        *(u32x4*)(xq + 16 * it) = u32x4{packed[0], packed[1], packed[2], packed[3]};
        if (!(it & 1)) xs[it >> 1] = f32x2{d, d * (float)sum};
    }
}

// the block's sum of each thread's s, in every thread (partial: ROW_WARPS floats of shared memory)
__device__ __forceinline__ float block_total(float s, float* partial) {
    s = warp_sum(s);
    if ((threadIdx.x & (WARP_SIZE - 1)) == 0) partial[threadIdx.x >> 5] = s;
    __syncthreads();
    float t = 0.0f;
#pragma unroll
    for (int i = 0; i < ROW_WARPS; ++i) t += partial[i];
    return t;
}

// x (K,) -> ys (K) float32 where given, and q8_1 (xq (K), xs (K / 32)) where xq is given, normalized
// by w (NULL: not normalized); all ROW_THREADS threads of the block call it; it ends with a barrier.
// Item it (16 values) is thread it % ROW_THREADS's: a q8_1 block's two items are neighbouring lanes.
// Rows of at most 16 ROW_THREADS values (an item a thread) are read once, x and w together, ahead of
// the sum of squares; longer ones twice.
__device__ __forceinline__ void stage_q8(const float* __restrict__ x, const float* __restrict__ w, float eps, int K,
                                         float* ys, u8* xq, f32x2* xs) {
    __shared__ float partial[ROW_WARPS];
    const int items = K >> 4, it0 = threadIdx.x;
    if (items <= ROW_THREADS) {
        const bool valid = it0 < items;  // items is even: a pair is valid or not together
        float v[16], g[16];
        if (valid) {
            load16(x + 16 * it0, v);
            if (w) load16(w + 16 * it0, g);
        } else {
#pragma unroll
            for (int i = 0; i < 16; ++i) v[i] = 0.0f;
        }
        if (w) {
            float s = 0.0f;
#pragma unroll
            for (int i = 0; i < 16; ++i) s += v[i] * v[i];
            const float scale = 1.0f / sqrtf(block_total(s, partial) / (float)K + eps);
            if (valid)
#pragma unroll
                for (int i = 0; i < 16; ++i) v[i] = v[i] * scale * g[i];
        }
        stage_item(v, it0, valid, ys, xq, xs);
        __syncthreads();
        return;
    }
    float scale = 1.0f;
    if (w) {
        float s = 0.0f;
        for (int it = it0; it < items; it += ROW_THREADS) {
            float v[16];
            load16(x + 16 * it, v);
#pragma unroll
            for (int i = 0; i < 16; ++i) s += v[i] * v[i];
        }
        scale = 1.0f / sqrtf(block_total(s, partial) / (float)K + eps);
    }
    const int rounds = (items + ROW_THREADS - 1) / ROW_THREADS;
    for (int j = 0; j < rounds; ++j) {  // uniform over the block: the pair's shuffles meet
        const int it = it0 + ROW_THREADS * j;
        const bool valid = it < items;
        float v[16];
        if (valid) {
            load16(x + 16 * it, v);
            if (w) {
                float g[16];
                load16(w + 16 * it, g);
#pragma unroll
                for (int i = 0; i < 16; ++i) v[i] = v[i] * scale * g[i];
            }
        } else {
#pragma unroll
            for (int i = 0; i < 16; ++i) v[i] = 0.0f;
        }
        stage_item(v, it, valid, ys, xq, xs);
    }
    __syncthreads();
}

// Rows n0 .. n0 + R - 1 of W (the last repeated past N) asked of L2 ahead, a 128-byte line a thread
// at a time (prefetch.global.L2): a block that stages its activations first has its weights on the
// way from memory meanwhile.
__device__ __forceinline__ void prefetch_rows(const u8* __restrict__ W, ll row_bytes, int n0, int R, int N) {
    const int lines = (int)((row_bytes + 127) >> 7) + 1;  // a row need not start on a line
    for (int i = threadIdx.x; i < R * lines; i += blockDim.x) {
        const int r = i / lines;
        const u8* p = W + (ll)min(n0 + r, N - 1) * row_bytes + ((ll)(i - r * lines) << 7);
        asm volatile("prefetch.global.L2 [%0];" ::"l"(p));
    }
}

// mmv1_q8 on x (K,) float32 staged by the block (normalized by nw where given)
template <class Q>
__device__ __forceinline__ void mmv1_sq8(const u8* __restrict__ W, ll row_bytes, const float* __restrict__ x,
                                         const float* __restrict__ nw, float eps, float* __restrict__ y, int N, int K,
                                         const float* __restrict__ add, const float* __restrict__ res, int block) {
    extern __shared__ __align__(16) u8 staged[];  // K bytes of q8, then K / 32 (d, d * sum(q)): stage_bytes(K)
    u8* xq = staged;
    f32x2* xs = (f32x2*)(staged + K);
    prefetch_rows(W, row_bytes, block * MMV1_ROWS, MMV1_ROWS, N);
    stage_q8(x, nw, eps, K, nullptr, xq, xs);
    mmv1_q8<Q>(W, row_bytes, xq, xs, y, N, K, add, res, block);
}

// mmv_glu_ids (shared experts included) on x as q8_1: row r of x at xq + r K, xs + r K / 32
template <class Q>
__device__ __forceinline__ void glu_ids_q8(const u8* __restrict__ Wg, const u8* __restrict__ Wu, ll row_bytes,
                                           ll expert_bytes, const int* __restrict__ ids, const u8* __restrict__ xq,
                                           const f32x2* __restrict__ xs, int x_div, float* __restrict__ h, int N,
                                           int K, int P, const u8* __restrict__ Wg2, const u8* __restrict__ Wu2,
                                           ll row_bytes2, int N2, float* __restrict__ h2) {
    constexpr int R = GLU_ROWS;
    __shared__ float red[2 * R * (GLU_THREADS / WARP_SIZE)];
    const int n0 = blockIdx.x * R, p = blockIdx.y;
    const bool shared = p >= P;
    const int rows_n = shared ? N2 : N;
    if (n0 >= rows_n) return;
    const u8* rows[2 * R];  // gate rows, then up rows
    glu_rows<R>(rows, Wg, Wu, row_bytes, expert_bytes, ids, Wg2, Wu2, row_bytes2, shared, p, n0, rows_n);
    const ll xr = shared ? p - P : p / x_div;
    const u8* xqp = xq + xr * K;
    const f32x2* xsp = xs + xr * (K >> 5);
    float* out = shared ? h2 + (ll)(p - P) * N2 : h + (ll)p * N;
    float acc[2 * R];
#pragma unroll
    for (int r = 0; r < 2 * R; ++r) acc[r] = 0.0f;
    for (int it = threadIdx.x; it < (K >> 4); it += GLU_THREADS) {
        Q8Piece x;
        x.load<Q>(xqp, xsp, it);
#pragma unroll
        for (int r = 0; r < 2 * R; ++r) acc[r] += Q::dot_q8(rows[r], it, x);
    }
    finish_glu<R, GLU_THREADS / WARP_SIZE>(acc, red, out, n0, rows_n);
}

// mmv_down_ids (shared experts and residual included) on h and h2 as q8_1: pair p's row at
// hq + p K (hs + p K / 32), token t's shared row at hq2 + t K2 (hs2 + t K2 / 32). The shared
// experts' down W2 is of format Q2, which may differ from the routed experts' Q (a Q4_K_M file's
// routed down rows of 1408 values fall back to Q5_0 or Q8_0, the shared ones stay Q6_K).
template <class Q, class Q2>
__device__ __forceinline__ void down_ids_q8(const u8* __restrict__ W, ll row_bytes, ll expert_bytes,
                                            const int* __restrict__ ids, const u8* __restrict__ hq,
                                            const f32x2* __restrict__ hs, const float* __restrict__ w,
                                            const float* __restrict__ add, float* __restrict__ y, int N, int K, int k,
                                            const u8* __restrict__ W2, ll row_bytes2, int K2,
                                            const u8* __restrict__ hq2, const f32x2* __restrict__ hs2,
                                            const float* __restrict__ res) {
    constexpr int R = MMV1_ROWS;
    __shared__ float red[2 * R * (DOWN_THREADS / WARP_SIZE)];
    const int n0 = blockIdx.x * R, t = blockIdx.y;
    const int items = K >> 4, routed = k * items;
    const int total = routed + (W2 ? K2 >> 4 : 0);
    float acc[2 * R];  // routed sums, then the shared row's
#pragma unroll
    for (int r = 0; r < 2 * R; ++r) acc[r] = 0.0f;
    for (int i = threadIdx.x; i < total; i += DOWN_THREADS) {
        const u8* rows[R];
        Q8Piece x;
        if (i < routed) {
            const int j = i / items, it = i - j * items;
            const int p = t * k + j;
#pragma unroll
            for (int r = 0; r < R; ++r) rows[r] = W + (ll)ids[p] * expert_bytes + (ll)min(n0 + r, N - 1) * row_bytes;
            x.load<Q>(hq + (ll)p * K, hs + (ll)p * (K >> 5), it);
            const float wp = w[p];
#pragma unroll
            for (int r = 0; r < R; ++r) acc[r] += wp * Q::dot_q8(rows[r], it, x);
        } else {
            const int it = i - routed;
#pragma unroll
            for (int r = 0; r < R; ++r) rows[r] = W2 + (ll)min(n0 + r, N - 1) * row_bytes2;
            x.load<Q2>(hq2 + (ll)t * K2, hs2 + (ll)t * (K2 >> 5), it);
#pragma unroll
            for (int r = 0; r < R; ++r) acc[R + r] += Q2::dot_q8(rows[r], it, x);
        }
    }
    finish_down<R, DOWN_THREADS / WARP_SIZE>(acc, red, add, res, W2 != nullptr, y, t, n0, N);
}

// one warp: the 32 values v of a q8_1 block (one a lane) -> xq[i], and (d, d * sum(q)) by lane 0
__device__ __forceinline__ void quantize_block(float v, bool valid, u8* __restrict__ xq, f32x2* __restrict__ xs,
                                               ll i) {
    float amax = fabsf(v);
#pragma unroll
    for (int off = 16; off > 0; off >>= 1) amax = fmaxf(amax, __shfl_xor_sync(FULL_MASK, amax, off));
    const float d = amax / 127.0f;
    const int q = amax == 0.0f ? 0 : __float2int_rn(v / d);
    int sum = q;
#pragma unroll
    for (int off = 16; off > 0; off >>= 1) sum += __shfl_xor_sync(FULL_MASK, sum, off);
    if (valid) {
        xq[i] = (u8)(signed char)q;
        if ((threadIdx.x & (WARP_SIZE - 1)) == 0) xs[i >> 5] = f32x2{d, d * (float)sum};
    }
}

// x (n,) float32 -> q8_1 xq (n,) int8, xs (n / 32) (d, d * sum(q)); n a multiple of 32
extern "C" __global__ void __launch_bounds__(128)
quantize_q8_1(const float* __restrict__ x, u8* __restrict__ xq, f32x2* __restrict__ xs, ll n) {
    const ll i = (ll)blockIdx.x * 128 + threadIdx.x;
    quantize_block(i < n ? x[i] : 0.0f, i < n, xq, xs, i);
}

// --- dequantize rows ----------------------------------------------------------------------------

// thread i decodes unit u of output row r, i = r * (K / 32) + u, into out[32 i:][:32]
template <class Q, class Out>
__device__ __forceinline__ void dequant(const u8* __restrict__ W, ll row_bytes, const int* __restrict__ rows,
                                        int n_rows, int K, Out* __restrict__ out) {
    const int units = K >> 5;
    const ll i = (ll)blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= (ll)n_rows * units) return;
    const ll r = i / units;
    const int u = (int)(i - r * units);
    const u8* row = W + (rows ? (ll)rows[r] : r) * row_bytes;
#pragma unroll
    for (int h = 0; h < 2; ++h) {
        float v[16];
        Q::half(row, u, h, v);
        store16(out + 32 * i + 16 * h, v);
    }
}

// --- kernels of every format ----------------------------------------------------------------------

#define FORMAT_KERNELS(name, Q)                                                                          \
    extern "C" __global__ void __launch_bounds__(128, 8)                                                \
        mmv_##name(const u8* __restrict__ W, ll row_bytes, const float* __restrict__ x,                \
                   float* __restrict__ y, int N, int K, int T, const float* __restrict__ add,          \
                   const float* __restrict__ res) {                                                    \
        mmv<Q>(W, row_bytes, x, y, N, K, T, add, res);                                                  \
    }                                                                                                   \
    extern "C" __global__ void __launch_bounds__(ROW_THREADS, 8)                                        \
        mmv_ids_##name(const u8* __restrict__ W, ll row_bytes, ll expert_bytes,                        \
                       const int* __restrict__ ids, const float* __restrict__ x, int x_div, ll x_stride, \
                       float* __restrict__ y, int N, int K, int P, int tpr) {                          \
        mmv_ids<Q>(W, row_bytes, expert_bytes, ids, x, x_div, x_stride, y, N, K, P, tpr);               \
    }                                                                                                   \
    extern "C" __global__ void __launch_bounds__(ROW_THREADS, 8)                                        \
        mmv1_##name(const u8* __restrict__ W, ll row_bytes, const float* __restrict__ x,               \
                    float* __restrict__ y, int N, int K, const float* __restrict__ add,                \
                    const float* __restrict__ res) {                                                   \
        mmv1<Q>(W, row_bytes, x, y, N, K, add, res);                                                    \
    }                                                                                                   \
    extern "C" __global__ void __launch_bounds__(ROW_THREADS, 8)                                        \
        mmv_glu_ids_##name(const u8* __restrict__ Wg, const u8* __restrict__ Wu, ll row_bytes,         \
                           ll expert_bytes, const int* __restrict__ ids, const float* __restrict__ x,  \
                           int x_div, float* __restrict__ h, int N, int K, int P,                      \
                           const u8* __restrict__ Wg2, const u8* __restrict__ Wu2, ll row_bytes2,      \
                           int N2, float* __restrict__ h2) {                                           \
        mmv_glu_ids<Q>(Wg, Wu, row_bytes, expert_bytes, ids, x, x_div, h, N, K, P, Wg2, Wu2, row_bytes2, \
                       N2, h2);                                                                         \
    }                                                                                                   \
    extern "C" __global__ void __launch_bounds__(ROW_THREADS, 8)                                        \
        mmv_down_ids_##name(const u8* __restrict__ W, ll row_bytes, ll expert_bytes,                   \
                            const int* __restrict__ ids, const float* __restrict__ h,                  \
                            const float* __restrict__ w, const float* __restrict__ add,                \
                            float* __restrict__ y, int N, int K, int k, const u8* __restrict__ W2,     \
                            ll row_bytes2, int K2, const float* __restrict__ h2,                       \
                            const float* __restrict__ res) {                                           \
        mmv_down_ids<Q>(W, row_bytes, expert_bytes, ids, h, w, add, y, N, K, k, W2, row_bytes2, K2, h2,  \
                        res);                                                                           \
    }                                                                                                   \
    extern "C" __global__ void dequant_##name##_f32(const u8* __restrict__ W, ll row_bytes,             \
                                                    const int* __restrict__ rows, int n_rows, int K,    \
                                                    float* __restrict__ out) {                          \
        dequant<Q>(W, row_bytes, rows, n_rows, K, out);                                                 \
    }                                                                                                   \
    extern "C" __global__ void dequant_##name##_f16(const u8* __restrict__ W, ll row_bytes,             \
                                                    const int* __restrict__ rows, int n_rows, int K,    \
                                                    u16* __restrict__ out) {                            \
        dequant<Q>(W, row_bytes, rows, n_rows, K, out);                                                 \
    }

FORMAT_KERNELS(f32, F32)
FORMAT_KERNELS(f16, F16)
FORMAT_KERNELS(bf16, BF16)
FORMAT_KERNELS(q4_0, Q4_0)
FORMAT_KERNELS(q4_1, Q4_1)
FORMAT_KERNELS(q5_0, Q5_0)
FORMAT_KERNELS(q5_1, Q5_1)
FORMAT_KERNELS(q8_0, Q8_0)
FORMAT_KERNELS(q4_k, Q4_K)
FORMAT_KERNELS(q5_k, Q5_K)
FORMAT_KERNELS(q6_k, Q6_K)

// --- kernels on int8 activations ---------------------------------------------------------------------

// down_ids_<kname>_q8: routed experts' down of format Q, the shared experts' of Q2
#define DOWN_Q8_KERNEL(kname, Q, Q2)                                                                     \
    extern "C" __global__ void __launch_bounds__(DOWN_THREADS, 1024 / DOWN_THREADS)                     \
        down_ids_##kname##_q8(const u8* __restrict__ W, ll row_bytes, ll expert_bytes,                 \
                              const int* __restrict__ ids, const u8* __restrict__ hq,                  \
                              const f32x2* __restrict__ hs, const float* __restrict__ w,               \
                              const float* __restrict__ add, float* __restrict__ y, int N, int K, int k, \
                              const u8* __restrict__ W2, ll row_bytes2, int K2,                         \
                              const u8* __restrict__ hq2, const f32x2* __restrict__ hs2,                \
                              const float* __restrict__ res) {                                         \
        down_ids_q8<Q, Q2>(W, row_bytes, expert_bytes, ids, hq, hs, w, add, y, N, K, k, W2, row_bytes2, K2, \
                           hq2, hs2, res);                                                              \
    }

#define INT8_KERNELS(name, Q)                                                                            \
    extern "C" __global__ void __launch_bounds__(ROW_THREADS, 8)                                        \
        mmv1_##name##_q8(const u8* __restrict__ W, ll row_bytes, const u8* __restrict__ xq,            \
                         const f32x2* __restrict__ xs, float* __restrict__ y, int N, int K,            \
                         const float* __restrict__ add, const float* __restrict__ res) {               \
        mmv1_q8<Q>(W, row_bytes, xq, xs, y, N, K, add, res, blockIdx.x);                                \
    }                                                                                                   \
    extern "C" __global__ void __launch_bounds__(ROW_THREADS, 8)                                        \
        mmv3_##name##_q8(const u8* __restrict__ W, ll row_bytes, float* __restrict__ y, int N,         \
                         const u8* __restrict__ W2, ll row_bytes2, float* __restrict__ y2, int N2,     \
                         const u8* __restrict__ W3, ll row_bytes3, float* __restrict__ y3, int N3,     \
                         const u8* __restrict__ xq, const f32x2* __restrict__ xs, int K) {             \
        const int b1 = (N + MMV1_ROWS - 1) / MMV1_ROWS, b2 = (N2 + MMV1_ROWS - 1) / MMV1_ROWS;          \
        const int b = blockIdx.x;                                                                       \
        if (b < b1) mmv1_q8<Q>(W, row_bytes, xq, xs, y, N, K, nullptr, nullptr, b);                     \
        else if (b < b1 + b2) mmv1_q8<Q>(W2, row_bytes2, xq, xs, y2, N2, K, nullptr, nullptr, b - b1);  \
        else mmv1_q8<Q>(W3, row_bytes3, xq, xs, y3, N3, K, nullptr, nullptr, b - b1 - b2);              \
    }                                                                                                   \
    extern "C" __global__ void __launch_bounds__(ROW_THREADS, 8)                                        \
        mmv1_##name##_sq8(const u8* __restrict__ W, ll row_bytes, const float* __restrict__ x,             \
                          const float* __restrict__ nw, float eps, float* __restrict__ y, int N, int K,     \
                          const float* __restrict__ add, const float* __restrict__ res) {                  \
        mmv1_sq8<Q>(W, row_bytes, x, nw, eps, y, N, K, add, res, blockIdx.x);                           \
    }                                                                                                   \
    extern "C" __global__ void __launch_bounds__(ROW_THREADS, 8)                                        \
        mmv3_##name##_sq8(const u8* __restrict__ W, ll row_bytes, float* __restrict__ y, int N,        \
                          const u8* __restrict__ W2, ll row_bytes2, float* __restrict__ y2, int N2,    \
                          const u8* __restrict__ W3, ll row_bytes3, float* __restrict__ y3, int N3,    \
                          const float* __restrict__ x, const float* __restrict__ nw, float eps, int K) {  \
        const int b1 = (N + MMV1_ROWS - 1) / MMV1_ROWS, b2 = (N2 + MMV1_ROWS - 1) / MMV1_ROWS;          \
        const int b = blockIdx.x;                                                                       \
        if (b < b1) mmv1_sq8<Q>(W, row_bytes, x, nw, eps, y, N, K, nullptr, nullptr, b);               \
        else if (b < b1 + b2) mmv1_sq8<Q>(W2, row_bytes2, x, nw, eps, y2, N2, K, nullptr, nullptr, b - b1); \
        else mmv1_sq8<Q>(W3, row_bytes3, x, nw, eps, y3, N3, K, nullptr, nullptr, b - b1 - b2);          \
    }                                                                                                   \
    extern "C" __global__ void __launch_bounds__(GLU_THREADS, 8)                                        \
        glu_ids_##name##_q8(const u8* __restrict__ Wg, const u8* __restrict__ Wu, ll row_bytes,        \
                            ll expert_bytes, const int* __restrict__ ids, const u8* __restrict__ xq,   \
                            const f32x2* __restrict__ xs, int x_div, float* __restrict__ h, int N,     \
                            int K, int P, const u8* __restrict__ Wg2, const u8* __restrict__ Wu2,      \
                            ll row_bytes2, int N2, float* __restrict__ h2) {                           \
        glu_ids_q8<Q>(Wg, Wu, row_bytes, expert_bytes, ids, xq, xs, x_div, h, N, K, P, Wg2, Wu2, row_bytes2, \
                      N2, h2);                                                                          \
    }                                                                                                   \
    DOWN_Q8_KERNEL(name, Q, Q)

INT8_KERNELS(q4_0, Q4_0)
INT8_KERNELS(q4_1, Q4_1)
INT8_KERNELS(q5_0, Q5_0)
INT8_KERNELS(q5_1, Q5_1)
INT8_KERNELS(q8_0, Q8_0)
INT8_KERNELS(q4_k, Q4_K)
INT8_KERNELS(q5_k, Q5_K)
INT8_KERNELS(q6_k, Q6_K)

// Routed down of a K-quant mix (Q5_0, Q5_1, Q8_0: llama.cpp's fallbacks for Q4_K, Q5_K, Q6_K rows
// not a multiple of 256; or a K-quant) with shared down of another K-quant (cuda.py MIXED_DOWN)
DOWN_Q8_KERNEL(q5_0_q4_k, Q5_0, Q4_K)
DOWN_Q8_KERNEL(q5_0_q5_k, Q5_0, Q5_K)
DOWN_Q8_KERNEL(q5_0_q6_k, Q5_0, Q6_K)
DOWN_Q8_KERNEL(q5_1_q4_k, Q5_1, Q4_K)
DOWN_Q8_KERNEL(q5_1_q5_k, Q5_1, Q5_K)
DOWN_Q8_KERNEL(q5_1_q6_k, Q5_1, Q6_K)
DOWN_Q8_KERNEL(q8_0_q4_k, Q8_0, Q4_K)
DOWN_Q8_KERNEL(q8_0_q5_k, Q8_0, Q5_K)
DOWN_Q8_KERNEL(q8_0_q6_k, Q8_0, Q6_K)
DOWN_Q8_KERNEL(q4_k_q5_k, Q4_K, Q5_K)
DOWN_Q8_KERNEL(q4_k_q6_k, Q4_K, Q6_K)
DOWN_Q8_KERNEL(q5_k_q4_k, Q5_K, Q4_K)
DOWN_Q8_KERNEL(q5_k_q6_k, Q5_K, Q6_K)
DOWN_Q8_KERNEL(q6_k_q4_k, Q6_K, Q4_K)
DOWN_Q8_KERNEL(q6_k_q5_k, Q6_K, Q5_K)

// --- elementwise helpers --------------------------------------------------------------------------

// llama.cpp rms_norm_f32 (ggml-cuda/norm.cu): sum of squares in float, scale = 1 / sqrt(mean + eps).
// All 256 threads of the block call it (partial: 32 floats of shared memory).
__device__ __forceinline__ float rms_scale(const float* __restrict__ x, int D, float eps, float* partial) {
    float s = 0.0f;
    for (int i = threadIdx.x; i < D; i += blockDim.x) s += x[i] * x[i];
    s = warp_sum(s);
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & (WARP_SIZE - 1);
    if (lane == 0) partial[warp] = s;
    __syncthreads();
    if (warp == 0) {
        s = lane < (int)(blockDim.x >> 5) ? partial[lane] : 0.0f;
        s = warp_sum(s);
        if (lane == 0) partial[0] = s;
    }
    __syncthreads();
    return 1.0f / sqrtf(partial[0] / (float)D + eps);
}

#define NORM_HELD 8  // values a thread holds in registers (rows up to 256 * 8)

// One row by a block of 256 threads: y = x / rms(x) * w, and where xq is given (rows of at most
// 256 * NORM_HELD values, a multiple of 32) y as q8_1 too (xq, xs), for the int8 products.
__device__ __forceinline__ void rms_norm_row(const float* x, const float* w, float* y, int D, float eps,
                                             u8* __restrict__ xq, f32x2* __restrict__ xs) {
    __shared__ float partial[32];
    if (D > NORM_HELD * 256 || blockDim.x != 256) {
        const float scale = rms_scale(x, D, eps, partial);
        for (int i = threadIdx.x; i < D; i += blockDim.x) y[i] = x[i] * scale * w[i];
        return;
    }
    // x and w loaded together before the reduction (the weights' latency hidden behind it); the
    // same sums in the same order as rms_scale
    float xv[NORM_HELD], wv[NORM_HELD];
#pragma unroll
    for (int j = 0; j < NORM_HELD; ++j) {
        const int i = threadIdx.x + 256 * j;
        xv[j] = i < D ? x[i] : 0.0f;
        wv[j] = i < D ? w[i] : 0.0f;
    }
    float s = 0.0f;
#pragma unroll
    for (int j = 0; j < NORM_HELD; ++j)
        if (threadIdx.x + 256 * j < D) s += xv[j] * xv[j];
    s = warp_sum(s);
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & (WARP_SIZE - 1);
    if (lane == 0) partial[warp] = s;
    __syncthreads();
    if (warp == 0) {
        s = lane < 8 ? partial[lane] : 0.0f;
        s = warp_sum(s);
        if (lane == 0) partial[0] = s;
    }
    __syncthreads();
    const float scale = 1.0f / sqrtf(partial[0] / (float)D + eps);
#pragma unroll
    for (int j = 0; j < NORM_HELD; ++j) {
        const int i = threadIdx.x + 256 * j;
        xv[j] = xv[j] * scale * wv[j];
        if (i < D) y[i] = xv[j];
    }
    if (!xq) return;
    // q8_1: a warp's 32 values of round j are one block; the rounds' reductions interleaved
    float amax[NORM_HELD];
#pragma unroll
    for (int j = 0; j < NORM_HELD; ++j) amax[j] = fabsf(xv[j]);
#pragma unroll
    for (int off = 16; off > 0; off >>= 1)
#pragma unroll
        for (int j = 0; j < NORM_HELD; ++j) amax[j] = fmaxf(amax[j], __shfl_xor_sync(FULL_MASK, amax[j], off));
    int q[NORM_HELD], sum[NORM_HELD];
#pragma unroll
    for (int j = 0; j < NORM_HELD; ++j) {
        const float d = amax[j] / 127.0f;
        q[j] = amax[j] == 0.0f ? 0 : __float2int_rn(xv[j] / d);
        sum[j] = q[j];
    }
#pragma unroll
    for (int off = 16; off > 0; off >>= 1)
#pragma unroll
        for (int j = 0; j < NORM_HELD; ++j) sum[j] += __shfl_xor_sync(FULL_MASK, sum[j], off);
#pragma unroll
    for (int j = 0; j < NORM_HELD; ++j) {
        const int i = threadIdx.x + 256 * j;
        if (i < D) {
            xq[i] = (u8)(signed char)q[j];
            if (lane == 0) {
                const float d = amax[j] / 127.0f;
                xs[i >> 5] = f32x2{d, d * (float)sum[j]};
            }
        }
    }
}

extern "C" __global__ void __launch_bounds__(256)
    rms_norm_f32(const float* x, ll x_stride, const float* w, float* y, int D, float eps) {
    rms_norm_row(x + (ll)blockIdx.x * x_stride, w, y + (ll)blockIdx.x * D, D, eps, nullptr, nullptr);
}

extern "C" __global__ void __launch_bounds__(256)
    rms_norm_q8(const float* x, ll x_stride, const float* w, float* y, int D, float eps, u8* xq, f32x2* xs) {
    const ll r = blockIdx.x;
    rms_norm_row(x + r * x_stride, w, y + r * D, D, eps, xq + r * D, xs + r * (D >> 5));
}

extern "C" __global__ void __launch_bounds__(256)
    silu_mul_f32(const float* g, const float* u, float* h, ll n) {
    const ll stride = (ll)gridDim.x * blockDim.x;
    for (ll i = (ll)blockIdx.x * blockDim.x + threadIdx.x; i < n; i += stride) {
        const float a = g[i];
        h[i] = a / (1.0f + expf(-a)) * u[i];
    }
}

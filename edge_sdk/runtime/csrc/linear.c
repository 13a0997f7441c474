/* Products with block-quantized weights on the CPU: y = x W^T for W [rows, cols] stored as INT4 or
 * INT8 codes with one scale per block of `block` inputs, symmetric (the zero points 8 and 128 that
 * ONNX Runtime's MatMulNBits implies). What runtime/linear.py runs for a decode step's linears:
 * the layers' INT4 projections and the LM head (131,072 x 3,072 for Ministral 3 3B, the step's
 * largest read); prefill's several tokens too, each pair of row groups read once for all of them
 * and each loaded chunk of it shared by four tokens' products.
 *
 * Why a kernel of our own: on a 2-core AVX-512 host MatMulNBits (accuracy level 4) reads the INT4
 * head at ~20 GB/s where a plain read of the same bytes reaches ~30; this kernel ~27 (measured
 * standalone over three copies of the head, so that none is cached: 10.4 ms against 8.0).
 *
 * How: the weights are repacked once (edge_linear_pack) so that one 64-byte load holds 4 codes of
 * each of 16 rows, lane r for row r. One VNNI dot-product instruction (vpdpbusd) then adds 4
 * products into each of 16 rows' sums, and no sum is ever reduced across lanes. x is quantized to
 * int8 per block (scale = max|x| / 127, as MatMulNBits does at accuracy level 4); each block's
 * integer sums, less the zero point times the block's sum of x, are scaled into float sums. Work
 * goes in pairs of groups (32 rows: each broadcast of x feeds two products, and twice the loads
 * are in flight), units of pairs shared over the library's threads (pool.h).
 *
 * Packed layout, rows padded to a multiple of 32 (padding rows: zero codes, zero scales). Group g
 * (rows 16g .. 16g + 15), block b: block * bits / 32 chunks of 64 bytes, in that order; in chunk
 * c, lane r holds row 16g + r's codes for inputs b * block + c * 8 + 0..7 (INT4: low nibbles the
 * first four, high nibbles the next four) or b * block + c * 4 + 0..3 (INT8). Scales: [groups,
 * blocks, 16] float32.
 */
#include <stdlib.h>
#include <string.h>
#if defined(__x86_64__)
#include <immintrin.h>
#endif

#include "pool.h"
#include "quantize.h"

#define GROUP 16              /* rows summed in one vector, a lane each */
#define PAIR (2 * GROUP)      /* rows one pass reads */
#define UNIT_PAIRS 16         /* pairs a thread takes at a time: 512 rows */
#define TOKEN_BLOCK 4         /* tokens whose products share each loaded chunk of weights (prefill) */
#define PREFETCH_BYTES 2048   /* how far ahead each stream is fetched into L2 (into L1: 10-20% slower) */
#define SERIAL_BYTES (1 << 20) /* weights smaller than this are read by one thread */

struct product {
    int bits, block, blocks, rows, cols, tokens, pairs, units;
    const unsigned char *packed;
    const float *scales;
    const int *words;  /* x quantized: int8 codes, read four at a time, [tokens, cols / 4] */
    const float *x_scales; /* [tokens, blocks] */
    const int *x_zeros; /* [tokens, blocks]: zero point x the block's sum of codes */
    float *y; /* [tokens, rows] */
    int next; /* the first unit no thread has taken (atomic) */
};

static size_t block_bytes(int bits, int block) { return (size_t)GROUP * block * bits / 8; }

static int valid(int bits, int block, int rows, int cols) {
    return (bits == 4 || bits == 8) && block > 0 && block % 32 == 0 && cols > 0 && cols % block == 0 && rows > 0;
}

static float scale_at(const void *scales, int scale_bits, size_t at) {
    return scale_bits == 16 ? (float)((const _Float16 *)scales)[at] : ((const float *)scales)[at];
}

/* Rows first .. first + count - 1 into the packed layout (zeros where nothing is written yet),
 * from one of two forms:
 * - rows (MatMulNBits): `codes` [count, cols * bits / 8], INT4 input 2i in the low nibble of
 *   byte i, codes unsigned about their zero point; `scales` [count, blocks];
 * - columns (DequantizeLinear along the inputs, INT4 only): `codes` the whole [cols, rows] of
 *   signed codes, two to a byte along the rows; `scales` the whole [blocks, rows]; `first` a
 *   multiple of 16.
 * Scales float16 or float32 (scale_bits). Returns 0, or -1 for arguments this layout does not
 * take. */
int edge_linear_pack(int bits, int block, int rows, int cols, int first, int count, int columns,
                     const unsigned char *codes, int scale_bits, const void *scales, unsigned char *packed,
                     float *packed_scales) {
    if (!valid(bits, block, rows, cols) || first < 0 || count < 0 || first + count > rows
        || (scale_bits != 16 && scale_bits != 32) || (columns && (bits != 4 || rows % 2 || first % GROUP)))
        return -1;
    const int blocks = cols / block, chunks = block * bits / 32;
    const size_t step = block_bytes(bits, block);
    for (int i = 0; i < count; i++)
        for (int b = 0; b < blocks; b++) {
            const int row = first + i;
            packed_scales[((size_t)(row / GROUP) * blocks + b) * GROUP + row % GROUP] =
                scale_at(scales, scale_bits, columns ? (size_t)b * rows + row : (size_t)i * blocks + b);
        }
    if (columns) {
        /* Tiles of 128 rows: for each input, one 64-byte line of codes, written into eight groups'
         * blocks (L2-resident across the inputs); a byte holds two rows' codes. */
        const size_t group_stride = (size_t)blocks * step;
        for (int tile = first; tile < first + count; tile += 128) {
            const int n = first + count - tile < 128 ? first + count - tile : 128;
            for (int k = 0; k < cols; k++) {
                const int b = k / block, c = k % block / 8, t = k % 8, shift = t / 4 * 4;
                const unsigned char *src = codes + ((size_t)k * rows + tile) / 2;
                unsigned char *base = packed + (size_t)(tile / GROUP) * group_stride + b * step + c * 64 + t % 4;
                for (int i = 0; i < n; i += 2) {
                    const int two = src[i / 2] ^ 0x88; /* signed codes -> about zero point 8 */
                    unsigned char *dst = base + (size_t)(i / GROUP) * group_stride + i % GROUP * 4;
                    dst[0] |= (unsigned char)((two & 15) << shift);
                    dst[4] |= (unsigned char)((two >> 4) << shift);
                }
            }
        }
        return 0;
    }
    const size_t row_bytes = (size_t)cols * bits / 8;
    for (int i = 0; i < count; i++) {
        const int row = first + i;
        const unsigned char *src = codes + i * row_bytes;
        unsigned char *lane = packed + (size_t)(row / GROUP) * blocks * step + row % GROUP * 4;
        for (int b = 0; b < blocks; b++)
            for (int c = 0; c < chunks; c++) {
                unsigned char *dst = lane + b * step + c * 64;
                if (bits == 8) {
                    memcpy(dst, src + (size_t)b * block + c * 4, 4);
                } else { /* inputs k .. k + 7 are the nibbles of s[0..3], low first; lane byte t: k + t, k + 4 + t */
                    const unsigned char *s = src + ((size_t)b * block + c * 8) / 2;
                    dst[0] = (s[0] & 15) | (s[2] & 15) << 4;
                    dst[1] = (s[0] >> 4) | (s[2] & 0xF0);
                    dst[2] = (s[1] & 15) | (s[3] & 15) << 4;
                    dst[3] = (s[1] >> 4) | (s[3] & 0xF0);
                }
            }
    }
    return 0;
}

#if defined(__x86_64__)
#pragma GCC push_options
#pragma GCC target("avx512f,avx512bw,avx512vnni")

#define INLINE static inline __attribute__((always_inline))

/* One block of two groups for `tokens` tokens (1, or TOKEN_BLOCK for prefill: a constant once
 * inlined, so the sums stay in registers), each chunk of weights loaded and unpacked once for all
 * of them. INT4: low nibbles as they are, high nibbles masked in place (16 times their value) and
 * summed apart, then shifted back: one instruction fewer per chunk than shifting each. */
INLINE void dot_int4(const unsigned char *w0, const unsigned char *w1, const int *const *x, int tokens, int chunks,
                     __m512i *sum0, __m512i *sum1) {
    const __m512i low = _mm512_set1_epi8(0x0F), high = _mm512_set1_epi8((char)0xF0);
    __m512i a0[TOKEN_BLOCK], h0[TOKEN_BLOCK], a1[TOKEN_BLOCK], h1[TOKEN_BLOCK];
    for (int t = 0; t < tokens; t++) a0[t] = h0[t] = a1[t] = h1[t] = _mm512_setzero_si512();
    for (int c = 0; c < chunks; c++) {
        const __m512i v0 = _mm512_loadu_si512(w0 + c * 64), v1 = _mm512_loadu_si512(w1 + c * 64);
        const __m512i l0 = _mm512_and_si512(v0, low), g0 = _mm512_and_si512(v0, high);
        const __m512i l1 = _mm512_and_si512(v1, low), g1 = _mm512_and_si512(v1, high);
        for (int t = 0; t < tokens; t++) {
            const __m512i x_low = _mm512_set1_epi32(x[t][2 * c]), x_high = _mm512_set1_epi32(x[t][2 * c + 1]);
            a0[t] = _mm512_dpbusd_epi32(a0[t], l0, x_low);
            h0[t] = _mm512_dpbusd_epi32(h0[t], g0, x_high);
            a1[t] = _mm512_dpbusd_epi32(a1[t], l1, x_low);
            h1[t] = _mm512_dpbusd_epi32(h1[t], g1, x_high);
        }
    }
    for (int t = 0; t < tokens; t++) {
        sum0[t] = _mm512_add_epi32(a0[t], _mm512_srai_epi32(h0[t], 4));
        sum1[t] = _mm512_add_epi32(a1[t], _mm512_srai_epi32(h1[t], 4));
    }
}

/* The same for INT8. */
INLINE void dot_int8(const unsigned char *w0, const unsigned char *w1, const int *const *x, int tokens, int chunks,
                     __m512i *sum0, __m512i *sum1) {
    for (int t = 0; t < tokens; t++) sum0[t] = sum1[t] = _mm512_setzero_si512();
    for (int c = 0; c < chunks; c++) {
        const __m512i v0 = _mm512_loadu_si512(w0 + c * 64), v1 = _mm512_loadu_si512(w1 + c * 64);
        for (int t = 0; t < tokens; t++) {
            const __m512i xc = _mm512_set1_epi32(x[t][c]);
            sum0[t] = _mm512_dpbusd_epi32(sum0[t], v0, xc);
            sum1[t] = _mm512_dpbusd_epi32(sum1[t], v1, xc);
        }
    }
}

/* Rows 32 * pair .. + 31 of tokens t0 .. t0 + tokens - 1, token t0 + i's into out[i][0 .. 31]. */
INLINE void pair_rows(const struct product *p, int pair, int t0, int tokens, float *const *out) {
    const size_t step = block_bytes(p->bits, p->block), group = step * p->blocks;
    const unsigned char *w0 = p->packed + (size_t)2 * pair * group, *w1 = w0 + group;
    const float *s0 = p->scales + (size_t)2 * pair * p->blocks * GROUP, *s1 = s0 + (size_t)p->blocks * GROUP;
    const int chunks = p->block * p->bits / 32, words = p->block / 4;
    __m512 f0[TOKEN_BLOCK], f1[TOKEN_BLOCK];
    for (int t = 0; t < tokens; t++) f0[t] = f1[t] = _mm512_setzero_ps();
    for (int b = 0; b < p->blocks; b++, w0 += step, w1 += step) {
        for (size_t at = 0; at < step; at += 64) {
            _mm_prefetch((const char *)w0 + PREFETCH_BYTES + at, _MM_HINT_T1);
            _mm_prefetch((const char *)w1 + PREFETCH_BYTES + at, _MM_HINT_T1);
        }
        const int *x[TOKEN_BLOCK];
        for (int t = 0; t < tokens; t++) x[t] = p->words + (size_t)(t0 + t) * (p->cols / 4) + b * words;
        __m512i d0[TOKEN_BLOCK], d1[TOKEN_BLOCK];
        if (p->bits == 4) dot_int4(w0, w1, x, tokens, chunks, d0, d1);
        else dot_int8(w0, w1, x, tokens, chunks, d0, d1);
        const __m512 scale0 = _mm512_loadu_ps(s0 + b * GROUP), scale1 = _mm512_loadu_ps(s1 + b * GROUP);
        for (int t = 0; t < tokens; t++) {
            const size_t at = (size_t)(t0 + t) * p->blocks + b;
            const __m512i zero = _mm512_set1_epi32(p->x_zeros[at]);
            const __m512 x_scale = _mm512_set1_ps(p->x_scales[at]);
            f0[t] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(_mm512_sub_epi32(d0[t], zero)), _mm512_mul_ps(scale0, x_scale),
                                    f0[t]);
            f1[t] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(_mm512_sub_epi32(d1[t], zero)), _mm512_mul_ps(scale1, x_scale),
                                    f1[t]);
        }
    }
    for (int t = 0; t < tokens; t++) {
        _mm512_storeu_ps(out[t], f0[t]);
        _mm512_storeu_ps(out[t] + GROUP, f1[t]);
    }
}

static void pair_one(const struct product *p, int pair, int t0, float *const *out) { pair_rows(p, pair, t0, 1, out); }
static void pair_block(const struct product *p, int pair, int t0, float *const *out) {
    pair_rows(p, pair, t0, TOKEN_BLOCK, out);
}
#pragma GCC pop_options

/* A pool task: units of pairs until none is left, every token's product of a pair while its
 * weights are in cache (TOKEN_BLOCK at a time, then one by one); the last pair's padding rows
 * are dropped. */
static void run_pairs(void *context) {
    struct product *p = context;
    float tail[TOKEN_BLOCK][PAIR];
    for (int u; (u = __atomic_fetch_add(&p->next, 1, __ATOMIC_RELAXED)) < p->units;) {
        const int last = (u + 1) * UNIT_PAIRS < p->pairs ? (u + 1) * UNIT_PAIRS : p->pairs;
        for (int pair = u * UNIT_PAIRS; pair < last; pair++) {
            const int row = pair * PAIR, whole = row + PAIR <= p->rows;
            for (int t = 0; t < p->tokens;) {
                const int n = p->tokens - t >= TOKEN_BLOCK ? TOKEN_BLOCK : 1;
                float *out[TOKEN_BLOCK];
                for (int i = 0; i < n; i++) out[i] = whole ? p->y + (size_t)(t + i) * p->rows + row : tail[i];
                if (n == TOKEN_BLOCK) pair_block(p, pair, t, out);
                else pair_one(p, pair, t, out);
                for (int i = 0; !whole && i < n; i++)
                    memcpy(p->y + (size_t)(t + i) * p->rows + row, tail[i], sizeof(float) * (p->rows - row));
                t += n;
            }
        }
    }
}
#endif

/* Whether this CPU runs edge_linear: AVX-512 with VNNI (elsewhere the caller keeps its own). */
int edge_linear_supported(void) {
#if defined(__x86_64__)
    return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw")
           && __builtin_cpu_supports("avx512vnni");
#else
    return 0;
#endif
}

/* y [tokens, rows] = x [tokens, cols] W^T over weights packed by edge_linear_pack. Returns 0; -1
 * for arguments this kernel does not take or a CPU without VNNI, -2 when scratch memory cannot
 * be had. */
int edge_linear(int bits, int block, int rows, int cols, int tokens, const unsigned char *packed,
                const float *scales, const float *x, float *y, int threads) {
    if (!valid(bits, block, rows, cols) || tokens < 1 || !edge_linear_supported()) return -1;
#if defined(__x86_64__)
    const int blocks = cols / block, zero_point = bits == 4 ? 8 : 128;
    const size_t all_blocks = (size_t)tokens * blocks;
    int *words = malloc((size_t)tokens * cols), *x_zeros = malloc(sizeof(int) * all_blocks);
    float *x_scales = malloc(sizeof(float) * all_blocks);
    if (!words || !x_zeros || !x_scales) {
        free(words), free(x_zeros), free(x_scales);
        return -2;
    }
    signed char *codes = (signed char *)words;
    for (size_t b = 0; b < all_blocks; b++) { /* token b / blocks, block b % blocks: x is [tokens, cols] */
        int sum;
        x_scales[b] = edge_quantize_row(x + b * block, block, codes + b * block, &sum);
        x_zeros[b] = zero_point * sum;
    }
    const int pairs = (rows + PAIR - 1) / PAIR;
    struct product p = {bits, block, blocks, rows, cols, tokens, pairs, (pairs + UNIT_PAIRS - 1) / UNIT_PAIRS,
                        packed, scales, words, x_scales, x_zeros, y, 0};
    const size_t work = (size_t)rows * cols * bits / 8 * tokens; /* bytes read, once per token from cache */
    edge_pool_run(run_pairs, &p, work < SERIAL_BYTES || threads < 1 ? 1 : threads);
    free(words), free(x_zeros), free(x_scales);
    return 0;
#else
    (void)packed, (void)scales, (void)x, (void)y, (void)threads, (void)tokens;
    return -1;
#endif
}

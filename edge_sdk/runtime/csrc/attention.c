/* Grouped-query attention for one decode or prefill step on the CPU, over a KV cache the caller
 * owns (runtime/attention.py): RoPE, the step's keys and values written into the cache in place,
 * then each query row attends to the cache positions it may see.
 *
 * Why a kernel of our own: ONNX Runtime's matrix products pack the cache (their B matrix) before
 * reading it, and its GroupQueryAttention reads the cache once per query head; both reach a
 * fraction of the memory bandwidth at long contexts. Here each key and value row is read once
 * per step for the G = heads / kv_heads query heads of its group, from a float32, float16 or
 * int8 cache (float16 halves the bytes a step reads, int8 halves them again: each row stored
 * with its scale, applied to the key's score and the value's weight rather than to each value;
 * over int8 keys the query rows are int8 codes too, so that a score is an integer dot product).
 *
 * Layouts (one sequence): q [S, heads * D], k, v [S, kv_heads * D] float32, before RoPE;
 * key_cache, value_cache [kv_heads, capacity, D]; for int8, key_scale, value_scale float32
 * [kv_heads, capacity]; out [S, heads * D]. RoPE (rotate-half, as
 * ONNX Runtime's RotaryEmbedding with interleaved=0) reads cos/sin tables [rows, D / 2] at each
 * token's position; q's tables carry the query scale. Position s of the step sees cache positions
 * 0 .. length + s.
 *
 * Work is split into (KV head, position) units over the library's thread pool (pool.h). The unit
 * is built for AVX2, AVX-512 and AVX-512 with VNNI, and the best the CPU runs is picked
 * (attention_unit.h).
 */
#include <math.h>
#include <stddef.h>
#include <stdlib.h>
#include <string.h>

#include "pool.h"
#include "quantize.h"
#if defined(__x86_64__)
#include <immintrin.h>
#endif

#define MAX_GROUPS 16
#define MAX_INT8_HEAD_DIM 512 /* over an int8 cache, scores stay exact in float32 (see quantize_queries) */
#define KEY_BLOCK 32         /* value rows per block: 8-16 KB, kept in L1 across the output slices */
#define PREFETCH_ROWS 16     /* how far ahead of the key being scored its row is fetched */
/* The least exponent a softmax weight is computed at: e^-87 is about float32's least normal value.
 * The vector expf hands each lane below its range to the scalar one (measured, 6 layers at 4,096
 * cached positions with widely spread scores, subnormals already flushed: 13.5 ms, 7.7-9.0 with
 * the floor); a weight that small is zero next to the row's sum, which is at least 1. */
#define EXP_FLOOR -87.0f
#define ROWS_PER_THREAD 4096 /* cached rows a step must read per thread before threads pay off */

struct step {
    int seq, heads, kv_heads, head_dim, capacity, length, bits; /* bits: the cache's 32, 16 or 8 */
    const float *q; /* rotated and scaled; over an int8 cache, each row's int8 codes as floats */
    /* int8 caches: each q row [seq * heads] as codes (like a cached row: largest magnitude at 127),
     * its scale, and the sum of its codes (what scoring against keys offset by 128 adds) */
    const signed char *q_codes;
    const float *q_scale;
    const int *q_sum;
    void *key_cache, *value_cache;
    float *key_scale, *value_scale; /* int8 caches: each row's scale, [kv_heads, capacity] */
    float *out;
};

/* Asks for bytes [offset, offset + size) of a cache ahead of use, into L2: the slices of a row
 * are read with strides the hardware prefetcher follows late. (Into L1 instead: float16 at 4,096
 * cached rows 20-28% slower on a Zen 4 host, 4 alternating rounds; int8 alike.) Callers keep to
 * filled rows: a hint into pages never touched costs a page walk for nothing. */
static inline void prefetch_bytes(const void *cache, size_t offset, size_t size) {
    for (size_t at = 0; at < size; at += 64) __builtin_prefetch((const char *)cache + offset + at, 0, 2);
}

#define VL 8
#define UNIT(name) name##_vl8
#include "attention_unit.h"
#undef UNIT
#undef VL

#if defined(__x86_64__)
#pragma GCC push_options
#pragma GCC target("avx512f,avx512vl,avx512bw,avx512dq,fma,f16c")
#define VL 16
#define UNIT(name) name##_vl16
#include "attention_unit.h"
#undef UNIT
#pragma GCC pop_options

/* The same with AVX-512 VNNI: int8 keys are scored by integer dot products (vpdpbusd). */
#pragma GCC push_options
#pragma GCC target("avx512f,avx512vl,avx512bw,avx512dq,avx512vnni,fma,f16c")
#define UNIT_VNNI 1
#define UNIT(name) name##_vnni
#include "attention_unit.h"
#undef UNIT
#undef VL
#pragma GCC pop_options
#endif

typedef void (*unit_fn)(const struct step *, int, int, float *);

/* dst = x rotated by position `pos` of (cos, sin), for `heads` heads of D values each: plain
 * float32 arithmetic, as in quantize.c (over an int8 cache the rotated query rows are quantized,
 * and a reference must reproduce their codes). */
EXACT_FLOAT_FUNCTION static void rotate(float *dst, const float *x, int heads, int D, const float *cos, const float *sin, long long pos) {
    EXACT_FLOAT
    const int half = D / 2;
    cos += pos * half;
    sin += pos * half;
    for (int h = 0; h < heads; h++, dst += D, x += D)
        for (int i = 0; i < half; i++) {
            dst[i] = x[i] * cos[i] - x[i + half] * sin[i];
            dst[i + half] = x[i + half] * cos[i] + x[i] * sin[i];
        }
}

/* One row of D values into a cache of `bits` (int8 rows with their scale, per row: what a key's
 * score or a value's weight is multiplied by). */
static void store_row(void *cache, float *scales, size_t row, int D, int bits, const float *x) {
    if (bits == 32) memcpy((float *)cache + row * D, x, sizeof(float) * D);
    else if (bits == 16)
        for (int d = 0; d < D; d++) ((_Float16 *)cache + row * D)[d] = (_Float16)x[d];
    else scales[row] = edge_quantize_row(x, D, (signed char *)cache + row * D, NULL);
}

/* Over an int8 cache, each rotated query row is quantized as a cached row is: a score is then the
 * integer dot product of two code rows times both scales (exact in float32 as well: products
 * of at most 127 * 127, and with keys offset by 128 at most 255 * 127: sums below 2^24 for
 * head_dim <= 512). The codes replace the row's floats in `q` for the float units and stay as
 * bytes for the VNNI one. */
static void quantize_queries(float *q, size_t rows, int D, signed char *codes, float *scales, int *sums) {
    for (size_t r = 0; r < rows; r++, q += D, codes += D) {
        scales[r] = edge_quantize_row(q, D, codes, &sums[r]);
        for (int d = 0; d < D; d++) q[d] = codes[d];
    }
}

/* Position s's keys (rotated, in `k_rotated`) and values into the caches at length + s. */
static void store_rows(const struct step *st, const float *k_rotated, const float *v) {
    const int D = st->head_dim;
    for (int h = 0; h < st->kv_heads; h++, k_rotated += D, v += D) {
        size_t row = (size_t)h * st->capacity + st->length;
        store_row(st->key_cache, st->key_scale, row, D, st->bits, k_rotated);
        store_row(st->value_cache, st->value_scale, row, D, st->bits, v);
    }
}

struct job {
    const struct step *st;
    unit_fn unit;
    int units, next, failed; /* next: the first unit no thread has taken (atomic) */
};

/* Subnormal floats flushed to zero while units run, on the thread running them (its previous mode
 * restored after). A softmax over a long context gives many weights below float32's normal range
 * and each product with one takes a microcode assist on x86 (measured, 6 layers at 4,096 cached
 * positions with widely spread scores: 26 ms, 13.5 flushed). Flushed, those weights count as the
 * zeros they round to next to a sum of at least 1. */
#if defined(__x86_64__)
#define FLUSH_MODE (_MM_FLUSH_ZERO_ON | 0x0040 /* denormals-are-zero */)
static unsigned flush_subnormals(void) {
    unsigned previous = _mm_getcsr();
    _mm_setcsr(previous | FLUSH_MODE);
    return previous;
}
static void restore_mode(unsigned previous) { _mm_setcsr(previous); }
#else
static unsigned flush_subnormals(void) { return 0; } /* elsewhere the caller's mode (not measured on Arm) */
static void restore_mode(unsigned previous) { (void)previous; }
#endif

/* A pool task (pool.h): units until none is left. */
static void run_units(void *context) {
    struct job *job = context;
    const struct step *st = job->st;
    float *scores = malloc(sizeof(float) * (st->heads / st->kv_heads) * (size_t)(st->length + st->seq));
    if (!scores) {
        __atomic_store_n(&job->failed, 1, __ATOMIC_RELAXED);
        return;
    }
    unsigned mode = flush_subnormals();
    for (int u; (u = __atomic_fetch_add(&job->next, 1, __ATOMIC_RELAXED)) < job->units;)
        job->unit(st, u % st->kv_heads, u / st->kv_heads, scores);
    restore_mode(mode);
    free(scores);
}

static unit_fn pick_unit(int head_dim) {
#if defined(__x86_64__)
    if (head_dim % 32 == 0 && __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512vl"))
        return __builtin_cpu_supports("avx512vnni") ? attend_unit_vnni : attend_unit_vl16;
#endif
    (void)head_dim;
    return attend_unit_vl8;
}

/* Returns 0; -1 for shapes or positions this kernel does not take (the caller checks them
 * first), -2 when scratch memory cannot be had. */
int edge_attention(int seq, int heads, int kv_heads, int head_dim, int capacity, int length, int cache_bits,
                   const long long *positions, int rope_rows, const float *q_cos, const float *q_sin,
                   const float *k_cos, const float *k_sin, const float *q, const float *k, const float *v,
                   void *key_cache, void *value_cache, float *key_scale, float *value_scale, float *out,
                   int threads) {
    if (seq < 1 || kv_heads < 1 || heads % kv_heads || heads / kv_heads > MAX_GROUPS || head_dim % 16
        || (cache_bits == 8 && head_dim > MAX_INT8_HEAD_DIM) || length < 0 || length + seq > capacity
        || (cache_bits != 8 && cache_bits != 16 && cache_bits != 32)
        || (cache_bits == 8 && !(key_scale && value_scale)))
        return -1;
    for (int s = 0; s < seq; s++)
        if (positions[s] < 0 || positions[s] >= rope_rows) return -1;
    const size_t q_size = (size_t)heads * head_dim, kv_size = (size_t)kv_heads * head_dim, q_rows = (size_t)seq * heads;
    /* scratch: rotated q and k; for an int8 cache, q's codes, scales and code sums */
    const size_t floats = seq * q_size + kv_size, codes = cache_bits == 8 ? seq * q_size : 0;
    float *rotated = malloc(sizeof(float) * floats + (codes ? codes + q_rows * (sizeof(float) + sizeof(int)) : 0));
    if (!rotated) return -2;
    float *q_scale = codes ? rotated + floats : NULL;
    int *q_sum = codes ? (int *)(q_scale + q_rows) : NULL;
    signed char *q_codes = codes ? (signed char *)(q_sum + q_rows) : NULL;
    struct step st = {seq, heads, kv_heads, head_dim, capacity, length, cache_bits, rotated, q_codes, q_scale,
                      q_sum, key_cache, value_cache, key_scale, value_scale, out};
    float *k_rotated = rotated + seq * q_size;
    for (int s = 0; s < seq; s++) {
        rotate(rotated + s * q_size, q + s * q_size, heads, head_dim, q_cos, q_sin, positions[s]);
        if (codes) quantize_queries(rotated + s * q_size, heads, head_dim, q_codes + s * q_size, q_scale + s * heads,
                                    q_sum + s * heads);
        rotate(k_rotated, k + s * kv_size, kv_heads, head_dim, k_cos, k_sin, positions[s]);
        struct step at = st;
        at.length = length + s;
        store_rows(&at, k_rotated, v + s * kv_size);
    }
    struct job job = {&st, pick_unit(head_dim), kv_heads * seq, 0, 0};
    const double rows = (double)kv_heads * seq * (length + (seq + 1) / 2.0);
    int want = threads < 1 ? 1 : threads;
    if (rows < (double)ROWS_PER_THREAD * 2) want = 1;
    edge_pool_run(run_units, &job, want);
    free(rotated);
    return job.failed ? -2 : 0;
}

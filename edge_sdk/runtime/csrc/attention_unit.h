/* One work unit of the attention kernel (attention.c): the G query rows of one KV head at one
 * position of the step. Included once per instruction set, with
 *   VL         floats per vector (8: AVX2 or NEON pairs, 16: AVX-512),
 *   UNIT(name) the name suffixed for that instruction set,
 * and the target pragma in force, so each build of it gets its own registers and loads.
 */

typedef float UNIT(fvec) __attribute__((vector_size(VL * 4)));
typedef _Float16 UNIT(hvec) __attribute__((vector_size(VL * 2)));

static inline UNIT(fvec) UNIT(load_f32)(const float *p) {
    UNIT(fvec) x;
    memcpy(&x, p, sizeof x);
    return x;
}

/* VL float16 values to float32: one instruction with F16C / AVX-512 (the compiler converts
 * element by element otherwise). */
static inline UNIT(fvec) UNIT(widen)(const _Float16 *p) {
#if defined(__AVX512F__) && VL == 16
    return (UNIT(fvec))_mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *)p));
#elif defined(__F16C__) && VL == 8
    return (UNIT(fvec))_mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)p));
#else
    UNIT(hvec) x;
    memcpy(&x, p, sizeof x);
    return __builtin_convertvector(x, UNIT(fvec));
#endif
}

static inline __attribute__((always_inline)) UNIT(fvec) UNIT(load_cache)(const void *cache, size_t i, int half) {
    return half ? UNIT(widen)((const _Float16 *)cache + i) : UNIT(load_f32)((const float *)cache + i);
}

static inline float UNIT(sum_lanes)(UNIT(fvec) x) {
    typedef float f32x4 __attribute__((vector_size(16)));
#if VL == 16
    typedef float f32x8 __attribute__((vector_size(32)));
    f32x8 y = __builtin_shufflevector(x, x, 0, 1, 2, 3, 4, 5, 6, 7)
              + __builtin_shufflevector(x, x, 8, 9, 10, 11, 12, 13, 14, 15);
#else
    UNIT(fvec) y = x;
#endif
    f32x4 a = __builtin_shufflevector(y, y, 0, 1, 2, 3) + __builtin_shufflevector(y, y, 4, 5, 6, 7);
    a += __builtin_shufflevector(a, a, 2, 3, 0, 1);
    return a[0] + a[1];
}

/* scores: G * (length + s + 1) floats of scratch. Always inlined with constant `groups` and
 * `half`, so each case gets its own unrolled copy. */
static inline __attribute__((always_inline)) void UNIT(attend)(const struct step *st, int h, int s, float *scores,
                                                                int groups, int half) {
    typedef UNIT(fvec) fvec;
    const int D = st->head_dim, n = st->length + s + 1;
    const size_t row0 = (size_t)h * st->capacity, row_bytes = (size_t)D * (half ? 2 : 4);
    const size_t first = ((size_t)s * st->heads + (size_t)h * groups) * D;
    const float *q = st->q + first;
    float *out = st->out + first;

    /* Scores, KEYS keys at a time: each q slice loaded serves all of them (four with AVX-512's
     * 32 registers, two with AVX2's 16). */
    enum { KEYS = VL == 16 ? 4 : 2 };
    for (int j = 0; j < n; j += KEYS) {
        const int keys = n - j < KEYS ? n - j : KEYS;
        fvec acc[KEYS][MAX_GROUPS] = {{{0}}};
        const size_t base = (row0 + j) * D;
        if (j + PREFETCH_ROWS + KEYS <= n)
            prefetch_bytes(st->key_cache, (row0 + j + PREFETCH_ROWS) * row_bytes, KEYS * row_bytes);
        for (int c = 0; c < D; c += VL) {
            fvec key[KEYS];
            for (int i = 0; i < KEYS; i++)
                key[i] = i < keys ? UNIT(load_cache)(st->key_cache, base + (size_t)i * D + c, half) : (fvec){0};
            for (int g = 0; g < groups; g++) {
                fvec qg = UNIT(load_f32)(q + (size_t)g * D + c);
                for (int i = 0; i < KEYS; i++) acc[i][g] += qg * key[i];
            }
        }
        for (int g = 0; g < groups; g++)
            for (int i = 0; i < keys; i++) scores[(size_t)g * n + j + i] = UNIT(sum_lanes)(acc[i][g]);
    }

    float inv[MAX_GROUPS];
    for (int g = 0; g < groups; g++) {
        float *row = scores + (size_t)g * n, top = row[0], total = 0.0f;
        for (int j = 1; j < n; j++) top = row[j] > top ? row[j] : top;
        for (int j = 0; j < n; j++) {
            const float x = row[j] - top;
            row[j] = expf(x > EXP_FLOOR ? x : EXP_FLOOR);
            total += row[j];
        }
        inv[g] = 1.0f / total;
    }

    /* out = P V over blocks of KEY_BLOCK keys: a block's value rows stay in L1 while each
     * 2 * VL-wide slice of the G output rows is accumulated in registers. */
    for (int j0 = 0; j0 < n; j0 += KEY_BLOCK) {
        const int j1 = j0 + KEY_BLOCK < n ? j0 + KEY_BLOCK : n;
        for (int c = 0; c < D; c += 2 * VL) {
            fvec lo[MAX_GROUPS], hi[MAX_GROUPS];
            for (int g = 0; g < groups; g++) {
                lo[g] = j0 ? UNIT(load_f32)(out + (size_t)g * D + c) : (fvec){0};
                hi[g] = j0 ? UNIT(load_f32)(out + (size_t)g * D + c + VL) : (fvec){0};
            }
            for (int j = j0; j < j1; j++) {
                const size_t base = (row0 + j) * D + c;
                if (c == 0 && j + KEY_BLOCK < n)
                    prefetch_bytes(st->value_cache, (row0 + j + KEY_BLOCK) * row_bytes, row_bytes);
                fvec v0 = UNIT(load_cache)(st->value_cache, base, half);
                fvec v1 = UNIT(load_cache)(st->value_cache, base + VL, half);
                for (int g = 0; g < groups; g++) {
                    float p = scores[(size_t)g * n + j];
                    lo[g] += p * v0;
                    hi[g] += p * v1;
                }
            }
            for (int g = 0; g < groups; g++) {
                fvec a = j1 == n ? lo[g] * inv[g] : lo[g], b = j1 == n ? hi[g] * inv[g] : hi[g];
                memcpy(out + (size_t)g * D + c, &a, sizeof a);
                memcpy(out + (size_t)g * D + c + VL, &b, sizeof b);
            }
        }
    }
}

static void UNIT(attend_unit)(const struct step *st, int h, int s, float *scores) {
    const int groups = st->heads / st->kv_heads;
    if (groups == 4 && st->half) UNIT(attend)(st, h, s, scores, 4, 1);
    else if (groups == 4) UNIT(attend)(st, h, s, scores, 4, 0);
    else if (st->half) UNIT(attend)(st, h, s, scores, groups, 1);
    else UNIT(attend)(st, h, s, scores, groups, 0);
}

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

/* VL int8 values to float32 (unscaled: the row's scale is applied to its score or weight). */
static inline UNIT(fvec) UNIT(widen_int8)(const signed char *p) {
#if defined(__AVX512F__) && VL == 16
    return (UNIT(fvec))_mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128((const __m128i *)p)));
#elif defined(__AVX2__) && VL == 8
    return (UNIT(fvec))_mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64((const __m128i *)p)));
#else
    typedef signed char UNIT(bvec) __attribute__((vector_size(VL)));
    UNIT(bvec) x;
    memcpy(&x, p, sizeof x);
    return __builtin_convertvector(x, UNIT(fvec));
#endif
}

static inline __attribute__((always_inline)) UNIT(fvec) UNIT(load_cache)(const void *cache, size_t i, int bits) {
    return bits == 8    ? UNIT(widen_int8)((const signed char *)cache + i)
           : bits == 16 ? UNIT(widen)((const _Float16 *)cache + i)
                        : UNIT(load_f32)((const float *)cache + i);
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

/* Lane l of the result = the sum of x[l]'s lanes, for VL vectors: a tree of shuffles and adds
 * (each stage halves the vectors; ~3 instructions per vector instead of a reduction each). */
static inline __attribute__((always_inline)) UNIT(fvec) UNIT(sum_each)(UNIT(fvec) *x) {
#if VL == 16
    for (int m = 0; m < 8; m++)
        x[m] = __builtin_shufflevector(x[m], x[m + 8], 0, 1, 2, 3, 4, 5, 6, 7, 16, 17, 18, 19, 20, 21, 22, 23)
               + __builtin_shufflevector(x[m], x[m + 8], 8, 9, 10, 11, 12, 13, 14, 15, 24, 25, 26, 27, 28, 29, 30, 31);
    for (int m = 0; m < 4; m++)
        x[m] = __builtin_shufflevector(x[m], x[m + 4], 0, 1, 2, 3, 16, 17, 18, 19, 8, 9, 10, 11, 24, 25, 26, 27)
               + __builtin_shufflevector(x[m], x[m + 4], 4, 5, 6, 7, 20, 21, 22, 23, 12, 13, 14, 15, 28, 29, 30, 31);
    for (int m = 0; m < 2; m++)
        x[m] = __builtin_shufflevector(x[m], x[m + 2], 0, 1, 16, 17, 4, 5, 20, 21, 8, 9, 24, 25, 12, 13, 28, 29)
               + __builtin_shufflevector(x[m], x[m + 2], 2, 3, 18, 19, 6, 7, 22, 23, 10, 11, 26, 27, 14, 15, 30, 31);
    return __builtin_shufflevector(x[0], x[1], 0, 16, 2, 18, 4, 20, 6, 22, 8, 24, 10, 26, 12, 28, 14, 30)
           + __builtin_shufflevector(x[0], x[1], 1, 17, 3, 19, 5, 21, 7, 23, 9, 25, 11, 27, 13, 29, 15, 31);
#else
    for (int m = 0; m < 4; m++)
        x[m] = __builtin_shufflevector(x[m], x[m + 4], 0, 1, 2, 3, 8, 9, 10, 11)
               + __builtin_shufflevector(x[m], x[m + 4], 4, 5, 6, 7, 12, 13, 14, 15);
    for (int m = 0; m < 2; m++)
        x[m] = __builtin_shufflevector(x[m], x[m + 2], 0, 1, 8, 9, 4, 5, 12, 13)
               + __builtin_shufflevector(x[m], x[m + 2], 2, 3, 10, 11, 6, 7, 14, 15);
    return __builtin_shufflevector(x[0], x[1], 0, 8, 2, 10, 4, 12, 6, 14)
           + __builtin_shufflevector(x[0], x[1], 1, 9, 3, 11, 5, 13, 7, 15);
#endif
}

/* scores: G * (length + s + 1) floats of scratch. Always inlined with constant `groups` and
 * `bits`, so each case gets its own unrolled copy. */
static inline __attribute__((always_inline)) void UNIT(attend)(const struct step *st, int h, int s, float *scores,
                                                                int groups, int bits) {
    typedef UNIT(fvec) fvec;
    const int D = st->head_dim, n = st->length + s + 1;
    const size_t row0 = (size_t)h * st->capacity, row_bytes = (size_t)D * bits / 8;
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
                key[i] = i < keys ? UNIT(load_cache)(st->key_cache, base + (size_t)i * D + c, bits) : (fvec){0};
            for (int g = 0; g < groups; g++) {
                fvec qg = UNIT(load_f32)(q + (size_t)g * D + c);
                for (int i = 0; i < KEYS; i++) acc[i][g] += qg * key[i];
            }
        }
        if (groups * KEYS == VL && keys == KEYS) { /* all KEYS scores of all groups in one vector */
            fvec each[VL];
            for (int g = 0; g < groups; g++)
                for (int i = 0; i < KEYS; i++) each[g * KEYS + i] = acc[i][g];
            float sums[VL];
            fvec all = UNIT(sum_each)(each);
            memcpy(sums, &all, sizeof sums);
            for (int g = 0; g < groups; g++)
                for (int i = 0; i < KEYS; i++)
                    scores[(size_t)g * n + j + i] = sums[g * KEYS + i] * (bits == 8 ? st->key_scale[row0 + j + i] : 1.0f);
            continue;
        }
        for (int i = 0; i < keys; i++) {
            const float scale = bits == 8 ? st->key_scale[row0 + j + i] : 1.0f;
            for (int g = 0; g < groups; g++) scores[(size_t)g * n + j + i] = UNIT(sum_lanes)(acc[i][g]) * scale;
        }
    }

    float inv[MAX_GROUPS];
    for (int g = 0; g < groups; g++) {
        float *row = scores + (size_t)g * n, top = row[0], total = 0.0f;
        for (int j = 1; j < n; j++) top = row[j] > top ? row[j] : top;
        for (int j = 0; j < n; j++) {
            const float x = row[j] - top, weight = expf(x > EXP_FLOOR ? x : EXP_FLOOR);
            total += weight;
            row[j] = bits == 8 ? weight * st->value_scale[row0 + j] : weight; /* the value row's scale, folded in */
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
                fvec v0 = UNIT(load_cache)(st->value_cache, base, bits);
                fvec v1 = UNIT(load_cache)(st->value_cache, base + VL, bits);
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
    if (groups == 4 && st->bits == 8) UNIT(attend)(st, h, s, scores, 4, 8);
    else if (groups == 4 && st->bits == 16) UNIT(attend)(st, h, s, scores, 4, 16);
    else if (groups == 4) UNIT(attend)(st, h, s, scores, 4, 32);
    else if (st->bits == 8) UNIT(attend)(st, h, s, scores, groups, 8);
    else if (st->bits == 16) UNIT(attend)(st, h, s, scores, groups, 16);
    else UNIT(attend)(st, h, s, scores, groups, 32);
}

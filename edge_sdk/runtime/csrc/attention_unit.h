/* One work unit of the attention kernel (attention.c): the G query rows of one KV head at one
 * position of the step: scores, softmax, then the weighted values. Included once per instruction
 * set, with
 *   VL         floats per vector (8: AVX2 or NEON pairs, 16: AVX-512),
 *   UNIT(name) the name suffixed for that instruction set,
 *   UNIT_VNNI  1 where AVX-512 VNNI scores int8 keys,
 * and the target pragma in force, so each build of it gets its own registers and loads.
 */
#ifndef UNIT_VNNI
#define UNIT_VNNI 0
#endif

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

/* Scores are made KEYS keys at a time: each q slice loaded serves all of them (four with AVX-512's
 * 32 registers, two with AVX2's 16). */
#define KEYS (VL == 16 ? 4 : 2)

/* What turns a lane sum into a score: (sum - offset[g]) * scale[g] (none given: 0 and 1), times
 * the key row's scale over an int8 cache; `lane_*` hold them for the one-vector case (lane
 * g * KEYS + i: group g, key i), made once per unit. */
struct UNIT(score_scale) {
    float offset[MAX_GROUPS], scale[MAX_GROUPS];
    UNIT(fvec) lane_offset, lane_scale;
};

static inline __attribute__((always_inline)) struct UNIT(score_scale) UNIT(score_scale_for)(const float *offset,
                                                                                              const float *scale,
                                                                                              int groups) {
    struct UNIT(score_scale) ss;
    for (int g = 0; g < groups; g++) {
        ss.offset[g] = offset ? offset[g] : 0.0f;
        ss.scale[g] = scale ? scale[g] : 1.0f;
    }
    for (int l = 0; l < VL; l++) {
        ss.lane_offset[l] = l / KEYS < groups ? ss.offset[l / KEYS] : 0.0f;
        ss.lane_scale[l] = l / KEYS < groups ? ss.scale[l / KEYS] : 0.0f;
    }
    return ss;
}

/* KEYS floats repeated across a vector, loaded as one broadcast (a narrow store read back as a
 * vector would stall on store forwarding). */
static inline UNIT(fvec) UNIT(repeat_keys)(const float *p) {
#if defined(__AVX512F__) && VL == 16
    return (UNIT(fvec))_mm512_broadcast_f32x4(_mm_loadu_ps(p));
#elif defined(__AVX__) && VL == 8
    double pair;
    memcpy(&pair, p, sizeof pair);
    return (UNIT(fvec))_mm256_castpd_ps(_mm256_set1_pd(pair));
#else
    UNIT(fvec) x;
    for (int l = 0; l < VL; l++) x[l] = p[l % KEYS];
    return x;
#endif
}

/* Scores j .. j + keys - 1 of each group from their accumulators' lane sums. */
static inline __attribute__((always_inline)) void UNIT(store_scores)(const struct step *st, UNIT(fvec) acc[KEYS][MAX_GROUPS],
                                                                      int keys, int groups, int bits, size_t row,
                                                                      const struct UNIT(score_scale) *ss,
                                                                      float *scores, int n) {
    if (groups * KEYS == VL && keys == KEYS) { /* all KEYS scores of all groups in one vector */
        UNIT(fvec) each[VL];
        for (int g = 0; g < groups; g++)
            for (int i = 0; i < KEYS; i++) each[g * KEYS + i] = acc[i][g];
        UNIT(fvec) all = (UNIT(sum_each)(each) - ss->lane_offset) * ss->lane_scale;
        if (bits == 8) /* the KEYS rows' scales, repeated for each group */
            all *= UNIT(repeat_keys)(st->key_scale + row);
        float sums[VL];
        memcpy(sums, &all, sizeof sums);
        for (int g = 0; g < groups; g++) memcpy(scores + (size_t)g * n, sums + g * KEYS, sizeof(float) * KEYS);
        return;
    }
    for (int i = 0; i < keys; i++)
        for (int g = 0; g < groups; g++)
            scores[(size_t)g * n + i] = (UNIT(sum_lanes)(acc[i][g]) - ss->offset[g]) * ss->scale[g]
                                        * (bits == 8 ? st->key_scale[row + i] : 1.0f);
}

/* Each group's scores against `keys` cache rows from `row` in float arithmetic (`keys`
 * constant: KEYS for whole blocks, 1 for the tail, so neither carries the other's branches). */
static inline __attribute__((always_inline)) void UNIT(score_rows)(const struct step *st, size_t row, const float *q,
                                                                    const struct UNIT(score_scale) *ss, float *scores,
                                                                    int n, int groups, int bits, int keys) {
    typedef UNIT(fvec) fvec;
    const int D = st->head_dim;
    fvec acc[KEYS][MAX_GROUPS];
    for (int i = 0; i < keys; i++)
        for (int g = 0; g < groups; g++) acc[i][g] = (fvec){0};
    for (int c = 0; c < D; c += VL) {
        fvec key[KEYS];
        for (int i = 0; i < keys; i++) key[i] = UNIT(load_cache)(st->key_cache, (row + i) * D + c, bits);
        for (int g = 0; g < groups; g++) {
            const fvec qg = UNIT(load_f32)(q + (size_t)g * D + c);
            for (int i = 0; i < keys; i++) acc[i][g] += qg * key[i];
        }
    }
    UNIT(store_scores)(st, acc, keys, groups, bits, row, ss, scores, n);
}

#if UNIT_VNNI
/* The same over int8 keys with integer dot products: vpdpbusd multiplies unsigned bytes by signed
 * ones, so each key byte is offset by 128 (its sign bit flipped) and 128 times the sum of q's
 * codes taken off each score. D % 64 == 0. */
static inline __attribute__((always_inline)) void UNIT(score_int8_rows)(const struct step *st, size_t row,
                                                                         const signed char *q,
                                                                         const struct UNIT(score_scale) *ss,
                                                                         float *scores, int n, int groups, int keys) {
    const int D = st->head_dim;
    const signed char *keys_at = (const signed char *)st->key_cache + row * D;
    const __m512i flip = _mm512_set1_epi8((char)0x80);
    __m512i acc[KEYS][MAX_GROUPS];
    for (int i = 0; i < keys; i++)
        for (int g = 0; g < groups; g++) acc[i][g] = _mm512_setzero_si512();
    for (int c = 0; c < D; c += 64) {
        __m512i key[KEYS];
        for (int i = 0; i < keys; i++) key[i] = _mm512_xor_si512(_mm512_loadu_si512(keys_at + (size_t)i * D + c), flip);
        for (int g = 0; g < groups; g++) {
            const __m512i qg = _mm512_loadu_si512(q + (size_t)g * D + c);
            for (int i = 0; i < keys; i++) acc[i][g] = _mm512_dpbusd_epi32(acc[i][g], key[i], qg);
        }
    }
    UNIT(fvec) sums[KEYS][MAX_GROUPS];
    for (int i = 0; i < keys; i++)
        for (int g = 0; g < groups; g++) sums[i][g] = (UNIT(fvec))_mm512_cvtepi32_ps(acc[i][g]);
    UNIT(store_scores)(st, sums, keys, groups, 8, row, ss, scores, n);
}
#endif

/* Each group's scores against cache rows row0 .. row0 + n - 1, KEYS keys at a time then a tail:
 * over int8 keys with VNNI (`codes`, their sums `q_sum`) or in float arithmetic (`q`). */
static inline __attribute__((always_inline)) void UNIT(score_keys)(const struct step *st, size_t row0, int n,
                                                                    const float *q, const signed char *codes,
                                                                    const int *q_sum, const float *scale,
                                                                    float *scores, int groups, int bits) {
    const size_t row_bytes = (size_t)st->head_dim * bits / 8;
    float offset[MAX_GROUPS];
    for (int g = 0; g < groups; g++) offset[g] = codes ? 128.0f * (float)q_sum[g] : 0.0f;
    const struct UNIT(score_scale) ss = UNIT(score_scale_for)(offset, scale, groups);
#if UNIT_VNNI
#define SCORE_ROWS(j, keys)                                                                                       \
    (codes ? UNIT(score_int8_rows)(st, row0 + (j), codes, &ss, scores + (j), n, groups, keys)                      \
           : UNIT(score_rows)(st, row0 + (j), q, &ss, scores + (j), n, groups, bits, keys))
#else
#define SCORE_ROWS(j, keys) UNIT(score_rows)(st, row0 + (j), q, &ss, scores + (j), n, groups, bits, keys)
#endif
    /* Two streams, the rows from 0 and those from `half`, KEYS at a time from each: a core keeps
     * more lines in flight over two sequential reads than over one (float16 at 4,096 cached rows,
     * cold, 6 layers: 4-10% faster on a 2-vCPU Xeon, 3 alternating rounds), then the rest. */
    const int half = n / (2 * KEYS) * KEYS;
    for (int j = 0; j < half; j += KEYS) {
        if (j + PREFETCH_ROWS + KEYS <= half) {
            prefetch_bytes(st->key_cache, (row0 + j + PREFETCH_ROWS) * row_bytes, KEYS * row_bytes);
            prefetch_bytes(st->key_cache, (row0 + half + j + PREFETCH_ROWS) * row_bytes, KEYS * row_bytes);
        }
        SCORE_ROWS(j, KEYS);
        SCORE_ROWS(half + j, KEYS);
    }
    int j = 2 * half;
    for (; j + KEYS <= n; j += KEYS) SCORE_ROWS(j, KEYS);
    for (; j < n; j++) SCORE_ROWS(j, 1);
#undef SCORE_ROWS
}

/* out = P V over blocks of KEY_BLOCK keys: a block's value rows stay in L1 while each slice of
 * `width` vectors of the G output rows is accumulated in registers (4 with AVX-512 for up to four
 * groups: 16 accumulators, one broadcast weight per four products). */
static inline __attribute__((always_inline)) void UNIT(weigh_values)(const struct step *st, size_t row0, int n,
                                                                      const float *weights, const float *inv,
                                                                      float *out, int groups, int bits, int width) {
    typedef UNIT(fvec) fvec;
    const int D = st->head_dim;
    const size_t row_bytes = (size_t)D * bits / 8;
    for (int j0 = 0; j0 < n; j0 += KEY_BLOCK) {
        const int j1 = j0 + KEY_BLOCK < n ? j0 + KEY_BLOCK : n;
        for (int c = 0; c < D; c += width * VL) {
            fvec acc[4][MAX_GROUPS];
            for (int g = 0; g < groups; g++)
                for (int w = 0; w < width; w++)
                    acc[w][g] = j0 ? UNIT(load_f32)(out + (size_t)g * D + c + w * VL) : (fvec){0};
            for (int j = j0; j < j1; j++) {
                const size_t base = (row0 + j) * D + c;
                if (c == 0 && j + KEY_BLOCK < n)
                    prefetch_bytes(st->value_cache, (row0 + j + KEY_BLOCK) * row_bytes, row_bytes);
                fvec v[4];
                for (int w = 0; w < width; w++) v[w] = UNIT(load_cache)(st->value_cache, base + w * VL, bits);
                for (int g = 0; g < groups; g++) {
                    const float p = weights[(size_t)g * n + j];
                    for (int w = 0; w < width; w++) acc[w][g] += p * v[w];
                }
            }
            for (int g = 0; g < groups; g++)
                for (int w = 0; w < width; w++) {
                    const fvec a = j1 == n ? acc[w][g] * inv[g] : acc[w][g];
                    memcpy(out + (size_t)g * D + c + w * VL, &a, sizeof a);
                }
        }
    }
}

/* scores: G * (length + s + 1) floats of scratch. Always inlined with constant `groups` and
 * `bits`, so each case gets its own unrolled copy. */
static inline __attribute__((always_inline)) void UNIT(attend)(const struct step *st, int h, int s, float *scores,
                                                                int groups, int bits) {
    const int D = st->head_dim, n = st->length + s + 1;
    const size_t row0 = (size_t)h * st->capacity;
    const size_t q_row = (size_t)s * st->heads + (size_t)h * groups, first = q_row * D;
    const float *q = st->q + first;
    float *out = st->out + first;

    const float *scale = bits == 8 ? st->q_scale + q_row : NULL;
    const int vnni = UNIT_VNNI && bits == 8 && D % 64 == 0;
    UNIT(score_keys)(st, row0, n, q, vnni ? st->q_codes + first : NULL, vnni ? st->q_sum + q_row : NULL, scale,
                     scores, groups, bits);

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

    if (VL == 16 && groups <= 4 && D % (4 * VL) == 0) UNIT(weigh_values)(st, row0, n, scores, inv, out, groups, bits, 4);
    else UNIT(weigh_values)(st, row0, n, scores, inv, out, groups, bits, 2);
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

#undef KEYS
#undef UNIT_VNNI

/* Matrix-vector products with weight-only quantized matrices for decode on x86 CPUs with AVX-512 VNNI and VBMI.
 *
 * The weights stay in the layouts torch's CPU kernels read (see expertflow/quant/scheme.py): packs, slots and
 * daemons carry one layout, and either kernel can run on it. The activations are quantized to int8 per group
 * of the weight (int4) or per 64 columns (int8), so that the inner loop is integer dot products (vpdpbusd),
 * 64 multiply-adds an instruction, instead of converting every weight to float.
 *
 * Each output row is reduced by one thread in a fixed order, so the result does not depend on the number of
 * threads. OpenMP is the process's own (torch's libgomp is already loaded under the same soname), so these
 * kernels share torch's thread pool rather than competing with it.
 */
#include <immintrin.h>
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

enum { EF_F32 = 0, EF_BF16 = 1 };

static inline float bf16_to_f32(uint16_t v) {
    uint32_t u = (uint32_t)v << 16;
    float f;
    memcpy(&f, &u, 4);
    return f;
}

static inline uint16_t f32_to_bf16(float f) { /* round to nearest even, as torch converts */
    uint32_t u;
    memcpy(&u, &f, 4);
    if ((u & 0x7fffffffu) > 0x7f800000u) return (uint16_t)((u >> 16) | 0x40);
    u += 0x7fffu + ((u >> 16) & 1u);
    return (uint16_t)(u >> 16);
}

static inline float load_val(const void *p, int dtype, long i) {
    return dtype == EF_BF16 ? bf16_to_f32(((const uint16_t *)p)[i]) : ((const float *)p)[i];
}

static inline void store_val(void *p, int dtype, long i, float v) {
    if (dtype == EF_BF16)
        ((uint16_t *)p)[i] = f32_to_bf16(v);
    else
        ((float *)p)[i] = v;
}

/* x[0..k) quantized symmetrically to int8 per block of `block` columns: qx, the scale of each block, the sum of
 * the codes of each block and the exact sum of the block's values. qx is padded with zeros to `kpad`. */
static void quantize_row(const void *x, int dtype, long k, long kpad, long block, int8_t *qx, float *scale,
                         int32_t *qsum, float *xsum) {
    long nb = kpad / block;
    for (long b = 0; b < nb; b++) {
        float amax = 0.f, sum = 0.f;
        for (long i = b * block; i < (b + 1) * block && i < k; i++) {
            float v = load_val(x, dtype, i);
            sum += v;
            amax = fmaxf(amax, fabsf(v));
        }
        float s = amax / 127.f;
        float inv = s > 0.f ? 1.f / s : 0.f;
        int32_t qs = 0;
        for (long i = b * block; i < (b + 1) * block; i++) {
            int32_t q = 0;
            if (i < k) {
                q = (int32_t)lrintf(load_val(x, dtype, i) * inv);
                q = q > 127 ? 127 : (q < -127 ? -127 : q);
            }
            qx[i] = (int8_t)q;
            qs += q;
        }
        scale[b] = s;
        qsum[b] = qs;
        xsum[b] = sum;
    }
}

/* A row of activations as the kernels take it: int8 codes (padded), and per block the scale, the sum of the
 * codes and the exact sum of the values. One allocation; NULL when out of memory. */
typedef struct {
    int8_t *q;
    float *scale, *sum;
    int32_t *qsum;
    void *block;
} ef_row;

static int row_alloc(ef_row *r, long kpad, long blocks) {
    size_t codes = (size_t)((kpad + 63) / 64 * 64), per = (size_t)blocks;
    size_t bytes = codes + per * (2 * sizeof(float) + sizeof(int32_t));
    r->block = aligned_alloc(64, (bytes + 63) / 64 * 64); /* a multiple of the alignment, as C11 asks */
    if (!r->block) return -1;
    r->q = (int8_t *)r->block;
    r->scale = (float *)((char *)r->block + codes);
    r->sum = r->scale + per;
    r->qsum = (int32_t *)(r->sum + per);
    return 0;
}

static const void *row_of(const void *x, int dtype, long i, long k) {
    return dtype == EF_BF16 ? (const void *)((const uint16_t *)x + i * k) : (const void *)((const float *)x + i * k);
}

/* --- int4, group-wise, asymmetric: w = (q - 8) * scale + zero -------------------------------------------------
 * qweight: rows in blocks of 64; inside a block, k-major, byte (k, i) holds row i in its low nibble and row i + 32
 * in its high nibble. A tail of fewer than 64 rows holds, per k, rows 2i (low) and 2i + 1 (high).
 * qparams: [k / group, n, 2] of (scale, zero). */

static inline __m512 group_params(const void *qp, int dtype, long idx, __m512 *zero) {
    /* 16 rows' (scale, zero) pairs starting at pair index idx. */
    if (dtype == EF_BF16) {
        __m512i v = _mm512_loadu_si512((const uint16_t *)qp + 2 * idx);
        *zero = _mm512_castsi512_ps(_mm512_and_si512(v, _mm512_set1_epi32((int)0xffff0000u)));
        return _mm512_castsi512_ps(_mm512_slli_epi32(v, 16));
    }
    const float *f = (const float *)qp + 2 * idx;
    __m512 a = _mm512_loadu_ps(f), b = _mm512_loadu_ps(f + 16);
    const __m512i even = _mm512_set_epi32(30, 28, 26, 24, 22, 20, 18, 16, 14, 12, 10, 8, 6, 4, 2, 0);
    const __m512i odd = _mm512_set_epi32(31, 29, 27, 25, 23, 21, 19, 17, 15, 13, 11, 9, 7, 5, 3, 1);
    *zero = _mm512_permutex2var_ps(a, odd, b);
    return _mm512_permutex2var_ps(a, even, b);
}

/* Rows row0..row0+63 of W against t rows of activations (t = 1 or TILE: each weight load serves them all). Row
 * i's codes are at qx + i * ldq, its per-group values at xs/xq/xsum + i * ldg; its outputs accumulate into
 * out + i * ldo (zeroed by the caller). Every activation row goes through the same operations whatever t is,
 * so a row's result does not depend on the rows computed beside it. */
/* Bytes 4r..4r+3 of a permuted vector = row r's codes at k, k+1, k+2, k+3 (rows 0-15 from the low table,
 * 16-31 from the high one; the two source vectors hold k, k+1 and k+2, k+3, 32 rows each). */
#define IDX4(r) (r), (r) + 32, (r) + 64, (r) + 96
static const uint8_t LO_IDX[64] = {IDX4(0),  IDX4(1),  IDX4(2),  IDX4(3),  IDX4(4),  IDX4(5),  IDX4(6),  IDX4(7),
                                   IDX4(8),  IDX4(9),  IDX4(10), IDX4(11), IDX4(12), IDX4(13), IDX4(14), IDX4(15)};
static const uint8_t HI_IDX[64] = {IDX4(16), IDX4(17), IDX4(18), IDX4(19), IDX4(20), IDX4(21), IDX4(22), IDX4(23),
                                   IDX4(24), IDX4(25), IDX4(26), IDX4(27), IDX4(28), IDX4(29), IDX4(30), IDX4(31)};
#define TILE 4
#define CHUNK 64 /* rows of activations per pass over the weight */
static inline __attribute__((always_inline)) void q4_block64_t(const uint8_t *w, const void *qp, int qp_dtype,
                                                               long n, long row0, long k, long group, int t,
                                                               const int8_t *qx, long ldq, const float *xs,
                                                               const int32_t *xq, const float *xsum, long ldg,
                                                               float *out, long ldo) {
    const __m512i ilo = _mm512_loadu_si512(LO_IDX), ihi = _mm512_loadu_si512(HI_IDX);
    const __m512i nib = _mm512_set1_epi8(0x0f);
    for (long g = 0; g < k / group; g++) {
        __m512i acc[TILE][4];
        for (int i = 0; i < t; i++)
            for (int r = 0; r < 4; r++) acc[i][r] = _mm512_setzero_si512();
        for (long kk = g * group; kk < (g + 1) * group; kk += 4) {
            const uint8_t *p = w + kk * 32;
            __m512i z0 = _mm512_loadu_si512(p), z1 = _mm512_loadu_si512(p + 64);
            __m512i l0 = _mm512_and_si512(z0, nib), l1 = _mm512_and_si512(z1, nib);
            __m512i h0 = _mm512_and_si512(_mm512_srli_epi16(z0, 4), nib);
            __m512i h1 = _mm512_and_si512(_mm512_srli_epi16(z1, 4), nib);
            __m512i v[4] = {_mm512_permutex2var_epi8(l0, ilo, l1), _mm512_permutex2var_epi8(l0, ihi, l1),
                            _mm512_permutex2var_epi8(h0, ilo, h1), _mm512_permutex2var_epi8(h0, ihi, h1)};
            for (int i = 0; i < t; i++) {
                int32_t x4;
                memcpy(&x4, qx + i * ldq + kk, 4);
                __m512i xb = _mm512_set1_epi32(x4);
                for (int r = 0; r < 4; r++) acc[i][r] = _mm512_dpbusd_epi32(acc[i][r], v[r], xb);
            }
        }
        /* sum_k (q - 8) x ~= xs * (sum q qx - 8 sum qx); the zero point meets the exact sum of x. */
        for (int r = 0; r < 4; r++) {
            __m512 zero;
            __m512 scale = group_params(qp, qp_dtype, g * n + row0 + 16 * r, &zero);
            for (int i = 0; i < t; i++) {
                const __m512 sx = _mm512_set1_ps(xs[i * ldg + g]), sumx = _mm512_set1_ps(xsum[i * ldg + g]);
                const __m512i corr = _mm512_set1_epi32(8 * xq[i * ldg + g]);
                __m512 dot = _mm512_mul_ps(_mm512_cvtepi32_ps(_mm512_sub_epi32(acc[i][r], corr)), sx);
                float *o = out + i * ldo + 16 * r;
                _mm512_storeu_ps(o, _mm512_fmadd_ps(scale, dot, _mm512_fmadd_ps(zero, sumx, _mm512_loadu_ps(o))));
            }
        }
    }
}

static void q4_block64(const uint8_t *w, const void *qp, int qp_dtype, long n, long row0, long k, long group,
                       long m, const int8_t *qx, long ldq, const float *xs, const int32_t *xq, const float *xsum,
                       long ldg, float *out, long ldo) {
    for (long i = 0; i < m; i++) memset(out + i * ldo, 0, 64 * sizeof(float));
    long i = 0;
    for (; i + TILE <= m; i += TILE)
        q4_block64_t(w, qp, qp_dtype, n, row0, k, group, TILE, qx + i * ldq, ldq, xs + i * ldg, xq + i * ldg,
                     xsum + i * ldg, ldg, out + i * ldo, ldo);
    for (; i < m; i++)
        q4_block64_t(w, qp, qp_dtype, n, row0, k, group, 1, qx + i * ldq, ldq, xs + i * ldg, xq + i * ldg,
                     xsum + i * ldg, ldg, out + i * ldo, ldo);
}

static void q4_tail(const uint8_t *w, const void *qp, int qp_dtype, long n, long row0, long rows, long k,
                    long group, long m, const int8_t *qx, long ldq, const float *xs, const int32_t *xq,
                    const float *xsum, long ldg, float *out, long ldo) {
    for (long i = 0; i < m; i++)
        for (long r = 0; r < rows; r++) {
            float y = 0.f;
            for (long g = 0; g < k / group; g++) {
                int32_t acc = 0;
                for (long kk = g * group; kk < (g + 1) * group; kk++) {
                    uint8_t b = w[kk * (rows / 2) + r / 2];
                    int32_t q = (r & 1) ? (b >> 4) : (b & 0x0f);
                    acc += q * qx[i * ldq + kk];
                }
                float scale = load_val(qp, qp_dtype, 2 * (g * n + row0 + r));
                float zero = load_val(qp, qp_dtype, 2 * (g * n + row0 + r) + 1);
                float dot = (float)(acc - 8 * xq[i * ldg + g]) * xs[i * ldg + g];
                y = scale * dot + (zero * xsum[i * ldg + g] + y);
            }
            out[i * ldo + r] = y;
        }
}

/* y[m, n] = x[m, k] @ W.T for an int4 W of n x k (both padded as the layout requires). Returns 0, or -1 when
 * out of memory. Rows of x go in chunks of CHUNK (bounded scratch memory); each block of 64 weight rows is
 * read once per chunk. */
int ef_q4_gemm(const void *x, int x_dtype, long m, const uint8_t *qweight, const void *qparams, int qp_dtype,
               long n, long k, long group, void *y, int y_dtype) {
    long ng = k / group, rows = m < CHUNK ? m : CHUNK;
    ef_row a;
    float *out = malloc(sizeof(float) * (size_t)(rows * n));
    if (!out || row_alloc(&a, rows * k, rows * ng) != 0) {
        free(out);
        return -1;
    }
    long full = n / 64 * 64;
    for (long i0 = 0; i0 < m; i0 += CHUNK) {
        long mc = m - i0 < CHUNK ? m - i0 : CHUNK;
        for (long i = 0; i < mc; i++)
            quantize_row(row_of(x, x_dtype, i0 + i, k), x_dtype, k, k, group, a.q + i * k, a.scale + i * ng,
                         a.qsum + i * ng, a.sum + i * ng);
#pragma omp parallel for schedule(static)
        for (long b = 0; b < full / 64; b++)
            q4_block64(qweight + b * 64 * (k / 2), qparams, qp_dtype, n, b * 64, k, group, mc, a.q, k, a.scale,
                       a.qsum, a.sum, ng, out + b * 64, n);
        if (full < n)
            q4_tail(qweight + full * (k / 2), qparams, qp_dtype, n, full, n - full, k, group, mc, a.q, k, a.scale,
                    a.qsum, a.sum, ng, out + full, n);
        for (long j = 0; j < mc * n; j++) store_val(y, y_dtype, i0 * n + j, out[j]);
    }
    free(a.block), free(out);
    return 0;
}

/* --- int8, per output channel, symmetric: w = q * scale -----------------------------------------------------
 * qweight: [n, k] int8, k a multiple of 16; scales: [n]. Activations in blocks of 64 columns. */

#define Q8_BLOCK 64

/* Weight rows row0..row0+rows-1 against t rows of activations (t = 1 or TILE; row i's codes at qx + i * kpad,
 * its block values at xs/xq + i * nb), into out + i * n. The same operations for a row whatever t is. */
static inline __attribute__((always_inline)) void q8_rows_t(const int8_t *w, const void *sc, int sc_dtype, long n,
                                                            long row0, long rows, long k, long kpad, int t,
                                                            const int8_t *qx, const float *xs, const int32_t *xq,
                                                            float *out) {
    const __m512i flip = _mm512_set1_epi8((char)0x80);
    long nb = kpad / Q8_BLOCK;
    for (long r = row0; r < row0 + rows; r++) {
        const int8_t *wr = w + r * k;
        __m512 f[TILE];
        for (int i = 0; i < t; i++) f[i] = _mm512_setzero_ps();
        for (long b = 0; b < nb; b++) {
            long left = k - b * Q8_BLOCK;
            __mmask64 mask = left >= 64 ? ~(__mmask64)0 : (((__mmask64)1 << left) - 1);
            /* (w + 128) as u8 against qx as s8: the +128 adds 128 * sum(qx), taken back in integers. */
            __m512i wv = _mm512_xor_si512(_mm512_maskz_loadu_epi8(mask, wr + b * Q8_BLOCK), flip);
            for (int i = 0; i < t; i++) {
                __m512i acc = _mm512_dpbusd_epi32(_mm512_zextsi128_si512(_mm_cvtsi32_si128(-128 * xq[i * nb + b])),
                                                  wv, _mm512_load_si512(qx + i * kpad + b * Q8_BLOCK));
                f[i] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(acc), _mm512_set1_ps(xs[i * nb + b]), f[i]);
            }
        }
        float s = load_val(sc, sc_dtype, r);
        for (int i = 0; i < t; i++) out[i * n + r] = _mm512_reduce_add_ps(f[i]) * s;
    }
}

static void q8_rows(const int8_t *w, const void *sc, int sc_dtype, long n, long row0, long rows, long k, long kpad,
                    long m, const int8_t *qx, const float *xs, const int32_t *xq, float *out) {
    long nb = kpad / Q8_BLOCK, i = 0;
    for (; i + TILE <= m; i += TILE)
        q8_rows_t(w, sc, sc_dtype, n, row0, rows, k, kpad, TILE, qx + i * kpad, xs + i * nb, xq + i * nb,
                  out + i * n);
    for (; i < m; i++)
        q8_rows_t(w, sc, sc_dtype, n, row0, rows, k, kpad, 1, qx + i * kpad, xs + i * nb, xq + i * nb, out + i * n);
}

/* y[m, n] = x[m, k] @ W.T for an int8 W of n x k. Returns 0, or -1 when out of memory. Each weight row is read
 * once per chunk of CHUNK rows of x. */
int ef_q8_gemm(const void *x, int x_dtype, long m, const int8_t *qweight, const void *scales, int sc_dtype, long n,
               long k, void *y, int y_dtype) {
    long kpad = (k + Q8_BLOCK - 1) / Q8_BLOCK * Q8_BLOCK, nb = kpad / Q8_BLOCK, rows = m < CHUNK ? m : CHUNK;
    ef_row a;
    float *out = malloc(sizeof(float) * (size_t)(rows * n));
    if (!out || row_alloc(&a, rows * kpad, rows * nb) != 0) {
        free(out);
        return -1;
    }
    for (long i0 = 0; i0 < m; i0 += CHUNK) {
        long mc = m - i0 < CHUNK ? m - i0 : CHUNK;
        for (long i = 0; i < mc; i++)
            quantize_row(row_of(x, x_dtype, i0 + i, k), x_dtype, k, kpad, Q8_BLOCK, a.q + i * kpad,
                         a.scale + i * nb, a.qsum + i * nb, a.sum + i * nb);
        long chunk = 64;
#pragma omp parallel for schedule(static)
        for (long r0 = 0; r0 < n; r0 += chunk)
            q8_rows(qweight, scales, sc_dtype, n, r0, r0 + chunk <= n ? chunk : n - r0, k, kpad, mc, a.q, a.scale,
                    a.qsum, out);
        for (long j = 0; j < mc * n; j++) store_val(y, y_dtype, i0 * n + j, out[j]);
    }
    free(a.block), free(out);
    return 0;
}

/* --- a decode step's gated experts in one call ---------------------------------------------------------------
 * For one row x and n_routes experts (slot indices into stacked int4 weights), each expert's
 * down(silu(gate(x)) * up(x)) with gate_up = [gate; up] rows (transformers' gate_up_proj), in one parallel region:
 * no per-expert call from Python, and x quantized once for all of them. Shapes need no padding (checked by the
 * caller): 2 * ffn rows and hidden rows a multiple of 16, hidden and ffn multiples of their groups. */

typedef struct {
    const uint8_t *w;
    long w_stride; /* bytes per slot */
    const void *qp;
    long qp_stride; /* elements per slot */
    long group;
} ef_q4_stack;

/* Slot `slot`'s (scale, zero) pairs in a stack. */
static inline const void *slot_qp(const ef_q4_stack *st, int qp_dtype, long slot) {
    return qp_dtype == EF_BF16 ? (const void *)((const uint16_t *)st->qp + slot * st->qp_stride)
                               : (const void *)((const float *)st->qp + slot * st->qp_stride);
}

/* A route's gate/up outputs h[0..2 ffn) -> silu(gate) * up, quantized for the down product (route r's place). */
static void swiglu_mid(float *h, long ffn, long group, ef_row *mid, long r) {
    long ng = ffn / group;
    for (long j = 0; j < ffn; j++) {
        float g = h[j];
        h[j] = g / (1.f + expf(-g)) * h[ffn + j];
    }
    quantize_row(h, EF_F32, ffn, ffn, group, mid->q + r * ffn, mid->scale + r * ng, mid->qsum + r * ng,
                 mid->sum + r * ng);
}

static void q4_rows(const ef_q4_stack *st, int qp_dtype, long slot, long n, long k, long b, const int8_t *qx,
                    const float *xs, const int32_t *xq, const float *xsum, float *out) {
    /* Block b of 64 rows, or the tail when b is the last block and n is not a multiple of 64. Kept apart from
     * q4_block_rows: with one row in constants, the compiler specializes the block's loops (a few percent faster). */
    const uint8_t *w = st->w + slot * st->w_stride;
    const void *qp = slot_qp(st, qp_dtype, slot);
    long full = n / 64 * 64;
    if (b * 64 < full)
        q4_block64(w + b * 64 * (k / 2), qp, qp_dtype, n, b * 64, k, st->group, 1, qx, 0, xs, xq, xsum, 0,
                   out + b * 64, 0);
    else
        q4_tail(w + full * (k / 2), qp, qp_dtype, n, full, n - full, k, st->group, 1, qx, 0, xs, xq, xsum, 0,
                out + full, 0);
}

int ef_q4_swiglu(const void *x, int x_dtype, long hidden, long ffn, long n_routes, const long *slots,
                 const ef_q4_stack *gate_up, const ef_q4_stack *down, int qp_dtype, void *out, int out_dtype) {
    long ng_mid = ffn / down->group;
    long nb_up = (2 * ffn + 63) / 64, nb_down = (hidden + 63) / 64;
    ef_row a, mid;
    float *h = malloc(sizeof(float) * (size_t)(n_routes * 2 * ffn));
    float *y = malloc(sizeof(float) * (size_t)(n_routes * hidden));
    int ok_a = row_alloc(&a, hidden, hidden / gate_up->group) == 0;
    int ok_mid = row_alloc(&mid, n_routes * ffn, n_routes * ng_mid) == 0;
    if (!h || !y || !ok_a || !ok_mid) {
        free(h), free(y);
        if (ok_a) free(a.block);
        if (ok_mid) free(mid.block);
        return -1;
    }
    quantize_row(x, x_dtype, hidden, hidden, gate_up->group, a.q, a.scale, a.qsum, a.sum);
#pragma omp parallel
    {
#pragma omp for schedule(static)
        for (long i = 0; i < n_routes * nb_up; i++)
            q4_rows(gate_up, qp_dtype, slots[i / nb_up], 2 * ffn, hidden, i % nb_up, a.q, a.scale, a.qsum, a.sum,
                    h + (i / nb_up) * 2 * ffn);
#pragma omp for schedule(static)
        for (long r = 0; r < n_routes; r++) swiglu_mid(h + r * 2 * ffn, ffn, down->group, &mid, r);
#pragma omp for schedule(static)
        for (long i = 0; i < n_routes * nb_down; i++) {
            long r = i / nb_down;
            q4_rows(down, qp_dtype, slots[r], hidden, ffn, i % nb_down, mid.q + r * ffn, mid.scale + r * ng_mid,
                    mid.qsum + r * ng_mid, mid.sum + r * ng_mid, y + r * hidden);
        }
    }
    for (long j = 0; j < n_routes * hidden; j++) store_val(out, out_dtype, j, y[j]);
    free(a.block), free(mid.block), free(h), free(y);
    return 0;
}

/* --- a prompt's gated experts in one call --------------------------------------------------------------------
 * Rows of x (m of them) routed to experts: route r takes row rows[r] through the expert in slot slots[g] of its
 * group g (routes start[g] .. start[g + 1] - 1, grouped by expert so that each weight block is read once for
 * all of a group's rows). out[r] = down(silu(gate(x)) * up(x)) for route r's row. Every route goes through the
 * operations a decode step's route goes through in ef_q4_swiglu (each row quantized the same way, the same
 * per-row arithmetic whatever the rows beside it): a route's result does not depend on the other routes, nor
 * on how they are grouped into calls. */
/* Block b of 64 rows (or the tail past the last whole block) of slot `slot`'s n x k weight against `cnt` rows of
 * quantized activations, one after another (codes k apart, per-group values ldg apart), into out (ldo apart). */
static void q4_block_rows(const ef_q4_stack *st, int qp_dtype, long slot, long n, long k, long b, long cnt,
                          const int8_t *qx, const float *xs, const int32_t *xq, const float *xsum, long ldg,
                          float *out, long ldo) {
    const uint8_t *w = st->w + slot * st->w_stride;
    const void *qp = slot_qp(st, qp_dtype, slot);
    long full = n / 64 * 64;
    if (b * 64 < full)
        q4_block64(w + b * 64 * (k / 2), qp, qp_dtype, n, b * 64, k, st->group, cnt, qx, k, xs, xq, xsum, ldg,
                   out + b * 64, ldo);
    else
        q4_tail(w + full * (k / 2), qp, qp_dtype, n, full, n - full, k, st->group, cnt, qx, k, xs, xq, xsum, ldg,
                out + full, ldo);
}

int ef_q4_swiglu_rows(const void *x, int x_dtype, long m, long hidden, long ffn, long n_groups, const long *slots,
                      const long *start, const long *rows, const ef_q4_stack *gate_up, const ef_q4_stack *down,
                      int qp_dtype, void *out, int out_dtype) {
    long n_routes = start[n_groups];
    long ng_in = hidden / gate_up->group, ng_mid = ffn / down->group;
    long nb_up = (2 * ffn + 63) / 64, nb_down = (hidden + 63) / 64;
    ef_row a, ra, mid;
    float *h = malloc(sizeof(float) * (size_t)(n_routes * 2 * ffn));
    float *y = malloc(sizeof(float) * (size_t)(n_routes * hidden));
    int ok_a = row_alloc(&a, m * hidden, m * ng_in) == 0;
    int ok_ra = row_alloc(&ra, n_routes * hidden, n_routes * ng_in) == 0;
    int ok_mid = row_alloc(&mid, n_routes * ffn, n_routes * ng_mid) == 0;
    if (!h || !y || !ok_a || !ok_ra || !ok_mid) {
        free(h), free(y);
        if (ok_a) free(a.block);
        if (ok_ra) free(ra.block);
        if (ok_mid) free(mid.block);
        return -1;
    }
    for (long i = 0; i < m; i++)
        quantize_row(row_of(x, x_dtype, i, hidden), x_dtype, hidden, hidden, gate_up->group, a.q + i * hidden,
                     a.scale + i * ng_in, a.qsum + i * ng_in, a.sum + i * ng_in);
    /* Each route's quantized row, so that a group's rows sit one after another. */
    for (long r = 0; r < n_routes; r++) {
        long i = rows[r];
        memcpy(ra.q + r * hidden, a.q + i * hidden, (size_t)hidden);
        memcpy(ra.scale + r * ng_in, a.scale + i * ng_in, sizeof(float) * (size_t)ng_in);
        memcpy(ra.qsum + r * ng_in, a.qsum + i * ng_in, sizeof(int32_t) * (size_t)ng_in);
        memcpy(ra.sum + r * ng_in, a.sum + i * ng_in, sizeof(float) * (size_t)ng_in);
    }
#pragma omp parallel
    {
#pragma omp for schedule(static)
        for (long i = 0; i < n_groups * nb_up; i++) {
            long g = i / nb_up, r0 = start[g];
            q4_block_rows(gate_up, qp_dtype, slots[g], 2 * ffn, hidden, i % nb_up, start[g + 1] - r0,
                          ra.q + r0 * hidden, ra.scale + r0 * ng_in, ra.qsum + r0 * ng_in, ra.sum + r0 * ng_in,
                          ng_in, h + r0 * 2 * ffn, 2 * ffn);
        }
#pragma omp for schedule(static)
        for (long r = 0; r < n_routes; r++) swiglu_mid(h + r * 2 * ffn, ffn, down->group, &mid, r);
#pragma omp for schedule(static)
        for (long i = 0; i < n_groups * nb_down; i++) {
            long g = i / nb_down, r0 = start[g];
            q4_block_rows(down, qp_dtype, slots[g], hidden, ffn, i % nb_down, start[g + 1] - r0, mid.q + r0 * ffn,
                          mid.scale + r0 * ng_mid, mid.qsum + r0 * ng_mid, mid.sum + r0 * ng_mid, ng_mid,
                          y + r0 * hidden, hidden);
        }
    }
    for (long j = 0; j < n_routes * hidden; j++) store_val(out, out_dtype, j, y[j]);
    free(a.block), free(ra.block), free(mid.block), free(h), free(y);
    return 0;
}

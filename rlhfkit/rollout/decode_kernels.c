/* The CPU engine's fused ops (driven by rlhfkit/rollout/fused.py for FastBackend in fast.py).
 *
 * A decode step of a small model at batch 8-32 spends about half its time in ~60 small tensor ops a layer
 * around the four int8 GEMMs (per-token scales, norms, rotary, cache writes, SiLU), each a few microseconds
 * of dispatch and thread start-up for a few kilobytes of work. Each function here does one run of them, from
 * one GEMM's raw output to the next GEMM's input, in a single pass over each row:
 *
 *   prep           x (-> RMSNorm) * w -> per-row quantized GEMM input      (the embedding, the attention output)
 *   qkv_post       qkv GEMM output -> q, rotary on q and k, k and v into the cache column
 *   residual_prep  o or down GEMM output -> h += it -> RMSNorm * w -> the next GEMM's input
 *   gate_up_post   gate/up GEMM output -> silu(gate) * up / s -> the down GEMM's input
 *   dequant_rows   lm-head GEMM output -> logits, written into chosen rows of the logits
 *   attention      one query token a row against the KV cache (grouped-query heads, masked keys)
 * and, once per policy update, quantize_rows and col_amax (the int8 copy of a weight, QuantLinear.quantize);
 * and gemm_u8s8 / gemm_u8s8_vnni, rlhfkit's own int8 GEMM (AVX2 / AVX-512 VNNI; at the end).
 *
 * GEMM outputs are fp32 (fbgemm's linear_dynamic) or int32 (torch._int_mm), `ytype` 0 / 1; the value of
 * output n of row b is y[b, n] * wscale[n] * xscale[b] (+ bias[n]). A GEMM input is written for its kernel,
 * `mode` 0 / 1 / 2 / 3: fp32 rows divided by their max |x| (fbgemm quantizes per tensor: rows of max 1 make that
 * per token), scale max |x|; int8 rows round(x / s), s = max |x| / 127, scale s (torch._int_mm); uint8
 * rows round(x / s) + 64, s = max |x| / 63, scale s (`mode` 2, gemm_u8s8, below, whose int32 output is read
 * as ytype 1); or uint8 rows round(x / s) + 128, s = max |x| / 127 (`mode` 3, gemm_u8s8_vnni). The
 * arithmetic is QuantLinear.int8's (rlhfkit/rollout/int8.py) in the same order, so results agree to float
 * rounding.
 * Rows are independent, and the loops over them run on OpenMP's threads where the compiler has OpenMP: the
 * same runtime (libgomp) and thread count as torch's own ops, so nothing oversubscribes the cores. A call
 * too small to pay for waking the threads runs on one (`PAR`).
 */
#include <math.h>
#include <stdint.h>
#include <string.h>
#if defined(__AMX_TILE__) && defined(__AMX_INT8__) && defined(__linux__)
#define RLHFKIT_AMX 1
#include <sys/syscall.h>
#include <unistd.h>
#endif
#ifdef __AVX2__
#include <immintrin.h>
#endif

int rlhfkit_kernels_version(void) { return 10; }

/* go parallel when a call touches more than ~64 KB of floats */
#define PAR(work) if ((long)(work) > 16384)

/* y[b, :n] as float, scaled: out[j] = y * wscale[j] * xs (+ bias[j]) */
static void dequant_row(const void *y, int ytype, long offset, const float *wscale, float xs, const float *bias,
                        int n, float *out) {
    if (ytype == 1) {
        const int32_t *yi = (const int32_t *)y + offset;
        for (int j = 0; j < n; j++) out[j] = (float)yi[j] * wscale[j] * xs;
    } else {
        const float *yf = (const float *)y + offset;
        for (int j = 0; j < n; j++) out[j] = yf[j] * wscale[j] * xs;
    }
    if (bias)
        for (int j = 0; j < n; j++) out[j] += bias[j];
}

/* sum of a[i] b[i] in 8 fixed lanes: the same association at every address (the library is compiled
 * without -ffast-math's reassociation, so a result never depends on how a buffer happens to be aligned) */
static inline float dot(const float *a, const float *b, int n) {
    float s[8] = {0, 0, 0, 0, 0, 0, 0, 0};
    int j = 0;
    for (; j + 8 <= n; j += 8)
        for (int l = 0; l < 8; l++) s[l] += a[j + l] * b[j + l];
    float t = ((s[0] + s[4]) + (s[1] + s[5])) + ((s[2] + s[6]) + (s[3] + s[7]));
    for (; j < n; j++) t += a[j] * b[j];
    return t;
}

/* max |x[j]| (exact in any order, so vectorized by hand: the compiler left the portable loop scalar, 40% of
 * the weights' rounding pass) */
static float row_amax(const float *x, int n) {
    float amax = 0.f;
    int j = 0;
#ifdef __AVX2__
    const __m256 sign = _mm256_set1_ps(-0.0f);
    __m256 m0 = _mm256_setzero_ps(), m1 = _mm256_setzero_ps();
    for (; j + 16 <= n; j += 16) {
        m0 = _mm256_max_ps(m0, _mm256_andnot_ps(sign, _mm256_loadu_ps(x + j)));
        m1 = _mm256_max_ps(m1, _mm256_andnot_ps(sign, _mm256_loadu_ps(x + j + 8)));
    }
    float m[8];
    _mm256_storeu_ps(m, _mm256_max_ps(m0, m1));
    for (int l = 0; l < 8; l++) amax = m[l] > amax ? m[l] : amax;
#endif
    for (; j < n; j++) amax = fabsf(x[j]) > amax ? fabsf(x[j]) : amax;
    return amax;
}

/* out[k] = max(out[k], max over the N rows of |w[n, k]|): the per-input-channel weight range the smoothing
 * reads (QuantLinear.quantize), one pass over w; exact in any order */
void col_amax(const float *w, int N, int K, float *out) {
    for (int n = 0; n < N; n++) {
        const float *x = w + (long)n * K;
        int k = 0;
#ifdef __AVX2__
        const __m256 sign = _mm256_set1_ps(-0.0f);
        for (; k + 8 <= K; k += 8)
            _mm256_storeu_ps(out + k, _mm256_max_ps(_mm256_loadu_ps(out + k),
                                                    _mm256_andnot_ps(sign, _mm256_loadu_ps(x + k))));
#endif
        for (; k < K; k++) out[k] = fabsf(x[k]) > out[k] ? fabsf(x[k]) : out[k];
    }
}

/* one row into the GEMM input of `mode`, its scale into *scale */
static void quant_row(const float *x, int n, int mode, void *out, long offset, float *scale) {
    float amax = row_amax(x, n);
    if (amax < 1e-12f) amax = 1e-12f;
    if (mode == 0) {
        float *o = (float *)out + offset;
        for (int j = 0; j < n; j++) o[j] = x[j] / amax;
        *scale = amax;
    } else if (mode == 1) {
        int8_t *o = (int8_t *)out + offset;
        float s = amax * (1.0f / 127.0f);
        for (int j = 0; j < n; j++) o[j] = (int8_t)nearbyintf(x[j] / s);
        *scale = s;
    } else if (mode == 2) {  /* gemm_u8s8's input, 7 bits: round(x / s) + 64 in [1, 127], s = max |x| / 63 */
        uint8_t *o = (uint8_t *)out + offset;
        float s = amax * (1.0f / 63.0f);
        for (int j = 0; j < n; j++) o[j] = (uint8_t)(nearbyintf(x[j] / s) + 64.0f);
        *scale = s;
    } else {  /* gemm_u8s8_vnni's input: 8 bits, zero point 128: round(x / s) + 128 in [1, 255], s = max |x| / 127 */
        uint8_t *o = (uint8_t *)out + offset;
        float s = amax * (1.0f / 127.0f);
        for (int j = 0; j < n; j++) o[j] = (uint8_t)(nearbyintf(x[j] / s) + 128.0f);
        *scale = s;
    }
}

/* in place: x = x * rsqrt(mean(x^2) + eps) * w (F.rms_norm) */
static void rms_norm_row(float *x, const float *w, float eps, int n) {
    float r = 1.0f / sqrtf(dot(x, x, n) / (float)n + eps);
    for (int j = 0; j < n; j++) x[j] = x[j] * r * w[j];
}

/* rows of x (B, K): (RMS-normalized when norm != 0) times w (K), quantized per row into out; the rows
 * before rounding into raw (B, K) too unless it is NULL (the smoothing statistics read them) */
void prep(const float *x, const float *w, float eps, int norm, int B, int K, int mode, void *out, float *scale,
          float *raw) {
#pragma omp parallel for PAR(B * K)
    for (int b = 0; b < B; b++) {
        float row[K];
        memcpy(row, x + (long)b * K, sizeof(float) * K);
        if (norm)
            rms_norm_row(row, w, eps, K);
        else
            for (int j = 0; j < K; j++) row[j] *= w[j];
        if (raw) memcpy(raw + (long)b * K, row, sizeof(float) * K);
        quant_row(row, K, mode, out, (long)b * K, scale + b);
    }
}

/* the qkv GEMM's output (B, (nh + 2 nkv) d) -> q (B, nh, d) rotated; k rotated and v into the caches
 * (S, nkv, L, d): row b is a token of sequence seq[b], written to column col[b] (a decode step: one token a
 * sequence; a prefill: each real token of each prompt, no pads); cos / sin (B, d) per row (transformers'
 * rotate_half layout) */
void qkv_post(const void *y, int ytype, const float *wscale, const float *xscale, const float *bias,
              const float *cos, const float *sin, int B, int nh, int nkv, int d, float *q, float *kc, float *vc,
              int L, const int32_t *seq, const int32_t *col) {
    int n = (nh + 2 * nkv) * d, half = d / 2;
#pragma omp parallel for PAR(B * n)
    for (int b = 0; b < B; b++) {
        float row[n];
        dequant_row(y, ytype, (long)b * n, wscale, xscale[b], bias, n, row);
        const float *c = cos + (long)b * d, *s = sin + (long)b * d;
        long sq = seq[b], at = col[b];
        for (int hd = 0; hd < nh + nkv; hd++) {
            const float *x = row + hd * d;
            float *dst = hd < nh ? q + ((long)b * nh + hd) * d : kc + ((sq * nkv + hd - nh) * L + at) * d;
            for (int i = 0; i < half; i++) dst[i] = x[i] * c[i] - x[i + half] * s[i];
            for (int i = half; i < d; i++) dst[i] = x[i] * c[i] + x[i - half] * s[i];
        }
        for (int j = 0; j < nkv; j++)
            memcpy(vc + ((sq * nkv + j) * L + at) * d, row + (nh + nkv + j) * d, sizeof(float) * d);
    }
}

/* h (B, H) += the o or down GEMM's output; then RMSNorm(h) * w quantized into out (the next GEMM's input),
 * unrounded into raw unless NULL */
void residual_prep(const void *y, int ytype, const float *wscale, const float *xscale, const float *bias, float *h,
                   const float *w, float eps, int B, int H, int mode, void *out, float *scale, float *raw) {
#pragma omp parallel for PAR(B * H)
    for (int b = 0; b < B; b++) {
        float row[H];
        float *hr = h + (long)b * H;
        dequant_row(y, ytype, (long)b * H, wscale, xscale[b], bias, H, row);
        for (int j = 0; j < H; j++) hr[j] += row[j];
        memcpy(row, hr, sizeof(float) * H);
        rms_norm_row(row, w, eps, H);
        if (raw) memcpy(raw + (long)b * H, row, sizeof(float) * H);
        quant_row(row, H, mode, out, (long)b * H, scale + b);
    }
}

/* exp(x) for x <= 0 (the SiLU's exp(-|g|)): 2^n * p(r), r in [-ln2/2, ln2/2], a degree-6 Taylor polynomial
 * (relative error < 3e-7, about float rounding); written branch-free so the loop vectorizes */
static inline float exp_nonpos(float x) {
    x = x < -80.0f ? -80.0f : x;  /* exp(-80) ~ 2e-35: still a normal float */
    float n = nearbyintf(x * 1.44269504088896341f);
    float r = x - n * 0.693145751953125f - n * 1.428606765330187e-06f;
    float p = 1.0f + r * (1.0f + r * (0.5f + r * (1.0f / 6 + r * (1.0f / 24 + r * (1.0f / 120 + r * (1.0f / 720))))));
    union { float f; int32_t i; } u = {.f = p};
    u.i += (int32_t)n << 23;
    return u.f;
}

/* the gate/up GEMM's output (B, 2 I) -> silu(gate) * up / s (inv_s = 1 / s of the down layer), quantized into
 * out (B, I); unrounded into raw unless NULL */
void gate_up_post(const void *y, int ytype, const float *wscale, const float *xscale, const float *inv_s, int B,
                  int I, int mode, void *out, float *scale, float *raw) {
#pragma omp parallel for PAR(B * 2 * I)
    for (int b = 0; b < B; b++) {
        float row[2 * I];
        dequant_row(y, ytype, (long)b * 2 * I, wscale, xscale[b], NULL, 2 * I, row);
        for (int i = 0; i < I; i++) {
            float g = row[i];
            float e = exp_nonpos(-fabsf(g));  /* sigmoid(g) = 1 / (1 + e) for g >= 0, e / (1 + e) for g < 0 */
            float sig = (g >= 0 ? 1.0f : e) / (1.0f + e);
            row[i] = g * sig * row[I + i] * inv_s[i];
        }
        if (raw) memcpy(raw + (long)b * I, row, sizeof(float) * I);
        quant_row(row, I, mode, out, (long)b * I, scale + b);
    }
}

/* the lm head's output (B, V) -> float logits into row rows[b] of out (R, V) */
void dequant_rows(const void *y, int ytype, const float *wscale, const float *xscale, const float *bias, int B,
                  int V, const int64_t *rows, float *out) {
#pragma omp parallel for PAR(B * V)
    for (int b = 0; b < B; b++)
        dequant_row(y, ytype, (long)b * V, wscale, xscale[b], bias, V, out + rows[b] * (long)V);
}

#ifdef __AVX2__
/* exp_nonpos on 8 lanes, the same steps as the scalar one */
static inline __m256 exp_nonpos8(__m256 x) {
    x = _mm256_max_ps(x, _mm256_set1_ps(-80.0f));
    __m256 n = _mm256_round_ps(_mm256_mul_ps(x, _mm256_set1_ps(1.44269504088896341f)),
                               _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    __m256 r = _mm256_sub_ps(_mm256_sub_ps(x, _mm256_mul_ps(n, _mm256_set1_ps(0.693145751953125f))),
                             _mm256_mul_ps(n, _mm256_set1_ps(1.428606765330187e-06f)));
    __m256 p = _mm256_set1_ps(1.0f / 720);
    p = _mm256_add_ps(_mm256_mul_ps(p, r), _mm256_set1_ps(1.0f / 120));
    p = _mm256_add_ps(_mm256_mul_ps(p, r), _mm256_set1_ps(1.0f / 24));
    p = _mm256_add_ps(_mm256_mul_ps(p, r), _mm256_set1_ps(1.0f / 6));
    p = _mm256_add_ps(_mm256_mul_ps(p, r), _mm256_set1_ps(0.5f));
    p = _mm256_add_ps(_mm256_mul_ps(p, r), _mm256_set1_ps(1.0f));
    p = _mm256_add_ps(_mm256_mul_ps(p, r), _mm256_set1_ps(1.0f));
    __m256i e = _mm256_slli_epi32(_mm256_cvtps_epi32(n), 23);
    return _mm256_castsi256_ps(_mm256_add_epi32(_mm256_castps_si256(p), e));
}

/* the dot products of q (DV * 8 floats) with 8 consecutive keys (rows of k, DV * 8 floats each), as one vector */
static inline __attribute__((always_inline)) __m256 dot8(const float *q, const float *k, int DV) {
    __m256 a[8];
    for (int l = 0; l < 8; l++) a[l] = _mm256_setzero_ps();
    for (int i = 0; i < DV; i++) {
        __m256 qi = _mm256_loadu_ps(q + 8 * i);
        for (int l = 0; l < 8; l++) a[l] = _mm256_fmadd_ps(qi, _mm256_loadu_ps(k + (long)l * DV * 8 + 8 * i), a[l]);
    }
    /* a transpose-and-add: lane l of the result sums a[l] */
    __m256 s0 = _mm256_hadd_ps(_mm256_hadd_ps(a[0], a[1]), _mm256_hadd_ps(a[2], a[3]));
    __m256 s1 = _mm256_hadd_ps(_mm256_hadd_ps(a[4], a[5]), _mm256_hadd_ps(a[6], a[7]));
    return _mm256_add_ps(_mm256_permute2f128_ps(s0, s1, 0x20), _mm256_permute2f128_ps(s0, s1, 0x31));
}

/* one (sequence, K/V head, query) job of `attention` with head size DV * 8: scores 8 keys at a time, the
 * softmax's exp on 8 lanes, the weighted sum of values in DV registers */
static inline __attribute__((always_inline)) void attention_job8(const float *qb, const float *k, const float *v,
                                                                 const uint8_t *m, int n, int groups, int DV,
                                                                 float scale, float *ob) {
    int d = DV * 8;
    float p[n + 8];
    for (int g = 0; g < groups; g++) {
        const float *qg = qb + (long)g * d;
        int j = 0;
        for (; j + 8 <= n; j += 8) _mm256_storeu_ps(p + j, dot8(qg, k + (long)j * d, DV));
        for (; j < n; j++) p[j] = dot(qg, k + (long)j * d, d);
        float top = -INFINITY;
        for (j = 0; j < n; j++) {
            p[j] = m[j] ? p[j] * scale : -INFINITY;
            top = p[j] > top ? p[j] : top;
        }
        if (top == -INFINITY) {  /* no key to read (a left pad in a prefill) */
            memset(ob + (long)g * d, 0, sizeof(float) * d);
            continue;
        }
        __m256 sum8 = _mm256_setzero_ps(), t8 = _mm256_set1_ps(top);
        for (j = 0; j + 8 <= n; j += 8) {
            __m256i mj = _mm256_cvtepu8_epi32(_mm_loadl_epi64((const __m128i *)(m + j)));
            __m256 keep = _mm256_castsi256_ps(_mm256_cmpgt_epi32(mj, _mm256_setzero_si256()));
            __m256 e = _mm256_and_ps(keep, exp_nonpos8(_mm256_sub_ps(_mm256_loadu_ps(p + j), t8)));
            _mm256_storeu_ps(p + j, e);
            sum8 = _mm256_add_ps(sum8, e);
        }
        float lanes[8], sum = 0.f;
        _mm256_storeu_ps(lanes, sum8);
        for (int l = 0; l < 8; l++) sum += lanes[l];
        for (; j < n; j++) {
            p[j] = m[j] ? exp_nonpos(p[j] - top) : 0.f;
            sum += p[j];
        }
        __m256 acc[DV];
        for (int i = 0; i < DV; i++) acc[i] = _mm256_setzero_ps();
        for (j = 0; j < n; j++) {
            if (!m[j]) continue;
            __m256 pj = _mm256_set1_ps(p[j]);
            for (int i = 0; i < DV; i++) acc[i] = _mm256_fmadd_ps(pj, _mm256_loadu_ps(v + (long)j * d + 8 * i), acc[i]);
        }
        __m256 inv = _mm256_set1_ps(1.0f / sum);
        for (int i = 0; i < DV; i++) _mm256_storeu_ps(ob + (long)g * d + 8 * i, _mm256_mul_ps(acc[i], inv));
    }
}
#endif

/* attention of R query tokens against the KV cache: q (R, nh, d), row r a token of sequence seq[r] at
 * column col[r], reading keys [0, col[r]] of the caches (S, nkv, L, d) where mask[seq[r] * mask_stride + j]
 * != 0 (a decode step: one row a sequence at the new token's column; a prefill: each real token, causal);
 * the nh / nkv query heads sharing a K/V head read it together. Softmax of q.k * scale, then the weighted
 * sum of values, into out (R, nh, d); a query with no key to read gets zeros. With AVX2 and a head size of
 * 64 or 128, attention_job8 (4x the portable loop at batch 32: its exp and its scores' horizontal sums
 * were scalar). */
void attention(const float *q, const float *kc, const float *vc, const uint8_t *mask, long mask_stride, int R,
               int nh, int nkv, int d, int L, const int32_t *seq, const int32_t *col, float scale, float *out) {
    int groups = nh / nkv;
#pragma omp parallel for schedule(dynamic, 4) PAR((long)R * nkv * (R > 0 ? col[R - 1] + 1 : 0) * d)
    for (long job = 0; job < (long)R * nkv; job++) {
        long r = job / nkv, s = seq[r];
        int kv = job % nkv, n = col[r] + 1;
        const float *k = kc + (s * nkv + kv) * L * d, *v = vc + (s * nkv + kv) * L * d;
        const float *qb = q + (r * nh + (long)kv * groups) * d;  /* head h = kv * groups + g */
        float *ob = out + (r * nh + (long)kv * groups) * d;
        const uint8_t *m = mask + s * mask_stride;
#ifdef __AVX2__
        if (d == 64) {
            attention_job8(qb, k, v, m, n, groups, 8, scale, ob);
            continue;
        }
        if (d == 128) {
            attention_job8(qb, k, v, m, n, groups, 16, scale, ob);
            continue;
        }
#endif
        float p[groups][n], top[groups], acc[groups][d];
        int any = 0;
        for (int g = 0; g < groups; g++) top[g] = -INFINITY;
        for (int j = 0; j < n; j++) {
            any |= m[j];
            for (int g = 0; g < groups; g++) {
                float x = m[j] ? dot(qb + g * d, k + (long)j * d, d) * scale : -INFINITY;
                p[g][j] = x;
                top[g] = x > top[g] ? x : top[g];
            }
        }
        if (!any) {
            memset(ob, 0, sizeof(float) * groups * d);
            continue;
        }
        for (int g = 0; g < groups; g++) {
            float sum = 0.f;
            for (int j = 0; j < n; j++) {
                float e = m[j] ? exp_nonpos(p[g][j] - top[g]) : 0.f;
                p[g][j] = e;
                sum += e;
            }
            float inv = 1.0f / sum;
            for (int j = 0; j < n; j++) p[g][j] *= inv;
            for (int i = 0; i < d; i++) acc[g][i] = 0.f;
        }
        for (int j = 0; j < n; j++) {
            if (!m[j]) continue;
            const float *vj = v + (long)j * d;
            for (int g = 0; g < groups; g++)
                for (int i = 0; i < d; i++) acc[g][i] += p[g][j] * vj[i];
        }
        for (int g = 0; g < groups; g++) memcpy(ob + (long)g * d, acc[g], sizeof(float) * d);
    }
}

#define PANEL 16

static inline long panel_bytes(int K) { return (long)PANEL * ((K + 3) & ~3); }

/* the int8 copy of a weight (QuantLinear.quantize): row n of w (N, K) times s (K; NULL: ones), rounded to
 * int8 with its own symmetric scale max |w s| / 127 (scale[n]), and the row's sum of int8 values into
 * rowsum[n] unless NULL (gemm_u8s8's zero-point term); on `threads` threads (the engine quantizes several
 * weights at once, one thread each). Rows go to w8 (N, K) when panel_row < 0, else straight into
 * gemm_u8s8's panel layout (below; columns past K are zeros) of a buffer whose row panel_row is this w's
 * first row (a group's weights share one buffer; the caller zeroes rows past the group's last), with no
 * second pass */
void quantize_rows(const float *w, const float *s, int N, int K, int8_t *w8, float *scale, int32_t *rowsum,
                   int threads, int panel_row) {
#pragma omp parallel for schedule(static) num_threads(threads)
    for (int r = 0; r < N; r++) {
        float row[K];
        int8_t q[K + 3];
        const float *wr = w + (long)r * K;
        if (s)
            for (int j = 0; j < K; j++) row[j] = wr[j] * s[j];
        else
            memcpy(row, wr, sizeof(float) * K);
        float amax = row_amax(row, K);
        float sc = amax / 127.0f;
        sc = sc < 1e-12f ? 1e-12f : sc;
        scale[r] = sc;
        float inv = 1.0f / sc;  /* a product, not a quotient, per weight: 2x faster, ties may round one apart */
        int32_t sum = 0;
        for (int j = 0; j < K; j++) {
            int8_t v = (int8_t)nearbyintf(row[j] * inv);
            q[j] = v;
            sum += v;
        }
        if (rowsum) rowsum[r] = sum;
        if (panel_row < 0) {
            memcpy(w8 + (long)r * K, q, K);
            continue;
        }
        q[K] = q[K + 1] = q[K + 2] = 0;  /* the last group's columns past K */
        long g = (long)panel_row + r;
        int8_t *dst = w8 + (g / PANEL) * panel_bytes(K) + (g % PANEL) * 4;
        for (int k = 0; k < K; k += 4) memcpy(dst + (long)k * PANEL, q + k, 4);
    }
}

/* The int8 GEMM for CPUs without VNNI, rlhfkit's own: out (M, N) int32 = a (M, K) uint8 times w^T minus
 * 64 * rowsum[n], i.e. the product of the signed activations a - 64 (gemm input mode 2) with the int8
 * weight w (N, K). The weight is laid out once per re-quantization, by the rounding pass itself
 * (quantize_rows): panels of 16 rows, and in a panel, for each group of 4 columns, the 16 rows' 4 bytes
 * side by side (64 bytes). One AVX2 step then broadcasts 4 bytes of an activation row and multiplies them
 * with a panel's 64 bytes: vpmaddubsw multiplies u8 by s8 and adds pairs into int16 (at most 2 * 127 * 127,
 * so 7-bit activations never saturate), vpmaddwd adds the pairs into int32, so each int32 lane sums one
 * output's 4 products: the accumulators are output columns, with no horizontal sums. A tile of 5
 * activation rows x 16 outputs keeps ten accumulators in registers while the panel (16 K bytes) stays in
 * L1; activation rows go in blocks of ~256 KB that stay in L2 while every panel streams past once; panels
 * split over the threads, so each core reads half the weight (the same scheme as fbgemm's, whose prepack
 * was 60% of a re-quantization: this layout is one pass over the int8 weight). */
int rlhfkit_has_avx2(void) {
#ifdef __AVX2__
    return 1;
#else
    return 0;
#endif
}

/* the byte of row j (< 16), column k of a panel */
static inline int8_t panel_at(const int8_t *panel, int j, int k) { return panel[(k / 4) * PANEL * 4 + j * 4 + k % 4]; }

/* a tile without vector instructions: the exact product, zero point zp folded out */
static inline void tile_scalar(int MR, const uint8_t *a, int K, int k4, const int8_t *panel, const int32_t *rowsum,
                               int nr, int32_t *out, int ldo, int zp) {
    for (int i = 0; i < MR; i++)
        for (int j = 0; j < nr; j++) {
            int32_t t = 0;
            for (int k = 0; k < k4; k++) t += (int32_t)a[(long)i * K + k] * panel_at(panel, j, k);
            out[(long)i * ldo + j] = t - zp * rowsum[j];
        }
}

#define MAX_TILE_ROWS 8  /* the largest tile either kernel's call sites name (the vnni kernel's) */
#define TILE_ROWS 5  /* 10 accumulators + 2 weight vectors + the broadcast + ones: 14 of AVX2's 16 registers
                        (4 rows: 1.2x slower on the engine's shapes; 6 spills) */

/* out[i, 0..nr) for i < MR rows of a, from one panel: the first k4 = K rounded down to 4 columns (the
 * last K % 4, a scalar loop in gemm_u8s8, are rare) minus 64 rowsum; MR is a constant at each call site,
 * so each tile height compiles to its own register-resident loop */
static inline __attribute__((always_inline)) void gemm_tile(int MR, const uint8_t *a, int K, int k4,
                                                            const int8_t *panel, const int32_t *rowsum, int nr,
                                                            int32_t *out, int ldo) {
#ifdef __AVX2__
    const __m256i ones = _mm256_set1_epi16(1);
    __m256i acc[MAX_TILE_ROWS][2];  /* MR <= TILE_ROWS runs; larger sizes compile but are never reached */
    for (int i = 0; i < MR; i++) acc[i][0] = acc[i][1] = _mm256_setzero_si256();
    for (int k = 0; k < k4; k += 4) {
        const int8_t *p = panel + (long)k * PANEL;
        __m256i w0 = _mm256_loadu_si256((const __m256i *)p), w1 = _mm256_loadu_si256((const __m256i *)(p + 32));
        _mm_prefetch((const char *)(p + 256), _MM_HINT_T0);  /* 4 groups ahead: the first tile streams the panel in */
        for (int i = 0; i < MR; i++) {
            int32_t q;
            memcpy(&q, a + (long)i * K + k, 4);
            __m256i av = _mm256_set1_epi32(q);
            acc[i][0] = _mm256_add_epi32(acc[i][0], _mm256_madd_epi16(_mm256_maddubs_epi16(av, w0), ones));
            acc[i][1] = _mm256_add_epi32(acc[i][1], _mm256_madd_epi16(_mm256_maddubs_epi16(av, w1), ones));
        }
    }
    __m256i z0 = _mm256_slli_epi32(_mm256_loadu_si256((const __m256i *)rowsum), 6);
    __m256i z1 = _mm256_slli_epi32(_mm256_loadu_si256((const __m256i *)(rowsum + 8)), 6);
    for (int i = 0; i < MR; i++) {
        int32_t row[PANEL];
        _mm256_storeu_si256((__m256i *)row, _mm256_sub_epi32(acc[i][0], z0));
        _mm256_storeu_si256((__m256i *)(row + 8), _mm256_sub_epi32(acc[i][1], z1));
        memcpy(out + (long)i * ldo, row, sizeof(int32_t) * nr);
    }
#else
    tile_scalar(MR, a, K, k4, panel, rowsum, nr, out, ldo, 64);
#endif
}

/* 8 of AVX-512's 32 registers: a batch-8 decode step's rows in one tile, so each panel is read once */
#define VNNI_TILE_ROWS 8

/* gemm_tile with AVX-512 VNNI: one vpdpbusd multiplies the 4 broadcast activation bytes (u8) by a whole panel
 * group (16 rows x 4 s8 = 64 bytes) and adds each output's 4 products into its int32 lane, with no int16 step
 * (so no saturation: 8-bit activations, zero point 128); one instruction where AVX2 takes six. Without
 * AVX-512 VNNI, the exact scalar product (correct everywhere, vectorized only where the compiler targets VNNI) */
static inline __attribute__((always_inline)) void gemm_tile_vnni(int MR, const uint8_t *a, int K, int k4,
                                                                 const int8_t *panel, const int32_t *rowsum, int nr,
                                                                 int32_t *out, int ldo) {
#if defined(__AVX512F__) && defined(__AVX512VNNI__)
    __m512i acc[MAX_TILE_ROWS];
    for (int i = 0; i < MR; i++) acc[i] = _mm512_setzero_si512();
    for (int k = 0; k < k4; k += 4) {
        const int8_t *p = panel + (long)k * PANEL;
        __m512i w = _mm512_loadu_si512((const void *)p);
        _mm_prefetch((const char *)(p + 512), _MM_HINT_T0);  /* 8 groups ahead */
        for (int i = 0; i < MR; i++) {
            int32_t q;
            memcpy(&q, a + (long)i * K + k, 4);
            acc[i] = _mm512_dpbusd_epi32(acc[i], _mm512_set1_epi32(q), w);
        }
    }
    __m512i z = _mm512_slli_epi32(_mm512_loadu_si512((const void *)rowsum), 7);
    for (int i = 0; i < MR; i++) {
        int32_t row[PANEL];
        _mm512_storeu_si512((void *)row, _mm512_sub_epi32(acc[i], z));
        memcpy(out + (long)i * ldo, row, sizeof(int32_t) * nr);
    }
#else
    tile_scalar(MR, a, K, k4, panel, rowsum, nr, out, ldo, 128);
#endif
}

int rlhfkit_has_vnni(void) {
#if defined(__AVX512F__) && defined(__AVX512VNNI__)
    return 1;
#else
    return 0;
#endif
}

/* MR rows of one panel with the kernel `vnni` names (both constants at every call site) */
static inline __attribute__((always_inline)) void tile(int vnni, int MR, const uint8_t *a, int K, int k4,
                                                       const int8_t *panel, const int32_t *rowsum, int nr,
                                                       int32_t *out, int ldo) {
    if (vnni)
        gemm_tile_vnni(MR, a, K, k4, panel, rowsum, nr, out, ldo);
    else
        gemm_tile(MR, a, K, k4, panel, rowsum, nr, out, ldo);
}

/* AMX (Intel's tile unit, Sapphire Rapids and later): one tdpbusd multiplies 16 activation rows x 64 bytes by
 * a 16-output x 64-byte weight block into 16 x 16 int32 sums, 16x the work of a vpdpbusd. The panel layout is
 * already AMX's B-tile layout (a tile row = one 4-column group of the panel's 16 outputs, 64 bytes), so a
 * weight tile is 16 consecutive groups of a panel, read with stride 64. Used by the vnni kernel for blocks of
 * 16 rows when K is a multiple of 64 (the prefill, batches of 16 and more), the VNNI tile for the rest.
 * Linux hands out the tile registers per process on request (arch_prctl ARCH_REQ_XCOMP_PERM): asked once;
 * refused (an old kernel, a VM without it) or switched off (rlhfkit_amx(0)), the VNNI tile runs everything. */
static int amx_state = -1;  /* -1: not asked yet, 0: off, 1: on */

int rlhfkit_amx(int want) {  /* 1: use AMX where it can be had, 0: do not, -1: only say whether it is in use */
#ifdef RLHFKIT_AMX
    if (want < 0)
        return amx_state == 1;
    if (!want)
        amx_state = 0;
    else if (amx_state != 1)
        amx_state = syscall(SYS_arch_prctl, 0x1023 /* ARCH_REQ_XCOMP_PERM */, 18 /* XFEATURE_XTILEDATA */) == 0;
    return amx_state;
#else
    (void)want;
    return 0;
#endif
}

#ifdef RLHFKIT_AMX
typedef struct {
    uint8_t palette, start_row, reserved[14];
    uint16_t colsb[16];
    uint8_t rows[16];
} amx_config;

/* one 16 x 16 block of sums (tile `t`, stored to c) minus 128 rowsum, its first nr columns into out */
static inline void amx_store(const int32_t c[16][16], const int32_t *rowsum, int nr, int32_t *out, int ldo) {
    for (int i = 0; i < 16; i++)
        for (int j = 0; j < nr; j++) out[(long)i * ldo + j] = c[i][j] - 128 * rowsum[j];
}

/* rows [m0, m1) (a multiple of 16 of them) of gemm_u8s8_vnni on AMX: panels in pairs over the threads (tiles
 * 0, 1: the two panels' sums; 2: 16 activation rows; 3, 4: the two panels' weights) */
static void amx_rows(const uint8_t *a, const int8_t *wp, const int32_t *rowsum, int m0, int m1, int N, int K,
                     int32_t *out) {
    int panels = (N + PANEL - 1) / PANEL, pairs = (panels + 1) / 2;
    long pb = panel_bytes(K);
#pragma omp parallel if ((long)(m1 - m0) * N * K > 262144)
    {
        amx_config cfg;
        memset(&cfg, 0, sizeof cfg);
        cfg.palette = 1;
        for (int t = 0; t < 5; t++) {
            cfg.colsb[t] = 64;
            cfg.rows[t] = 16;
        }
        _tile_loadconfig(&cfg);  /* per thread: tile state is a thread's own */
        int32_t c[16][16];
#pragma omp for schedule(static)
        for (int q = 0; q < pairs; q++) {
            int p = 2 * q, two = p + 1 < panels, n = p * PANEL;
            int nr0 = N - n < PANEL ? N - n : PANEL, nr1 = two ? (N - n - PANEL < PANEL ? N - n - PANEL : PANEL) : 0;
            const int8_t *b0 = wp + p * pb, *b1 = b0 + pb;
            for (int m = m0; m < m1; m += 16) {
                const uint8_t *am = a + (long)m * K;
                _tile_zero(0);
                _tile_zero(1);
                for (int k = 0; k < K; k += 64) {
                    _tile_loadd(2, am + k, K);
                    _tile_loadd(3, b0 + (long)k * PANEL, 64);
                    _tile_dpbusd(0, 2, 3);
                    if (two) {
                        _tile_loadd(4, b1 + (long)k * PANEL, 64);
                        _tile_dpbusd(1, 2, 4);
                    }
                }
                _tile_stored(0, c, 64);
                amx_store((const int32_t (*)[16])c, rowsum + n, nr0, out + (long)m * N + n, N);
                if (two) {
                    _tile_stored(1, c, 64);
                    amx_store((const int32_t (*)[16])c, rowsum + n + PANEL, nr1, out + (long)m * N + n + PANEL, N);
                }
            }
        }
        _tile_release();
    }
}
#endif

/* a (M, K) uint8 x wp (w (N, K) in panels, as quantize_rows writes it) -> out (M, N) int32, the activations'
 * zero point (64: gemm_u8s8, 128: gemm_u8s8_vnni) folded out with rowsum: ceil(N / 16) * 16 entries (zeros
 * past N); `vnni` is a constant at both call sites, so each compiles to its own loops */
static inline __attribute__((always_inline)) void gemm_panels(int vnni, const uint8_t *a, const int8_t *wp,
                                                              const int32_t *rowsum, int M, int N, int K,
                                                              int32_t *out) {
    int k4 = K & ~3, panels = (N + PANEL - 1) / PANEL;
    int block = (262144 / (K > 0 ? K : 1)) & ~3;  /* activation rows a block: ~256 KB, in L2 */
    block = block < 4 ? 4 : block;
    for (int m0 = 0; m0 < M; m0 += block) {
        int m1 = m0 + block < M ? m0 + block : M, first = m0;  /* rows from `first` on: the vector tiles */
#ifdef RLHFKIT_AMX
        if (vnni && K % 64 == 0 && m1 - m0 >= 16 && amx_state == 1) {
            first = m0 + (m1 - m0) / 16 * 16;
            amx_rows(a, wp, rowsum, m0, first, N, K, out);
            if (first == m1)
                continue;
        }
#endif
#pragma omp parallel for schedule(static) if ((long)(m1 - first) * N * K > 262144)
        for (int p = 0; p < panels; p++) {
            const int8_t *panel = wp + p * panel_bytes(K);
            int n = p * PANEL, nr = N - n < PANEL ? N - n : PANEL;
            const int32_t *rs = rowsum + n;
            int32_t *o = out + n;
            int m = first, rows = vnni ? VNNI_TILE_ROWS : TILE_ROWS;
            for (; m + rows <= m1; m += rows)
                tile(vnni, rows, a + (long)m * K, K, k4, panel, rs, nr, o + (long)m * N, N);
            const uint8_t *am = a + (long)m * K;
            int32_t *om = o + (long)m * N;
            switch (m1 - m) {  /* the rest, fewer rows than a tile (at most 4 for avx2) */
                case 7: tile(vnni, 7, am, K, k4, panel, rs, nr, om, N); break;
                case 6: tile(vnni, 6, am, K, k4, panel, rs, nr, om, N); break;
                case 5: tile(vnni, 5, am, K, k4, panel, rs, nr, om, N); break;
                case 4: tile(vnni, 4, am, K, k4, panel, rs, nr, om, N); break;
                case 3: tile(vnni, 3, am, K, k4, panel, rs, nr, om, N); break;
                case 2: tile(vnni, 2, am, K, k4, panel, rs, nr, om, N); break;
                case 1: tile(vnni, 1, am, K, k4, panel, rs, nr, om, N); break;
            }
            for (int i = first; i < m1 && k4 < K; i++)  /* the last K % 4 columns (none for the usual sizes) */
                for (int j = 0; j < nr; j++)
                    for (int k = k4; k < K; k++)
                        out[(long)i * N + n + j] += (int32_t)a[(long)i * K + k] * panel_at(panel, j, k);
        }
    }
}

void gemm_u8s8(const uint8_t *a, const int8_t *wp, const int32_t *rowsum, int M, int N, int K, int32_t *out) {
    gemm_panels(0, a, wp, rowsum, M, N, K, out);
}

void gemm_u8s8_vnni(const uint8_t *a, const int8_t *wp, const int32_t *rowsum, int M, int N, int K, int32_t *out) {
    gemm_panels(1, a, wp, rowsum, M, N, K, out);
}

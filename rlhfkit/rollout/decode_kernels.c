/* The CPU engine's fused decode ops (rlhfkit/rollout/fast.py, FastBackend._decode_fused).
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
 *
 * GEMM outputs are fp32 (fbgemm's linear_dynamic) or int32 (torch._int_mm), `ytype` 0 / 1; the value of
 * output n of row b is y[b, n] * wscale[n] * xscale[b] (+ bias[n]). A GEMM input is written for its kernel,
 * `mode` 0 / 1: fp32 rows divided by their max |x| (fbgemm quantizes per tensor: rows of max 1 make that per
 * token), scale max |x|; or int8 rows round(x / s), s = max |x| / 127, scale s. The arithmetic is
 * QuantLinear.int8's (rlhfkit/rollout/int8.py) in the same order, so results agree to float rounding.
 * Single-threaded: one call's work is a few hundred kilobytes at most.
 */
#include <math.h>
#include <stdint.h>
#include <string.h>

int rlhfkit_kernels_version(void) { return 1; }

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

static float row_amax(const float *x, int n) {
    float m[8] = {0, 0, 0, 0, 0, 0, 0, 0};
    int j = 0;
    for (; j + 8 <= n; j += 8)
        for (int l = 0; l < 8; l++) {
            float a = fabsf(x[j + l]);
            m[l] = a > m[l] ? a : m[l];
        }
    float amax = 0.f;
    for (int l = 0; l < 8; l++) amax = m[l] > amax ? m[l] : amax;
    for (; j < n; j++) amax = fabsf(x[j]) > amax ? fabsf(x[j]) : amax;
    return amax;
}

/* one row into the GEMM input of `mode`, its scale into *scale */
static void quant_row(const float *x, int n, int mode, void *out, long offset, float *scale) {
    float amax = row_amax(x, n);
    if (amax < 1e-12f) amax = 1e-12f;
    if (mode == 0) {
        float *o = (float *)out + offset;
        for (int j = 0; j < n; j++) o[j] = x[j] / amax;
        *scale = amax;
    } else {
        int8_t *o = (int8_t *)out + offset;
        float s = amax * (1.0f / 127.0f);
        for (int j = 0; j < n; j++) o[j] = (int8_t)nearbyintf(x[j] / s);
        *scale = s;
    }
}

/* in place: x = x * rsqrt(mean(x^2) + eps) * w (F.rms_norm) */
static void rms_norm_row(float *x, const float *w, float eps, int n) {
    float s[8] = {0, 0, 0, 0, 0, 0, 0, 0};
    int j = 0;
    for (; j + 8 <= n; j += 8)
        for (int l = 0; l < 8; l++) s[l] += x[j + l] * x[j + l];
    float ss = 0.f;
    for (int l = 0; l < 8; l++) ss += s[l];
    for (; j < n; j++) ss += x[j] * x[j];
    float r = 1.0f / sqrtf(ss / (float)n + eps);
    for (j = 0; j < n; j++) x[j] = x[j] * r * w[j];
}

/* rows of x (B, K): (RMS-normalized when norm != 0) times w (K), quantized per row into out */
void prep(const float *x, const float *w, float eps, int norm, int B, int K, int mode, void *out, float *scale) {
    float row[K];
    for (int b = 0; b < B; b++) {
        memcpy(row, x + (long)b * K, sizeof(float) * K);
        if (norm)
            rms_norm_row(row, w, eps, K);
        else
            for (int j = 0; j < K; j++) row[j] *= w[j];
        quant_row(row, K, mode, out, (long)b * K, scale + b);
    }
}

/* the qkv GEMM's output (B, (nh + 2 nkv) d) -> q (B, nh, d) rotated; k rotated and v into column `col` of
 * the caches (B, nkv, L, d); cos / sin (B, d) per row (transformers' rotate_half layout) */
void qkv_post(const void *y, int ytype, const float *wscale, const float *xscale, const float *bias,
              const float *cos, const float *sin, int B, int nh, int nkv, int d, float *q, float *kc, float *vc,
              int L, int col) {
    int n = (nh + 2 * nkv) * d, half = d / 2;
    float row[n];
    for (int b = 0; b < B; b++) {
        dequant_row(y, ytype, (long)b * n, wscale, xscale[b], bias, n, row);
        const float *c = cos + (long)b * d, *s = sin + (long)b * d;
        for (int hd = 0; hd < nh + nkv; hd++) {
            const float *x = row + hd * d;
            float *dst = hd < nh ? q + ((long)b * nh + hd) * d : kc + (((long)b * nkv + hd - nh) * L + col) * d;
            for (int i = 0; i < half; i++) dst[i] = x[i] * c[i] - x[i + half] * s[i];
            for (int i = half; i < d; i++) dst[i] = x[i] * c[i] + x[i - half] * s[i];
        }
        for (int j = 0; j < nkv; j++)
            memcpy(vc + (((long)b * nkv + j) * L + col) * d, row + (nh + nkv + j) * d, sizeof(float) * d);
    }
}

/* h (B, H) += the o or down GEMM's output; then RMSNorm(h) * w quantized into out (the next GEMM's input) */
void residual_prep(const void *y, int ytype, const float *wscale, const float *xscale, const float *bias, float *h,
                   const float *w, float eps, int B, int H, int mode, void *out, float *scale) {
    float row[H];
    for (int b = 0; b < B; b++) {
        float *hr = h + (long)b * H;
        dequant_row(y, ytype, (long)b * H, wscale, xscale[b], bias, H, row);
        for (int j = 0; j < H; j++) hr[j] += row[j];
        memcpy(row, hr, sizeof(float) * H);
        rms_norm_row(row, w, eps, H);
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
 * out (B, I) */
void gate_up_post(const void *y, int ytype, const float *wscale, const float *xscale, const float *inv_s, int B,
                  int I, int mode, void *out, float *scale) {
    float row[2 * I];
    for (int b = 0; b < B; b++) {
        dequant_row(y, ytype, (long)b * 2 * I, wscale, xscale[b], NULL, 2 * I, row);
        for (int i = 0; i < I; i++) {
            float g = row[i];
            float e = exp_nonpos(-fabsf(g));  /* sigmoid(g) = 1 / (1 + e) for g >= 0, e / (1 + e) for g < 0 */
            float sig = (g >= 0 ? 1.0f : e) / (1.0f + e);
            row[i] = g * sig * row[I + i] * inv_s[i];
        }
        quant_row(row, I, mode, out, (long)b * I, scale + b);
    }
}

/* the lm head's output (B, V) -> float logits into row rows[b] of out (R, V) */
void dequant_rows(const void *y, int ytype, const float *wscale, const float *xscale, const float *bias, int B,
                  int V, const int64_t *rows, float *out) {
    for (int b = 0; b < B; b++)
        dequant_row(y, ytype, (long)b * V, wscale, xscale[b], bias, V, out + rows[b] * (long)V);
}

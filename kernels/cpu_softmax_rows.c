/* Native CPU row passes over a token chunk's fp32 logits z [C, V] (row stride `stride`), for
   the fused head-and-loss on CPU (linear_policy_loss_torch.py). Built on first use by
   cpu_softmax_rows.py with the system C compiler and called through ctypes; the torch passes in
   linear_policy_loss_torch.py compute the same quantities and are its reference and fallback.

   Why native: on one CPU thread the torch version walks each [C, V] chunk six times (amax,
   subtract, exp, sum, dot, scale), about 12% of the chunk's three GEMMs. Here a row is read
   once for its max and once more (from L2: a row of V = 152k floats is 600 KiB) for exp, the
   sums and the optional store, so the elementwise share drops to 5-7%.

   Per row r, with t = z - m:
     m[r] = max z,  s[r] = sum exp(t),  d[r] = sum exp(t) t   (terms with exp(t) == 0 add 0)
   softmax_row_stats: those three; store_exp != 0 also overwrites z with exp(t).
   softmax_row_dz:    z <- exp(t) (a[r] t + b[r])  (0 where exp(t) == 0).

   Torch equivalent (fp32):
     m = z.amax(1); t = z - m[:, None]; e = t.exp()
     s = e.sum(1); d = torch.where(e == 0, 0, e * t).sum(1)
     dz = torch.where(e == 0, 0, e * (a[:, None] * t + b[:, None]))

   Sums run over blocks of BLOCK floats in fp32 lanes, then into an fp64 accumulator, so their
   error stays at fp32 rounding of the block sums (the torch sums are pairwise, about the
   same). NaN logits propagate into s and d; -inf logits add nothing. Compiled with
   -fno-trapping-math (lets the compiler turn the selects into vector blends) and
   -fopenmp-simd (the reduction pragmas); no OpenMP runtime, no threads: the Python side
   splits rows across threads (ctypes releases the GIL). */

#include <math.h>
#include <stdint.h>
#include <string.h>

#define BLOCK 512

/* exp(x) for x <= 0 (max-shifted logits): Cody-Waite reduction x = n ln2 + r, |r| <= ln2/2,
   and the Cephes degree-6 polynomial for exp(r) (about 1 ulp), branch-free so it vectorizes;
   0 below -87.3 (fp32 underflow), NaN in gives NaN out. */
static inline float exp_nonpos(float x) {
    float xc = x < -87.3f ? -87.3f : x;
    float n = (xc * 1.44269504088896341f + 12582912.0f) - 12582912.0f; /* round to nearest */
    float r = xc - n * 0.693359375f - n * -2.12194440e-4f;
    float p = 1.9875691500e-4f;
    p = p * r + 1.3981999507e-3f;
    p = p * r + 8.3334519073e-3f;
    p = p * r + 4.1665795894e-2f;
    p = p * r + 1.6666665459e-1f;
    p = p * r + 5.0000001201e-1f;
    p = p * r * r + r + 1.0f;
    int32_t bits = ((int32_t)n + 127) << 23; /* 2^n, n in [-126, 0] */
    float scale;
    memcpy(&scale, &bits, sizeof scale);
    return x < -87.3f ? 0.0f : p * scale;
}

static float row_max(const float *z, int64_t v) {
    float m = -INFINITY;
#pragma omp simd reduction(max : m)
    for (int64_t j = 0; j < v; j++) m = z[j] > m ? z[j] : m;
    return m;
}

/* s = sum exp(t), d = sum exp(t) t over one row; store_exp: z <- exp(t) */
static inline void row_sums(float *z, int64_t v, float m, int store_exp, double *s, double *d) {
    double s_acc = 0.0, d_acc = 0.0;
    for (int64_t j0 = 0; j0 < v; j0 += BLOCK) {
        int64_t j1 = j0 + BLOCK < v ? j0 + BLOCK : v;
        float bs = 0.0f, bd = 0.0f;
        /* two copies of the loop, so neither carries a masked store */
        if (store_exp) {
#pragma omp simd reduction(+ : bs, bd)
            for (int64_t j = j0; j < j1; j++) {
                float t = z[j] - m, e = exp_nonpos(t);
                bs += e;
                bd += e == 0.0f ? 0.0f : e * t;
                z[j] = e;
            }
        } else {
#pragma omp simd reduction(+ : bs, bd)
            for (int64_t j = j0; j < j1; j++) {
                float t = z[j] - m, e = exp_nonpos(t);
                bs += e;
                bd += e == 0.0f ? 0.0f : e * t;
            }
        }
        s_acc += bs;
        d_acc += bd;
    }
    *s = s_acc;
    *d = d_acc;
}

/* rows [r0, r1): m_out[r], s_out[r], d_out[r] (fp32), z <- exp(z - m) if store_exp */
void softmax_row_stats(float *z, int64_t r0, int64_t r1, int64_t v, int64_t stride,
                       int32_t store_exp, float *m_out, float *s_out, float *d_out) {
    for (int64_t r = r0; r < r1; r++) {
        float *row = z + r * stride;
        float m = row_max(row, v);
        double s, d;
        row_sums(row, v, m, store_exp, &s, &d);
        m_out[r] = m;
        s_out[r] = (float)s;
        d_out[r] = (float)d;
    }
}

/* rows [r0, r1): z <- exp(t) (a[r] t + b[r]), t = z - m[r] */
void softmax_row_dz(float *z, int64_t r0, int64_t r1, int64_t v, int64_t stride,
                    const float *m, const float *a, const float *b) {
    for (int64_t r = r0; r < r1; r++) {
        float *row = z + r * stride;
        float mr = m[r], ar = a[r], br = b[r];
#pragma omp simd
        for (int64_t j = 0; j < v; j++) {
            float t = row[j] - mr, e = exp_nonpos(t);
            row[j] = e == 0.0f ? 0.0f : e * (ar * t + br);
        }
    }
}

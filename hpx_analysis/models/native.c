/* Native CPU kernels of hpx-analysis for passes without a parameter gradient (ERF, truncation sweeps).
 *
 * Built on first use by hpx_analysis/models/native.py (cc -O3 -march=native, cached per source, compiler and CPU)
 * and called through ctypes; every tensor is float32 and channels-last, so a pixel's channels are contiguous.
 *
 * hpx_fft_filter: a 2D FFT filtering of channels-last signals, vectorised across 16 channels, with every step
 *   of one (image, 16-channel block) in cache: the rows' real FFTs two at a time (one complex FFT), per column the
 *   forward FFT, the product with the spectrum and the inverse, then the rows' inverse FFTs two at a time, written
 *   straight back channels-last (no layout copies). Mixed-radix Stockham FFTs (radix 4, 2, 3, 5, any other prime by
 *   its DFT), twiddles computed in double.
 * hpx_star_relu: s * relu(x)^2 + b in one pass, and its gradient in one pass from x (nothing else saved).
 * hpx_gate_*: HyenaPixel's gating around the filter, per pixel: u = LN(q * k), out = LN(v * filtered), and their
 *   input gradients, with bias-free layer norms over the channels.
 * Work is split over at most `threads` OpenMP threads; results do not depend on the thread count.
 */
#include <math.h>
#include <omp.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>

#define LANES 16          /* channels per vector (native.py's LANES) */
#define MAX_CHANNELS 4096 /* per pixel, in the gating kernels (native.py's MAX_GATE_CHANNELS) */
typedef float lanes_t __attribute__((vector_size(LANES * sizeof(float))));

/* ---------------------------------------------------------------- threads */

typedef void (*task_fn)(void *context, int64_t begin, int64_t end);

/* fn(context, begin, end) over [0, count) in contiguous slices, one per OpenMP thread (at most `threads`). Built
 * with -fopenmp, this runs on PyTorch's own OpenMP threads (its libgomp is the process's): they are awake right after
 * a PyTorch operation, where threads of a second pool would first compete with them for the cores. Each task's
 * result does not depend on the slicing. */
static void parallel(task_fn fn, void *context, int64_t count, int threads) {
    if (threads > count) threads = (int)count;
    if (threads <= 1) {
        if (count > 0) fn(context, 0, count);
        return;
    }
#pragma omp parallel num_threads(threads)
    {
        const int64_t index = omp_get_thread_num(), team = omp_get_num_threads();
        const int64_t begin = count * index / team, end = count * (index + 1) / team;
        if (begin < end) fn(context, begin, end);
    }
}

/* ---------------------------------------------------------------- FFTs on 16-lane vectors */

enum { MAX_STAGES = 40 };

typedef struct {
    int n, stages;
    int radix[MAX_STAGES];
    float *twiddle_re[MAX_STAGES], *twiddle_im[MAX_STAGES]; /* stage s: (n_s / p) x p factors w_{n_s}^{j k} */
    float *dft_re[MAX_STAGES], *dft_im[MAX_STAGES];         /* stage s: p x p DFT matrix (generic radix) */
} plan_t;

static void plan_free(plan_t *plan) {
    for (int s = 0; s < plan->stages; s++) {
        free(plan->twiddle_re[s]);
        free(plan->twiddle_im[s]);
        free(plan->dft_re[s]);
        free(plan->dft_im[s]);
    }
    plan->stages = 0;
}

/* Plan of a length-n transform, sign -1 forward, +1 inverse (unscaled). Returns 0, or 1 out of memory. */
static int plan_make(plan_t *plan, int n, int sign) {
    int factors[MAX_STAGES], count = 0, rest = n;
    while (rest % 4 == 0 && count < MAX_STAGES) { factors[count++] = 4; rest /= 4; }
    while (rest % 2 == 0 && count < MAX_STAGES) { factors[count++] = 2; rest /= 2; }
    for (int p = 3; rest > 1 && count < MAX_STAGES; p += 2)
        while (rest % p == 0 && count < MAX_STAGES) { factors[count++] = p; rest /= p; }
    plan->n = n;
    plan->stages = 0;
    int length = n;
    for (int s = 0; s < count; s++) {
        int p = factors[s], m = length / p;
        plan->radix[s] = p;
        plan->twiddle_re[s] = malloc(sizeof(float) * (size_t)m * p);
        plan->twiddle_im[s] = malloc(sizeof(float) * (size_t)m * p);
        plan->dft_re[s] = malloc(sizeof(float) * (size_t)p * p);
        plan->dft_im[s] = malloc(sizeof(float) * (size_t)p * p);
        plan->stages = s + 1;
        if (!plan->twiddle_re[s] || !plan->twiddle_im[s] || !plan->dft_re[s] || !plan->dft_im[s]) {
            plan_free(plan);
            return 1;
        }
        for (int j = 0; j < m; j++)
            for (int k = 0; k < p; k++) {
                double angle = sign * 2.0 * M_PI * (double)((int64_t)j * k % length) / length;
                plan->twiddle_re[s][j * p + k] = (float)cos(angle);
                plan->twiddle_im[s][j * p + k] = (float)sin(angle);
            }
        for (int r = 0; r < p; r++)
            for (int k = 0; k < p; k++) {
                double angle = sign * 2.0 * M_PI * (double)(r * k % p) / p;
                plan->dft_re[s][r * p + k] = (float)cos(angle);
                plan->dft_im[s][r * p + k] = (float)sin(angle);
            }
        length = m;
    }
    return 0;
}

#define TWIDDLE(k, br, bi)                                                       \
    do {                                                                         \
        float w_re = tw_re[j * p + (k)], w_im = tw_im[j * p + (k)];              \
        dst_re[o + (k) * s] = (br) * w_re - (bi) * w_im;                          \
        dst_im[o + (k) * s] = (br) * w_im + (bi) * w_re;                          \
    } while (0)

/* The loops of one Stockham stage around a butterfly (its body sees i0, o, j, s, m): the radix is chosen once per
 * stage, outside the loops. */
#define STAGE(...)                                   \
    for (int j = 0; j < m; j++)                      \
        for (int q = 0; q < s; q++) {                \
            const int i0 = q + s * j, o = q + s * p * j; \
            __VA_ARGS__                              \
        }

/* Stockham autosort FFT of (re, im), n vectors of 16 lanes, with (work_re, work_im) as the second buffer.
 * Returns the buffer that holds the result: 0 for (re, im), 1 for (work_re, work_im). */
static int fft(const plan_t *plan, int sign, lanes_t *re, lanes_t *im, lanes_t *work_re, lanes_t *work_im) {
    lanes_t *src_re = re, *src_im = im, *dst_re = work_re, *dst_im = work_im;
    int s = 1, length = plan->n;
    for (int stage = 0; stage < plan->stages; stage++) {
        const int p = plan->radix[stage], m = length / p;
        const float *tw_re = plan->twiddle_re[stage], *tw_im = plan->twiddle_im[stage];
        if (p == 4) {
            const float rotation = (float)sign; /* sign * i * t3 = (-sign t3i, sign t3r) */
            STAGE(
                const int i1 = i0 + s * m, i2 = i1 + s * m, i3 = i2 + s * m;
                lanes_t t0r = src_re[i0] + src_re[i2], t0i = src_im[i0] + src_im[i2];
                lanes_t t1r = src_re[i0] - src_re[i2], t1i = src_im[i0] - src_im[i2];
                lanes_t t2r = src_re[i1] + src_re[i3], t2i = src_im[i1] + src_im[i3];
                lanes_t t3r = src_re[i1] - src_re[i3], t3i = src_im[i1] - src_im[i3];
                lanes_t rot_r = -rotation * t3i, rot_i = rotation * t3r;
                dst_re[o] = t0r + t2r;
                dst_im[o] = t0i + t2i;
                TWIDDLE(1, t1r + rot_r, t1i + rot_i);
                TWIDDLE(2, t0r - t2r, t0i - t2i);
                TWIDDLE(3, t1r - rot_r, t1i - rot_i);
            )
        } else if (p == 2) {
            STAGE(
                const int i1 = i0 + s * m;
                dst_re[o] = src_re[i0] + src_re[i1];
                dst_im[o] = src_im[i0] + src_im[i1];
                TWIDDLE(1, src_re[i0] - src_re[i1], src_im[i0] - src_im[i1]);
            )
        } else if (p == 3) {
            const float half = -0.5f, d = sign * 0.86602540378443864676f; /* w_3 = half + i d */
            STAGE(
                const int i1 = i0 + s * m, i2 = i1 + s * m;
                lanes_t tr = src_re[i1] + src_re[i2], ti = src_im[i1] + src_im[i2];
                lanes_t ur = src_re[i1] - src_re[i2], ui = src_im[i1] - src_im[i2];
                lanes_t mr = src_re[i0] + half * tr, mi = src_im[i0] + half * ti;
                dst_re[o] = src_re[i0] + tr;
                dst_im[o] = src_im[i0] + ti;
                TWIDDLE(1, mr - d * ui, mi + d * ur);
                TWIDDLE(2, mr + d * ui, mi - d * ur);
            )
        } else if (p == 5) {
            const float c1 = 0.30901699437494742410f, c2 = -0.80901699437494742410f;
            const float s1 = sign * 0.95105651629515357212f, s2 = sign * 0.58778525229247312917f;
            STAGE(
                const int i1 = i0 + s * m, i2 = i1 + s * m, i3 = i2 + s * m, i4 = i3 + s * m;
                lanes_t ar = src_re[i0], ai = src_im[i0];
                lanes_t t1r = src_re[i1] + src_re[i4], t1i = src_im[i1] + src_im[i4];
                lanes_t u1r = src_re[i1] - src_re[i4], u1i = src_im[i1] - src_im[i4];
                lanes_t t2r = src_re[i2] + src_re[i3], t2i = src_im[i2] + src_im[i3];
                lanes_t u2r = src_re[i2] - src_re[i3], u2i = src_im[i2] - src_im[i3];
                lanes_t m1r = ar + c1 * t1r + c2 * t2r, m1i = ai + c1 * t1i + c2 * t2i;
                lanes_t m2r = ar + c2 * t1r + c1 * t2r, m2i = ai + c2 * t1i + c1 * t2i;
                lanes_t n1r = s1 * u1r + s2 * u2r, n1i = s1 * u1i + s2 * u2i; /* b1, b4 = m1 +- i n1 */
                lanes_t n2r = s2 * u1r - s1 * u2r, n2i = s2 * u1i - s1 * u2i; /* b2, b3 = m2 +- i n2 */
                dst_re[o] = ar + t1r + t2r;
                dst_im[o] = ai + t1i + t2i;
                TWIDDLE(1, m1r - n1i, m1i + n1r);
                TWIDDLE(2, m2r - n2i, m2i + n2r);
                TWIDDLE(3, m2r + n2i, m2i - n2r);
                TWIDDLE(4, m1r + n1i, m1i - n1r);
            )
        } else {
            const float *c_re = plan->dft_re[stage], *c_im = plan->dft_im[stage];
            STAGE(
                for (int k = 0; k < p; k++) {
                    lanes_t br = src_re[i0], bi = src_im[i0];
                    for (int r = 1; r < p; r++) {
                        lanes_t xr = src_re[i0 + r * s * m], xi = src_im[i0 + r * s * m];
                        br += xr * c_re[r * p + k] - xi * c_im[r * p + k];
                        bi += xr * c_im[r * p + k] + xi * c_re[r * p + k];
                    }
                    TWIDDLE(k, br, bi);
                }
            )
        }
        s *= p;
        length = m;
        lanes_t *swap = src_re; src_re = dst_re; dst_re = swap;
        swap = src_im; src_im = dst_im; dst_im = swap;
    }
    return src_re != re;
}

/* ---------------------------------------------------------------- FFT filtering */

/* The first `count` floats at `from` as a vector (the rest zero), and a vector's first `count` lanes stored at `to`:
 * a whole vector is one load or store, a partial one (the last block of a channel count that is no multiple of 16)
 * goes through memcpy. */
static inline lanes_t load_lanes(const float *from, int count) {
    lanes_t value = {0};
    if (count == LANES) memcpy(&value, from, sizeof value);
    else memcpy(&value, from, sizeof(float) * count);
    return value;
}

static inline void store_lanes(float *to, lanes_t value, int count) {
    if (count == LANES) memcpy(to, &value, sizeof value);
    else memcpy(to, &value, sizeof(float) * count);
}

typedef struct {
    const float *signal, *lanes, *skip;
    float *out;
    int conjugate, channels, height, width, fft_h, fft_w, place_h, place_w, read_h, read_w;
    const plan_t *forward_w, *inverse_w, *forward_h, *inverse_h;
    int failed;
} filter_job_t;

enum { SCRATCH_SLOTS = 6 };
static __thread void *scratch_memory[SCRATCH_SLOTS];
static __thread size_t scratch_bytes[SCRATCH_SLOTS];

/* The calling thread's scratch buffer `slot` of at least `bytes`, kept from call to call (the threads are PyTorch's
 * long-lived OpenMP threads; a fresh allocation per call would be page-faulted in again each time where freed memory
 * goes back to the system); buffers of 2 MB or more are 2 MB aligned and asked to be huge pages (the column pass
 * strides through them). NULL if out of memory. */
static void *scratch(int slot, size_t bytes) {
    if (scratch_bytes[slot] >= bytes) return scratch_memory[slot];
    free(scratch_memory[slot]);
    scratch_memory[slot] = NULL;
    scratch_bytes[slot] = 0;
    const size_t huge = (size_t)2 << 20, alignment = bytes >= huge ? huge : 64;
    const size_t rounded = (bytes + alignment - 1) / alignment * alignment;
    void *memory = NULL;
    if (posix_memalign(&memory, alignment, rounded) != 0) return NULL;
#ifdef MADV_HUGEPAGE
    if (alignment == huge) madvise(memory, rounded, MADV_HUGEPAGE);
#endif
    scratch_memory[slot] = memory;
    scratch_bytes[slot] = rounded;
    return memory;
}

/* One (image, 16-channel block) per task: task = image * blocks + block. */
static void filter_tasks(void *context, int64_t begin, int64_t end) {
    filter_job_t *job = (filter_job_t *)context;
    const int C = job->channels, H = job->height, W = job->width, NH = job->fft_h, NW = job->fft_w;
    const int NWC = NW / 2 + 1, blocks = (C + LANES - 1) / LANES, longest = NH > NW ? NH : NW;
    const float scale = 1.0f / ((float)NH * (float)NW);
    const size_t rows = sizeof(lanes_t) * (size_t)H * NWC;
    lanes_t *rows_re = scratch(0, rows), *rows_im = scratch(1, rows);
    lanes_t *a_re = scratch(2, sizeof(lanes_t) * longest), *a_im = scratch(3, sizeof(lanes_t) * longest);
    lanes_t *b_re = scratch(4, sizeof(lanes_t) * longest), *b_im = scratch(5, sizeof(lanes_t) * longest);
    if (!rows_re || !rows_im || !a_re || !a_im || !b_re || !b_im) {
        job->failed = 1;
        return;
    }
    const lanes_t zero = {0};
    for (int64_t task = begin; task < end; task++) {
        const int image = (int)(task / blocks), first = (int)(task % blocks) * LANES;
        const int count = C - first < LANES ? C - first : LANES;
        const size_t pixel0 = (size_t)image * H * W;
        const lanes_t skip = job->skip ? load_lanes(job->skip + first, count) : zero;
        /* rows: real rows h and h + 1 as one complex FFT, split into their half spectra */
        for (int h = 0; h < H; h += 2) {
            const int pair = h + 1 < H;
            for (int w = 0; w < NW; w++) a_re[w] = a_im[w] = zero;
            for (int w = 0; w < W; w++) {
                const float *pixel = job->signal + (pixel0 + (size_t)h * W + w) * C + first;
                a_re[job->place_w + w] = load_lanes(pixel, count);
                if (pair) a_im[job->place_w + w] = load_lanes(pixel + (size_t)W * C, count);
            }
            lanes_t *z_re = a_re, *z_im = a_im;
            if (fft(job->forward_w, -1, a_re, a_im, b_re, b_im)) { z_re = b_re; z_im = b_im; }
            lanes_t *x_re = rows_re + (size_t)h * NWC, *x_im = rows_im + (size_t)h * NWC;
            lanes_t *y_re = pair ? x_re + NWC : x_re, *y_im = pair ? x_im + NWC : x_im;
            for (int k = 0; k < NWC; k++) {
                const int mirror = (NW - k) % NW;
                lanes_t pr = z_re[k], pi = z_im[k], qr = z_re[mirror], qi = z_im[mirror];
                x_re[k] = 0.5f * (pr + qr);
                x_im[k] = 0.5f * (pi - qi);
                if (pair) {
                    y_re[k] = 0.5f * (pi + qi);
                    y_im[k] = 0.5f * (qr - pr);
                }
            }
        }
        /* columns: forward FFT, product with the spectrum, inverse FFT, the read rows kept */
        const lanes_t *spectrum = (const lanes_t *)job->lanes + (size_t)(first / LANES) * 2 * NWC * NH;
        for (int k = 0; k < NWC; k++) {
            for (int h = 0; h < NH; h++) a_re[h] = a_im[h] = zero;
            for (int h = 0; h < H; h++) {
                a_re[job->place_h + h] = rows_re[(size_t)h * NWC + k];
                a_im[job->place_h + h] = rows_im[(size_t)h * NWC + k];
            }
            lanes_t *z_re = a_re, *z_im = a_im, *w_re = b_re, *w_im = b_im;
            if (fft(job->forward_h, -1, a_re, a_im, b_re, b_im)) {
                z_re = b_re; z_im = b_im; w_re = a_re; w_im = a_im;
            }
            const lanes_t *s_re = spectrum + (size_t)k * NH, *s_im = s_re + (size_t)NWC * NH;
            for (int h = 0; h < NH; h++) {
                lanes_t xr = z_re[h], xi = z_im[h], sr = s_re[h], si = job->conjugate ? -s_im[h] : s_im[h];
                z_re[h] = xr * sr - xi * si;
                z_im[h] = xr * si + xi * sr;
            }
            lanes_t *r_re = z_re, *r_im = z_im;
            if (fft(job->inverse_h, 1, z_re, z_im, w_re, w_im)) { r_re = w_re; r_im = w_im; }
            for (int h = 0; h < H; h++) {
                rows_re[(size_t)h * NWC + k] = r_re[job->read_h + h];
                rows_im[(size_t)h * NWC + k] = r_im[job->read_h + h];
            }
        }
        /* rows back: half spectra of rows h and h + 1 as one complex inverse (real part h, imaginary part h + 1);
         * the imaginary parts of bins 0 and NW / 2 are dropped, as a complex-to-real inverse does */
        for (int h = 0; h < H; h += 2) {
            const int pair = h + 1 < H;
            const lanes_t *x_re = rows_re + (size_t)h * NWC, *x_im = rows_im + (size_t)h * NWC;
            const lanes_t *y_re = pair ? x_re + NWC : x_re, *y_im = pair ? x_im + NWC : x_im;
            for (int k = 0; k < NWC; k++) {
                const int edge = k == 0 || 2 * k == NW;
                lanes_t xr = x_re[k], xi = edge ? zero : x_im[k];
                lanes_t yr = pair ? y_re[k] : zero, yi = pair && !edge ? y_im[k] : zero;
                a_re[k] = xr - yi;
                a_im[k] = xi + yr;
                if (!edge) {
                    a_re[NW - k] = xr + yi;
                    a_im[NW - k] = yr - xi;
                }
            }
            lanes_t *z_re = a_re, *z_im = a_im;
            if (fft(job->inverse_w, 1, a_re, a_im, b_re, b_im)) { z_re = b_re; z_im = b_im; }
            for (int w = 0; w < W; w++) {
                const size_t at = (pixel0 + (size_t)h * W + w) * C + first;
                lanes_t value = z_re[job->read_w + w] * scale, below = z_im[job->read_w + w] * scale;
                if (job->skip) {
                    value += skip * load_lanes(job->signal + at, count);
                    if (pair) below += skip * load_lanes(job->signal + at + (size_t)W * C, count);
                }
                store_lanes(job->out + at, value, count);
                if (pair) store_lanes(job->out + at + (size_t)W * C, below, count);
            }
        }
    }
}

/* out (B, H, W, C) = signal (B, H, W, C) zero-padded to (fft_h, fft_w) at (place_h, place_w), multiplied by the
 * spectrum in the rFFT domain (conjugated if asked), read back from (read_h, read_w), plus skip[c] * signal where
 * skip is not NULL. lanes: the spectrum (C, fft_h, fft_w / 2 + 1) as (ceil(C / 16), 2, fft_w / 2 + 1, fft_h, 16)
 * floats (block, real / imaginary, column, row, channel). Returns 0, 1 out of memory, 2 bad geometry. */
int hpx_fft_filter(const float *signal, float *out, const float *lanes, const float *skip, int conjugate, int batch,
                   int channels, int height, int width, int fft_h, int fft_w, int place_h, int place_w, int read_h,
                   int read_w, int threads) {
    if (place_h < 0 || place_w < 0 || read_h < 0 || read_w < 0 || place_h + height > fft_h ||
        place_w + width > fft_w || read_h + height > fft_h || read_w + width > fft_w)
        return 2;
    plan_t plans[4] = {{0}};
    int failed = plan_make(&plans[0], fft_w, -1) | plan_make(&plans[1], fft_w, 1) | plan_make(&plans[2], fft_h, -1) |
                 plan_make(&plans[3], fft_h, 1);
    if (!failed) {
        filter_job_t job = {signal, lanes, skip, out, conjugate, channels, height, width, fft_h, fft_w, place_h,
                            place_w, read_h, read_w, &plans[0], &plans[1], &plans[2], &plans[3], 0};
        parallel(filter_tasks, &job, (int64_t)batch * ((channels + LANES - 1) / LANES), threads);
        failed = job.failed;
    }
    for (int i = 0; i < 4; i++) plan_free(&plans[i]);
    return failed ? 1 : 0;
}

/* ---------------------------------------------------------------- StarReLU */

typedef struct {
    const float *x, *grad;
    float *out;
    float scale, bias;
} star_job_t;

static void star_tasks(void *context, int64_t begin, int64_t end) {
    star_job_t *job = (star_job_t *)context;
    const float *restrict x = job->x;
    float *restrict out = job->out;
    const float scale = job->scale, bias = job->bias;
    for (int64_t i = begin; i < end; i++) {
        float rectified = x[i] > 0.0f ? x[i] : 0.0f;
        out[i] = bias + scale * rectified * rectified;
    }
}

static void star_backward_tasks(void *context, int64_t begin, int64_t end) {
    star_job_t *job = (star_job_t *)context;
    const float *restrict x = job->x, *restrict grad = job->grad;
    float *restrict out = job->out;
    const float twice = 2.0f * job->scale;
    for (int64_t i = begin; i < end; i++) out[i] = grad[i] * (x[i] > 0.0f ? x[i] * twice : 0.0f);
}

/* out = bias + scale * relu(x)^2, elementwise over n floats. */
void hpx_star_relu(const float *x, float *out, float scale, float bias, int64_t n, int threads) {
    star_job_t job = {.x = x, .out = out, .scale = scale, .bias = bias};
    parallel(star_tasks, &job, n, threads);
}

/* grad_x = grad * 2 * scale * relu(x), the gradient of hpx_star_relu, elementwise over n floats. */
void hpx_star_relu_backward(const float *x, const float *grad, float *grad_x, float scale, int64_t n, int threads) {
    star_job_t job = {.x = x, .grad = grad, .out = grad_x, .scale = scale};
    parallel(star_backward_tasks, &job, n, threads);
}

/* ---------------------------------------------------------------- HyenaPixel gating, per pixel */

typedef struct {
    const float *qkv, *filtered, *weight, *grad;
    float *out, *mean, *rstd, *grad_qkv, *grad_filtered;
    float eps;
    int channels;
} gate_job_t;

/* Sum of a[c] * b[c] over n floats (b NULL: of a[c]), in 16 partial sums (vectorised; the order is fixed). */
#define INLINE static inline __attribute__((always_inline))

INLINE float dot(const float *a, const float *b, int n) {
    lanes_t partial = {0};
    int c = 0;
    for (; c + LANES <= n; c += LANES) {
        lanes_t x, y;
        memcpy(&x, a + c, sizeof x);
        if (b) {
            memcpy(&y, b + c, sizeof y);
            x *= y;
        }
        partial += x;
    }
    float halves[LANES]; /* a tree of halves: 4 dependent vector adds instead of 16 scalar ones */
    memcpy(halves, &partial, sizeof halves);
    for (int width = LANES / 2; width >= 1; width /= 2)
        for (int l = 0; l < width; l++) halves[l] += halves[l + width];
    float total = halves[0];
    for (; c < n; c++) total += b ? a[c] * b[c] : a[c];
    return total;
}

/* y = (x - mean) * rstd * weight over n channels (n <= MAX_CHANNELS); returns mean and rstd. */
INLINE void layer_norm(const float *restrict x, const float *restrict weight, float eps, int n, float *restrict y,
                       float *mean_out, float *rstd_out) {
    float centred[MAX_CHANNELS];
    const float mean = dot(x, NULL, n) / n;
    for (int c = 0; c < n; c++) centred[c] = x[c] - mean;
    const float rstd = 1.0f / sqrtf(dot(centred, centred, n) / n + eps);
    for (int c = 0; c < n; c++) y[c] = centred[c] * rstd * weight[c];
    *mean_out = mean;
    *rstd_out = rstd;
}

/* grad_x of layer_norm from its input x, mean, rstd and grad_y. */
INLINE void layer_norm_backward(const float *restrict grad_y, const float *restrict x, const float *restrict weight,
                                float mean, float rstd, int n, float *restrict grad_x) {
    float scaled[MAX_CHANNELS], normalised[MAX_CHANNELS];
    for (int c = 0; c < n; c++) {
        scaled[c] = grad_y[c] * weight[c];
        normalised[c] = (x[c] - mean) * rstd;
    }
    const float a = dot(scaled, NULL, n) / n, b = dot(scaled, normalised, n) / n;
    for (int c = 0; c < n; c++) grad_x[c] = rstd * (scaled[c] - a - normalised[c] * b);
}

static void gate_in_tasks(void *context, int64_t begin, int64_t end) {
    gate_job_t *job = (gate_job_t *)context;
    const int C = job->channels;
    float product[MAX_CHANNELS];
    for (int64_t p = begin; p < end; p++) {
        const float *q = job->qkv + p * 3 * C, *k = q + C;
        for (int c = 0; c < C; c++) product[c] = q[c] * k[c];
        layer_norm(product, job->weight, job->eps, C, job->out + p * C, job->mean + p, job->rstd + p);
    }
}

static void gate_out_tasks(void *context, int64_t begin, int64_t end) {
    gate_job_t *job = (gate_job_t *)context;
    const int C = job->channels;
    float gated[MAX_CHANNELS];
    for (int64_t p = begin; p < end; p++) {
        const float *v = job->qkv + p * 3 * C + 2 * C, *filtered = job->filtered + p * C;
        for (int c = 0; c < C; c++) gated[c] = v[c] * filtered[c];
        layer_norm(gated, job->weight, job->eps, C, job->out + p * C, job->mean + p, job->rstd + p);
    }
}

static void gate_out_backward_tasks(void *context, int64_t begin, int64_t end) {
    gate_job_t *job = (gate_job_t *)context;
    const int C = job->channels;
    float gated[MAX_CHANNELS], grad_gated[MAX_CHANNELS];
    for (int64_t p = begin; p < end; p++) {
        const float *v = job->qkv + p * 3 * C + 2 * C, *filtered = job->filtered + p * C;
        float *grad_filtered = job->grad_filtered + p * C, *grad_v = job->grad_qkv + p * 3 * C + 2 * C;
        for (int c = 0; c < C; c++) gated[c] = v[c] * filtered[c];
        layer_norm_backward(job->grad + p * C, gated, job->weight, job->mean[p], job->rstd[p], C, grad_gated);
        for (int c = 0; c < C; c++) {
            grad_v[c] = grad_gated[c] * filtered[c];
            grad_filtered[c] = grad_gated[c] * v[c];
        }
    }
}

static void gate_in_backward_tasks(void *context, int64_t begin, int64_t end) {
    gate_job_t *job = (gate_job_t *)context;
    const int C = job->channels;
    float product[MAX_CHANNELS], grad_product[MAX_CHANNELS];
    for (int64_t p = begin; p < end; p++) {
        const float *q = job->qkv + p * 3 * C, *k = q + C;
        float *grad_q = job->grad_qkv + p * 3 * C, *grad_k = grad_q + C;
        for (int c = 0; c < C; c++) product[c] = q[c] * k[c];
        layer_norm_backward(job->grad + p * C, product, job->weight, job->mean[p], job->rstd[p], C, grad_product);
        for (int c = 0; c < C; c++) {
            grad_q[c] = grad_product[c] * k[c];
            grad_k[c] = grad_product[c] * q[c];
        }
    }
}

/* qkv (P, 3C) -> normed = LN(q * k) (P, C); mean, rstd (P,). Returns 2 if C > MAX_CHANNELS. */
int hpx_gate_in(const float *qkv, const float *weight, float eps, float *normed, float *mean, float *rstd,
                int64_t pixels, int channels, int threads) {
    gate_job_t job = {.qkv = qkv, .weight = weight, .out = normed, .mean = mean, .rstd = rstd, .eps = eps,
                      .channels = channels};
    if (channels > MAX_CHANNELS) return 2;
    parallel(gate_in_tasks, &job, pixels, threads);
    return 0;
}

/* qkv (P, 3C), filtered (P, C) -> out = LN(v * filtered) (P, C); mean, rstd (P,). */
int hpx_gate_out(const float *qkv, const float *filtered, const float *weight, float eps, float *out, float *mean,
                 float *rstd, int64_t pixels, int channels, int threads) {
    gate_job_t job = {.qkv = qkv, .filtered = filtered, .weight = weight, .out = out, .mean = mean, .rstd = rstd,
                      .eps = eps, .channels = channels};
    if (channels > MAX_CHANNELS) return 2;
    parallel(gate_out_tasks, &job, pixels, threads);
    return 0;
}

/* The gradient of hpx_gate_out from grad (P, C) of out and the forward's statistics: v's into grad_qkv's last C
 * columns, filtered's into grad_filtered (P, C). */
int hpx_gate_out_backward(const float *grad, const float *qkv, const float *filtered, const float *mean,
                          const float *rstd, const float *weight, float *grad_qkv, float *grad_filtered,
                          int64_t pixels, int channels, int threads) {
    gate_job_t job = {.grad = grad, .qkv = qkv, .filtered = filtered, .mean = (float *)mean, .rstd = (float *)rstd,
                      .weight = weight, .grad_qkv = grad_qkv, .grad_filtered = grad_filtered, .channels = channels};
    if (channels > MAX_CHANNELS) return 2;
    parallel(gate_out_backward_tasks, &job, pixels, threads);
    return 0;
}

/* The gradient of hpx_gate_in from grad (P, C) of normed and the forward's statistics: q's and k's into grad_qkv's
 * first 2C columns. */
int hpx_gate_in_backward(const float *grad, const float *qkv, const float *mean, const float *rstd,
                         const float *weight, float *grad_qkv, int64_t pixels, int channels, int threads) {
    gate_job_t job = {.grad = grad, .qkv = qkv, .mean = (float *)mean, .rstd = (float *)rstd, .weight = weight,
                      .grad_qkv = grad_qkv, .channels = channels};
    if (channels > MAX_CHANNELS) return 2;
    parallel(gate_in_backward_tasks, &job, pixels, threads);
    return 0;
}

// BatchNorm in training followed by a leaky ReLU (ReLU, identity), forward and backward, for channels-last float32
// CPU maps, in torch's own arithmetic: the same sums in the same order, the same roundings, so that outputs,
// gradients and running statistics equal torch's native_batch_norm + leaky_relu_ (and their backward) bit for bit
// at any thread count. What it saves is passes over memory, not arithmetic: forward two statistics reads and one
// read-and-write for norm + activation (torch: one more read and write for the activation); backward one read of
// the gradient and the input for both reductions, the activation's mask recomputed from the input, and one pass
// writing the input gradient (torch: one more pass for the activation's gradient). Built on first use by
// models/bn_act_train.py, which checks the bit equality against torch once per process before using it.
//
// torch's CPU batch norm on a channels-last map of R = N * H * W pixel rows of C floats, with T threads:
//  - the rows are cut as at::parallel_for cuts them (min(T, R) pieces of ceil(R / pieces) rows); each piece sums
//    its rows in float, row after row, one lane per channel; the pieces' sums are added in double in piece order;
//  - mean = float(double sum / R); var_sum likewise over fma(x - mean, x - mean, acc);
//  - 1 / std = float(1 / sqrt(double(var_sum / float(R)) + eps)); the running statistics move in float without
//    fused multiply-adds (momentum * value + (1 - momentum) * running), the variance term's product in double;
//  - y = fma(x, a, b) with a = 1 / std * w and b = fma(-mean, a, bias);
//  - backward sums dz and fma(x - mean, dz, acc) the same way, then dx = fma(-(x - mean), k, dz - sum / R) *
//    invstd * w with k = dotp * invstd * invstd / R (each a float operation, left to right).
// torch's vectorised kernels fuse a multiply into the following add in its AVX2 and AVX-512 builds and not in its
// baseline build (ATEN_CPU_CAPABILITY=default); `fused` picks which, and the caller's probe finds out which one the
// running torch does.
// The compiler must fuse no other multiply and add (GCC does by default under -march=native), so this file is
// built with -ffp-contract=off (models/cpu_build.py's SOURCE_FLAGS); the probe would catch a build that fused more.
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <vector>

#include "parallel_range.h"

namespace {

// acc + u * v, rounded once (FZ: a fused multiply-add) or after the product too.
template <bool FZ>
inline float madd(float u, float v, float acc) {
  if constexpr (FZ) {
    return std::fma(u, v, acc);
  } else {
    return acc + u * v;
  }
}

// torch's split of R rows over T threads: pieces of `step` rows, `count` of them.
struct Split {
  int64_t step, count;
  Split(int64_t R, int64_t T) {
    const int64_t t = std::max<int64_t>(1, std::min(T, R));
    step = (R + t - 1) / t;
    count = (R + step - 1) / step;
  }
};

// Per piece, K column sums over its rows into part (count, K, C) (rows(r0, r1, acc) adds rows [r0, r1) into acc:
// K rows of C float lanes, one row after another), then per sum and channel the double sum of the pieces in order:
// out (K, C).
template <int K, typename F>
void column_sums(int64_t R, int64_t C, int64_t T, const F& rows, double* out) {
  const Split sp(R, T);
  std::vector<float> part(sp.count * K * C, 0.f);
  parallel_range(0, sp.count, 1, T, [&](int64_t p0, int64_t p1) {
    for (int64_t p = p0; p < p1; ++p) rows(p * sp.step, std::min(R, (p + 1) * sp.step), part.data() + p * K * C);
  });
  for (int64_t j = 0; j < K * C; ++j) {
    double s = 0.0;
    for (int64_t p = 0; p < sp.count; ++p) s += part[p * K * C + j];
    out[j] = s;
  }
}

void sum_rows(const float* X, int64_t C, int64_t r0, int64_t r1, float* __restrict acc) {
  for (int64_t r = r0; r < r1; ++r) {
    const float* __restrict x = X + r * C;
#pragma omp simd
    for (int64_t c = 0; c < C; ++c) acc[c] += x[c];
  }
}

template <bool FZ>
void sq_dev_rows(const float* X, int64_t C, int64_t r0, int64_t r1, const float* __restrict m,
                 float* __restrict acc) {
  for (int64_t r = r0; r < r1; ++r) {
    const float* __restrict x = X + r * C;
#pragma omp simd
    for (int64_t c = 0; c < C; ++c) {
      const float d = x[c] - m[c];
      acc[c] = madd<FZ>(d, d, acc[c]);
    }
  }
}

// The activation's gradient, as torch's leaky_relu_backward (threshold_backward for ReLU) gives it from the saved
// output, whose sign is that of v = x * a + b.
inline float act_grad(float g, float v, float slope) { return v > 0.f ? g : (slope == 0.f ? 0.f : g * slope); }

// Rows [r0, r1): acc[c] += dz, acc[C + c] += (x - m) * dz.
template <bool FZ>
void grad_rows(const float* G, int64_t gs, const float* X, int64_t C, int64_t r0, int64_t r1,
               const float* __restrict a, const float* __restrict b, const float* __restrict m, float slope,
               float* __restrict acc) {
  float* __restrict acc2 = acc + C;
  for (int64_t r = r0; r < r1; ++r) {
    const float* __restrict x = X + r * C;
    const float* __restrict g = G + r * gs;
#pragma omp simd
    for (int64_t c = 0; c < C; ++c) {
      const float d = act_grad(g[c], madd<FZ>(x[c], a[c], b[c]), slope);
      acc[c] += d;
      acc2[c] = madd<FZ>(x[c] - m[c], d, acc2[c]);
    }
  }
}

// y = act(x * a + b) over rows [r0, r1) (ReLU, slope 0: exactly 0 below zero, as torch's relu gives).
template <bool FZ>
void apply_rows(const float* X, float* Y, int64_t C, int64_t r0, int64_t r1, const float* __restrict a,
                const float* __restrict b, float slope) {
  for (int64_t r = r0; r < r1; ++r) {
    const float* __restrict x = X + r * C;
    float* __restrict y = Y + r * C;
#pragma omp simd
    for (int64_t c = 0; c < C; ++c) {
      const float v = madd<FZ>(x[c], a[c], b[c]);
      y[c] = v > 0.f ? v : (slope == 0.f ? 0.f : v * slope);
    }
  }
}

// dx = (dz - gm) - (x - m) * k, then / std * w, over rows [r0, r1).
template <bool FZ>
void dx_rows(const float* G, int64_t gs, const float* X, float* DX, int64_t C, int64_t r0, int64_t r1,
             const float* __restrict a, const float* __restrict b, const float* __restrict m,
             const float* __restrict k, const float* __restrict gm, const float* __restrict is,
             const float* __restrict w, float slope) {
  for (int64_t r = r0; r < r1; ++r) {
    const float* __restrict x = X + r * C;
    const float* __restrict g = G + r * gs;
    float* __restrict d = DX + r * C;
#pragma omp simd
    for (int64_t c = 0; c < C; ++c) {
      const float t = act_grad(g[c], madd<FZ>(x[c], a[c], b[c]), slope) - gm[c];
      d[c] = madd<FZ>(-(x[c] - m[c]), k[c], t) * is[c] * w[c];
    }
  }
}

template <bool FZ>
void forward(const float* X, const float* w, const float* bias, int64_t R, int64_t C, double eps, double momentum,
             bool update, float* running_mean, float* running_var, float slope, int64_t T, float* Y, float* mean,
             float* invstd, float* a, float* b) {
  std::vector<double> total(C), var_sum(C);
  column_sums<1>(R, C, T, [&](int64_t r0, int64_t r1, float* acc) { sum_rows(X, C, r0, r1, acc); }, total.data());
  for (int64_t c = 0; c < C; ++c) mean[c] = static_cast<float>(total[c] / static_cast<double>(R));
  column_sums<1>(R, C, T, [&](int64_t r0, int64_t r1, float* acc) { sq_dev_rows<FZ>(X, C, r0, r1, mean, acc); },
                 var_sum.data());
  const float fR = static_cast<float>(R), mf = static_cast<float>(momentum), rest = 1.f - mf;
  for (int64_t c = 0; c < C; ++c) {
    const float vs = static_cast<float>(var_sum[c]);  // torch keeps the sum as a float
    const double var = static_cast<double>(vs / fR);
    invstd[c] = (var != 0.0 || eps != 0.0) ? static_cast<float>(1.0 / std::sqrt(var + eps)) : 0.f;
    a[c] = invstd[c] * w[c];
    b[c] = madd<FZ>(-mean[c], a[c], bias[c]);
    if (update) {  // torch's update is compiled without fused multiply-adds
      running_mean[c] = mf * mean[c] + rest * running_mean[c];
      const double unbiased = static_cast<double>(vs / static_cast<float>(R - 1));
      running_var[c] = static_cast<float>(static_cast<double>(mf) * unbiased + rest * running_var[c]);
    }
  }
  parallel_range(0, R, 64, T, [&](int64_t r0, int64_t r1) { apply_rows<FZ>(X, Y, C, r0, r1, a, b, slope); });
}

template <bool FZ>
void backward(const float* G, int64_t gs, const float* X, const float* w, const float* mean, const float* invstd,
              const float* a, const float* b, int64_t R, int64_t C, float slope, int64_t T, float* DX, float* dw,
              float* db) {
  std::vector<double> sums(2 * C);  // sum dz, then sum (x - mean) dz
  column_sums<2>(R, C, T, [&](int64_t r0, int64_t r1, float* acc) {
    grad_rows<FZ>(G, gs, X, C, r0, r1, a, b, mean, slope, acc);
  }, sums.data());
  const float fR = static_cast<float>(R);
  std::vector<float> k(C), gm(C);
  for (int64_t c = 0; c < C; ++c) {
    const float sum = static_cast<float>(sums[c]), dotp = static_cast<float>(sums[C + c]);  // floats, as torch's
    k[c] = dotp * invstd[c] * invstd[c] / fR;
    gm[c] = sum / fR;
    dw[c] = dotp * invstd[c];
    db[c] = sum;
  }
  parallel_range(0, R, 64, T, [&](int64_t r0, int64_t r1) {
    dx_rows<FZ>(G, gs, X, DX, C, r0, r1, a, b, mean, k.data(), gm.data(), invstd, w, slope);
  });
}

}  // namespace

// Forward. X (R, C): R pixel rows of a channels-last float32 map; w, bias (C,); fused: the arithmetic variant (see
// above). Writes Y (R, C), the batch mean and 1 / std (C,) (torch's save_mean / save_invstd), a and b (C,) (y =
// act(x * a + b)), and, when update_running, moves running_mean / running_var (C,) by momentum as torch does.
extern "C" int normyolo_bn_act_forward(const float* X, const float* w, const float* bias, int64_t R, int64_t C,
                                       double eps, double momentum, int64_t update_running, float* running_mean,
                                       float* running_var, double slope, int64_t fused, int64_t threads, float* Y,
                                       float* mean, float* invstd, float* a, float* b) {
  return guarded([&] {
    const float sl = static_cast<float>(slope);
    (fused ? forward<true> : forward<false>)(X, w, bias, R, C, eps, momentum, update_running != 0, running_mean,
                                             running_var, sl, threads, Y, mean, invstd, a, b);
  });
}

// Backward of normyolo_bn_act_forward for the gradient G of y, whose pixel rows are gs floats apart (gs == C:
// channels-last; gs > C: a channel slice of a wider channels-last tensor, as a concatenation's backward hands on).
// Writes DX (R, C), dw and db (C,).
extern "C" int normyolo_bn_act_backward(const float* G, int64_t gs, const float* X, const float* w,
                                        const float* mean, const float* invstd, const float* a, const float* b,
                                        int64_t R, int64_t C, double slope, int64_t fused, int64_t threads,
                                        float* DX, float* dw, float* db) {
  return guarded([&] {
    const float sl = static_cast<float>(slope);
    (fused ? backward<true> : backward<false>)(G, gs, X, w, mean, invstd, a, b, R, C, sl, threads, DX, dw, db);
  });
}

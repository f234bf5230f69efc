// GroupNorm (LayerNorm and InstanceNorm as its G = 1 and G = C cases) followed by a leaky ReLU, in one kernel, for
// channels-last float32 CPU tensors in inference. Built on first use by models/norm_act_cpu.py.
//
// torch runs GroupNorm (statistics pass + scale-and-shift pass) and the activation (another read and write) as two
// ops, and GroupNorm cannot be folded into the convolution as BatchNorm is. Here each image is read once for its
// statistics and once more to write norm + activation while it is still in cache.
//
// Statistics in one pass without E[x^2] - mean^2's cancellation: every channel is summed shifted by its value at the
// image's central pixel, y = x - x0[c] (float over blocks of 256 rows, then double), so a map whose mean is far from
// zero against its spread loses no digits; each channel's mean and sum of squared deviations then combine into the
// group's exactly (in double, the parallel-variance formula).
// Plain C++ with a C interface (models/cpu_build.py compiles it with the system compiler and loads it with ctypes):
// no torch header, so the first build on a machine takes about 1.5 s instead of about 21 s (2-core Xeon, back to back,
// benchmarks/kernel_build.py; the previous source built with --via torch).
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <vector>

#include "parallel_range.h"

namespace {

constexpr int64_t kBlockRows = 256;  // rows summed in float before adding to the double totals

// Rows of fewer than kStrip floats are handled kStrip / C rows at a time, as one contiguous strip: the vector loops
// then run over kStrip floats instead of C, which for C = 16 or 32 is most of their cost.
constexpr int64_t kStrip = 64;

int64_t strip_rows(int64_t C) { return C >= kStrip ? 1 : kStrip / C; }

// Over rows [r0, r1) of one image (rows of C floats): s1[c] += sum (x - k[c]), s2[c] += sum (x - k[c])^2.
// k: the shifts repeated to a strip (strip_rows(C) * C floats); f1, f2: as many floats of scratch.
void channel_sums(const float* x, int64_t C, int64_t r0, int64_t r1, const float* __restrict k, double* s1,
                  double* s2, float* f1, float* f2) {
  const int64_t R = strip_rows(C), L = R * C;
  for (int64_t r = r0; r < r1; r += kBlockRows) {
    std::fill(f1, f1 + L, 0.f);
    std::fill(f2, f2 + L, 0.f);
    float* __restrict p1 = f1;
    float* __restrict p2 = f2;
    const int64_t re = std::min(r + kBlockRows, r1);
    int64_t rr = r;
    for (; rr + R <= re; rr += R) {  // one strip of R rows
      const float* __restrict xr = x + rr * C;
#pragma omp simd
      for (int64_t j = 0; j < L; ++j) {
        const float v = xr[j] - k[j];
        p1[j] += v;
        p2[j] += v * v;
      }
    }
    for (; rr < re; ++rr) {  // the rows left over
      const float* __restrict xr = x + rr * C;
      for (int64_t c = 0; c < C; ++c) {
        const float v = xr[c] - k[c];
        p1[c] += v;
        p2[c] += v * v;
      }
    }
    for (int64_t j = 0; j < L; ++j) {
      s1[j % C] += p1[j];
      s2[j % C] += p2[j];
    }
  }
}

// y = leaky(x * a[c] + b[c]) over rows [r0, r1); a, b: C floats repeated to a strip. y may be x (in place): each
// element is read before it is written at the same index, so the loops carry no dependence.
void apply_rows(const float* x, float* y, int64_t C, int64_t r0, int64_t r1, const float* __restrict a,
                const float* __restrict b, float slope) {
  const int64_t R = strip_rows(C), L = R * C;
  int64_t r = r0;
  for (; r + R <= r1; r += R) {
    const float* xr = x + r * C;
    float* yr = y + r * C;
#pragma omp simd
    for (int64_t j = 0; j < L; ++j) {
      const float v = xr[j] * a[j] + b[j];
      yr[j] = std::max(v, 0.f) + slope * std::min(v, 0.f);
    }
  }
  for (; r < r1; ++r) {
    const float* xr = x + r * C;
    float* yr = y + r * C;
    for (int64_t c = 0; c < C; ++c) {
      const float v = xr[c] * a[c] + b[c];
      yr[c] = std::max(v, 0.f) + slope * std::min(v, 0.f);
    }
  }
}

// Per-image scratch; the float arrays are strip-sized (strip_rows(C) * C).
struct Scratch {
  std::vector<double> s1, s2;
  std::vector<float> f1, f2, k, a, b;
  explicit Scratch(int64_t C)
      : s1(C), s2(C), f1(strip_rows(C) * C), f2(strip_rows(C) * C), k(strip_rows(C) * C), a(strip_rows(C) * C),
        b(strip_rows(C) * C) {}

  // shifts: the image's central pixel (a corner is the pixel zero padding disturbs most), repeated to a strip;
  // sums zeroed
  void start(const float* xn, int64_t C, int64_t HW) {
    const float* mid = xn + (HW / 2) * C;
    for (size_t j = 0; j < k.size(); ++j) k[j] = mid[j % C];
    std::fill(s1.begin(), s1.end(), 0.0);
    std::fill(s2.begin(), s2.end(), 0.0);
  }

  // shifted sums over HW rows -> per-channel scale a and shift b (repeated to a strip)
  void finish(int64_t C, int64_t G, int64_t HW, const float* w, const float* bias, double eps) {
    const int64_t D = C / G;
    const double n = static_cast<double>(HW);
    for (int64_t g = 0; g < G; ++g) {
      double mean = 0.0;
      for (int64_t d = 0; d < D; ++d) mean += k[g * D + d] + s1[g * D + d] / n;
      mean /= static_cast<double>(D);
      double m2 = 0.0;  // the group's sum of squared deviations from its mean
      for (int64_t d = 0; d < D; ++d) {
        const int64_t c = g * D + d;
        const double dev = k[c] + s1[c] / n - mean;
        m2 += std::max(0.0, s2[c] - s1[c] * s1[c] / n) + n * dev * dev;
      }
      const double rstd = 1.0 / std::sqrt(m2 / (n * static_cast<double>(D)) + eps);
      for (int64_t d = 0; d < D; ++d) {
        const int64_t c = g * D + d;
        a[c] = static_cast<float>(rstd * w[c]);
        b[c] = static_cast<float>(bias[c] - mean * rstd * w[c]);
      }
    }
    for (size_t j = C; j < a.size(); ++j) {
      a[j] = a[j % C];
      b[j] = b[j % C];
    }
  }
};

// Y = leaky(group_norm(X)) of N images of HW pixel rows of C floats, on T threads; Y may be X.
void group_norm_leaky(const float* X, float* Y, const float* w, const float* bb, int64_t N, int64_t C, int64_t HW,
                      int64_t groups, double eps, double slope, int64_t T) {
  const float sl = static_cast<float>(slope);

  if (N >= T) {  // whole images per thread: the apply pass reads an image its statistics pass just read
    parallel_range(0, N, 1, T, [&](int64_t n0, int64_t n1) {
      Scratch s(C);
      for (int64_t n = n0; n < n1; ++n) {
        const float* xn = X + n * HW * C;
        s.start(xn, C, HW);
        channel_sums(xn, C, 0, HW, s.k.data(), s.s1.data(), s.s2.data(), s.f1.data(), s.f2.data());
        s.finish(C, groups, HW, w, bb, eps);
        apply_rows(xn, Y + n * HW * C, C, 0, HW, s.a.data(), s.b.data(), sl);
      }
    });
    return;
  }

  // fewer images than threads: each image's rows are split over the threads
  const int64_t K = std::max<int64_t>(1, std::min<int64_t>(HW / 64, 2 * T));
  std::vector<double> part1(K * C), part2(K * C);
  Scratch s(C);
  for (int64_t n = 0; n < N; ++n) {
    const float* xn = X + n * HW * C;
    s.start(xn, C, HW);
    std::fill(part1.begin(), part1.end(), 0.0);
    std::fill(part2.begin(), part2.end(), 0.0);
    parallel_range(0, K, 1, T, [&](int64_t k0, int64_t k1) {
      std::vector<float> f1(s.f1.size()), f2(s.f2.size());  // per-thread scratch; chunk k writes only part[k]
      for (int64_t k = k0; k < k1; ++k)
        channel_sums(xn, C, k * HW / K, (k + 1) * HW / K, s.k.data(), &part1[k * C], &part2[k * C], f1.data(),
                     f2.data());
    });
    for (int64_t k = 0; k < K; ++k) {
      for (int64_t c = 0; c < C; ++c) {
        s.s1[c] += part1[k * C + c];
        s.s2[c] += part2[k * C + c];
      }
    }
    s.finish(C, groups, HW, w, bb, eps);
    parallel_range(0, HW, kBlockRows, T, [&](int64_t r0, int64_t r1) {
      apply_rows(xn, Y + n * HW * C, C, r0, r1, s.a.data(), s.b.data(), sl);
    });
  }
}

}  // namespace

// X (N, H*W, C): a channels-last float32 (N, C, H, W) map; w, bb (C,); groups divides C; threads: OpenMP threads.
// Writes Y (N, H*W, C) = leaky(group_norm(x)); Y may be X (in place: an image's statistics are complete before any
// of its values is overwritten).
extern "C" int normyolo_group_norm_leaky(const float* X, float* Y, const float* w, const float* bb, int64_t N,
                                         int64_t C, int64_t HW, int64_t groups, double eps, double slope,
                                         int64_t threads) {
  return guarded([&] { group_norm_leaky(X, Y, w, bb, N, C, HW, groups, eps, slope, threads); });
}

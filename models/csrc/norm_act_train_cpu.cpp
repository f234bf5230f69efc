// GroupNorm (LayerNorm and InstanceNorm as its G = 1 and G = C cases) followed by a leaky ReLU, forward and
// backward, for channels-last float32 CPU tensors in training. Built on first use by models/norm_act_train.py.
// (BatchNorm has its own kernel, bn_act_train_cpu.cpp, which reproduces torch's ops bit for bit.)
//
// torch trains Conv -> Norm -> LeakyReLU as two ops each way: forward the norm (statistics, then scale and shift into
// a new tensor) and the activation (another read and write); backward the activation's gradient (read two maps,
// write one) and the norm's (two reductions reading that gradient and the input, then a third pass writing the
// input's gradient). On a CPU whose memory bandwidth is the limit, those passes are a large part of the step. Here:
// forward reads the map once for the statistics and once more to write norm + activation; backward reads the output
// gradient and the input once for both reductions (the activation's mask is recomputed from the input, never
// stored) and once more to write the input gradient.
//
// Work is split into chunks of up to kChunkRows pixels of one image, each summed on its own (float over blocks of
// kBlockRows rows, then double) and combined in double in a fixed order, so results do not depend on the thread
// count. Forward statistics are shifted sums (y = x - x0[c], x0 the chunk's middle row) combined with the
// parallel-variance formula, so a map whose mean is far from zero against its spread loses no digits.
// Plain C++ with a C interface (models/cpu_build.py compiles it with the system compiler and loads it with ctypes):
// no torch header, so the first build on a machine takes about 2 s instead of about 21 s (2-core Xeon, back to back,
// benchmarks/kernel_build.py; the previous source built with --via torch).
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <utility>
#include <vector>

#include "parallel_range.h"

namespace {

constexpr int64_t kBlockRows = 256;   // rows summed in float before adding to the double totals
constexpr int64_t kChunkRows = 2048;  // pixels of one image per unit of parallel work
constexpr int64_t kStrip = 64;        // rows of C < kStrip floats are processed kStrip / C at a time

int64_t strip_rows(int64_t C) { return C >= kStrip ? 1 : kStrip / C; }

struct Layout {
  int64_t N, C, HW, G, T;  // G: groups per image; T: threads
  int64_t K() const { return std::max<int64_t>(1, (HW + kChunkRows - 1) / kChunkRows); }  // chunks per image
  int64_t chunks() const { return N * K(); }
  int64_t rows(int64_t j, int64_t* r0) const {  // chunk j's first pixel in its image (*r0) and pixel count
    const int64_t k = j % K();
    *r0 = k * HW / K();
    return (k + 1) * HW / K() - *r0;
  }
  // Statistics groups: group q = n * G + g holds the channels of group g in image n. Image n and channels
  // [c0, c1) of group q:
  int64_t groups() const { return N * G; }
  void group(int64_t q, int64_t* n, int64_t* c0, int64_t* c1) const {
    const int64_t D = C / G;
    *n = q / G;
    *c0 = (q % G) * D;
    *c1 = *c0 + D;
  }
};

// Repeat C values to a strip of strip_rows(C) * C floats.
void to_strip(const float* v, int64_t C, float* out) {
  const int64_t L = strip_rows(C) * C;
  for (int64_t j = 0; j < L; ++j) out[j] = v[j % C];
}

// Over rows [r0, r1) (rows of C floats at x): s1[c] += sum (x - k[c]), s2[c] += sum (x - k[c])^2; k strip-sized.
void shifted_sums(const float* x, int64_t C, int64_t r0, int64_t r1, const float* __restrict k, double* s1,
                  double* s2) {
  const int64_t R = strip_rows(C), L = R * C;
  std::vector<float> f1(L), f2(L);
  for (int64_t r = r0; r < r1; r += kBlockRows) {
    std::fill(f1.begin(), f1.end(), 0.f);
    std::fill(f2.begin(), f2.end(), 0.f);
    float* __restrict p1 = f1.data();
    float* __restrict p2 = f2.data();
    const int64_t re = std::min(r + kBlockRows, r1);
    int64_t rr = r;
    for (; rr + R <= re; rr += R) {
      const float* __restrict xr = x + rr * C;
#pragma omp simd
      for (int64_t j = 0; j < L; ++j) {
        const float v = xr[j] - k[j];
        p1[j] += v;
        p2[j] += v * v;
      }
    }
    for (; rr < re; ++rr) {
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

// y = leaky(x * a[c] + b[c]) over rows [r0, r1); a, b strip-sized.
void apply_rows(const float* x, float* y, int64_t C, int64_t r0, int64_t r1, const float* __restrict a,
                const float* __restrict b, float slope) {
  const int64_t R = strip_rows(C), L = R * C;
  int64_t r = r0;
  for (; r + R <= r1; r += R) {
    const float* __restrict xr = x + r * C;
    float* __restrict yr = y + r * C;
#pragma omp simd
    for (int64_t j = 0; j < L; ++j) {
      const float v = xr[j] * a[j] + b[j];
      const float vs = v * slope;  // computed unconditionally so that the select vectorises
      yr[j] = v > 0.f ? v : vs;
    }
  }
  for (; r < r1; ++r) {
    const float* xr = x + r * C;
    float* yr = y + r * C;
    for (int64_t c = 0; c < C; ++c) {
      const float v = xr[c] * a[c] + b[c];
      const float vs = v * slope;
      yr[c] = v > 0.f ? v : vs;
    }
  }
}

// Backward reductions over rows [r0, r1): with dz = g where x * a + b > 0, else g * slope,
// t1[c] += sum dz, t2[c] += sum dz * (x - mu[c]). g's rows are gs floats apart (gs > C: g is a channel slice of a
// wider channels-last gradient, as a concatenation's backward hands on; those rows are taken one at a time).
void grad_sums(const float* g, int64_t gs, const float* x, int64_t C, int64_t r0, int64_t r1,
               const float* __restrict a, const float* __restrict b, const float* __restrict mu, float slope,
               double* t1, double* t2) {
  const int64_t S = strip_rows(C), L = S * C, R = gs == C ? S : 1;
  std::vector<float> f1(L), f2(L);
  for (int64_t r = r0; r < r1; r += kBlockRows) {
    std::fill(f1.begin(), f1.end(), 0.f);
    std::fill(f2.begin(), f2.end(), 0.f);
    float* __restrict p1 = f1.data();
    float* __restrict p2 = f2.data();
    const int64_t re = std::min(r + kBlockRows, r1);
    int64_t rr = r;
    for (; R > 1 && rr + R <= re; rr += R) {
      const float* __restrict xr = x + rr * C;
      const float* __restrict gr = g + rr * C;
#pragma omp simd
      for (int64_t j = 0; j < L; ++j) {
        const float z = xr[j] * a[j] + b[j];
        const float dz = gr[j] * (z > 0.f ? 1.f : slope);
        p1[j] += dz;
        p2[j] += dz * (xr[j] - mu[j]);
      }
    }
    for (; rr < re; ++rr) {  // rows one at a time, each into the strip lane a strip would have given it, so that
      // strided and contiguous gradients are summed in the same order
      const int64_t o = ((rr - r) % S) * C;
      const float* __restrict xr = x + rr * C;
      const float* __restrict gr = g + rr * gs;
#pragma omp simd
      for (int64_t c = 0; c < C; ++c) {
        const float z = xr[c] * a[c] + b[c];
        const float dz = gr[c] * (z > 0.f ? 1.f : slope);
        p1[o + c] += dz;
        p2[o + c] += dz * (xr[c] - mu[c]);
      }
    }
    for (int64_t j = 0; j < L; ++j) {
      t1[j % C] += p1[j];
      t2[j % C] += p2[j];
    }
  }
}

// Per-channel values of one image for the backward passes, each repeated to a strip (strip_rows(C) * C floats):
// the forward's scale a and shift b (for the activation's mask), the statistics' mean mu, and the coefficients of
// dx = p * dz + (q * (x - mu) + r) (the coefficients mix the channels of a group, as torch's GroupNorm backward).
struct Coefs {
  std::vector<float> a, b, mu, p, q, r;
  explicit Coefs(int64_t C) {
    for (auto* v : {&a, &b, &mu, &p, &q, &r}) v->resize(strip_rows(C) * C);
  }
};

// dx over rows [r0, r1) with dz as in grad_sums; g's rows gs floats apart.
void grad_apply(const float* g, int64_t gs, const float* x, float* dx, int64_t C, int64_t r0, int64_t r1,
                const Coefs& cf, float slope) {
  const int64_t R = gs == C ? strip_rows(C) : 1, L = strip_rows(C) * C;
  const float* __restrict a = cf.a.data();
  const float* __restrict b = cf.b.data();
  const float* __restrict mu = cf.mu.data();
  const float* __restrict p = cf.p.data();
  const float* __restrict q = cf.q.data();
  const float* __restrict r_ = cf.r.data();
  int64_t r = r0;
  for (; R > 1 && r + R <= r1; r += R) {
    const float* __restrict xr = x + r * C;
    const float* __restrict gr = g + r * C;
    float* __restrict dr = dx + r * C;
#pragma omp simd
    for (int64_t j = 0; j < L; ++j) {
      const float z = xr[j] * a[j] + b[j];
      const float dz = gr[j] * (z > 0.f ? 1.f : slope);
      const float xc = xr[j] - mu[j];
      dr[j] = p[j] * dz + (q[j] * xc + r_[j]);
    }
  }
  for (; r < r1; ++r) {
    const float* __restrict xr = x + r * C;
    const float* __restrict gr = g + r * gs;
    float* __restrict dr = dx + r * C;
#pragma omp simd
    for (int64_t c = 0; c < C; ++c) {
      const float z = xr[c] * a[c] + b[c];
      const float dz = gr[c] * (z > 0.f ? 1.f : slope);
      const float xc = xr[c] - mu[c];
      dr[c] = p[c] * dz + (q[c] * xc + r_[c]);
    }
  }
}

// Each statistics group's mean and 1 / std from its chunks' means and squared deviations (cmean, cm2: (chunks, C)),
// by the parallel-variance formula in double in a fixed order, stored per image and channel as the scale A, shift
// B, MU and RS (N, C).
void group_stats(const Layout& L, const std::vector<double>& cmean, const std::vector<double>& cm2, const float* w,
                 const float* bb, double eps, float* A, float* B, float* MU, float* RS) {
  const int64_t C = L.C, K = L.K();
  for (int64_t q = 0; q < L.groups(); ++q) {
    int64_t n, c0, c1, r0;
    L.group(q, &n, &c0, &c1);
    double tot = 0.0, m = 0.0, m2 = 0.0;
    for (int64_t j = n * K; j < (n + 1) * K; ++j) {
      const double cnt = static_cast<double>(L.rows(j, &r0));
      for (int64_t c = c0; c < c1; ++c) {
        tot += cnt;
        m += cnt * cmean[j * C + c];
      }
    }
    m /= tot;
    for (int64_t j = n * K; j < (n + 1) * K; ++j) {
      const double cnt = static_cast<double>(L.rows(j, &r0));
      for (int64_t c = c0; c < c1; ++c) {
        const double d = cmean[j * C + c] - m;
        m2 += cm2[j * C + c] + cnt * d * d;
      }
    }
    const double rs = 1.0 / std::sqrt(m2 / tot + eps);
    for (int64_t c = c0; c < c1; ++c) {
      A[n * C + c] = static_cast<float>(rs * w[c]);
      B[n * C + c] = static_cast<float>(bb[c] - m * rs * w[c]);
      MU[n * C + c] = static_cast<float>(m);
      RS[n * C + c] = static_cast<float>(rs);
    }
  }
}

// Chunk sums (chunks, C) added up per image and channel (N, C), chunks in order.
std::vector<double> per_image(const Layout& L, const std::vector<double>& t) {
  const int64_t C = L.C, K = L.K();
  std::vector<double> s(L.N * C, 0.0);
  for (int64_t j = 0; j < L.chunks(); ++j) {
    for (int64_t c = 0; c < C; ++c) s[(j / K) * C + c] += t[j * C + c];
  }
  return s;
}

// dweight = sum dz xhat and dbias = sum dz per channel (C,) from the per-image sums s1, s2 (N, C), images in order.
void param_grads(const Layout& L, const std::vector<double>& s1, const std::vector<double>& s2, const float* RS,
                 float* dw, float* db) {
  const int64_t C = L.C;
  for (int64_t c = 0; c < C; ++c) {
    double sw = 0.0, sb = 0.0;
    for (int64_t n = 0; n < L.N; ++n) {
      sw += s2[n * C + c] * RS[n * C + c];
      sb += s1[n * C + c];
    }
    dw[c] = static_cast<float>(sw);
    db[c] = static_cast<float>(sb);
  }
}

// dx's coefficients per image and channel (double, stored as float) from s1 = sum dz and s2 = sum dz (x - mu) per
// image and channel; m = the statistics group's value count:
// dx = rstd (w dz - S1 / m - xhat S2 / m) with S1 = sum w dz and S2 = sum w dz xhat over the group, i.e.
// p = rstd w, q = -rstd^2 S2 / m, r = -rstd S1 / m.
struct GradCoefs {
  std::vector<float> p, q, r;
};
GradCoefs grad_coefs(const Layout& L, const std::vector<double>& s1, const std::vector<double>& s2, const float* w,
                     const float* RS) {
  const int64_t N = L.N, C = L.C;
  GradCoefs g{std::vector<float>(N * C), std::vector<float>(N * C), std::vector<float>(N * C)};
  for (int64_t q = 0; q < L.groups(); ++q) {
    int64_t n, c0, c1;
    L.group(q, &n, &c0, &c1);
    double S1 = 0.0, S2 = 0.0;
    for (int64_t c = c0; c < c1; ++c) {
      S1 += w[c] * s1[n * C + c];
      S2 += w[c] * s2[n * C + c] * RS[n * C + c];
    }
    const double m = static_cast<double>((c1 - c0) * L.HW);
    for (int64_t c = c0; c < c1; ++c) {
      const int64_t i = n * C + c;
      const double rs = RS[i];
      g.p[i] = static_cast<float>(rs * w[c]);
      g.q[i] = static_cast<float>(-rs * rs * S2 / m);
      g.r[i] = static_cast<float>(-rs * S1 / m);
    }
  }
  return g;
}

// Parallel over chunks; fn(j, n, r0, r1) for each.
template <typename F>
void for_chunks(const Layout& L, F fn) {
  parallel_range(0, L.chunks(), 1, L.T, [&](int64_t j0, int64_t j1) {
    for (int64_t j = j0; j < j1; ++j) {
      int64_t r0;
      const int64_t cnt = L.rows(j, &r0);
      fn(j, j / L.K(), r0, r0 + cnt);
    }
  });
}

}  // namespace


// Forward. X (N, H*W, C): a channels-last float32 (N, C, H, W) map; w, bb (C,) the norm's weight and bias; groups:
// the GroupNorm group count (>= 1, dividing C); threads: OpenMP threads. Writes Y (N, H*W, C) = leaky(x * a + b) and
// A, B, MU, RS (N, C) per image and channel (scale a, shift b, the statistics' mean and 1 / std).
extern "C" int normyolo_norm_act_forward(const float* X, const float* w, const float* bb, int64_t N, int64_t C,
                                         int64_t HW, int64_t groups, double eps, double slope, int64_t threads,
                                         float* Y, float* A, float* B, float* MU, float* RS) {
  return guarded([&] {
    const Layout L{N, C, HW, groups, threads};
    const int64_t J = L.chunks();

    // 1. per chunk: mean and sum of squared deviations of each channel (double)
    std::vector<double> cmean(J * C), cm2(J * C);
    for_chunks(L, [&](int64_t j, int64_t n, int64_t r0, int64_t r1) {
      const float* xn = X + n * HW * C;
      std::vector<float> k(strip_rows(C) * C);
      to_strip(xn + ((r0 + r1) / 2) * C, C, k.data());
      std::vector<double> s1(C, 0.0), s2(C, 0.0);
      shifted_sums(xn, C, r0, r1, k.data(), s1.data(), s2.data());
      const double cnt = static_cast<double>(r1 - r0);
      for (int64_t c = 0; c < C; ++c) {
        cmean[j * C + c] = k[c] + s1[c] / cnt;
        cm2[j * C + c] = std::max(0.0, s2[c] - s1[c] * s1[c] / cnt);
      }
    });

    // 2. each statistics group from its chunks
    group_stats(L, cmean, cm2, w, bb, eps, A, B, MU, RS);

    // 3. y = leaky(x * a + b)
    const float sl = static_cast<float>(slope);
    for_chunks(L, [&](int64_t, int64_t n, int64_t r0, int64_t r1) {
      std::vector<float> as(strip_rows(C) * C), bs(strip_rows(C) * C);
      to_strip(A + n * C, C, as.data());
      to_strip(B + n * C, C, bs.data());
      apply_rows(X + n * HW * C, Y + n * HW * C, C, r0, r1, as.data(), bs.data(), sl);
    });
  });
}

// Backward of normyolo_norm_act_forward. G: the gradient of y, pixel rows of C floats gs floats apart (gs == C:
// channels-last; gs > C: a channel slice of a wider channels-last tensor, as a concatenation's backward hands on);
// X, w, A, B, MU, RS as in the forward. Writes DX (N, H*W, C) channels-last, dw (C,) and db (C,).
extern "C" int normyolo_norm_act_backward(const float* G, int64_t gs, const float* X, const float* w, const float* A,
                                          const float* B, const float* MU, const float* RS, int64_t N, int64_t C,
                                          int64_t HW, int64_t groups, double slope, int64_t threads, float* DX,
                                          float* dw, float* db) {
  return guarded([&] {
    const Layout L{N, C, HW, groups, threads};
    const int64_t J = L.chunks();
    const float sl = static_cast<float>(slope);

    // 1. per chunk: sum dz and sum dz * (x - mu)
    std::vector<double> t1(J * C, 0.0), t2(J * C, 0.0);
    for_chunks(L, [&](int64_t j, int64_t n, int64_t r0, int64_t r1) {
      const int64_t S = strip_rows(C) * C;
      std::vector<float> as(S), bs(S), ms(S);
      to_strip(A + n * C, C, as.data());
      to_strip(B + n * C, C, bs.data());
      to_strip(MU + n * C, C, ms.data());
      grad_sums(G + n * HW * gs, gs, X + n * HW * C, C, r0, r1, as.data(), bs.data(), ms.data(), sl, &t1[j * C],
                &t2[j * C]);
    });
    const std::vector<double> s1 = per_image(L, t1), s2 = per_image(L, t2);
    param_grads(L, s1, s2, RS, dw, db);

    // 2. dx's coefficients per image and channel
    const GradCoefs k = grad_coefs(L, s1, s2, w, RS);

    // 3. dx
    for_chunks(L, [&](int64_t, int64_t n, int64_t r0, int64_t r1) {
      Coefs cf(C);
      const std::pair<const float*, std::vector<float>*> src[] = {
          {A + n * C, &cf.a}, {B + n * C, &cf.b}, {MU + n * C, &cf.mu}, {k.p.data() + n * C, &cf.p},
          {k.q.data() + n * C, &cf.q}, {k.r.data() + n * C, &cf.r}};
      for (const auto& [from, to] : src) to_strip(from, C, to->data());
      grad_apply(G + n * HW * gs, gs, X + n * HW * C, DX + n * HW * C, C, r0, r1, cf, sl);
    });
  });
}

// GroupNorm (LayerNorm and InstanceNorm as its G = 1 and G = C cases) followed by a leaky ReLU, in one kernel, for
// channels-last float32 CPU tensors in inference. Built on first use by models/norm_act_cpu.py.
//
// torch runs GroupNorm (statistics pass + scale-and-shift pass) and the activation (another read and write) as two
// ops, and GroupNorm cannot be folded into the convolution as BatchNorm is. Here each image is read once for its
// statistics (twice with two_pass) and once more to write norm + activation while it is still in cache.
//
// Statistics: per-channel sums in float over blocks of 256 rows, added up in double. One pass takes the variance as
// E[x^2] - mean^2 (the algorithm of torch's channels-last GroupNorm, with double totals); two_pass sums squared
// deviations from the mean instead (the algorithm of torch's NCHW InstanceNorm), for inputs whose mean is large
// against their spread.
#include <torch/extension.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <vector>

namespace {

constexpr int64_t kBlockRows = 256;  // rows summed in float before adding to the double totals

// Rows of fewer than kStrip floats are handled kStrip / C rows at a time, as one contiguous strip: the vector loops
// then run over kStrip floats instead of C, which for C = 16 or 32 is most of their cost.
constexpr int64_t kStrip = 64;

int64_t strip_rows(int64_t C) { return C >= kStrip ? 1 : kStrip / C; }

// s1[c] += sum x, s2[c] += sum x^2 over rows [r0, r1) of one image (rows of C floats); with mu (C floats, repeated
// to a strip in mu_strip), only s2[c] += sum (x - mu[c])^2. f1, f2: strip_rows(C) * C floats of scratch.
void channel_sums(const float* x, int64_t C, int64_t r0, int64_t r1, const float* mu_strip, double* s1, double* s2,
                  float* f1, float* f2) {
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
      if (mu_strip != nullptr) {
#pragma omp simd
        for (int64_t j = 0; j < L; ++j) {
          const float z = xr[j] - mu_strip[j];
          p2[j] += z * z;
        }
      } else {
#pragma omp simd
        for (int64_t j = 0; j < L; ++j) {
          const float v = xr[j];
          p1[j] += v;
          p2[j] += v * v;
        }
      }
    }
    for (; rr < re; ++rr) {  // the rows left over
      const float* __restrict xr = x + rr * C;
      for (int64_t c = 0; c < C; ++c) {
        const float v = mu_strip != nullptr ? xr[c] - mu_strip[c] : xr[c];
        p1[c] += v;
        p2[c] += v * v;
      }
    }
    for (int64_t j = 0; j < L; ++j) {
      s1[j % C] += f1[j];
      s2[j % C] += f2[j];
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

// One image's sums -> per-channel group mean, scale a and shift b, each repeated to a strip (strip_rows(C) * C
// floats). centered: s2 holds squared deviations from mean_in (the float means the second pass subtracted).
void finish(int64_t C, int64_t G, int64_t HW, const double* s1, const double* s2, const float* mean_in,
            const float* w, const float* bias, double eps, float* mean_out, float* a, float* b) {
  const int64_t D = C / G, L = strip_rows(C) * C;
  const double inv = 1.0 / static_cast<double>(HW * D);
  for (int64_t g = 0; g < G; ++g) {
    double m = 0.0, q = 0.0;
    for (int64_t d = 0; d < D; ++d) {
      m += s1[g * D + d];
      q += s2[g * D + d];
    }
    const double mean = mean_in != nullptr ? static_cast<double>(mean_in[g * D]) : m * inv;
    const double var = mean_in != nullptr ? q * inv : std::max(0.0, q * inv - mean * mean);
    const double rstd = 1.0 / std::sqrt(var + eps);
    for (int64_t d = 0; d < D; ++d) {
      const int64_t c = g * D + d;
      mean_out[c] = static_cast<float>(mean);
      a[c] = static_cast<float>(rstd * w[c]);
      b[c] = static_cast<float>(bias[c] - mean * rstd * w[c]);
    }
  }
  for (int64_t j = C; j < L; ++j) {
    mean_out[j] = mean_out[j % C];
    a[j] = a[j % C];
    b[j] = b[j % C];
  }
}

struct Scratch {
  std::vector<double> s1, s2;
  std::vector<float> f1, f2, a, b, mean, mean2;  // strip-sized (strip_rows(C) * C)
  explicit Scratch(int64_t C)
      : s1(C), s2(C), f1(strip_rows(C) * C), f2(strip_rows(C) * C), a(strip_rows(C) * C), b(strip_rows(C) * C),
        mean(strip_rows(C) * C), mean2(strip_rows(C) * C) {}
};

}  // namespace

// x: (N, C, H, W) channels-last float32; weight, bias: (C,) float32 -> leaky(group_norm(x)), channels-last; with
// inplace, written into x (whose statistics are complete before any of its values is overwritten) and x returned.
torch::Tensor group_norm_leaky(const torch::Tensor& x, const torch::Tensor& weight, const torch::Tensor& bias,
                               int64_t groups, double eps, double slope, bool two_pass, bool inplace) {
  TORCH_CHECK(x.device().is_cpu() && x.scalar_type() == torch::kFloat && x.dim() == 4 &&
                  x.is_contiguous(at::MemoryFormat::ChannelsLast),
              "group_norm_leaky: expected a channels-last float32 CPU (N, C, H, W) tensor");
  const int64_t N = x.size(0), C = x.size(1), HW = x.size(2) * x.size(3);
  TORCH_CHECK(groups > 0 && C % groups == 0, "group_norm_leaky: channels ", C, " not divisible by groups ", groups);
  TORCH_CHECK(weight.numel() == C && bias.numel() == C && weight.is_contiguous() && bias.is_contiguous() &&
                  weight.scalar_type() == torch::kFloat && bias.scalar_type() == torch::kFloat,
              "group_norm_leaky: expected contiguous float32 weight and bias of ", C, " values");
  auto y = inplace ? x : torch::empty_like(x, at::MemoryFormat::ChannelsLast);
  if (x.numel() == 0) return y;
  const float* X = x.data_ptr<float>();
  float* Y = y.data_ptr<float>();  // == X in place
  const float* w = weight.data_ptr<float>();
  const float* bb = bias.data_ptr<float>();
  const float sl = static_cast<float>(slope);
  const int64_t T = at::get_num_threads();

  if (N >= T) {  // whole images per thread: the apply pass reads an image its statistics pass just read
    at::parallel_for(0, N, 1, [&](int64_t n0, int64_t n1) {
      Scratch s(C);
      for (int64_t n = n0; n < n1; ++n) {
        const float* xn = X + n * HW * C;
        std::fill(s.s1.begin(), s.s1.end(), 0.0);
        std::fill(s.s2.begin(), s.s2.end(), 0.0);
        channel_sums(xn, C, 0, HW, nullptr, s.s1.data(), s.s2.data(), s.f1.data(), s.f2.data());
        finish(C, groups, HW, s.s1.data(), s.s2.data(), nullptr, w, bb, eps, s.mean.data(), s.a.data(), s.b.data());
        if (two_pass) {
          s.mean2 = s.mean;
          std::fill(s.s2.begin(), s.s2.end(), 0.0);
          channel_sums(xn, C, 0, HW, s.mean2.data(), s.s1.data(), s.s2.data(), s.f1.data(), s.f2.data());
          finish(C, groups, HW, s.s1.data(), s.s2.data(), s.mean2.data(), w, bb, eps, s.mean.data(), s.a.data(),
                 s.b.data());
        }
        apply_rows(xn, Y + n * HW * C, C, 0, HW, s.a.data(), s.b.data(), sl);
      }
    });
    return y;
  }

  // fewer images than threads: each image's rows are split over the threads
  const int64_t K = std::max<int64_t>(1, std::min<int64_t>(HW / 64, 2 * T));
  std::vector<double> part1(K * C), part2(K * C);
  Scratch s(C);
  for (int64_t n = 0; n < N; ++n) {
    const float* xn = X + n * HW * C;
    for (int pass = 0; pass < (two_pass ? 2 : 1); ++pass) {
      const float* mu = pass == 1 ? s.mean2.data() : nullptr;
      std::fill(part1.begin(), part1.end(), 0.0);
      std::fill(part2.begin(), part2.end(), 0.0);
      at::parallel_for(0, K, 1, [&](int64_t k0, int64_t k1) {
        std::vector<float> f1(strip_rows(C) * C), f2(strip_rows(C) * C);
        for (int64_t k = k0; k < k1; ++k)
          channel_sums(xn, C, k * HW / K, (k + 1) * HW / K, mu, &part1[k * C], &part2[k * C], f1.data(), f2.data());
      });
      std::fill(s.s1.begin(), s.s1.end(), 0.0);
      std::fill(s.s2.begin(), s.s2.end(), 0.0);
      for (int64_t k = 0; k < K; ++k) {
        for (int64_t c = 0; c < C; ++c) {
          s.s1[c] += part1[k * C + c];
          s.s2[c] += part2[k * C + c];
        }
      }
      finish(C, groups, HW, s.s1.data(), s.s2.data(), mu, w, bb, eps, s.mean.data(), s.a.data(), s.b.data());
      s.mean2 = s.mean;
    }
    at::parallel_for(0, HW, kBlockRows, [&](int64_t r0, int64_t r1) {
      apply_rows(xn, Y + n * HW * C, C, r0, r1, s.a.data(), s.b.data(), sl);
    });
  }
  return y;
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("group_norm_leaky", &group_norm_leaky, "leaky(group_norm(x)) of a channels-last float32 CPU tensor");
}

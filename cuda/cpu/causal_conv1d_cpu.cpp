// C++ causal depthwise conv (the maths in ssmlab/causal_conv1d.h).
//
// One (batch, channel) row at a time, rows spread over OpenMP threads. A row
// is converted to float32 once into a buffer padded with K-1 leading zeros, so
// the inner loops have no boundary tests and the compiler can vectorise them.
#include <algorithm>
#include <cmath>
#include <stdexcept>
#include <string>
#include <vector>

#include "ssmlab/causal_conv1d.h"

namespace ssmlab {
namespace {

void check(const CausalConv1dParams& p) {
  if (p.width < 1 || p.width > kConvMaxWidth)
    throw std::invalid_argument("causal_conv1d: width " + std::to_string(p.width) + " outside [1, " +
                                std::to_string(kConvMaxWidth) + "]");
  if (p.dtype == DType::kFloat64) throw std::invalid_argument("causal_conv1d: float64 runs on the reference path");
}

// xp[0 .. K-2] = 0, xp[K-1 + t] = x[t]: the row with its causal zero padding.
void load_row(const CausalConv1dParams& p, int64_t b, int64_t c, std::vector<float>& xp) {
  const int64_t L = p.length, K = p.width, base = b * p.x_stride[0] + c * p.x_stride[1];
  xp.assign(L + K - 1, 0.0f);
  for (int64_t t = 0; t < L; ++t) xp[K - 1 + t] = load_float(p.x, p.dtype, base + t);
}

// The conv's value at step t before the activation; xp is the zero-padded row.
inline float pre_activation(const float* w, const std::vector<float>& xp, int64_t t, int64_t K, float bias) {
  float acc = bias;
  for (int64_t k = 0; k < K; ++k) acc += w[k] * xp[t + k];
  return acc;
}

float silu_grad(float pre) {
  const float s = 1.0f / (1.0f + std::exp(-pre));
  return s * (1.0f + pre * (1.0f - s));
}

}  // namespace

void causal_conv1d_fwd_cpu(const CausalConv1dParams& p) {
  check(p);
  const int64_t B = p.batch, C = p.channels, L = p.length, K = p.width;
#pragma omp parallel
  {
    std::vector<float> xp, row(L);
#pragma omp for schedule(static)
    for (int64_t r = 0; r < B * C; ++r) {
      const int64_t b = r / C, c = r % C;
      load_row(p, b, c, xp);
      const float* w = p.weight + c * K;
      const float bias = p.bias ? p.bias[c] : 0.0f;
      for (int64_t t = 0; t < L; ++t) {
        const float acc = pre_activation(w, xp, t, K, bias);
        row[t] = p.silu ? acc / (1.0f + std::exp(-acc)) : acc;
      }
      for (int64_t t = 0; t < L; ++t) store_float(p.out, p.dtype, r * L + t, row[t]);
    }
  }
}

void causal_conv1d_bwd_cpu(const CausalConv1dParams& p) {
  check(p);
  const int64_t B = p.batch, C = p.channels, L = p.length, K = p.width, nch = causal_conv1d_chunks(L);
#pragma omp parallel
  {
    std::vector<float> xp, gp(L + K - 1);
#pragma omp for schedule(static)
    for (int64_t r = 0; r < B * C; ++r) {
      const int64_t b = r / C, c = r % C;
      load_row(p, b, c, xp);
      const float* w = p.weight + c * K;
      const float bias = p.bias ? p.bias[c] : 0.0f;
      // gp[t] for t < L, then K-1 trailing zeros so grad_x needs no boundary test
      for (int64_t t = 0; t < L; ++t) {
        const float g = load_float(p.grad_out, p.dtype, r * L + t);
        if (p.silu) {
          gp[t] = g * silu_grad(pre_activation(w, xp, t, K, bias));
        } else {
          gp[t] = g;
        }
      }
      for (int64_t t = L; t < L + K - 1; ++t) gp[t] = 0.0f;
      for (int64_t t = 0; t < L; ++t) {
        float acc = 0.0f;
        for (int64_t k = 0; k < K; ++k) acc += w[k] * gp[t + (K - 1) - k];
        store_float(p.grad_x, p.dtype, r * L + t, acc);
      }
      for (int64_t ch = 0; ch < nch; ++ch) {
        const int64_t t0 = ch * kConvChunk, t1 = std::min(L, t0 + kConvChunk), part = b * nch + ch;
        for (int64_t k = 0; k < K; ++k) {
          float acc = 0.0f;
          for (int64_t t = t0; t < t1; ++t) acc += gp[t] * xp[t + k];
          p.grad_weight_partial[(part * C + c) * K + k] = acc;
        }
        if (p.grad_bias_partial) {
          float acc = 0.0f;
          for (int64_t t = t0; t < t1; ++t) acc += gp[t];
          p.grad_bias_partial[part * C + c] = acc;
        }
      }
    }
  }
}

}  // namespace ssmlab

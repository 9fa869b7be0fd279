// CPU single-token decoding steps (see ssmlab/decode_step.h for the maths).
//
// The SSM step is spread over OpenMP threads in tasks of one batch row and a
// tile of kTile channels, which share the row's B and C (converted to float
// once per task). A task first gathers its channels' scalars (x, Δ, z: any
// dtype, any stride) into float arrays and runs the per-channel nonlinearities
// (softplus, silu) over the whole tile at once, and only then walks the
// channels' states: with N = 16 a channel has few states, and one libm call
// per channel would cost as much as its whole state update. The conv step's
// tasks are tiles of channels over every batch row, so each weight is
// converted once.
//
// Vector code without special compiler flags: the math loops call the small
// branch-free exp and log1p below instead of libm (which compilers vectorise
// only under -ffast-math), and a channel's N states are copied into a
// zero-padded scratch row so the update runs over whole vectors. Every output
// is a sum in a fixed order: results do not depend on the number of threads.
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <stdexcept>
#include <string>
#include <vector>

#include "ssmlab/decode_step.h"

namespace ssmlab {
namespace {

constexpr int kLanes = 8;                   // partial sums of y: states are processed in groups of 8
constexpr int64_t kTile = 64;               // channels per task (they share the staged B and C rows)
constexpr int64_t kParallelWork = 1 << 12;  // below this many state elements a thread team costs more than it saves

void require_kernel_dtype(DType d, const char* fn, const char* name) {
  if (d != DType::kFloat32 && d != DType::kFloat16 && d != DType::kBFloat16)
    throw std::invalid_argument(std::string(fn) + ": " + name + " must be float32, float16 or bfloat16, got " +
                                dtype_name(d));
}

// m ? a : b on the bit patterns. GCC keeps a float `?:` as a branch (a
// comparison may trap under its default -ftrapping-math), which stops a loop
// from vectorising; this form compiles to and/andnot/or.
inline float select(bool m, float a, float b) {
  const uint32_t mask = 0u - uint32_t(m);
  return bits_to_float((float_to_bits(a) & mask) | (float_to_bits(b) & ~mask));
}

// exp(x) = 2^k e^r with k = round(x / ln 2) and |r| <= ln(2) / 2; e^r by its
// Taylor polynomial of degree 7 (truncation 5e-9 relative, under float's
// rounding); 2^k is applied as two factors so that subnormal results come out
// right. Outside [-104, 89] float's exp is 0 or inf, which the clamped input
// still produces; NaN passes the clamp (it compares false).
inline float exp_poly(float x) {
  x = select(x < -104.0f, -104.0f, x);
  x = select(x > 89.0f, 89.0f, x);
  const float shifter = 12582912.0f;  // 1.5 * 2^23: adding it rounds to an integer kept in the low mantissa bits
  const float t = x * 1.44269502f + shifter;
  const float kf = t - shifter;
  const int32_t k = int32_t(float_to_bits(t)) - int32_t(float_to_bits(shifter));
  // ln 2 in two parts, the first exact when multiplied by |k| < 512 (Cody & Waite).
  float r = x - kf * 0.693145751953125f;
  r = r - kf * 1.42860677e-06f;
  float p = 1.0f / 5040.0f;
  p = p * r + 1.0f / 720.0f;
  p = p * r + 1.0f / 120.0f;
  p = p * r + 1.0f / 24.0f;
  p = p * r + 1.0f / 6.0f;
  p = p * r + 0.5f;
  p = p * r + 1.0f;
  p = p * r + 1.0f;
  const int32_t k1 = k >> 1, k2 = k - k1;
  return p * bits_to_float(uint32_t(k1 + 127) << 23) * bits_to_float(uint32_t(k2 + 127) << 23);
}

// log1p(u) for u in [0, 1]: w = 1 + u = 2^e m with m in [0.707, 1.414),
// log m = 2 atanh(s) with s = (m - 1) / (m + 1), |s| < 0.172, by its series to
// s^9 (truncation 2e-9 relative); (u - (w - 1)) / w restores what rounding
// 1 + u lost, which is all of u when u is tiny.
inline float log1p_unit(float u) {
  const float w = 1.0f + u;
  const bool big = w >= 1.41421356f;
  const float m = select(big, 0.5f * w, w);
  const float s = (m - 1.0f) / (m + 1.0f), s2 = s * s;
  const float series = 2.0f * s * (1.0f + s2 * (1.0f / 3.0f + s2 * (1.0f / 5.0f + s2 * (1.0f / 7.0f + s2 * (1.0f / 9.0f)))));
  return select(big, 0.693147181f, 0.0f) + series + (u - (w - 1.0f)) / w;
}

// softplus(v) = max(v, 0) + log1p(exp(-|v|)): equal, in float, to PyTorch's
// (identity above 20), and the argument of log1p stays in [0, 1].
inline float softplus(float v) { return select(v > 0.0f, v, 0.0f) + log1p_unit(exp_poly(-std::fabs(v))); }

inline float silu(float v) { return v / (1.0f + exp_poly(-v)); }

int64_t round_up(int64_t n, int64_t m) { return (n + m - 1) / m * m; }

// The conv step with the state's element type T known at compile time (the
// shift touches K elements a row); tasks are tiles of channels, whose weights
// and bias are converted to float once and reused for every batch row.
template <typename T>
void conv_update(const CausalConv1dUpdateParams& p) {
  using E = Elem<T>;
  const int64_t C = p.channels, K = p.width, sk = p.state_stride[2];
  const int64_t tiles = (C + kTile - 1) / kTile;
#pragma omp parallel if (p.batch * C * K >= kParallelWork)
  {
    std::vector<float> w(kTile * K);
#pragma omp for schedule(static)
    for (int64_t tile = 0; tile < tiles; ++tile) {
      const int64_t c0 = tile * kTile, nc = std::min(kTile, C - c0);
      float bias[kTile] = {};
      for (int64_t t = 0; t < nc; ++t) {
        const int64_t ci = c0 + t;
        for (int64_t k = 0; k < K; ++k)
          w[t * K + k] = load_float(p.weight, p.weight_dtype, ci * p.weight_stride[0] + k * p.weight_stride[1]);
        if (p.bias) bias[t] = load_float(p.bias, p.bias_dtype, ci * p.bias_stride);
      }
      for (int64_t bi = 0; bi < p.batch; ++bi) {
        float acc[kTile] = {};
        for (int64_t t = 0; t < nc; ++t) {
          const int64_t ci = c0 + t;
          T* row = static_cast<T*>(p.state) + bi * p.state_stride[0] + ci * p.state_stride[1];
          const float* wt = &w[t * K];
          float sum = bias[t];
          // Shift left by one while summing...
          for (int64_t k = 0; k + 1 < K; ++k) {
            row[k * sk] = row[(k + 1) * sk];
            sum += E::load(&row[k * sk]) * wt[k];
          }
          // ...then append x and read it back, so that a 16-bit state gives the
          // conv the same rounded input now as in the K - 1 steps to come.
          T* last = &row[(K - 1) * sk];
          E::store(last, load_float(p.x, p.x_dtype, bi * p.x_stride[0] + ci * p.x_stride[1]));
          acc[t] = sum + E::load(last) * wt[K - 1];
        }
        if (p.silu)
          for (int64_t t = 0; t < kTile; ++t) acc[t] = silu(acc[t]);
        for (int64_t t = 0; t < nc; ++t) store_float(p.out, p.x_dtype, bi * C + c0 + t, acc[t]);
      }
    }
  }
}

// One task of the SSM step: batch row bi, channels [c0, c0 + kTile). scratch
// holds 4 Np floats, zero on the first call: the B, C, A and h rows, padded
// to Np; the padding lanes have A = B = C = 0, so they hold 0 and add nothing
// to y.
void ssm_task(const SelectiveStateUpdateParams& p, int64_t bi, int64_t c0, float* scratch) {
  const int64_t N = p.dstate, Np = round_up(N, kLanes), dim = p.dim, nc = std::min(kTile, dim - c0);
  const int64_t sn = p.state_stride[2], an = p.A_stride[1];
  float* b = scratch;
  float* c = b + Np;
  float* a = c + Np;
  float* h = a + Np;
  for (int64_t n = 0; n < N; ++n) {
    b[n] = load_float(p.B, p.B_dtype, bi * p.B_stride[0] + n * p.B_stride[1]);
    c[n] = load_float(p.C, p.C_dtype, bi * p.C_stride[0] + n * p.C_stride[1]);
  }
  // The tile's scalars, then their nonlinearities as whole-tile vector loops.
  float xs[kTile] = {}, delta[kTile] = {}, gate[kTile] = {};
  for (int64_t t = 0; t < nc; ++t) {
    const int64_t ci = c0 + t;
    xs[t] = load_float(p.x, p.x_dtype, bi * p.x_stride[0] + ci * p.x_stride[1]);
    delta[t] = load_float(p.dt, p.dt_dtype, bi * p.dt_stride[0] + ci * p.dt_stride[1]);
    if (p.dt_bias) delta[t] += p.dt_bias[ci * p.dt_bias_stride];
    if (p.z) gate[t] = load_float(p.z, p.z_dtype, bi * p.z_stride[0] + ci * p.z_stride[1]);
  }
  if (p.dt_softplus)
    for (int64_t t = 0; t < kTile; ++t) delta[t] = softplus(delta[t]);
  if (p.z)
    for (int64_t t = 0; t < kTile; ++t) gate[t] = silu(gate[t]);

  for (int64_t t = 0; t < nc; ++t) {
    const int64_t ci = c0 + t;
    const float dt = delta[t], dx = dt * xs[t];
    float* state = p.state + bi * p.state_stride[0] + ci * p.state_stride[1];
    const float* A = p.A + ci * p.A_stride[0];
    for (int64_t n = 0; n < N; ++n) {
      h[n] = state[n * sn];
      a[n] = A[n * an];
    }
    // A non-finite Δ or x can leave NaN in the padding; reset it per channel.
    for (int64_t n = N; n < Np; ++n) h[n] = 0.0f;
    for (int64_t n = 0; n < Np; ++n) h[n] = exp_poly(dt * a[n]) * h[n] + dx * b[n];
    float part[kLanes] = {};
    for (int64_t n0 = 0; n0 < Np; n0 += kLanes)
      for (int j = 0; j < kLanes; ++j) part[j] += c[n0 + j] * h[n0 + j];
    for (int64_t n = 0; n < N; ++n) state[n * sn] = h[n];
    float y = ((part[0] + part[4]) + (part[1] + part[5])) + ((part[2] + part[6]) + (part[3] + part[7]));
    if (p.D) y += p.D[ci * p.D_stride] * xs[t];
    if (p.z) y *= gate[t];
    store_float(p.out, p.x_dtype, bi * dim + ci, y);
  }
}

}  // namespace

void causal_conv1d_update_cpu(const CausalConv1dUpdateParams& p) {
  const char* fn = "causal_conv1d_update_cpu";
  require_kernel_dtype(p.state_dtype, fn, "conv_state");
  require_kernel_dtype(p.x_dtype, fn, "x");
  require_kernel_dtype(p.weight_dtype, fn, "weight");
  if (p.bias) require_kernel_dtype(p.bias_dtype, fn, "bias");
  const int64_t C = p.channels, K = p.width;
  if (p.batch == 0 || C == 0 || K == 0) return;
  dispatch_dtype(p.state_dtype, [&](auto tag) { conv_update<decltype(tag)>(p); });
}

void selective_state_update_cpu(const SelectiveStateUpdateParams& p) {
  const char* fn = "selective_state_update_cpu";
  require_kernel_dtype(p.x_dtype, fn, "x");
  require_kernel_dtype(p.dt_dtype, fn, "dt");
  require_kernel_dtype(p.B_dtype, fn, "B");
  require_kernel_dtype(p.C_dtype, fn, "C");
  if (p.z) require_kernel_dtype(p.z_dtype, fn, "z");
  const int64_t N = p.dstate, dim = p.dim;
  if (p.batch == 0 || dim == 0 || N == 0) return;
  const int64_t tiles = (dim + kTile - 1) / kTile, tasks = p.batch * tiles;
#pragma omp parallel if (p.batch * dim * N >= kParallelWork)
  {
    std::vector<float> scratch(4 * round_up(N, kLanes), 0.0f);
#pragma omp for schedule(static)
    for (int64_t task = 0; task < tasks; ++task) ssm_task(p, task / tiles, (task % tiles) * kTile, scratch.data());
  }
}

}  // namespace ssmlab

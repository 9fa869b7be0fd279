// CPU selective scan (Mamba's S6), fused forward and chunk-recomputing backward.
//
// Forward: one pass per (batch, dim) row. For each block of kChunk steps the
// row's inputs are staged into small float tiles (Δ, Δu, and B_t, C_t turned
// time-major), then each step updates the N-vector state h in place (it stays
// in L1 cache), contracts it with C_t, adds D u and applies the z gate. The
// state at the end of every block is written to chunk_states.
//
// Backward: rows are walked block by block from the end. Each block's states
// are recomputed from the stored state at the end of the previous block, into
// a kChunk x N tile, then the adjoint recurrence runs backwards through it:
//   g_t = dL/dh_t = gy_t C_t + exp(Δ_{t+1} A) g_{t+1}     (g_{L-1} gets dL/dh_L too)
// so the backward holds O(kChunk N) floats per thread, never h for every step.
//
// Determinism: every output element is a sum taken in a fixed order that does
// not depend on the thread count. Reductions over rows (grad of A, D, Δ-bias,
// time-invariant B/C, and input-dependent B/C shared by the rows of a group)
// are written per row or per fixed slice of rows into the workspace and summed
// in index order afterwards; there are no atomics.
#include <algorithm>
#include <cmath>
#include <cstring>
#include <stdexcept>
#include <vector>

#include "ssmlab/selective_scan.h"

namespace ssmlab {
namespace {

constexpr int64_t kChunk = 64;   // steps per recomputation block
constexpr int64_t kSlices = 8;   // row slices per (batch, group) for the B/C gradients

using P = SelectiveScanParams;

// exp(x) for the inner loops, written branch-free so that the compiler can
// vectorise it: Cody–Waite reduction x = k ln2 + r, a degree-6 polynomial for
// exp(r) on |r| <= ln2/2 (relative error ~2e-7), and 2^k built in the
// exponent bits. Inputs are clamped to float's normal range.
inline float fast_exp(float x) {
  x = std::min(std::max(x, -87.0f), 88.0f);
  const float t = x * 1.44269504088896341f;
  const int k = static_cast<int>(t + (t >= 0.0f ? 0.5f : -0.5f));
  const float kf = static_cast<float>(k);
  const float r = (x - kf * 0.693359375f) + kf * 2.12194440e-4f;
  float q = 1.9875691500e-4f;
  q = q * r + 1.3981999507e-3f;
  q = q * r + 8.3334519073e-3f;
  q = q * r + 4.1665795894e-2f;
  q = q * r + 1.6666665459e-1f;
  q = q * r + 5.0000001201e-1f;
  const float e = q * r * r + r + 1.0f;
  float scale;
  const int bits = (k + 127) << 23;
  std::memcpy(&scale, &bits, sizeof(float));
  return e * scale;
}

// log(1 + w) for w in [0, 1], branch-free: 1 + w = 2^e (1 + f) with e in {0, 1}
// and f in [sqrt(1/2) - 1, sqrt(2) - 1], then the Cephes logf polynomial in f.
// For e = 0, f = w exactly, so small w keep their relative accuracy.
inline float log1p_unit(float w) {
  const bool big = w > 0.41421356f;
  const float f = big ? 0.5f * (w - 1.0f) : w;
  const float e = big ? 1.0f : 0.0f;
  float y = 7.0376836292e-2f;
  y = y * f - 1.1514610310e-1f;
  y = y * f + 1.1676998740e-1f;
  y = y * f - 1.2420140846e-1f;
  y = y * f + 1.4249322787e-1f;
  y = y * f - 1.6668057665e-1f;
  y = y * f + 2.0000714765e-1f;
  y = y * f - 2.4999993993e-1f;
  y = y * f + 3.3333331174e-1f;
  const float z = f * f;
  y = y * z * f - 2.12194440e-4f * e - 0.5f * z;
  return f + y + 0.693359375f * e;
}

// softplus with PyTorch's threshold (identity above 20), as
// max(x, 0) + log(1 + exp(-|x|)) so that nothing overflows; and sigmoid.
inline float softplus(float x) {
  const float sp = std::max(x, 0.0f) + log1p_unit(fast_exp(-std::fabs(x)));
  return x > 20.0f ? x : sp;
}
inline float sigmoid(float x) { return 1.0f / (1.0f + fast_exp(-x)); }
inline float softplus_grad(float x) { return x > 20.0f ? 1.0f : sigmoid(x); }

int64_t n_chunks(const P& p) { return (p.length + kChunk - 1) / kChunk; }
int64_t n_slices(const P& p) { return std::min<int64_t>(kSlices, p.dim / p.groups); }

// Per-thread staging of one block of one row.
struct Tiles {
  std::vector<float> x, dt, dsp, u, z, zsig, B, C, h, H, dA, gB, gC;
  explicit Tiles(int64_t N, bool backward)
      : x(kChunk), dt(kChunk), dsp(kChunk), u(kChunk), z(kChunk), zsig(kChunk), B(kChunk * N), C(kChunk * N), h(N) {
    if (backward) {
      H.resize(kChunk * N);
      dA.resize(kChunk * N);
      gB.resize(kChunk * N);
      gC.resize(kChunk * N);
    }
  }
};

// Pointers of one (batch b, dim d) row.
template <typename T>
struct Row {
  const T *u, *delta, *z, *B, *C;
  const float *A, *Bc, *Cc;  // A row, and the time-invariant B/C rows
  float D, bias;
  Row(const P& p, int64_t b, int64_t d) {
    const int64_t g = d / (p.dim / p.groups), N = p.dstate;
    u = static_cast<const T*>(p.u) + b * p.u_stride[0] + d * p.u_stride[1];
    delta = static_cast<const T*>(p.delta) + b * p.delta_stride[0] + d * p.delta_stride[1];
    z = p.z ? static_cast<const T*>(p.z) + b * p.z_stride[0] + d * p.z_stride[1] : nullptr;
    B = p.is_variable_B ? static_cast<const T*>(p.B) + b * p.B_stride[0] + g * p.B_stride[1] : nullptr;
    C = p.is_variable_C ? static_cast<const T*>(p.C) + b * p.C_stride[0] + g * p.C_stride[1] : nullptr;
    A = p.A + d * N;
    Bc = p.is_variable_B ? nullptr : static_cast<const float*>(p.B) + d * N;
    Cc = p.is_variable_C ? nullptr : static_cast<const float*>(p.C) + d * N;
    D = p.D ? p.D[d] : 0.0f;
    bias = p.delta_bias ? p.delta_bias[d] : 0.0f;
  }
};

// Stages steps [t0, t0 + len) of a row: Δ before/after softplus, u, and the
// input-dependent B_t, C_t transposed to time-major (len x N).
template <typename T>
void stage(const P& p, const Row<T>& row, int64_t t0, int64_t len, Tiles& w) {
  using E = Elem<T>;
  const int64_t N = p.dstate;
  for (int64_t t = 0; t < len; ++t) {
    w.x[t] = float(E::load(row.delta + t0 + t)) + row.bias;
    w.u[t] = float(E::load(row.u + t0 + t));
  }
  // Transcendentals per step, in separate loops so that they vectorise.
  if (p.delta_softplus) {
#pragma omp simd
    for (int64_t t = 0; t < len; ++t) {
      w.dt[t] = softplus(w.x[t]);
      w.dsp[t] = softplus_grad(w.x[t]);
    }
  } else {
    std::copy(w.x.begin(), w.x.begin() + len, w.dt.begin());
  }
  if (row.z) {
    for (int64_t t = 0; t < len; ++t) w.z[t] = float(E::load(row.z + t0 + t));
#pragma omp simd
    for (int64_t t = 0; t < len; ++t) w.zsig[t] = sigmoid(w.z[t]);
  }
  if (row.B)
    for (int64_t n = 0; n < N; ++n)
      for (int64_t t = 0; t < len; ++t) w.B[t * N + n] = float(E::load(row.B + n * p.B_stride[2] + t0 + t));
  if (row.C)
    for (int64_t n = 0; n < N; ++n)
      for (int64_t t = 0; t < len; ++t) w.C[t * N + n] = float(E::load(row.C + n * p.C_stride[2] + t0 + t));
}

// One step of the recurrence on the state h (length N); returns C_t . h_t.
// When H / dA are given, the new state and exp(Δ A) are also stored there.
inline float step(int64_t N, const float* a, float dt, float du, const float* b, const float* c, float* h,
                  float* H, float* dA) {
  float y = 0.0f;
  if (H) {
#pragma omp simd reduction(+ : y)
    for (int64_t n = 0; n < N; ++n) {
      const float e = fast_exp(dt * a[n]);
      const float hn = e * h[n] + du * b[n];
      h[n] = hn;
      H[n] = hn;
      dA[n] = e;
      y += c[n] * hn;
    }
  } else {
#pragma omp simd reduction(+ : y)
    for (int64_t n = 0; n < N; ++n) {
      const float hn = fast_exp(dt * a[n]) * h[n] + du * b[n];
      h[n] = hn;
      y += c[n] * hn;
    }
  }
  return y;
}


template <typename T>
void fwd(const P& p) {
  using E = Elem<T>;
  const int64_t N = p.dstate, L = p.length, rows = p.batch * p.dim, nch = n_chunks(p);
#pragma omp parallel
  {
    Tiles w(N, false);
#pragma omp for schedule(static)
    for (int64_t r = 0; r < rows; ++r) {
      const int64_t bi = r / p.dim, di = r % p.dim;
      const Row<T> row(p, bi, di);
      T* out = static_cast<T*>(p.out) + bi * p.out_stride[0] + di * p.out_stride[1];
      float* h = w.h.data();
      for (int64_t n = 0; n < N; ++n) h[n] = p.h0 ? p.h0[r * N + n] : 0.0f;
      for (int64_t c = 0; c < nch; ++c) {
        const int64_t t0 = c * kChunk, len = std::min(kChunk, L - t0);
        stage(p, row, t0, len, w);
        for (int64_t t = 0; t < len; ++t) {
          const float* b = row.B ? &w.B[t * N] : row.Bc;
          const float* cc = row.C ? &w.C[t * N] : row.Cc;
          float y = step(N, row.A, w.dt[t], w.dt[t] * w.u[t], b, cc, h, nullptr, nullptr) + row.D * w.u[t];
          if (row.z) y *= w.z[t] * w.zsig[t];
          E::store(out + t0 + t, y);
        }
        if (p.chunk_states) std::copy(h, h + N, p.chunk_states + (r * nch + c) * N);
      }
      if (p.last_state) std::copy(h, h + N, p.last_state + r * N);
    }
  }
}

// Workspace layout (floats): per-row partial sums, then per-slice B/C sums.
struct Workspace {
  float *gA, *gB, *gC, *gD, *gbias, *gBs, *gCs;
  static size_t floats(const P& p, float** out = nullptr, float* base = nullptr) {
    const int64_t rows = p.batch * p.dim, N = p.dstate;
    const int64_t slice = p.batch * p.groups * n_slices(p) * N * p.length;
    const int64_t sizes[7] = {rows * N,
                              p.is_variable_B ? 0 : rows * N,
                              p.is_variable_C ? 0 : rows * N,
                              rows,
                              rows,
                              p.is_variable_B ? slice : 0,
                              p.is_variable_C ? slice : 0};
    size_t off = 0;
    for (int i = 0; i < 7; ++i) {
      if (out) out[i] = base + off;
      off += size_t(sizes[i]);
    }
    return off;
  }
  explicit Workspace(const P& p) {
    float* ptrs[7];
    floats(p, ptrs, static_cast<float*>(p.workspace));
    gA = ptrs[0], gB = ptrs[1], gC = ptrs[2], gD = ptrs[3], gbias = ptrs[4], gBs = ptrs[5], gCs = ptrs[6];
  }
};

// Backward of one row. gBs / gCs: this row's slice of the input-dependent
// B/C gradient sums (N x L), added to in place.
template <typename T>
void bwd_row(const P& p, int64_t bi, int64_t di, Tiles& w, const Workspace& ws, float* gBs, float* gCs) {
  using E = Elem<T>;
  const int64_t N = p.dstate, L = p.length, nch = n_chunks(p), r = bi * p.dim + di;
  const Row<T> row(p, bi, di);
  const int64_t goff = r * L;  // grad_out and the gradients are contiguous
  const T* gout = static_cast<const T*>(p.grad_out) + goff;
  T* gu = static_cast<T*>(p.grad_u) + goff;
  T* gdelta = static_cast<T*>(p.grad_delta) + goff;
  T* gz = p.grad_z ? static_cast<T*>(p.grad_z) + goff : nullptr;

  std::vector<float> carry(N), gA(N, 0.0f), gBc(N, 0.0f), gCc(N, 0.0f), ys(kChunk);
  for (int64_t n = 0; n < N; ++n) carry[n] = p.grad_last_state ? p.grad_last_state[r * N + n] : 0.0f;
  float gD = 0.0f, gbias = 0.0f;
  std::vector<float> zeros(N, 0.0f);

  for (int64_t c = nch - 1; c >= 0; --c) {
    const int64_t t0 = c * kChunk, len = std::min(kChunk, L - t0);
    stage(p, row, t0, len, w);
    const float* hstart = c > 0 ? p.chunk_states + (r * nch + c - 1) * N : (p.h0 ? p.h0 + r * N : zeros.data());
    std::copy(hstart, hstart + N, w.h.data());
    for (int64_t t = 0; t < len; ++t) {  // recompute the block's states
      const float* b = row.B ? &w.B[t * N] : row.Bc;
      const float* cc = row.C ? &w.C[t * N] : row.Cc;
      ys[t] = step(N, row.A, w.dt[t], w.dt[t] * w.u[t], b, cc, w.h.data(), &w.H[t * N], &w.dA[t * N]) +
              row.D * w.u[t];
    }
    for (int64_t t = len - 1; t >= 0; --t) {  // adjoint, backwards in time
      float gy = float(E::load(gout + t0 + t));
      if (row.z) {
        const float zz = w.z[t], s = w.zsig[t];
        if (gz) E::store(gz + t0 + t, gy * ys[t] * s * (1.0f + zz * (1.0f - s)));
        gy *= zz * s;
      }
      const float u = w.u[t], dt = w.dt[t];
      gD += gy * u;
      const float* b = row.B ? &w.B[t * N] : row.Bc;
      const float* cc = row.C ? &w.C[t * N] : row.Cc;
      const float* H = &w.H[t * N];
      const float* Hp = t > 0 ? &w.H[(t - 1) * N] : hstart;
      const float* dA = &w.dA[t * N];
      float* gb = row.B ? &w.gB[t * N] : gBc.data();
      float* gc = row.C ? &w.gC[t * N] : gCc.data();
      const bool accB = !row.B, accC = !row.C;
      float g_dt = 0.0f, g_bsum = 0.0f;
#pragma omp simd reduction(+ : g_dt, g_bsum)
      for (int64_t n = 0; n < N; ++n) {
        const float g = gy * cc[n] + carry[n];  // dL/dh_t
        const float gdA = g * Hp[n] * dA[n];    // dL/d(Δ A_n)
        gA[n] += gdA * dt;
        g_dt += gdA * row.A[n];
        g_bsum += g * b[n];
        const float gbn = g * dt * u, gcn = gy * H[n];
        gb[n] = accB ? gb[n] + gbn : gbn;
        gc[n] = accC ? gc[n] + gcn : gcn;
        carry[n] = dA[n] * g;
      }
      g_dt += g_bsum * u;
      E::store(gu + t0 + t, gy * row.D + g_bsum * dt);
      const float gx = p.delta_softplus ? g_dt * w.dsp[t] : g_dt;
      E::store(gdelta + t0 + t, gx);
      gbias += gx;
    }
    if (row.B)
      for (int64_t n = 0; n < N; ++n)
        for (int64_t t = 0; t < len; ++t) gBs[n * L + t0 + t] += w.gB[t * N + n];
    if (row.C)
      for (int64_t n = 0; n < N; ++n)
        for (int64_t t = 0; t < len; ++t) gCs[n * L + t0 + t] += w.gC[t * N + n];
  }
  if (p.grad_h0) std::copy(carry.begin(), carry.end(), p.grad_h0 + r * N);
  std::copy(gA.begin(), gA.end(), ws.gA + r * N);
  if (ws.gB != nullptr && !row.B) std::copy(gBc.begin(), gBc.end(), ws.gB + r * N);
  if (ws.gC != nullptr && !row.C) std::copy(gCc.begin(), gCc.end(), ws.gC + r * N);
  ws.gD[r] = gD;
  ws.gbias[r] = gbias;
}

template <typename T>
void bwd(const P& p) {
  const int64_t N = p.dstate, L = p.length, dpg = p.dim / p.groups, S = n_slices(p);
  const int64_t tasks = p.batch * p.groups * S;
  const Workspace ws(p);
#pragma omp parallel
  {
    Tiles w(N, true);
    // Task (b, g, s) owns rows d in a fixed slice of group g, walked in order,
    // and the slice's private sums of the input-dependent B/C gradients.
#pragma omp for schedule(static)
    for (int64_t task = 0; task < tasks; ++task) {
      const int64_t s = task % S, g = (task / S) % p.groups, bi = task / (S * p.groups);
      float* gBs = p.is_variable_B ? ws.gBs + task * N * L : nullptr;
      float* gCs = p.is_variable_C ? ws.gCs + task * N * L : nullptr;
      if (gBs) std::fill(gBs, gBs + N * L, 0.0f);
      if (gCs) std::fill(gCs, gCs + N * L, 0.0f);
      const int64_t lo = g * dpg + s * dpg / S, hi = g * dpg + (s + 1) * dpg / S;
      for (int64_t di = lo; di < hi; ++di) bwd_row<T>(p, bi, di, w, ws, gBs, gCs);
    }
    // Fixed-order reductions over batch (per dim) and over slices (per B/C element).
#pragma omp for schedule(static)
    for (int64_t di = 0; di < p.dim; ++di) {
      for (int64_t n = 0; n < N; ++n) {
        float a = 0.0f, b = 0.0f, c = 0.0f;
        for (int64_t bi = 0; bi < p.batch; ++bi) {
          const int64_t i = (bi * p.dim + di) * N + n;
          a += ws.gA[i];
          if (!p.is_variable_B) b += ws.gB[i];
          if (!p.is_variable_C) c += ws.gC[i];
        }
        p.grad_A[di * N + n] = a;
        if (!p.is_variable_B) p.grad_B[di * N + n] = b;
        if (!p.is_variable_C) p.grad_C[di * N + n] = c;
      }
      float gd = 0.0f, gb = 0.0f;
      for (int64_t bi = 0; bi < p.batch; ++bi) {
        gd += ws.gD[bi * p.dim + di];
        gb += ws.gbias[bi * p.dim + di];
      }
      if (p.grad_D) p.grad_D[di] = gd;
      if (p.grad_delta_bias) p.grad_delta_bias[di] = gb;
    }
    // grad_B / grad_C (input-dependent) are contiguous (batch, groups, N, L).
    const int64_t bg = p.batch * p.groups;
    for (int which = 0; which < 2; ++which) {
      const bool var = which == 0 ? p.is_variable_B : p.is_variable_C;
      if (!var) continue;
      const float* src = which == 0 ? ws.gBs : ws.gCs;
      float* dst = which == 0 ? p.grad_B : p.grad_C;
#pragma omp for schedule(static)
      for (int64_t i = 0; i < bg * N; ++i) {
        const int64_t k = i / N, n = i % N;
        float* o = dst + i * L;
        const float* s0 = src + (k * S) * N * L + n * L;
        std::copy(s0, s0 + L, o);
        for (int64_t s = 1; s < S; ++s) {
          const float* ss = s0 + s * N * L;
          for (int64_t t = 0; t < L; ++t) o[t] += ss[t];
        }
      }
    }
  }
}

void check(const P& p) {
  if (p.dtype == DType::kFloat64)
    throw std::invalid_argument("selective_scan (cpu): float64 inputs are not supported by the native kernel");
  if (p.groups <= 0 || p.dim % p.groups != 0) throw std::invalid_argument("selective_scan (cpu): groups must divide dim");
}

}  // namespace

void selective_scan_fwd_cpu(const SelectiveScanParams& p) {
  check(p);
  dispatch_dtype(p.dtype, [&](auto tag) { fwd<decltype(tag)>(p); });
}

void selective_scan_bwd_cpu(const SelectiveScanParams& p) {
  check(p);
  if (!p.chunk_states && p.length > kChunk)
    throw std::invalid_argument("selective_scan_bwd_cpu: chunk_states from the forward are required");
  if (!p.workspace && selective_scan_bwd_workspace_bytes_cpu(p) > 0)
    throw std::invalid_argument("selective_scan_bwd_cpu: workspace is null");
  dispatch_dtype(p.dtype, [&](auto tag) { bwd<decltype(tag)>(p); });
}

int64_t selective_scan_chunk_len_cpu() { return kChunk; }

size_t selective_scan_bwd_workspace_bytes_cpu(const SelectiveScanParams& p) {
  if (p.groups <= 0 || p.dim % p.groups != 0) return 0;
  return Workspace::floats(p) * sizeof(float);
}

}  // namespace ssmlab

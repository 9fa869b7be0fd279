// CPU selective scan (Mamba's S6), fused forward and chunk-recomputing backward,
// vectorised over the state dimension N.
//
// Layout of the work. The N states of a row are padded to Np = 8 ceil(N / 8)
// (zero A, B, C and h0 in the padding, which therefore stays exactly zero and
// contributes nothing) and processed as 8-float vectors in register blocks of
// up to kMaxNV vectors; the inner loops are templates on the block size, so a
// block's state, A row and gradient accumulators live in registers, and a
// larger N is a sequence of blocks. Each thread takes tasks of one (batch,
// group) and a run of channels of that group. Time is cut into blocks of
// kChunk steps (the recomputation unit) and blocks are grouped into visits of
// up to kMaxVisit blocks: the input-dependent B_t, C_t of a visit are turned
// time-major (visit steps x Np floats) once per task and shared by all the
// task's channels, and each channel then runs through the whole visit (long,
// prefetched accesses to its rows). Per channel and block, Δ (bias +
// softplus), Δu, sigmoid(z) and the like are computed 8 steps at a time,
// outside the N loop.
//
// Forward: per step h = exp(Δ A) h + Δu B_t, and the 8 partial sums of C_t . h
// per step are reduced 8 steps at a time (an 8 x 8 transpose-add), then
// y = C_t . h + D u, times silu(z). The state at the end of every block is
// written to chunk_states.
//
// Backward: blocks are walked from the end. For each channel the block's
// states are recomputed from the stored state at the end of the previous
// block, keeping X_t = exp(Δ_t A) h_{t-1} and exp(Δ_t A) per step (2 kChunk Np
// floats); the gradient of C_t (gy_t h_t) is taken on the way. Then the
// adjoint recurrence runs backwards,
//   g_t = dL/dh_t = gy_t C_t + exp(Δ_{t+1} A) g_{t+1}     (g_{L-1} gets dL/dh_L too)
// giving dA += g X Δ, dB_t = g Δu, and per step Σ_n g X A and Σ_n g B (for
// dΔ and du). The backward holds O(kChunk Np) floats per thread (plus the
// visit's B/C tiles and O(Np) per channel of its task), never h for every step.
//
// Determinism: every output element is a sum taken in a fixed order that does
// not depend on the thread count or the schedule. Reductions over rows (grad
// of A, D, Δ-bias, time-invariant B/C) are written per row into the workspace
// and summed in index order afterwards; the input-dependent B/C gradients,
// shared by the channels of a group, are summed per fixed slice of channels
// (channel order) into the workspace (slice 0 straight into grad_B / grad_C)
// and then over slices in order. No atomics. The result does depend on the
// instruction set (FMA contraction, see below), which is fixed per machine.
//
// Instruction sets: this file is compiled twice. As itself it is the portable
// build (8-float vectors written with GCC/Clang vector extensions, plain arrays
// elsewhere) plus the public entry points. selective_scan_cpu_avx2.cpp
// includes it again with SSMLAB_SS_AVX2_TU on x86-64 GCC/Clang, where the
// kernels (everything after the headers) are compiled under
// target("avx2,fma"); the entry points run those when the CPU has AVX2 and
// FMA. No special compiler flags are needed. SSMLAB_SELECTIVE_SCAN_ISA=portable
// in the environment forces the portable kernels (for testing).
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <new>
#include <stdexcept>
#include <type_traits>
#include <vector>

#include "ssmlab/selective_scan.h"

// The AVX2+FMA build exists on x86-64 with GCC or Clang (target pragmas).
#if (defined(__x86_64__) || defined(_M_X64)) && defined(__GNUC__) && !defined(SSMLAB_SS_NO_AVX2)
#define SSMLAB_SS_HAVE_AVX2 1
#endif

#if defined(SSMLAB_SS_AVX2_TU)
#if !defined(SSMLAB_SS_HAVE_AVX2)
#error "selective_scan_cpu_avx2.cpp includes this file only where SSMLAB_SS_HAVE_AVX2 holds"
#endif
#include <immintrin.h>
// Everything from here to the end of the kernels is compiled for AVX2+FMA;
// the headers above are not, so no inline function shared with other files
// (std::, ssmlab/dtype.h) gets an AVX2 body that the linker could pick for a
// CPU without AVX2.
#if defined(__clang__)
#pragma clang attribute push(__attribute__((target("avx2,fma"))), apply_to = function)
#else
#pragma GCC push_options
#pragma GCC target("avx2,fma")
#endif
#define SSMLAB_SS_ISA ss_avx2
#else
#define SSMLAB_SS_ISA ss_portable
#endif

#if defined(__GNUC__)
#define SSMLAB_SS_PRAGMA(x) _Pragma(#x)
#define SSMLAB_SS_UNROLL SSMLAB_SS_PRAGMA(GCC unroll 8)
#define SSMLAB_SS_INLINE inline __attribute__((always_inline))
#else
#define SSMLAB_SS_UNROLL
#define SSMLAB_SS_INLINE inline
#endif

namespace ssmlab {
namespace SSMLAB_SS_ISA {
namespace {

constexpr int64_t kChunk = 64;    // steps per recomputation block
constexpr int64_t kSlices = 8;    // row slices per (batch, group) for the B/C gradients
constexpr int64_t kFwdRows = 16;  // channels per forward task (they share the staged B/C)
constexpr int kW = 8;             // floats per vector
// Vectors per register block of the state: 4 (32 states) in AVX2's 16
// registers of 8 floats; 2 where a vector takes two 4-float registers.
#if defined(SSMLAB_SS_AVX2_TU)
constexpr int kMaxNV = 4;
#else
constexpr int kMaxNV = 2;
#endif
constexpr int64_t kVisitFloats = 8192;  // per staged B/C tile
constexpr int64_t kMaxVisit = 8;         // blocks per visit at most

using P = SelectiveScanParams;

// ---------------------------------------------------------------------------
// 8-float vectors.
#if defined(SSMLAB_SS_AVX2_TU)
struct V {
  __m256 r;
};
SSMLAB_SS_INLINE V vset(float x) { return {_mm256_set1_ps(x)}; }
SSMLAB_SS_INLINE V vzero() { return {_mm256_setzero_ps()}; }
SSMLAB_SS_INLINE V vload(const float* p) { return {_mm256_loadu_ps(p)}; }
SSMLAB_SS_INLINE void vstore(float* p, V a) { _mm256_storeu_ps(p, a.r); }
SSMLAB_SS_INLINE V operator+(V a, V b) { return {_mm256_add_ps(a.r, b.r)}; }
SSMLAB_SS_INLINE V operator-(V a, V b) { return {_mm256_sub_ps(a.r, b.r)}; }
SSMLAB_SS_INLINE V operator*(V a, V b) { return {_mm256_mul_ps(a.r, b.r)}; }
SSMLAB_SS_INLINE V vfma(V a, V b, V c) { return {_mm256_fmadd_ps(a.r, b.r, c.r)}; }   // a b + c
SSMLAB_SS_INLINE V vfnma(V a, V b, V c) { return {_mm256_fnmadd_ps(a.r, b.r, c.r)}; }  // c - a b
// min(max(x, lo), hi), letting NaN through.
SSMLAB_SS_INLINE V vclamp(V x, float lo, float hi) {
  return {_mm256_min_ps(_mm256_set1_ps(hi), _mm256_max_ps(_mm256_set1_ps(lo), x.r))};
}
SSMLAB_SS_INLINE V operator/(V a, V b) { return {_mm256_div_ps(a.r, b.r)}; }
SSMLAB_SS_INLINE V vmax(V a, V b) { return {_mm256_max_ps(a.r, b.r)}; }
// a > b ? x : y, per lane.
SSMLAB_SS_INLINE V vsel_gt(V a, V b, V x, V y) {
  return {_mm256_blendv_ps(y.r, x.r, _mm256_cmp_ps(a.r, b.r, _CMP_GT_OQ))};
}
// The float whose bits are those of t shifted left by 23 (2^k from t = magic + k).
SSMLAB_SS_INLINE V vshl23(V t) { return {_mm256_castsi256_ps(_mm256_slli_epi32(_mm256_castps_si256(t.r), 23))}; }
// out[i] = the sum of row i of the 8 x 8 block m (row-major), as
// ((m0 + m1) + (m2 + m3)) + ((m4 + m5) + (m6 + m7)).
SSMLAB_SS_INLINE void rowsums8(const float* m, float* out) {
  const __m256 a0 = _mm256_hadd_ps(_mm256_loadu_ps(m), _mm256_loadu_ps(m + 8));
  const __m256 a1 = _mm256_hadd_ps(_mm256_loadu_ps(m + 16), _mm256_loadu_ps(m + 24));
  const __m256 a2 = _mm256_hadd_ps(_mm256_loadu_ps(m + 32), _mm256_loadu_ps(m + 40));
  const __m256 a3 = _mm256_hadd_ps(_mm256_loadu_ps(m + 48), _mm256_loadu_ps(m + 56));
  const __m256 b0 = _mm256_hadd_ps(a0, a1), b1 = _mm256_hadd_ps(a2, a3);
  _mm256_storeu_ps(out, _mm256_add_ps(_mm256_permute2f128_ps(b0, b1, 0x20), _mm256_permute2f128_ps(b0, b1, 0x31)));
}
// dst[i ds + j] = src[j ss + i] for i, j < 8.
SSMLAB_SS_INLINE void transpose8(const float* src, int64_t ss, float* dst, int64_t ds) {
  __m256 r[8], t[8], q[8];
  for (int i = 0; i < 8; ++i) r[i] = _mm256_loadu_ps(src + i * ss);
  for (int i = 0; i < 8; i += 2) {
    t[i] = _mm256_unpacklo_ps(r[i], r[i + 1]);
    t[i + 1] = _mm256_unpackhi_ps(r[i], r[i + 1]);
  }
  for (int i = 0; i < 8; i += 4) {
    q[i] = _mm256_shuffle_ps(t[i], t[i + 2], 0x44);
    q[i + 1] = _mm256_shuffle_ps(t[i], t[i + 2], 0xEE);
    q[i + 2] = _mm256_shuffle_ps(t[i + 1], t[i + 3], 0x44);
    q[i + 3] = _mm256_shuffle_ps(t[i + 1], t[i + 3], 0xEE);
  }
  for (int i = 0; i < 4; ++i) {
    _mm256_storeu_ps(dst + i * ds, _mm256_permute2f128_ps(q[i], q[i + 4], 0x20));
    _mm256_storeu_ps(dst + (i + 4) * ds, _mm256_permute2f128_ps(q[i], q[i + 4], 0x31));
  }
}
#elif defined(__GNUC__)
// Two 4-float halves: SSE2 / NEON registers, no 32-byte vector ABI question.
typedef float f4 __attribute__((vector_size(16)));
typedef int32_t i4 __attribute__((vector_size(16)));
struct V {
  f4 a, b;
};
SSMLAB_SS_INLINE V vset(float x) { return {f4{x, x, x, x}, f4{x, x, x, x}}; }
SSMLAB_SS_INLINE V vzero() { return vset(0.0f); }
SSMLAB_SS_INLINE V vload(const float* p) {
  V v;
  std::memcpy(&v.a, p, 16);
  std::memcpy(&v.b, p + 4, 16);
  return v;
}
SSMLAB_SS_INLINE void vstore(float* p, V v) {
  std::memcpy(p, &v.a, 16);
  std::memcpy(p + 4, &v.b, 16);
}
SSMLAB_SS_INLINE V operator+(V x, V y) { return {x.a + y.a, x.b + y.b}; }
SSMLAB_SS_INLINE V operator-(V x, V y) { return {x.a - y.a, x.b - y.b}; }
SSMLAB_SS_INLINE V operator*(V x, V y) { return {x.a * y.a, x.b * y.b}; }
SSMLAB_SS_INLINE V vfma(V x, V y, V z) { return {x.a * y.a + z.a, x.b * y.b + z.b}; }
SSMLAB_SS_INLINE V vfnma(V x, V y, V z) { return {z.a - x.a * y.a, z.b - x.b * y.b}; }
SSMLAB_SS_INLINE f4 clamp4(f4 x, f4 lo, f4 hi) {
  const i4 below = x < lo, above = x > hi;  // false for NaN
  i4 r = ((i4)x & ~below) | ((i4)lo & below);
  r = (r & ~above) | ((i4)hi & above);
  return (f4)r;
}
SSMLAB_SS_INLINE V vclamp(V x, float lo, float hi) {
  const f4 l{lo, lo, lo, lo}, h{hi, hi, hi, hi};
  return {clamp4(x.a, l, h), clamp4(x.b, l, h)};
}
SSMLAB_SS_INLINE V operator/(V x, V y) { return {x.a / y.a, x.b / y.b}; }
SSMLAB_SS_INLINE f4 sel4(i4 m, f4 x, f4 y) { return (f4)(((i4)x & m) | ((i4)y & ~m)); }
SSMLAB_SS_INLINE V vmax(V x, V y) { return {sel4(x.a > y.a, x.a, y.a), sel4(x.b > y.b, x.b, y.b)}; }
SSMLAB_SS_INLINE V vsel_gt(V a, V b, V x, V y) { return {sel4(a.a > b.a, x.a, y.a), sel4(a.b > b.b, x.b, y.b)}; }
SSMLAB_SS_INLINE V vshl23(V t) { return {(f4)((i4)t.a << 23), (f4)((i4)t.b << 23)}; }
#else
struct V {
  float f[kW];
};
SSMLAB_SS_INLINE V vset(float x) {
  V v;
  for (int i = 0; i < kW; ++i) v.f[i] = x;
  return v;
}
SSMLAB_SS_INLINE V vzero() { return vset(0.0f); }
SSMLAB_SS_INLINE V vload(const float* p) {
  V v;
  std::memcpy(v.f, p, sizeof(v.f));
  return v;
}
SSMLAB_SS_INLINE void vstore(float* p, V v) { std::memcpy(p, v.f, sizeof(v.f)); }
#define SSMLAB_SS_ELEMENTWISE(expr) \
  V r;                              \
  for (int i = 0; i < kW; ++i) r.f[i] = (expr);   \
  return r;
SSMLAB_SS_INLINE V operator+(V x, V y) { SSMLAB_SS_ELEMENTWISE(x.f[i] + y.f[i]) }
SSMLAB_SS_INLINE V operator-(V x, V y) { SSMLAB_SS_ELEMENTWISE(x.f[i] - y.f[i]) }
SSMLAB_SS_INLINE V operator*(V x, V y) { SSMLAB_SS_ELEMENTWISE(x.f[i] * y.f[i]) }
SSMLAB_SS_INLINE V vfma(V x, V y, V z) { SSMLAB_SS_ELEMENTWISE(x.f[i] * y.f[i] + z.f[i]) }
SSMLAB_SS_INLINE V vfnma(V x, V y, V z) { SSMLAB_SS_ELEMENTWISE(z.f[i] - x.f[i] * y.f[i]) }
SSMLAB_SS_INLINE V operator/(V x, V y) { SSMLAB_SS_ELEMENTWISE(x.f[i] / y.f[i]) }
SSMLAB_SS_INLINE V vmax(V x, V y) { SSMLAB_SS_ELEMENTWISE(x.f[i] > y.f[i] ? x.f[i] : y.f[i]) }
SSMLAB_SS_INLINE V vsel_gt(V a, V b, V x, V y) { SSMLAB_SS_ELEMENTWISE(a.f[i] > b.f[i] ? x.f[i] : y.f[i]) }
SSMLAB_SS_INLINE V vclamp(V x, float lo, float hi) {
  SSMLAB_SS_ELEMENTWISE(x.f[i] < lo ? lo : (x.f[i] > hi ? hi : x.f[i]))
}
SSMLAB_SS_INLINE V vshl23(V t) {
  V r;
  for (int i = 0; i < kW; ++i) {
    uint32_t bits;
    std::memcpy(&bits, &t.f[i], 4);
    bits <<= 23;
    std::memcpy(&r.f[i], &bits, 4);
  }
  return r;
}
#undef SSMLAB_SS_ELEMENTWISE
#endif

#if !defined(SSMLAB_SS_AVX2_TU)
SSMLAB_SS_INLINE void transpose8(const float* src, int64_t ss, float* dst, int64_t ds) {
  for (int i = 0; i < kW; ++i)
    for (int j = 0; j < kW; ++j) dst[i * ds + j] = src[j * ss + i];
}
SSMLAB_SS_INLINE void rowsums8(const float* m, float* out) {
  for (int i = 0; i < kW; ++i) {
    const float* r = m + i * kW;
    out[i] = ((r[0] + r[1]) + (r[2] + r[3])) + ((r[4] + r[5]) + (r[6] + r[7]));
  }
}
#endif

// exp(x), 8 at a time: Cody–Waite reduction x = k ln2 + r, then
// exp(r) = 1 + r + r^2 q(r) on |r| <= ln2/2 with q of degree 4 fitted for
// minimal relative error (3e-9; 8.4e-8 with float rounding, measured over
// [-87, 88], the same as Cephes' degree 5), and 2^k built in the exponent
// bits. x is clamped to [-87, 88] (float's normal range); NaN stays NaN.
// Rounding: t = x log2(e) + (1.5 2^23 + 127) rounds to an integer whose low
// bits are k + 127, so its bits shifted left by 23 are the float 2^k.
SSMLAB_SS_INLINE V vexp(V x) {
  constexpr float kMagic = 12582912.0f + 127.0f;
  x = vclamp(x, -87.0f, 88.0f);
  const V t = vfma(x, vset(1.44269504088896341f), vset(kMagic));
  const V kf = t - vset(kMagic);
  V r = vfnma(kf, vset(0.693359375f), x);
  r = vfnma(kf, vset(-2.12194440e-4f), r);
  V q = vset(1.381461309460317e-3f);
  q = vfma(q, r, vset(8.368709961324475e-3f));
  q = vfma(q, r, vset(4.166838737387929e-2f));
  q = vfma(q, r, vset(1.6666520688656966e-1f));
  q = vfma(q, r, vset(4.999999345162604e-1f));
  const V e = vfma(q, r * r, r) + vset(1.0f);
  return e * vshl23(t);
}

// log(1 + w) for w in [0, 1]: 1 + w = 2^e (1 + f) with e in {0, 1} and f in
// [sqrt(1/2) - 1, sqrt(2) - 1], then the Cephes logf polynomial in f. For
// e = 0, f = w exactly, so small w keep their relative accuracy.
SSMLAB_SS_INLINE V vlog1p_unit(V w) {
  const V thr = vset(0.41421356f);
  const V f = vsel_gt(w, thr, vset(0.5f) * (w - vset(1.0f)), w);
  const V e = vsel_gt(w, thr, vset(1.0f), vzero());
  V y = vset(7.0376836292e-2f);
  y = vfma(y, f, vset(-1.1514610310e-1f));
  y = vfma(y, f, vset(1.1676998740e-1f));
  y = vfma(y, f, vset(-1.2420140846e-1f));
  y = vfma(y, f, vset(1.4249322787e-1f));
  y = vfma(y, f, vset(-1.6668057665e-1f));
  y = vfma(y, f, vset(2.0000714765e-1f));
  y = vfma(y, f, vset(-2.4999993993e-1f));
  y = vfma(y, f, vset(3.3333331174e-1f));
  const V z = f * f;
  y = vfnma(vset(0.5f), z, vfnma(vset(2.12194440e-4f), e, y * z * f));
  return vfma(vset(0.693359375f), e, f + y);
}

// softplus with PyTorch's threshold (identity above 20), as
// max(x, 0) + log(1 + exp(-|x|)) so that nothing overflows, and its
// derivative sigmoid(x) (1 above the threshold) from the same exp(-|x|).
SSMLAB_SS_INLINE V vsoftplus(V x, V* grad) {
  const V e = vexp(vzero() - vmax(x, vzero() - x));  // exp(-|x|)
  const V sp = vmax(x, vzero()) + vlog1p_unit(e);
  if (grad) {
    const V r = vset(1.0f) / (vset(1.0f) + e);  // sigmoid(|x|)
    *grad = vsel_gt(x, vset(20.0f), vset(1.0f), vsel_gt(vzero(), x, e * r, r));
  }
  return vsel_gt(x, vset(20.0f), x, sp);
}
SSMLAB_SS_INLINE V vsigmoid(V x) { return vset(1.0f) / (vset(1.0f) + vexp(vzero() - x)); }

// ---------------------------------------------------------------------------
// Sizes, buffers.

int64_t n_chunks(const P& p) { return (p.length + kChunk - 1) / kChunk; }
int64_t n_slices(const P& p) { return std::min<int64_t>(kSlices, p.dim / p.groups); }
int64_t padded(int64_t N) { return (N + kW - 1) / kW * kW; }
// Blocks per visit: a channel's turn runs through this many blocks in a row
// (fewer, longer row accesses), as long as a staged B/C tile (visit steps x
// Np floats) stays within kVisitFloats.
int64_t visit_chunks(int64_t Np) {
  return std::max<int64_t>(1, std::min<int64_t>(kMaxVisit, kVisitFloats / (kChunk * Np)));
}

// Zero-initialised, 64-byte aligned floats.
class Buf {
 public:
  explicit Buf(int64_t n) : n_(std::max<int64_t>(n, 1)) {
    p_ = static_cast<float*>(::operator new(size_t(n_) * sizeof(float), std::align_val_t(64)));
    std::memset(p_, 0, size_t(n_) * sizeof(float));
  }
  ~Buf() { ::operator delete(p_, std::align_val_t(64)); }
  Buf(const Buf&) = delete;
  Buf& operator=(const Buf&) = delete;
  float* get() const { return p_; }
  operator float*() const { return p_; }

 private:
  int64_t n_;
  float* p_;
};

// Copies n floats and zero-fills up to np.
inline void copy_pad(const float* src, int64_t n, int64_t np, float* dst) {
  if (src)
    std::copy(src, src + n, dst);
  else
    std::fill(dst, dst + n, 0.0f);
  std::fill(dst + n, dst + np, 0.0f);
}

// Pointers of one (batch b, dim d) row.
template <typename T>
struct Row {
  const T *u, *delta, *z;
  float D, bias;
  Row(const P& p, int64_t b, int64_t d) {
    u = static_cast<const T*>(p.u) + b * p.u_stride[0] + d * p.u_stride[1];
    delta = static_cast<const T*>(p.delta) + b * p.delta_stride[0] + d * p.delta_stride[1];
    z = p.z ? static_cast<const T*>(p.z) + b * p.z_stride[0] + d * p.z_stride[1] : nullptr;
    D = p.D ? p.D[d] : 0.0f;
    bias = p.delta_bias ? p.delta_bias[d] : 0.0f;
  }
};

// Per-step values of one block of one row (kChunk each; whole vectors are
// computed, the steps past the block's length are ignored). yp, sdt, sb: 8
// partial sums per step.
struct Steps {
  Buf xb, ub, zb, gyob, dt, dsp, du, zs, gy, y, o1, o2, o3, s1, s2, yp, sdt, sb;
  const float *x = nullptr, *u = nullptr, *z = nullptr, *gyo = nullptr;  // the row's values, or copies in xb ..
  Steps()
      : xb(kChunk), ub(kChunk), zb(kChunk), gyob(kChunk), dt(kChunk), dsp(kChunk), du(kChunk), zs(kChunk),
        gy(kChunk), y(kChunk), o1(kChunk), o2(kChunk), o3(kChunk), s1(kChunk), s2(kChunk), yp(kChunk * kW),
        sdt(kChunk * kW), sb(kChunk * kW) {}
};

// n floats of a row of T: the row itself where T is float and n is whole
// vectors, else a copy in buf.
template <typename T>
SSMLAB_SS_INLINE const float* load_steps(const T* src, int64_t n, float* buf) {
  if (std::is_same<T, float>::value) {
    if (n % kW == 0) return reinterpret_cast<const float*>(src);
    std::memcpy(buf, src, size_t(n) * sizeof(float));
  } else {
    for (int64_t t = 0; t < n; ++t) buf[t] = float(Elem<T>::load(src + t));
  }
  return buf;
}
template <typename T>
SSMLAB_SS_INLINE void store_steps(const float* src, int64_t n, T* dst) {
  if (std::is_same<T, float>::value) {
    std::memcpy(dst, src, size_t(n) * sizeof(float));
  } else {
    for (int64_t t = 0; t < n; ++t) Elem<T>::store(dst + t, src[t]);
  }
}

// Stages steps [t0, t0 + len) of a row: Δ (after bias and softplus), its
// softplus derivative (grad), u, Δu, z and sigmoid(z); and, with gout, the
// output gradient before (gyo) and after (gy) the z gate.
template <typename T>
void stage_row(const P& p, const Row<T>& row, int64_t t0, int64_t len, Steps& s, const T* gout, bool grad) {
  float *dt = s.dt, *dsp = s.dsp, *du = s.du, *zs = s.zs, *gy = s.gy;
  const float *x = s.x = load_steps(row.delta + t0, len, s.xb), *u = s.u = load_steps(row.u + t0, len, s.ub);
  const float *z = s.z = row.z ? load_steps(row.z + t0, len, s.zb) : nullptr;
  const float* gyo = s.gyo = gout ? load_steps(gout + t0, len, s.gyob) : nullptr;
  const V bias = vset(row.bias);
  for (int64_t t = 0; t < len; t += kW) {  // whole vectors: steps past len hold stale values
    const V xv = vload(x + t) + bias;
    V dtv = xv;
    if (p.delta_softplus) {
      V g;
      dtv = vsoftplus(xv, grad ? &g : nullptr);
      if (grad) vstore(dsp + t, g);
    }
    vstore(dt + t, dtv);
    vstore(du + t, dtv * vload(u + t));
    if (row.z) {
      const V zv = vload(z + t), sv = vsigmoid(zv);
      vstore(zs + t, sv);
      if (gout) vstore(gy + t, vload(gyo + t) * (zv * sv));
    } else if (gout) {
      vstore(gy + t, vload(gyo + t));
    }
  }
}

// Stages steps [t0, t0 + len) of an input-dependent B or C of one (batch,
// group), (N, L) with state stride sn, time-major into tile (len x Np; the
// padding columns are left as they are: zero).
template <typename T>
void stage_bc(const T* src, int64_t sn, int64_t N, int64_t Np, int64_t t0, int64_t len, float* tile) {
  using E = Elem<T>;
  int64_t n0 = 0;
  if (std::is_same<T, float>::value) {  // 8 x 8 blocks, then the edges
    const float* f = reinterpret_cast<const float*>(src) + t0;
    const int64_t len8 = len / kW * kW;
    for (; n0 + kW <= N; n0 += kW) {
      for (int64_t t = 0; t < len8; t += kW) transpose8(f + n0 * sn + t, sn, tile + t * Np + n0, Np);
      for (int64_t n = n0; n < n0 + kW; ++n)
        for (int64_t t = len8; t < len; ++t) tile[t * Np + n] = f[n * sn + t];
    }
  }
  for (int64_t n = n0; n < N; ++n) {
    const T* s = src + n * sn + t0;
    for (int64_t t = 0; t < len; ++t) tile[t * Np + n] = float(E::load(s + t));
  }
}

// Hints that p[t0, t0 + len) will be read soon; a no-op where unsupported.
template <typename T>
SSMLAB_SS_INLINE void prefetch(const T* p, int64_t t0, int64_t len) {
#if defined(__GNUC__)
  const char* c = reinterpret_cast<const char*>(p + t0);
  for (int64_t i = 0; i < len * int64_t(sizeof(T)); i += 64) __builtin_prefetch(c + i, 0, 3);
#else
  (void)p, (void)t0, (void)len;
#endif
}

// ---------------------------------------------------------------------------
// Inner kernels on one register block of NV vectors of the state. Pointers
// are already offset to the block; B/C/X/E advance by their stride per step
// (0 for a time-invariant B/C).

// Forward: h = exp(Δ A) h + Δu B_t; yp[t] (+)= C_t * h (8 partial sums).
template <int NV, bool ACC>
void fwd_kernel(int64_t len, const float* A, float* hmem, const float* dt, const float* du, const float* B,
                int64_t bs, const float* C, int64_t cs, float* yp) {
  V h[NV], a[NV];
  SSMLAB_SS_UNROLL
  for (int v = 0; v < NV; ++v) h[v] = vload(hmem + kW * v), a[v] = vload(A + kW * v);
  for (int64_t t = 0; t < len; ++t) {
    const V dtv = vset(dt[t]), duv = vset(du[t]);
    const float *b = B + t * bs, *c = C + t * cs;
    V acc = ACC ? vload(yp + kW * t) : vzero();
    SSMLAB_SS_UNROLL
    for (int v = 0; v < NV; ++v) {
      const V e = vexp(dtv * a[v]);
      h[v] = vfma(e, h[v], duv * vload(b + kW * v));
      acc = vfma(vload(c + kW * v), h[v], acc);
    }
    vstore(yp + kW * t, acc);
  }
  SSMLAB_SS_UNROLL
  for (int v = 0; v < NV; ++v) vstore(hmem + kW * v, h[v]);
}

// Backward, recomputation: from the state hmem at the start of the block,
// X_t = exp(Δ A) h_{t-1} and E_t = exp(Δ A) into tiles of row stride ld;
// h_t = X_t + Δu B_t. The gradient of C from this step, gy_t h_t, goes to the
// tile gC (row stride ld) when C is input-dependent (VC), otherwise into the
// row's accumulator gC. With Y, yp[t] (+)= C_t * h_t (8 partial sums).
template <int NV, bool VC, bool Y, bool ACC>
void recompute_kernel(int64_t len, const float* A, const float* hmem, const float* dt, const float* du,
                      const float* gy, const float* B, int64_t bs, const float* C, int64_t cs, float* X, float* E,
                      int64_t ld, float* gC, float* yp) {
  V h[NV], a[NV], gc[NV];
  SSMLAB_SS_UNROLL
  for (int v = 0; v < NV; ++v) {
    h[v] = vload(hmem + kW * v), a[v] = vload(A + kW * v);
    if (!VC) gc[v] = vload(gC + kW * v);
  }
  for (int64_t t = 0; t < len; ++t) {
    const V dtv = vset(dt[t]), duv = vset(du[t]), gyv = vset(gy[t]);
    const float *b = B + t * bs, *c = C + t * cs;
    float *x = X + t * ld, *e = E + t * ld, *gct = gC + t * ld;
    V acc = vzero();
    if (Y && ACC) acc = vload(yp + kW * t);
    SSMLAB_SS_UNROLL
    for (int v = 0; v < NV; ++v) {
      const V ev = vexp(dtv * a[v]);
      const V xv = ev * h[v];
      h[v] = vfma(duv, vload(b + kW * v), xv);
      vstore(x + kW * v, xv);
      vstore(e + kW * v, ev);
      if (VC)
        vstore(gct + kW * v, vfma(gyv, h[v], vload(gct + kW * v)));
      else
        gc[v] = vfma(gyv, h[v], gc[v]);
      if (Y) acc = vfma(vload(c + kW * v), h[v], acc);
    }
    if (Y) vstore(yp + kW * t, acc);
  }
  if (!VC) {
    SSMLAB_SS_UNROLL
    for (int v = 0; v < NV; ++v) vstore(gC + kW * v, gc[v]);
  }
}

// Backward, adjoint: steps len-1 .. 0 with the carried g (carry, dL/dh of the
// block's last state on entry, of the state before the block on exit):
// g = gy C_t + carry; dA += g X_t Δ; carry = E_t g; the gradient of B from
// this step, g Δu, to the tile gB (row stride ld; VB) or the row's
// accumulator gB; sdt[t] (+)= g X_t A and sb[t] (+)= g B_t (8 partial sums).
template <int NV, bool VB, bool ACC>
void adjoint_kernel(int64_t len, const float* A, float* carry, float* gA, const float* dt, const float* du,
                    const float* gy, const float* B, int64_t bs, const float* C, int64_t cs, const float* X,
                    const float* E, int64_t ld, float* gB, float* sdt, float* sb) {
  V g[NV], ga[NV], a[NV], gb[NV];
  SSMLAB_SS_UNROLL
  for (int v = 0; v < NV; ++v) {
    g[v] = vload(carry + kW * v), ga[v] = vload(gA + kW * v), a[v] = vload(A + kW * v);
    if (!VB) gb[v] = vload(gB + kW * v);
  }
  for (int64_t t = len - 1; t >= 0; --t) {
    const V dtv = vset(dt[t]), duv = vset(du[t]), gyv = vset(gy[t]);
    const float *b = B + t * bs, *c = C + t * cs, *x = X + t * ld, *e = E + t * ld;
    float* gbt = gB + t * ld;
    V s1 = ACC ? vload(sdt + kW * t) : vzero();
    V s2 = ACC ? vload(sb + kW * t) : vzero();
    SSMLAB_SS_UNROLL
    for (int v = 0; v < NV; ++v) {
      const V gv = vfma(gyv, vload(c + kW * v), g[v]);
      const V gdA = gv * vload(x + kW * v);
      const V bv = vload(b + kW * v);
      ga[v] = vfma(gdA, dtv, ga[v]);
      s1 = vfma(gdA, a[v], s1);
      s2 = vfma(gv, bv, s2);
      if (VB)
        vstore(gbt + kW * v, vfma(gv, duv, vload(gbt + kW * v)));
      else
        gb[v] = vfma(gv, duv, gb[v]);
      g[v] = vload(e + kW * v) * gv;
    }
    vstore(sdt + kW * t, s1);
    vstore(sb + kW * t, s2);
  }
  SSMLAB_SS_UNROLL
  for (int v = 0; v < NV; ++v) {
    vstore(carry + kW * v, g[v]);
    vstore(gA + kW * v, ga[v]);
    if (!VB) vstore(gB + kW * v, gb[v]);
  }
}

// The kernels over all register blocks of the padded state (Np floats).
// Block sizes: kMaxNV vectors, then what remains.
template <typename F>
SSMLAB_SS_INLINE void for_blocks(int64_t Np, F&& f) {
  for (int64_t off = 0; off < Np; off += kW * kMaxNV) f(off, int(std::min<int64_t>(kMaxNV, (Np - off) / kW)));
}

// CALL(K) with the compile-time K = nv (1 .. kMaxNV).
#define SSMLAB_SS_NV_SWITCH(nv, CALL)             \
  switch (nv) {                                   \
    case 1: CALL(1); break;                       \
    case 2: CALL(kMaxNV >= 2 ? 2 : 1); break;     \
    case 3: CALL(kMaxNV >= 3 ? 3 : 1); break;     \
    default: CALL(kMaxNV); break;                 \
  }
static_assert(kMaxNV >= 1 && kMaxNV <= 4, "SSMLAB_SS_NV_SWITCH covers 1..4 vectors");

void fwd_row(int64_t Np, int64_t len, const float* A, float* h, const float* dt, const float* du, const float* B,
             int64_t bs, const float* C, int64_t cs, float* yp) {
  for_blocks(Np, [&](int64_t off, int nv) {
#define CALL(K)                                                                                             \
  (off == 0 ? fwd_kernel<K, false>(len, A + off, h + off, dt, du, B + off, bs, C + off, cs, yp)             \
            : fwd_kernel<K, true>(len, A + off, h + off, dt, du, B + off, bs, C + off, cs, yp))
    SSMLAB_SS_NV_SWITCH(nv, CALL)
#undef CALL
  });
}

template <bool VC, bool Y>
void recompute_row(int64_t Np, int64_t len, const float* A, const float* h, const float* dt, const float* du,
                   const float* gy, const float* B, int64_t bs, const float* C, int64_t cs, float* X, float* E,
                   float* gC, float* yp) {
  for_blocks(Np, [&](int64_t off, int nv) {
#define CALL(K)                                                                                                  \
  (off == 0 ? recompute_kernel<K, VC, Y, false>(len, A + off, h + off, dt, du, gy, B + off, bs, C + off, cs,     \
                                                X + off, E + off, Np, gC + off, yp)                              \
            : recompute_kernel<K, VC, Y, true>(len, A + off, h + off, dt, du, gy, B + off, bs, C + off, cs,      \
                                               X + off, E + off, Np, gC + off, yp))
    SSMLAB_SS_NV_SWITCH(nv, CALL)
#undef CALL
  });
}

template <bool VB>
void adjoint_row(int64_t Np, int64_t len, const float* A, float* carry, float* gA, const float* dt, const float* du,
                 const float* gy, const float* B, int64_t bs, const float* C, int64_t cs, const float* X,
                 const float* E, float* gB, float* sdt, float* sb) {
  for_blocks(Np, [&](int64_t off, int nv) {
#define CALL(K)                                                                                              \
  (off == 0 ? adjoint_kernel<K, VB, false>(len, A + off, carry + off, gA + off, dt, du, gy, B + off, bs,     \
                                           C + off, cs, X + off, E + off, Np, gB + off, sdt, sb)             \
            : adjoint_kernel<K, VB, true>(len, A + off, carry + off, gA + off, dt, du, gy, B + off, bs,      \
                                          C + off, cs, X + off, E + off, Np, gB + off, sdt, sb))
    SSMLAB_SS_NV_SWITCH(nv, CALL)
#undef CALL
  });
}

// The sum of 8 lanes, in the order of rowsums8.
inline float lane_sum(const float* l) { return ((l[0] + l[1]) + (l[2] + l[3])) + ((l[4] + l[5]) + (l[6] + l[7])); }

// y[t] = the sum of the 8 partial sums of step t, for t < len.
inline void reduce_parts(const float* parts, int64_t len, float* y) {
  for (int64_t t = 0; t < len; t += kW) rowsums8(parts + t * kW, y + t);
}

// ---------------------------------------------------------------------------
// Forward.

template <typename T>
void fwd(const P& p) {
  const int64_t N = p.dstate, Np = padded(N), L = p.length, nch = n_chunks(p);
  const int64_t dpg = p.dim / p.groups, nblk = (dpg + kFwdRows - 1) / kFwdRows;
  const int64_t tasks = p.batch * p.groups * nblk, vis = visit_chunks(Np);
  const bool vB = p.is_variable_B, vC = p.is_variable_C;
#pragma omp parallel
  {
    Steps s;
    Buf A(kFwdRows * Np), H(kFwdRows * Np), Bc(vB ? 0 : kFwdRows * Np), Cc(vC ? 0 : kFwdRows * Np);
    Buf Bt(vB ? vis * kChunk * Np : 0), Ct(vC ? vis * kChunk * Np : 0);
    // Tasks: (batch, group, run of kFwdRows channels); no reductions across
    // tasks, so any schedule gives the same result. Each channel runs through
    // `vis` blocks at a time (one visit), with B/C staged once per visit.
#pragma omp for schedule(dynamic, 1)
    for (int64_t task = 0; task < tasks; ++task) {
      const int64_t k = task % nblk, g = (task / nblk) % p.groups, bi = task / (nblk * p.groups);
      const int64_t lo = g * dpg + k * kFwdRows, m = std::min(kFwdRows, (g + 1) * dpg - lo);
      for (int64_t j = 0; j < m; ++j) {
        const int64_t d = lo + j, r = bi * p.dim + d;
        copy_pad(p.A + d * N, N, Np, A + j * Np);
        copy_pad(p.h0 ? p.h0 + r * N : nullptr, N, Np, H + j * Np);
        if (!vB) copy_pad(static_cast<const float*>(p.B) + d * N, N, Np, Bc + j * Np);
        if (!vC) copy_pad(static_cast<const float*>(p.C) + d * N, N, Np, Cc + j * Np);
      }
      const T* Bsrc = vB ? static_cast<const T*>(p.B) + bi * p.B_stride[0] + g * p.B_stride[1] : nullptr;
      const T* Csrc = vC ? static_cast<const T*>(p.C) + bi * p.C_stride[0] + g * p.C_stride[1] : nullptr;
      for (int64_t c0 = 0; c0 < nch; c0 += vis) {  // one visit: blocks [c0, c1)
        const int64_t c1 = std::min(nch, c0 + vis), T0 = c0 * kChunk, TL = std::min(L, c1 * kChunk) - T0;
        if (vB) stage_bc(Bsrc, p.B_stride[2], N, Np, T0, TL, Bt);
        if (vC) stage_bc(Csrc, p.C_stride[2], N, Np, T0, TL, Ct);
        for (int64_t j = 0; j < m; ++j) {
          const int64_t d = lo + j, r = bi * p.dim + d;
          const Row<T> row(p, bi, d);
          T* out = static_cast<T*>(p.out) + bi * p.out_stride[0] + d * p.out_stride[1];
          float* h = H + j * Np;
          for (int64_t c = c0; c < c1; ++c) {
            const int64_t t0 = c * kChunk, len = std::min(kChunk, L - t0);
            stage_row(p, row, t0, len, s, static_cast<const T*>(nullptr), false);
            if (c + 1 < c1) {  // the row's next block of this visit
              const int64_t t1 = t0 + kChunk, l1 = std::min(kChunk, L - t1);
              prefetch(row.delta, t1, l1), prefetch(row.u, t1, l1), prefetch(out, t1, l1);
              if (row.z) prefetch(row.z, t1, l1);
            }
            fwd_row(Np, len, A + j * Np, h, s.dt, s.du, vB ? Bt + (t0 - T0) * Np : Bc + j * Np, vB ? Np : 0,
                    vC ? Ct + (t0 - T0) * Np : Cc + j * Np, vC ? Np : 0, s.yp);
            reduce_parts(s.yp, len, s.y);
            const V Dv = vset(row.D);
            for (int64_t t = 0; t < len; t += kW) {
              V y = vfma(Dv, vload(s.u + t), vload(s.y + t));
              if (row.z) y = y * (vload(s.z + t) * vload(s.zs + t));
              vstore(s.o1 + t, y);
            }
            store_steps(s.o1.get(), len, out + t0);
            if (p.chunk_states) std::copy(h, h + N, p.chunk_states + (r * nch + c) * N);
            if (p.last_state && c == nch - 1) std::copy(h, h + N, p.last_state + r * N);
          }
        }
      }
    }
  }
}

// ---------------------------------------------------------------------------
// Backward.

// Workspace layout (floats): per-row partial sums, then the per-slice sums of
// the input-dependent B/C gradients for slices 1.. (slice 0 goes straight to
// grad_B / grad_C).
struct Workspace {
  float *gA, *gB, *gC, *gD, *gbias, *gBs, *gCs;
  static size_t floats(const P& p, float** out = nullptr, float* base = nullptr) {
    const int64_t rows = p.batch * p.dim, N = p.dstate;
    const int64_t slice = p.batch * p.groups * (n_slices(p) - 1) * N * p.length;
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

// Writes the time-major tile (len x Np) to dst (N, L) at steps [t0, t0 + len).
inline void unstage(const float* tile, int64_t N, int64_t Np, int64_t L, int64_t t0, int64_t len, float* dst) {
  int64_t n0 = 0;
  const int64_t len8 = len / kW * kW;
  for (; n0 + kW <= N; n0 += kW) {  // 8 x 8 blocks, then the edges
    for (int64_t t = 0; t < len8; t += kW) transpose8(tile + t * Np + n0, Np, dst + n0 * L + t0 + t, L);
    for (int64_t n = n0; n < n0 + kW; ++n)
      for (int64_t t = len8; t < len; ++t) dst[n * L + t0 + t] = tile[t * Np + n];
  }
  for (int64_t n = n0; n < N; ++n) {
    float* o = dst + n * L + t0;
    for (int64_t t = 0; t < len; ++t) o[t] = tile[t * Np + n];
  }
}

// Per-thread scratch of the backward, for tasks of up to m channels and
// visits of up to vis blocks.
struct BwdScratch {
  Steps s;
  Buf A, carry, gA, Bc, Cc, gBc, gCc, gD, gbias, h, Bt, Ct, gBt, gCt, X, E;
  BwdScratch(int64_t m, int64_t Np, int64_t vis, bool vB, bool vC)
      : A(m * Np), carry(m * Np), gA(m * Np), Bc(vB ? 0 : m * Np), Cc(vC ? 0 : m * Np), gBc(vB ? 0 : m * Np),
        gCc(vC ? 0 : m * Np), gD(m * kW), gbias(m * kW), h(Np), Bt(vB ? vis * kChunk * Np : 0),
        Ct(vC ? vis * kChunk * Np : 0), gBt(vB ? vis * kChunk * Np : 0), gCt(vC ? vis * kChunk * Np : 0),
        X(kChunk * Np), E(kChunk * Np) {}
};

// Recomputation then adjoint of one block of row j of the task, at offset
// off (floats) into the visit's B/C tiles.
template <bool VB, bool VC, bool Z>
void bwd_block_row(int64_t Np, int64_t len, BwdScratch& w, int64_t j, int64_t off) {
  Steps& s = w.s;
  const float* A = w.A + j * Np;
  const float* B = VB ? w.Bt + off : w.Bc + j * Np;
  const float* C = VC ? w.Ct + off : w.Cc + j * Np;
  const int64_t bs = VB ? Np : 0, cs = VC ? Np : 0;
  recompute_row<VC, Z>(Np, len, A, w.h, s.dt, s.du, s.gy, B, bs, C, cs, w.X, w.E, VC ? w.gCt + off : w.gCc + j * Np,
                       s.yp);
  adjoint_row<VB>(Np, len, A, w.carry + j * Np, w.gA + j * Np, s.dt, s.du, s.gy, B, bs, C, cs, w.X, w.E,
                  VB ? w.gBt + off : w.gBc + j * Np, s.sdt, s.sb);
}

template <typename T>
void bwd(const P& p) {
  const int64_t N = p.dstate, Np = padded(N), L = p.length, nch = n_chunks(p);
  const int64_t dpg = p.dim / p.groups, S = n_slices(p), G = p.groups;
  const int64_t tasks = p.batch * G * S, mmax = (dpg + S - 1) / S, vis = visit_chunks(Np);
  const bool vB = p.is_variable_B, vC = p.is_variable_C;
  const Workspace ws(p);
  using RowFn = void (*)(int64_t, int64_t, BwdScratch&, int64_t, int64_t);
  RowFn row_fns[2][2][2] = {{{bwd_block_row<false, false, false>, bwd_block_row<false, false, true>},
                             {bwd_block_row<false, true, false>, bwd_block_row<false, true, true>}},
                            {{bwd_block_row<true, false, false>, bwd_block_row<true, false, true>},
                             {bwd_block_row<true, true, false>, bwd_block_row<true, true, true>}}};
  const RowFn row_fn = row_fns[vB][vC][p.z != nullptr];
#pragma omp parallel
  {
    BwdScratch w(mmax, Np, vis, vB, vC);
    Steps& s = w.s;
    // Task (b, g, slice): rows of a fixed slice of group g, walked in order
    // within each block, and the slice's sums of the input-dependent B/C
    // gradients. Tasks share nothing, so any schedule gives the same result.
#pragma omp for schedule(dynamic, 1)
    for (int64_t task = 0; task < tasks; ++task) {
      const int64_t sl = task % S, g = (task / S) % G, bi = task / (S * G), k = bi * G + g;
      const int64_t lo = g * dpg + sl * dpg / S, m = g * dpg + (sl + 1) * dpg / S - lo;
      float* gBdst = !vB ? nullptr : sl == 0 ? p.grad_B + k * N * L : ws.gBs + (k * (S - 1) + sl - 1) * N * L;
      float* gCdst = !vC ? nullptr : sl == 0 ? p.grad_C + k * N * L : ws.gCs + (k * (S - 1) + sl - 1) * N * L;
      const T* Bsrc = vB ? static_cast<const T*>(p.B) + bi * p.B_stride[0] + g * p.B_stride[1] : nullptr;
      const T* Csrc = vC ? static_cast<const T*>(p.C) + bi * p.C_stride[0] + g * p.C_stride[1] : nullptr;
      for (int64_t j = 0; j < m; ++j) {
        const int64_t d = lo + j, r = bi * p.dim + d;
        copy_pad(p.A + d * N, N, Np, w.A + j * Np);
        copy_pad(p.grad_last_state ? p.grad_last_state + r * N : nullptr, N, Np, w.carry + j * Np);
        std::fill(w.gA + j * Np, w.gA + (j + 1) * Np, 0.0f);
        if (!vB) {
          copy_pad(static_cast<const float*>(p.B) + d * N, N, Np, w.Bc + j * Np);
          std::fill(w.gBc + j * Np, w.gBc + (j + 1) * Np, 0.0f);
        }
        if (!vC) {
          copy_pad(static_cast<const float*>(p.C) + d * N, N, Np, w.Cc + j * Np);
          std::fill(w.gCc + j * Np, w.gCc + (j + 1) * Np, 0.0f);
        }
        std::fill(w.gD + j * kW, w.gD + (j + 1) * kW, 0.0f);
        std::fill(w.gbias + j * kW, w.gbias + (j + 1) * kW, 0.0f);
      }
      // Visits from the end: blocks [c0, c1), each channel walking them backwards.
      for (int64_t c1 = nch; c1 > 0; c1 -= vis) {
        const int64_t c0 = std::max<int64_t>(0, c1 - vis), T0 = c0 * kChunk, TL = std::min(L, c1 * kChunk) - T0;
        if (vB) {
          stage_bc(Bsrc, p.B_stride[2], N, Np, T0, TL, w.Bt);
          std::fill(w.gBt.get(), w.gBt + TL * Np, 0.0f);
        }
        if (vC) {
          stage_bc(Csrc, p.C_stride[2], N, Np, T0, TL, w.Ct);
          std::fill(w.gCt.get(), w.gCt + TL * Np, 0.0f);
        }
        for (int64_t j = 0; j < m; ++j) {
          const int64_t d = lo + j, r = bi * p.dim + d;
          const Row<T> row(p, bi, d);
          const T* gout = static_cast<const T*>(p.grad_out) + r * L;  // grad_out and the gradients are contiguous
          // The stored states this visit starts from (contiguous, read backwards).
          const int64_t cs0 = std::max<int64_t>(c0, 1);
          if (c1 > cs0) prefetch(p.chunk_states + (r * nch + cs0 - 1) * N, 0, (c1 - cs0) * N);
          for (int64_t c = c1 - 1; c >= c0; --c) {
          const int64_t t0 = c * kChunk, len = std::min(kChunk, L - t0), goff = r * L + t0;
          stage_row(p, row, t0, len, s, gout, true);
          if (c > c0) {  // the row's next block of this visit
            const int64_t t1 = t0 - kChunk;
            prefetch(row.delta, t1, kChunk), prefetch(row.u, t1, kChunk), prefetch(gout, t1, kChunk);
            prefetch(static_cast<T*>(p.grad_u) + r * L, t1, kChunk);
            prefetch(static_cast<T*>(p.grad_delta) + r * L, t1, kChunk);
            if (row.z) prefetch(row.z, t1, kChunk);
            if (p.grad_z) prefetch(static_cast<T*>(p.grad_z) + r * L, t1, kChunk);
          }
          const float* hstart = c > 0 ? p.chunk_states + (r * nch + c - 1) * N : (p.h0 ? p.h0 + r * N : nullptr);
          copy_pad(hstart, N, Np, w.h);
          row_fn(Np, len, w, j, (t0 - T0) * Np);
          if (row.z) reduce_parts(s.yp, len, s.y);  // gz needs y = C . h + D u from the recomputation
          float *sdt = s.s1, *sb = s.s2;
          reduce_parts(s.sdt, len, sdt);
          reduce_parts(s.sb, len, sb);
          // grad u, grad Δ (before bias and softplus), grad z; grad D and grad
          // Δ-bias summed in 8 lanes (step t in lane t mod 8).
          const int64_t full = len / kW * kW;
          const V Dv = vset(row.D);
          float *gDl = w.gD + j * kW, *gbl = w.gbias + j * kW;
          V gDv = vload(gDl), gbv = vload(gbl);
          for (int64_t t = 0; t < len; t += kW) {
            const V gyv = vload(s.gy + t), uv = vload(s.u + t), sbv = vload(sb + t);
            vstore(s.o1 + t, vfma(gyv, Dv, sbv * vload(s.dt + t)));
            V gx = vfma(sbv, uv, vload(sdt + t));
            if (p.delta_softplus) gx = gx * vload(s.dsp + t);
            vstore(s.o2 + t, gx);
            if (row.z) {
              const V zv = vload(s.z + t), sg = vload(s.zs + t);
              const V yv = vfma(Dv, uv, vload(s.y + t));
              vstore(s.o3 + t, vload(s.gyo + t) * yv * sg * vfma(zv, vset(1.0f) - sg, vset(1.0f)));
            }
            if (t < full) gDv = vfma(gyv, uv, gDv), gbv = gbv + gx;
          }
          vstore(gDl, gDv);
          vstore(gbl, gbv);
          for (int64_t t = full; t < len; ++t) gDl[t % kW] += s.gy[t] * s.u[t], gbl[t % kW] += s.o2[t];
          store_steps(s.o1.get(), len, static_cast<T*>(p.grad_u) + goff);
          store_steps(s.o2.get(), len, static_cast<T*>(p.grad_delta) + goff);
          if (p.grad_z) store_steps(s.o3.get(), len, static_cast<T*>(p.grad_z) + goff);
          }
        }
        if (vB) unstage(w.gBt, N, Np, L, T0, TL, gBdst);
        if (vC) unstage(w.gCt, N, Np, L, T0, TL, gCdst);
      }
      for (int64_t j = 0; j < m; ++j) {
        const int64_t r = bi * p.dim + lo + j;
        if (p.grad_h0) std::copy(w.carry + j * Np, w.carry + j * Np + N, p.grad_h0 + r * N);
        std::copy(w.gA + j * Np, w.gA + j * Np + N, ws.gA + r * N);
        if (!vB) std::copy(w.gBc + j * Np, w.gBc + j * Np + N, ws.gB + r * N);
        if (!vC) std::copy(w.gCc + j * Np, w.gCc + j * Np + N, ws.gC + r * N);
        ws.gD[r] = lane_sum(w.gD + j * kW);
        ws.gbias[r] = lane_sum(w.gbias + j * kW);
      }
    }
    // Fixed-order reductions over batch (per dim) and over slices (per B/C element).
#pragma omp for schedule(static)
    for (int64_t di = 0; di < p.dim; ++di) {
      for (int64_t n = 0; n < N; ++n) {
        float a = 0.0f, b = 0.0f, c = 0.0f;
        for (int64_t bi = 0; bi < p.batch; ++bi) {
          const int64_t i = (bi * p.dim + di) * N + n;
          a += ws.gA[i];
          if (!vB) b += ws.gB[i];
          if (!vC) c += ws.gC[i];
        }
        p.grad_A[di * N + n] = a;
        if (!vB) p.grad_B[di * N + n] = b;
        if (!vC) p.grad_C[di * N + n] = c;
      }
      float gd = 0.0f, gb = 0.0f;
      for (int64_t bi = 0; bi < p.batch; ++bi) {
        gd += ws.gD[bi * p.dim + di];
        gb += ws.gbias[bi * p.dim + di];
      }
      if (p.grad_D) p.grad_D[di] = gd;
      if (p.grad_delta_bias) p.grad_delta_bias[di] = gb;
    }
    // grad_B / grad_C (input-dependent) are contiguous (batch, groups, N, L)
    // and already hold slice 0; add slices 1.. in order.
    const int64_t bg = p.batch * G;
    for (int which = 0; which < 2; ++which) {
      const bool var = which == 0 ? vB : vC;
      if (!var || S == 1) continue;
      const float* src = which == 0 ? ws.gBs : ws.gCs;
      float* dst = which == 0 ? p.grad_B : p.grad_C;
#pragma omp for schedule(static)
      for (int64_t i = 0; i < bg * N; ++i) {
        const int64_t k = i / N, n = i % N;
        float* o = dst + i * L;
        const float* s0 = src + (k * (S - 1)) * N * L + n * L;
        for (int64_t sl = 0; sl < S - 1; ++sl) {
          const float* ss = s0 + sl * N * L;
#pragma omp simd
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

// The kernels of this instruction set.
void fwd_entry(const SelectiveScanParams& p) {
  check(p);
  dispatch_dtype(p.dtype, [&](auto tag) { fwd<decltype(tag)>(p); });
}

void bwd_entry(const SelectiveScanParams& p) {
  check(p);
  dispatch_dtype(p.dtype, [&](auto tag) { bwd<decltype(tag)>(p); });
}

#if !defined(SSMLAB_SS_AVX2_TU)
size_t workspace_floats(const SelectiveScanParams& p) { return Workspace::floats(p); }
int64_t chunk_len() { return kChunk; }
#endif

}  // namespace SSMLAB_SS_ISA

#if defined(SSMLAB_SS_AVX2_TU)
#if defined(__clang__)
#pragma clang attribute pop
#else
#pragma GCC pop_options
#endif
#endif

#if !defined(SSMLAB_SS_AVX2_TU)
#if defined(SSMLAB_SS_HAVE_AVX2)
namespace ss_avx2 {
void fwd_entry(const SelectiveScanParams& p);
void bwd_entry(const SelectiveScanParams& p);
}  // namespace ss_avx2
#endif

namespace {

// Whether to run the AVX2+FMA kernels: built, supported by this CPU (and OS),
// and not overridden by SSMLAB_SELECTIVE_SCAN_ISA=portable.
bool use_avx2() {
#if defined(SSMLAB_SS_HAVE_AVX2)
  static const bool ok = [] {
    const char* env = std::getenv("SSMLAB_SELECTIVE_SCAN_ISA");
    if (env && std::strcmp(env, "portable") == 0) return false;
    __builtin_cpu_init();
    return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
  }();
  return ok;
#else
  return false;
#endif
}

}  // namespace

void selective_scan_fwd_cpu(const SelectiveScanParams& p) {
#if defined(SSMLAB_SS_HAVE_AVX2)
  if (use_avx2()) return ss_avx2::fwd_entry(p);
#endif
  ss_portable::fwd_entry(p);
}

void selective_scan_bwd_cpu(const SelectiveScanParams& p) {
  if (!p.chunk_states && p.length > ss_portable::chunk_len())
    throw std::invalid_argument("selective_scan_bwd_cpu: chunk_states from the forward are required");
  if (!p.workspace && selective_scan_bwd_workspace_bytes_cpu(p) > 0)
    throw std::invalid_argument("selective_scan_bwd_cpu: workspace is null");
#if defined(SSMLAB_SS_HAVE_AVX2)
  if (use_avx2()) return ss_avx2::bwd_entry(p);
#endif
  ss_portable::bwd_entry(p);
}

int64_t selective_scan_chunk_len_cpu() { return ss_portable::chunk_len(); }

size_t selective_scan_bwd_workspace_bytes_cpu(const SelectiveScanParams& p) {
  if (p.groups <= 0 || p.dim % p.groups != 0) return 0;
  return ss_portable::workspace_floats(p) * sizeof(float);
}

// The CPU forward splits nothing across threads along L, so it needs no scratch.
size_t selective_scan_fwd_workspace_bytes_cpu(const SelectiveScanParams&) { return 0; }
#endif  // !SSMLAB_SS_AVX2_TU

}  // namespace ssmlab

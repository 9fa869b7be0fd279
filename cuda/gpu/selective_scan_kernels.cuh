// Fused CUDA selective scan (Mamba's S6): forward and backward kernels.
//
// Shared by the per-dtype translation units selective_scan_{f32,f16,bf16}.cu,
// which instantiate launch_fwd<T> / launch_bwd<T> so the three compile in
// parallel. The public entry points live in selective_scan.cu.
//
// Work decomposition (the same in both directions):
//   * a block owns kRows = kThreads / S channels d of ONE batch b and ONE group
//     g, so the input-dependent B_t, C_t of a time step are loaded once per
//     block into shared memory and read by all of its channels (B/C loads are
//     amortised over kRows channels);
//   * each channel is served by S consecutive lanes; lane s holds the states
//     n = s*NT .. s*NT+NT-1 in registers (N <= S*NT, missing states padded with
//     A = B = C = 0, which keeps them at zero and out of every sum);
//   * the length is walked in chunks of kChunk steps. Per chunk the block
//     (1) loads delta, u (and z, grad_out) coalesced, applies bias and
//     softplus once per element and stages Δ and Δu in shared memory,
//     (2) runs the recurrence: per step and state one ex2 (MUFU), one FMUL for
//     the exponent, one FMUL for Δu B and the single loop-carried FFMA
//     h = e h + Δu B, then one FFMA for C·h; y is summed over the S lanes by
//     shuffles, and (3) applies D u and the silu(z) gate and stores coalesced.
//
// Backward: chunks are walked from the end. A chunk's states are recomputed
// from the forward's stored chunk-boundary state (chunk_states) in sub-chunks
// of kSub steps held in registers, and the adjoint
//     g_t = dL/dh_t = gy_t C_t + exp(Δ_{t+1} A) g_{t+1}
// runs backwards through them. Determinism: every reduction has a fixed order
// and no atomics. Per-row sums (grad A, D, delta_bias, time-invariant B/C) are
// written per (batch, channel) into the workspace; input-dependent B/C
// gradients are summed over a block's channels in shared memory in channel
// order and written per block; a second kernel sums over batch / blocks in
// index order.
#pragma once
#include <cstdint>
#include <stdexcept>
#include <string>
#include <type_traits>

#include "cuda_utils.cuh"
#include "ssmlab/selective_scan.h"

namespace ssmlab {
namespace ss {

using P = SelectiveScanParams;

constexpr int kChunk = 64;      // steps per chunk (== selective_scan_chunk_len_cuda())
constexpr int kPad = kChunk + 1;  // row pitch of the (row, step) tiles: no bank conflicts
constexpr int kThreads = 128;
constexpr int kSub = 8;         // backward: steps whose states are held in registers
constexpr float kLog2e = 1.4426950408889634f;
constexpr float kLn2 = 0.6931471805599453f;

__device__ __forceinline__ float ex2(float x) {
  float y;
  asm("ex2.approx.ftz.f32 %0, %1;" : "=f"(y) : "f"(x));
  return y;
}

// softplus(x) = max(x, 0) + log1p(exp(-|x|)), branch-free and accurate where
// softplus(x) ~ exp(x) is tiny.
__device__ __forceinline__ float softplus(float x) {
  const float e = ex2(-fabsf(x) * kLog2e), w = 1.0f + e;
  // log1p(e) = log(w) * e / (w - 1) keeps full relative accuracy for tiny e (Goldberg).
  const float l = w == 1.0f ? e : __logf(w) * __fdividef(e, w - 1.0f);
  return fmaxf(x, 0.0f) + l;
}
__device__ __forceinline__ float sigmoid(float x) { return 1.0f / (1.0f + ex2(-x * kLog2e)); }

__host__ __device__ inline int64_t round32(int64_t n) { return (n + 31) / 32 * 32; }  // 128-byte aligned parts

// Scratch of a length-split scan (p.segments > 1 pieces): per row and piece,
// the piece's local result from zero (forward: its end state; backward: the
// adjoint carry leaving its first step) and the sum of its Δ, whose
// exponential exp(A ΣΔ) is the piece's decay. The main pass combines the
// pieces before its own in order, so every piece starts from its true value.
struct SegScratch {
  float *h, *dsum;  // [(row * segments + k) * N + n], [row * segments + k]
  __host__ __device__ static int64_t floats(const P& p) {
    if (p.segments <= 1) return 0;
    const int64_t rows = p.batch * p.dim;
    return round32(rows * p.segments * p.dstate) + round32(rows * p.segments);
  }
  __host__ __device__ static SegScratch at(const P& p, float* base) {
    return {base, base + round32(p.batch * p.dim * p.segments * p.dstate)};
  }
};

// Chunks [begin, end) of piece k when nch chunks are split into nseg pieces
// (the launcher picks nseg so that no piece is empty).
struct SegRange {
  int64_t begin, end;
};
__device__ __forceinline__ SegRange seg_range(int64_t nch, int64_t nseg, int64_t k) {
  const int64_t per = (nch + nseg - 1) / nseg, b = k * per;
  return {b, b + per < nch ? b + per : nch};
}

// Layout of the workspace (floats) for the backward. The per-row sums are kept
// per piece of a split length too, and added over batch and pieces in order.
struct BwdWorkspace {
  float *gA, *gBc, *gCc, *gD, *gbias, *gBv, *gCv;
  SegScratch seg;
  int64_t blocks_per_group;
  static constexpr int64_t kRowsPerBlock = kThreads / 4;  // S = 4 lanes a channel for every supported N
  __host__ __device__ static int64_t floats(const P& p, float** out = nullptr, float* base = nullptr) {
    const int64_t nseg = p.segments > 1 ? p.segments : 1;
    const int64_t rows = p.batch * p.dim * nseg, N = p.dstate, dpg = p.dim / p.groups;
    const int64_t nblk = (dpg + kRowsPerBlock - 1) / kRowsPerBlock;
    const int64_t var = p.batch * p.groups * nblk * N * p.length;
    const int64_t sizes[8] = {rows * N, p.is_variable_B ? 0 : rows * N, p.is_variable_C ? 0 : rows * N,
                              rows, rows, p.is_variable_B ? var : 0, p.is_variable_C ? var : 0,
                              SegScratch::floats(p)};
    int64_t off = 0;
    for (int i = 0; i < 8; ++i) {
      if (out) out[i] = base + off;
      off += round32(sizes[i]);
    }
    return off;
  }
  static BwdWorkspace make(const P& p) {
    float* ptr[8];
    floats(p, ptr, static_cast<float*>(p.workspace));
    const int64_t dpg = p.dim / p.groups, R = kRowsPerBlock;
    return {ptr[0], ptr[1], ptr[2], ptr[3], ptr[4], ptr[5], ptr[6], SegScratch::at(p, ptr[7]), (dpg + R - 1) / R};
  }
};

// The block's place: batch b, group g, first channel d0 of its rows.
struct Place {
  int64_t b, g, blk, d0, rows;  // rows: valid channels in this block
};
template <int R>
__device__ __forceinline__ Place place(const P& p) {
  const int64_t dpg = p.dim / p.groups, nblk = (dpg + R - 1) / R;
  const int64_t i = blockIdx.x;
  Place q;
  q.blk = i % nblk;
  q.g = (i / nblk) % p.groups;
  q.b = i / (nblk * p.groups);
  q.d0 = q.g * dpg + q.blk * R;
  q.rows = dpg - q.blk * R < R ? dpg - q.blk * R : R;
  return q;
}

// Input-dependent B or C of the block's (b, g): element (n, t0 + t), as float.
template <typename T>
__device__ __forceinline__ const T* bc_base(const void* X, const int64_t* st, const Place& q) {
  return static_cast<const T*>(X) + q.b * st[0] + q.g * st[1];
}

// ---------------------------------------------------------------------------
// Forward
// ---------------------------------------------------------------------------

template <int NT, int S>
struct Shape {
  static constexpr int kNT = NT, kS = S, kNP = NT * S, kRows = kThreads / S;
  static constexpr int kTileFloats = kRows * kPad;
  // Backward B/C contribution buffers: one (row pair, state) slab a step,
  // slabs 4 floats apart in bank terms, so the reduction's reads (8 steps x 4
  // states a warp) hit 32 distinct banks and the vector stores stay aligned.
  static constexpr int kRedPitch = kRows / 2 * kNP + 4;
  static size_t fwd_smem() { return sizeof(float) * (4 * kTileFloats + 2 * kChunk * kNP + 2 * kRows); }
  static size_t fwd_seg_smem() { return sizeof(float) * (2 * kTileFloats + kChunk * kNP + kRows); }
  static size_t bwd_seg_smem() { return sizeof(float) * (2 * kTileFloats + kChunk * kNP + kRows); }
  static size_t bwd_smem() {
    return sizeof(float) * (4 * kTileFloats + 2 * kChunk * kNP + 2 * kSub * kRedPitch + kChunk / kSub * kRows * kNP);
  }
};

template <int S>
__device__ __forceinline__ float group_sum(float v) {
#pragma unroll
  for (int m = 1; m < S; m <<= 1) v += __shfl_xor_sync(0xffffffffu, v, m);
  return v;
}

// Reads NT consecutive floats of shared memory (16-byte aligned when NT % 4 == 0).
template <int NT>
__device__ __forceinline__ void ld_vec(float (&v)[NT], const float* s) {
  if constexpr (NT % 4 == 0) {
#pragma unroll
    for (int i = 0; i < NT; i += 4) {
      const float4 x = *reinterpret_cast<const float4*>(s + i);
      v[i] = x.x, v[i + 1] = x.y, v[i + 2] = x.z, v[i + 3] = x.w;
    }
  } else {
#pragma unroll
    for (int i = 0; i < NT; ++i) v[i] = s[i];
  }
}

// A (row, step) tile of a (batch, dim, L) tensor, kRows x kChunk elements,
// held kPer a thread in registers: element j of thread i is tile element
// i + j * kThreads (row (i + j kThreads) / kChunk), so a warp reads 32
// consecutive steps of one row. All kPer loads are issued before any use.
template <int R>
struct TileIdx {
  static constexpr int kPer = R * kChunk / kThreads;
  __device__ static int row(int j) { return (threadIdx.x + j * kThreads) / kChunk; }
  __device__ static int step(int j) { return (threadIdx.x + j * kThreads) % kChunk; }
};

// The raw element type kept in registers between a load and its use: the
// conversion to float is left to the use, so that a prefetch issued before a
// long loop does not wait for its data at the conversion.
template <typename T> struct Raw { using type = T; };
template <> struct Raw<Half> { using type = unsigned short; };
template <> struct Raw<BFloat16> { using type = unsigned short; };
template <typename T>
__device__ __forceinline__ float to_float_as(typename Raw<T>::type x) {
  if constexpr (std::is_same_v<T, BFloat16>) return __uint_as_float(uint32_t(x) << 16);
  else if constexpr (std::is_same_v<T, Half>) return __half2float(__ushort_as_half(x));
  else return x;
}
template <typename T>
__device__ __forceinline__ typename Raw<T>::type ld_raw(const T* p) {
  return *reinterpret_cast<const typename Raw<T>::type*>(p);
}

template <typename T, int R, typename V>
__device__ __forceinline__ void load_tile(V (&v)[TileIdx<R>::kPer], const void* X, const int64_t* st, const Place& q,
                                          int64_t t0, int len) {
  const T* base = static_cast<const T*>(X) + q.b * st[0] + q.d0 * st[1] + t0;
#pragma unroll
  for (int j = 0; j < TileIdx<R>::kPer; ++j) {
    const int rr = TileIdx<R>::row(j), t = TileIdx<R>::step(j);
    if constexpr (std::is_same_v<V, float>) v[j] = (rr < q.rows && t < len) ? Dev<T>::ld(base + rr * st[1] + t) : 0.0f;
    else v[j] = (rr < q.rows && t < len) ? ld_raw(base + rr * st[1] + t) : V(0);
  }
}

// Input-dependent B or C of the block's (b, g) for steps [t0, t0 + len): NP
// states x kChunk steps, element j of a thread is (n, t) = divmod(i + j kThreads, kChunk).
template <typename T, int NP, typename V>
__device__ __forceinline__ void load_bc(V (&v)[NP * kChunk / kThreads], const T* base, int64_t nstride, int N,
                                        int64_t t0, int len) {
#pragma unroll
  for (int j = 0; j < NP * kChunk / kThreads; ++j) {
    const int i = threadIdx.x + j * kThreads, n = i / kChunk, t = i % kChunk;
    if constexpr (std::is_same_v<V, float>) v[j] = (n < N && t < len) ? Dev<T>::ld(base + n * nstride + t0 + t) : 0.0f;
    else v[j] = (n < N && t < len) ? ld_raw(base + n * nstride + t0 + t) : V(0);
  }
}
template <typename T, int NP, typename V>
__device__ __forceinline__ void store_bc(float* s, const V (&v)[NP * kChunk / kThreads]) {
#pragma unroll
  for (int j = 0; j < NP * kChunk / kThreads; ++j) {
    const int i = threadIdx.x + j * kThreads;
    if constexpr (std::is_same_v<V, float>) s[(i % kChunk) * NP + i / kChunk] = v[j];
    else s[(i % kChunk) * NP + i / kChunk] = to_float_as<T>(v[j]);
  }
}

// Sums y[0..7] over the 4 lanes of a channel; lane s returns the totals of
// steps 2s and 2s+1 (a transposed reduction: 6 shuffles instead of 16).
__device__ __forceinline__ void group_sum8(const float (&y)[8], int s, float& y0, float& y1) {
  float a[4];
  const bool hi2 = s & 2, hi1 = s & 1;
#pragma unroll
  for (int j = 0; j < 4; ++j) {
    const float send = hi2 ? y[j] : y[j + 4], keep = hi2 ? y[j + 4] : y[j];
    a[j] = keep + __shfl_xor_sync(0xffffffffu, send, 2);
  }
  float c[2];
#pragma unroll
  for (int j = 0; j < 2; ++j) {
    const float send = hi1 ? a[j] : a[j + 2], keep = hi1 ? a[j + 2] : a[j];
    c[j] = keep + __shfl_xor_sync(0xffffffffu, send, 1);
  }
  y0 = c[0], y1 = c[1];
}

// B or C as the step loops read it, from shared memory in both layouts: the
// input-dependent B_t from the staged chunk (NP floats a step), a time-invariant
// B from the row's own slot, written once at the start (stride 0). One code
// path, so the loops carry no per-layout register copies (v5 spent 8 moves a
// step on them, 2 an element).
template <int NT, int NP>
struct BcView {
  const float* base;
  int ts;
  __device__ BcView(float* smem, bool variable, const float (&fixed)[NT], int r, int lane) {
    float* own = smem + (variable ? 0 : r * NP) + lane * NT;
    ts = variable ? NP : 0;
    base = own;
    if (!variable) {
#pragma unroll
      for (int i = 0; i < NT; i += 4) *reinterpret_cast<float4*>(own + i) = make_float4(fixed[i], fixed[i + 1], fixed[i + 2], fixed[i + 3]);
    }
  }
  __device__ __forceinline__ void at(float (&v)[NT], int t) const { ld_vec<NT>(v, base + t * ts); }
};

template <typename T, int NT, int S>
__global__ void __launch_bounds__(kThreads, 3) fwd_kernel(P p) {  // 3 blocks an SM: 384 blocks in one wave at B=8, D=1536
  static_assert(S == 4, "the lane reductions assume 4 lanes a channel");
  static_assert(NT % 4 == 0, "16-byte shared-memory accesses");
  using Sh = Shape<NT, S>;
  using TI = TileIdx<Sh::kRows>;
  constexpr int R = Sh::kRows, NP = Sh::kNP, KP = TI::kPer, KBC = NP * kChunk / kThreads;
  extern __shared__ float4 smem4[];
  float* smem = reinterpret_cast<float*>(smem4);
  float(*sDt)[kPad] = reinterpret_cast<float(*)[kPad]>(smem);
  float(*sDu)[kPad] = reinterpret_cast<float(*)[kPad]>(smem + Sh::kTileFloats);
  float(*sY)[kPad] = reinterpret_cast<float(*)[kPad]>(smem + 2 * Sh::kTileFloats);
  float(*sG)[kPad] = reinterpret_cast<float(*)[kPad]>(smem + 3 * Sh::kTileFloats);
  float* sB = smem + 4 * Sh::kTileFloats;
  float* sC = sB + kChunk * NP;
  float* sBias = sC + kChunk * NP;  // [R]
  float* sD = sBias + R;            // [R]

  const Place q = place<R>(p);
  const int N = int(p.dstate), tid = threadIdx.x, r = tid / S, s = tid % S;
  const int64_t L = p.length, nch = (L + kChunk - 1) / kChunk, nseg = p.segments, piece = blockIdx.y;
  const SegRange cr = seg_range(nch, nseg, piece);  // all chunks unless the length is split
  const bool row_ok = r < q.rows;
  const int64_t d = q.d0 + (row_ok ? r : 0), row = q.b * p.dim + d;
  if (tid < R) {
    const bool ok = tid < q.rows;
    sBias[tid] = ok && p.delta_bias ? p.delta_bias[q.d0 + tid] : 0.0f;
    sD[tid] = ok && p.D ? p.D[q.d0 + tid] : 0.0f;
  }

  float A2[NT], Bc[NT], Cc[NT], h[NT];
#pragma unroll
  for (int i = 0; i < NT; ++i) {
    const int n = s * NT + i;
    const bool ok = row_ok && n < N;
    A2[i] = ok ? p.A[d * N + n] * kLog2e : 0.0f;
    Bc[i] = ok && !p.is_variable_B ? static_cast<const float*>(p.B)[d * N + n] : 0.0f;
    Cc[i] = ok && !p.is_variable_C ? static_cast<const float*>(p.C)[d * N + n] : 0.0f;
    h[i] = ok && p.h0 ? p.h0[row * N + n] : 0.0f;
  }
  if (piece > 0 && row_ok) {  // the true start state: the pieces before this one, in order
    const SegScratch sc = SegScratch::at(p, static_cast<float*>(p.workspace));
    for (int64_t j = 0; j < piece; ++j) {
      const float ds = sc.dsum[row * nseg + j];
#pragma unroll
      for (int i = 0; i < NT; ++i)
        if (s * NT + i < N) h[i] = fmaf(ex2(A2[i] * ds), h[i], sc.h[(row * nseg + j) * N + s * NT + i]);
    }
  }
  const T* Bv = p.is_variable_B ? bc_base<T>(p.B, p.B_stride, q) : nullptr;
  const T* Cv = p.is_variable_C ? bc_base<T>(p.C, p.C_stride, q) : nullptr;
  const BcView<NT, NP> vB(sB, Bv, Bc, r, s), vC(sC, Cv, Cc, r, s);  // read back by the writing lane only
  T* out = static_cast<T*>(p.out) + q.b * p.out_stride[0] + q.d0 * p.out_stride[1];

  // Registers of the next chunk, loaded while the current one is scanned.
  using RT = typename Raw<T>::type;
  RT pu[KP], pd[KP], pz[KP], pb[KBC], pc[KBC];
  auto prefetch = [&](int64_t c) {
    const int64_t t0 = c * kChunk;
    const int len = int(L - t0 < kChunk ? L - t0 : kChunk);
    load_tile<T, R>(pu, p.u, p.u_stride, q, t0, len);
    load_tile<T, R>(pd, p.delta, p.delta_stride, q, t0, len);
    if (p.z) load_tile<T, R>(pz, p.z, p.z_stride, q, t0, len);
    if (Bv) load_bc<T, NP>(pb, Bv, p.B_stride[2], N, t0, len);
    if (Cv) load_bc<T, NP>(pc, Cv, p.C_stride[2], N, t0, len);
  };
  prefetch(cr.begin);
  __syncthreads();  // sBias, sD

  for (int64_t c = cr.begin; c <= cr.end; ++c) {
    // One sweep over the tile: gate and store chunk c-1, stage chunk c.
    // Every (row, step) element is read and rewritten by the same thread.
    const int64_t tp = (c - 1) * kChunk, tc = c * kChunk;
    const int lenp = int(L - tp < kChunk ? L - tp : kChunk), lenc = int(L - tc < kChunk ? L - tc : kChunk);
#pragma unroll
    for (int j = 0; j < KP; ++j) {
      const int rr = TI::row(j), t = TI::step(j);
      if (c > cr.begin && rr < q.rows && t < lenp)
        Dev<T>::st(out + rr * p.out_stride[1] + tp + t, sY[rr][t] * sG[rr][t]);
      if (c < cr.end) {
        // Past the end or the block's rows: Δ = 0, the identity step.
        const float u = to_float_as<T>(pu[j]), zz = p.z ? to_float_as<T>(pz[j]) : 0.0f;
        float dt = to_float_as<T>(pd[j]) + sBias[rr];
        if (p.delta_softplus) dt = softplus(dt);
        if (rr >= q.rows || t >= lenc) dt = 0.0f;
        sDt[rr][t] = dt;
        sDu[rr][t] = dt * u;
        sY[rr][t] = sD[rr] * u;
        sG[rr][t] = p.z ? zz * sigmoid(zz) : 1.0f;
      }
    }
    if (c == cr.end) break;
    if (Bv) store_bc<T, NP>(sB, pb);
    if (Cv) store_bc<T, NP>(sC, pc);
    __syncthreads();
    if (c + 1 < cr.end) prefetch(c + 1);

    // The recurrence, 8 steps at a time: all shared loads of a group first,
    // then the exponentials and the one-FMA state updates, then y.
    const int len = int(L - c * kChunk < kChunk ? L - c * kChunk : kChunk);
#pragma unroll 1
    for (int g0 = 0; g0 < len; g0 += 8) {
      float dt[8], du[8], y[8];
#pragma unroll
      for (int k = 0; k < 8; ++k) dt[k] = sDt[r][g0 + k], du[k] = sDu[r][g0 + k];
#pragma unroll
      for (int k = 0; k < 8; ++k) {
        float b[NT], cc[NT];
        vB.at(b, g0 + k);
        vC.at(cc, g0 + k);
        y[k] = 0.0f;
#pragma unroll
        for (int i = 0; i < NT; ++i) {
          h[i] = fmaf(ex2(dt[k] * A2[i]), h[i], du[k] * b[i]);
          y[k] = fmaf(cc[i], h[i], y[k]);
        }
      }
      float y0, y1;
      group_sum8(y, s, y0, y1);
      sY[r][g0 + 2 * s] += y0;
      sY[r][g0 + 2 * s + 1] += y1;
    }
    if (p.chunk_states && row_ok) {
#pragma unroll
      for (int i = 0; i < NT; ++i)
        if (s * NT + i < N) p.chunk_states[(row * nch + c) * N + s * NT + i] = h[i];
    }
    __syncthreads();
  }
  if (p.last_state && row_ok && piece == nseg - 1) {
#pragma unroll
    for (int i = 0; i < NT; ++i)
      if (s * NT + i < N) p.last_state[row * N + s * NT + i] = h[i];
  }
}

// A lane of a first-pass block: its channel row, its piece of the length, and
// its states' A · log2 e and time-invariant B or C (zero for absent states).
template <int NT, int S>
struct SegLane {
  int N, r, s;
  bool row_ok;
  int64_t d, row, nseg, piece;
  SegRange cr;
  float A2[NT], fixed[NT];
  __device__ SegLane(const P& p, const Place& q, int64_t piece_, const void* X, bool variable)
      : N(int(p.dstate)), r(threadIdx.x / S), s(threadIdx.x % S), nseg(p.segments), piece(piece_) {
    cr = seg_range((p.length + kChunk - 1) / kChunk, nseg, piece);
    row_ok = r < q.rows;
    d = q.d0 + (row_ok ? r : 0);
    row = q.b * p.dim + d;
#pragma unroll
    for (int i = 0; i < NT; ++i) {
      const int n = s * NT + i;
      const bool ok = row_ok && n < N;
      A2[i] = ok ? p.A[d * N + n] * kLog2e : 0.0f;
      fixed[i] = ok && !variable ? static_cast<const float*>(X)[d * N + n] : 0.0f;
    }
  }
  // The piece's local result (end state or carry) and its sum of Δ, for the main pass.
  __device__ void store(const SegScratch& sc, const float (&v)[NT], float dsum) const {
    if (!row_ok) return;
#pragma unroll
    for (int i = 0; i < NT; ++i)
      if (s * NT + i < N) sc.h[(row * nseg + piece) * N + s * NT + i] = v[i];
    if (s == 0) sc.dsum[row * nseg + piece] = dsum;
  }
};

// First pass of a split forward: every piece but the last scanned from the
// zero state, keeping only its end state and the sum of its Δ (no C, y, gate
// or output: about half the forward's work an element). Same block layout as
// fwd_kernel; blockIdx.y is the piece.
template <typename T, int NT, int S>
__global__ void __launch_bounds__(kThreads, 3) fwd_seg_kernel(P p) {
  static_assert(S == 4, "the block layout assumes 4 lanes a channel");
  static_assert(NT % 4 == 0, "16-byte shared-memory accesses");
  using Sh = Shape<NT, S>;
  using TI = TileIdx<Sh::kRows>;
  constexpr int R = Sh::kRows, NP = Sh::kNP, KP = TI::kPer, KBC = NP * kChunk / kThreads;
  extern __shared__ float4 smem4[];
  float* smem = reinterpret_cast<float*>(smem4);
  float(*sDt)[kPad] = reinterpret_cast<float(*)[kPad]>(smem);
  float(*sDu)[kPad] = reinterpret_cast<float(*)[kPad]>(smem + Sh::kTileFloats);
  float* sB = smem + 2 * Sh::kTileFloats;
  float* sBias = sB + kChunk * NP;  // [R]

  const Place q = place<R>(p);
  const SegLane<NT, S> ln(p, q, blockIdx.y, p.B, p.is_variable_B);
  const int N = ln.N, tid = threadIdx.x, r = ln.r;
  const int64_t L = p.length;
  const SegRange cr = ln.cr;
  if (tid < R) sBias[tid] = tid < q.rows && p.delta_bias ? p.delta_bias[q.d0 + tid] : 0.0f;
  float h[NT] = {};
  const T* Bv = p.is_variable_B ? bc_base<T>(p.B, p.B_stride, q) : nullptr;
  const BcView<NT, NP> vB(sB, Bv, ln.fixed, r, ln.s);

  using RT = typename Raw<T>::type;
  RT pu[KP], pd[KP], pb[KBC];
  auto prefetch = [&](int64_t c) {
    const int64_t t0 = c * kChunk;
    const int len = int(L - t0 < kChunk ? L - t0 : kChunk);
    load_tile<T, R>(pu, p.u, p.u_stride, q, t0, len);
    load_tile<T, R>(pd, p.delta, p.delta_stride, q, t0, len);
    if (Bv) load_bc<T, NP>(pb, Bv, p.B_stride[2], N, t0, len);
  };
  prefetch(cr.begin);
  __syncthreads();  // sBias

  float dsum = 0.0f;  // every lane of a row adds the same Δs
  for (int64_t c = cr.begin; c < cr.end; ++c) {
    const int len = int(L - c * kChunk < kChunk ? L - c * kChunk : kChunk);
#pragma unroll
    for (int j = 0; j < KP; ++j) {
      const int rr = TI::row(j), t = TI::step(j);
      float dt = to_float_as<T>(pd[j]) + sBias[rr];
      if (p.delta_softplus) dt = softplus(dt);
      if (rr >= q.rows || t >= len) dt = 0.0f;  // the identity step
      sDt[rr][t] = dt;
      sDu[rr][t] = dt * to_float_as<T>(pu[j]);
    }
    if (Bv) store_bc<T, NP>(sB, pb);
    __syncthreads();
    if (c + 1 < cr.end) prefetch(c + 1);
#pragma unroll 1
    for (int g0 = 0; g0 < len; g0 += 8) {
      float dt[8], du[8];
#pragma unroll
      for (int k = 0; k < 8; ++k) dt[k] = sDt[r][g0 + k], du[k] = sDu[r][g0 + k];
#pragma unroll
      for (int k = 0; k < 8; ++k) {
        float b[NT];
        vB.at(b, g0 + k);
#pragma unroll
        for (int i = 0; i < NT; ++i) h[i] = fmaf(ex2(dt[k] * ln.A2[i]), h[i], du[k] * b[i]);
        dsum += dt[k];
      }
    }
    __syncthreads();
  }
  ln.store(SegScratch::at(p, static_cast<float*>(p.workspace)), h, dsum);
}

// ---------------------------------------------------------------------------
// Backward
// ---------------------------------------------------------------------------

// Pairs of neighbouring channels (lanes tid and tid ^ 4: rows r and r ^ 1, same
// lane s) add their NT per-state B/C contributions with a transposed exchange:
// NT/2 shuffles leave the even row holding the pair's sums of its lane's first
// NT/2 states and the odd row the last NT/2. This halves the shared buffers the
// block reduction reads (and the reads). a + b == b + a exactly, so the order
// stays fixed and the result deterministic.
template <int NT>
__device__ __forceinline__ void pair_sum(const float (&v)[NT], bool odd, float (&out)[NT / 2]) {
#pragma unroll
  for (int i = 0; i < NT / 2; ++i) {
    const float send = odd ? v[i] : v[i + NT / 2], keep = odd ? v[i + NT / 2] : v[i];
    out[i] = keep + __shfl_xor_sync(0xffffffffu, send, 4);
  }
}

template <int NT>
__device__ __forceinline__ void st_half(float* dst, const float (&v)[NT / 2]) {
  if constexpr (NT / 2 == 2) {
    *reinterpret_cast<float2*>(dst) = make_float2(v[0], v[1]);
  } else {
#pragma unroll
    for (int i = 0; i < NT / 2; i += 4) *reinterpret_cast<float4*>(dst + i) = make_float4(v[i], v[i + 1], v[i + 2], v[i + 3]);
  }
}

// The lane's NT values of B_t in the backward (input-dependent: from the staged
// chunk at a constant offset a step; else the time-invariant registers). The
// forward's BcView (one shared-memory path for both layouts) measured 2%
// slower here: its run-time stride costs an address multiply per load in the
// unrolled loops, where this form has immediate offsets.
template <int NT, int NP>
__device__ __forceinline__ void bc_at(float (&v)[NT], const float* sX, bool variable, const float (&fixed)[NT], int t,
                                      int s) {
  if (variable) ld_vec<NT>(v, sX + t * NP + s * NT);
  else {
#pragma unroll
    for (int i = 0; i < NT; ++i) v[i] = fixed[i];
  }
}

// Blocks an SM the backward is compiled for. N <= 16: 3 (168 registers, a
// few spills; shared memory fits 3 too), so the 384 blocks of B = 8, D = 1536
// run in one wave on 132 SMs — measured 1.6x faster than 2 blocks an SM with
// no spills (8.8 vs 5.5 ms at L = 8192, bf16). Larger N: what fits.
template <int NT> constexpr int bwd_min_blocks() { return NT == 4 ? 3 : NT == 8 ? 2 : 1; }

// kVarBC: B and C both input-dependent, known at compile time (Mamba's case).
// Then every `vB ? load : copy` below is a plain load: in the general build
// the compiler emits both sides, and the copies of the time-invariant B/C
// registers were about 3 of the 36 instructions an element of the sub-chunk
// loop (v5's SASS).
template <typename T, int NT, int S, bool kVarBC>
__global__ void __launch_bounds__(kThreads, bwd_min_blocks<NT>()) bwd_kernel(P p, BwdWorkspace ws) {
  static_assert(S == 4, "the lane reductions assume 4 lanes a channel");
  static_assert(NT % 4 == 0, "16-byte shared-memory accesses");
  using Sh = Shape<NT, S>;
  using TI = TileIdx<Sh::kRows>;
  constexpr int R = Sh::kRows, NP = Sh::kNP, KP = TI::kPer, KBC = NP * kChunk / kThreads, NS = kChunk / kSub;
  extern __shared__ float4 smem4[];
  float* smem = reinterpret_cast<float*>(smem4);
  auto tile = [&](int k) { return reinterpret_cast<float(*)[kPad]>(smem + k * Sh::kTileFloats); };
  // Four tiles; three are overwritten in place by the gradients they give way
  // to (after the sub-chunk that reads them), each element by the lane that
  // reads it last, behind a __syncwarp.
  float(*sDt)[kPad] = tile(0);  // Δ, then grad delta
  float(*sU)[kPad] = tile(1);   // u, then grad u
  float(*sGy)[kPad] = tile(2);  // dL/dy before the gate: grad_out * silu(z)
  float(*sZ)[kPad] = tile(3);   // d(gate)/dz * grad_out, then grad z
  float* sB = smem + 4 * Sh::kTileFloats;
  float* sC = sB + kChunk * NP;
  constexpr int RP = Sh::kRedPitch;
  float* sRB = sC + kChunk * NP;  // [kSub] slabs of [R/2][NP]: row-pair grad B_t contributions
  float* sRC = sRB + kSub * RP;   // the same for grad C_t
  float* sHs = sRC + kSub * RP;   // [NS][R][NP]: the state at the start of every sub-chunk

  const Place q = place<R>(p);
  const int N = int(p.dstate), tid = threadIdx.x, r = tid / S, s = tid % S;
  const int64_t L = p.length, nch = (L + kChunk - 1) / kChunk, nseg = p.segments, piece = blockIdx.y;
  const SegRange cr = seg_range(nch, nseg, piece);  // all chunks unless the length is split
  const bool row_ok = r < q.rows, odd = r & 1, zgrad = p.z && p.grad_z;
  const int64_t d = q.d0 + (row_ok ? r : 0), row = q.b * p.dim + d;
  const float Dd = row_ok && p.D ? p.D[d] : 0.0f;
  const int64_t gst[2] = {p.dim * p.length, p.length};  // grad_out and the gradients are contiguous
  float* hs_lane = sHs + r * NP + s * NT;

  float A2[NT], Bc[NT], Cc[NT], carry[NT], gA[NT], gBc[NT], gCc[NT];
#pragma unroll
  for (int i = 0; i < NT; ++i) {
    const int n = s * NT + i;
    const bool ok = row_ok && n < N;
    A2[i] = ok ? p.A[d * N + n] * kLog2e : 0.0f;
    Bc[i] = ok && !p.is_variable_B ? static_cast<const float*>(p.B)[d * N + n] : 0.0f;
    Cc[i] = ok && !p.is_variable_C ? static_cast<const float*>(p.C)[d * N + n] : 0.0f;
    carry[i] = ok && p.grad_last_state ? p.grad_last_state[row * N + n] : 0.0f;
    gA[i] = gBc[i] = gCc[i] = 0.0f;
  }
  if (piece < nseg - 1 && row_ok) {  // the true carry into this piece: the pieces after it, last first
    for (int64_t j = nseg - 1; j > piece; --j) {
      const float ds = ws.seg.dsum[row * nseg + j];
#pragma unroll
      for (int i = 0; i < NT; ++i)
        if (s * NT + i < N) carry[i] = fmaf(ex2(A2[i] * ds), carry[i], ws.seg.h[(row * nseg + j) * N + s * NT + i]);
    }
  }
  float gD = 0.0f, gbias = 0.0f;  // this lane's steps; summed over the 4 lanes at the end
  const T* Bv = p.is_variable_B ? bc_base<T>(p.B, p.B_stride, q) : nullptr;
  const T* Cv = p.is_variable_C ? bc_base<T>(p.C, p.C_stride, q) : nullptr;
  const bool vB = kVarBC || Bv != nullptr, vC = kVarBC || Cv != nullptr;
  const int64_t part = (q.b * p.groups + q.g) * ws.blocks_per_group + q.blk;  // this block's B/C partial

  for (int64_t c = cr.end - 1; c >= cr.begin; --c) {
    const int64_t t0 = c * kChunk;
    const int len = int(L - t0 < kChunk ? L - t0 : kChunk);
    // (1) stage the chunk in two halves (u, Δ, B, C; then grad_out, z), each
    // with all of its global loads issued before any use; two halves keep the
    // staging registers inside the budget of 3 blocks an SM.
    {
      float pu[KP], pd[KP], pb[KBC], pc[KBC];
      load_tile<T, R>(pu, p.u, p.u_stride, q, t0, len);
      load_tile<T, R>(pd, p.delta, p.delta_stride, q, t0, len);
      if (vB) load_bc<T, NP>(pb, Bv, p.B_stride[2], N, t0, len);
      if (vC) load_bc<T, NP>(pc, Cv, p.C_stride[2], N, t0, len);
#pragma unroll
      for (int j = 0; j < KP; ++j) {
        const int rr = TI::row(j), t = TI::step(j);
        const bool ok = rr < q.rows && t < len;
        const float x = pd[j] + (ok && p.delta_bias ? p.delta_bias[q.d0 + rr] : 0.0f);
        sDt[rr][t] = !ok ? 0.0f : p.delta_softplus ? softplus(x) : x;  // past the end: Δ = 0, the identity
        sU[rr][t] = pu[j];
      }
      if (vB) store_bc<T, NP>(sB, pb);
      if (vC) store_bc<T, NP>(sC, pc);
    }
    {
      float pg[KP], pz[KP];
      load_tile<T, R>(pg, p.grad_out, gst, q, t0, len);
      if (p.z) load_tile<T, R>(pz, p.z, p.z_stride, q, t0, len);
#pragma unroll
      for (int j = 0; j < KP; ++j) {
        const int rr = TI::row(j), t = TI::step(j);
        if (p.z) {
          const float sg = sigmoid(pz[j]);
          sGy[rr][t] = pg[j] * pz[j] * sg;
          sZ[rr][t] = pg[j] * sg * (1.0f + pz[j] * (1.0f - sg));  // times y + D u below: grad z
        } else {
          sGy[rr][t] = pg[j];
        }
      }
    }
    __syncthreads();

    // (2a) forward through the chunk from its stored start state: the state at
    // the start of every sub-chunk (to shared memory), and grad z = (y + D u) sZ.
    // Steps past the end have Δ = 0, so every sub-chunk runs its 8 steps.
    {
      float h[NT];
#pragma unroll
      for (int i = 0; i < NT; ++i) {
        const int n = s * NT + i;
        const bool ok = row_ok && n < N;
        h[i] = !ok ? 0.0f
                   : c > 0 ? p.chunk_states[(row * nch + c - 1) * N + n]
                   : p.h0 ? p.h0[row * N + n] : 0.0f;
      }
#pragma unroll 1
      for (int k = 0; k < NS && k * kSub < len; ++k) {
#pragma unroll
        for (int i = 0; i < NT; i += 4)
          *reinterpret_cast<float4*>(hs_lane + k * R * NP + i) = make_float4(h[i], h[i + 1], h[i + 2], h[i + 3]);
        float dt[kSub], du[kSub], y[kSub];
#pragma unroll
        for (int tt = 0; tt < kSub; ++tt) dt[tt] = sDt[r][k * kSub + tt], du[tt] = dt[tt] * sU[r][k * kSub + tt];
#pragma unroll
        for (int tt = 0; tt < kSub; ++tt) {
          const int t = k * kSub + tt;
          float b[NT];
          bc_at<NT, NP>(b, sB, vB, Bc, t, s);
#pragma unroll
          for (int i = 0; i < NT; ++i) h[i] = fmaf(ex2(dt[tt] * A2[i]), h[i], du[tt] * b[i]);
          y[tt] = 0.0f;
          if (zgrad) {
            float cc[NT];
            bc_at<NT, NP>(cc, sC, vC, Cc, t, s);
#pragma unroll
            for (int i = 0; i < NT; ++i) y[tt] = fmaf(cc[i], h[i], y[tt]);
          }
        }
        if (zgrad) {
          float y0, y1;
          group_sum8(y, s, y0, y1);
          const int t = k * kSub + 2 * s;
          sZ[r][t] *= fmaf(Dd, sU[r][t], y0);
          sZ[r][t + 1] *= fmaf(Dd, sU[r][t + 1], y1);
        }
      }
    }

    // (2b) backwards through the sub-chunks: recompute their states, then the adjoint.
#pragma unroll 1
    for (int k = NS - 1; k >= 0; --k) {
      if (k * kSub >= len) continue;  // uniform across the block
      float H[kSub][NT], dt[kSub], du[kSub];
#pragma unroll
      for (int tt = 0; tt < kSub; ++tt) dt[tt] = sDt[r][k * kSub + tt], du[tt] = dt[tt] * sU[r][k * kSub + tt];
      {
        float h[NT];
        ld_vec<NT>(h, hs_lane + k * R * NP);
#pragma unroll
        for (int tt = 0; tt < kSub; ++tt) {
          float b[NT];
          bc_at<NT, NP>(b, sB, vB, Bc, k * kSub + tt, s);
#pragma unroll
          for (int i = 0; i < NT; ++i) {
            h[i] = fmaf(ex2(dt[tt] * A2[i]), h[i], du[tt] * b[i]);
            H[tt][i] = h[i];
          }
        }
      }
      // The adjoint, step by step backwards. e·h_{t-1} = h_t - Δu B_t, so the
      // earlier state is not needed; the per-step channel sums (grad Δ through
      // A, and the B·g that grad u and grad Δ share) wait for the end of the
      // sub-chunk, where one transposed reduction gives each lane two steps.
      float gdt[kSub], gbs[kSub];
#pragma unroll
      for (int tt = kSub - 1; tt >= 0; --tt) {
        const int t = k * kSub + tt;
        const float gy = sGy[r][t], dtv = sDt[r][t], duv = dtv * sU[r][t];
        float b[NT], cc[NT];
        bc_at<NT, NP>(b, sB, vB, Bc, t, s);
        bc_at<NT, NP>(cc, sC, vC, Cc, t, s);
        float gB[NT], gC[NT];
        gdt[tt] = 0.0f, gbs[tt] = 0.0f;
#pragma unroll
        for (int i = 0; i < NT; ++i) {
          const float e = ex2(dtv * A2[i]);
          const float g = fmaf(gy, cc[i], carry[i]);            // dL/dh_t
          const float gdA = g * fmaf(-duv, b[i], H[tt][i]);  // dL/d(Δ A_n) = g e h_{t-1}
          gA[i] = fmaf(gdA, dtv, gA[i]);
          gdt[tt] = fmaf(gdA, A2[i], gdt[tt]);
          gbs[tt] = fmaf(g, b[i], gbs[tt]);
          gB[i] = g * duv;
          gC[i] = gy * H[tt][i];
          carry[i] = e * g;
        }
        if (vB) {
          float v[NT / 2];
          pair_sum<NT>(gB, odd, v);
          st_half<NT>(sRB + tt * RP + (r >> 1) * NP + s * NT + (odd ? NT / 2 : 0), v);
        } else {
#pragma unroll
          for (int i = 0; i < NT; ++i) gBc[i] += gB[i];
        }
        if (vC) {
          float v[NT / 2];
          pair_sum<NT>(gC, odd, v);
          st_half<NT>(sRC + tt * RP + (r >> 1) * NP + s * NT + (odd ? NT / 2 : 0), v);
        } else {
#pragma unroll
          for (int i = 0; i < NT; ++i) gCc[i] += gC[i];
        }
      }
      {
        float x0, x1, b0, b1;
        group_sum8(gdt, s, x0, x1);
        group_sum8(gbs, s, b0, b1);
        __syncwarp();  // the channel's other lanes have read this sub-chunk's Δ and u
#pragma unroll
        for (int j = 0; j < 2; ++j) {
          const int t = k * kSub + 2 * s + j;
          if (t < len) {
            const float gdtA = (j ? x1 : x0) * kLn2, gb = j ? b1 : b0;  // A2 carries log2 e
            const float u = sU[r][t], dtt = sDt[r][t], gy = sGy[r][t];
            // softplus'(x) = sigmoid(x) = 1 - exp(-softplus(x)) = -expm1(-Δ)
            const float sig = p.delta_softplus ? -expm1f(-dtt) : 1.0f;
            const float gx = fmaf(gb, u, gdtA) * sig;
            sU[r][t] = fmaf(gy, Dd, gb * dtt);  // grad u
            sDt[r][t] = gx;                     // grad delta
            gD = fmaf(gy, u, gD);
            gbias += gx;
          }
        }
      }
      // Sum the sub-chunk's B_t / C_t contributions over the block's row pairs, in order.
      if (vB || vC) {
        __syncthreads();
        const int nout = kSub * N;
        for (int i = tid; i < 2 * nout; i += kThreads) {
          const bool isC = i >= nout;
          if (isC ? !vC : !vB) continue;
          const int j = isC ? i - nout : i, tt = j % kSub, n = j / kSub, t = k * kSub + tt;
          if (t >= len) continue;
          const float* src = (isC ? sRC : sRB) + tt * RP + n;
          float acc = 0.0f;
#pragma unroll 4
          for (int rr = 0; rr < R / 2; ++rr) acc += src[rr * NP];
          float* dst = isC ? ws.gCv : ws.gBv;
          dst[(part * N + n) * L + t0 + t] = acc;
        }
        __syncthreads();
      }
    }
    __syncthreads();

    // (3) store grad u, grad delta (and grad z) of the chunk.
    {
      const int64_t o0 = (q.b * p.dim + q.d0) * L + t0;
#pragma unroll
      for (int j = 0; j < KP; ++j) {
        const int rr = TI::row(j), t = TI::step(j);
        if (rr < q.rows && t < len) {
          const int64_t o = o0 + rr * L + t;
          Dev<T>::st(static_cast<T*>(p.grad_u) + o, sU[rr][t]);
          Dev<T>::st(static_cast<T*>(p.grad_delta) + o, sDt[rr][t]);
          if (zgrad) Dev<T>::st(static_cast<T*>(p.grad_z) + o, sZ[rr][t]);
        }
      }
    }
    __syncthreads();
  }

  gD = group_sum<S>(gD);
  gbias = group_sum<S>(gbias);
  if (row_ok) {
    const int64_t prow = piece * p.batch * p.dim + row;  // this piece's partial sums
#pragma unroll
    for (int i = 0; i < NT; ++i) {
      const int n = s * NT + i;
      if (n >= N) continue;
      if (p.grad_h0 && piece == 0) p.grad_h0[row * N + n] = carry[i];
      ws.gA[prow * N + n] = gA[i];
      if (!p.is_variable_B) ws.gBc[prow * N + n] = gBc[i];
      if (!p.is_variable_C) ws.gCc[prow * N + n] = gCc[i];
    }
    if (s == 0) {
      ws.gD[prow] = gD;
      ws.gbias[prow] = gbias;
    }
  }
}

// First pass of a split backward: every piece but the first runs the adjoint
// g_t = gy_t C_t + exp(Δ_{t+1} A) g_{t+1} backwards from a zero carry, keeping
// only the carry that leaves its first step and the sum of its Δ. No states
// are recomputed (the carry does not depend on them): one exponential and two
// FMA-pipe operations an element.
template <typename T, int NT, int S>
__global__ void __launch_bounds__(kThreads, 3) bwd_seg_kernel(P p, BwdWorkspace ws) {
  static_assert(S == 4, "the block layout assumes 4 lanes a channel");
  static_assert(NT % 4 == 0, "16-byte shared-memory accesses");
  using Sh = Shape<NT, S>;
  using TI = TileIdx<Sh::kRows>;
  constexpr int R = Sh::kRows, NP = Sh::kNP, KP = TI::kPer, KBC = NP * kChunk / kThreads;
  extern __shared__ float4 smem4[];
  float* smem = reinterpret_cast<float*>(smem4);
  float(*sDt)[kPad] = reinterpret_cast<float(*)[kPad]>(smem);
  float(*sGy)[kPad] = reinterpret_cast<float(*)[kPad]>(smem + Sh::kTileFloats);  // dL/dy before the gate
  float* sC = smem + 2 * Sh::kTileFloats;
  float* sBias = sC + kChunk * NP;  // [R]

  const Place q = place<R>(p);
  const SegLane<NT, S> ln(p, q, blockIdx.y + 1, p.C, p.is_variable_C);
  const int N = ln.N, tid = threadIdx.x, r = ln.r;
  const int64_t L = p.length;
  const SegRange cr = ln.cr;
  const int64_t gst[2] = {p.dim * p.length, p.length};  // grad_out is contiguous
  if (tid < R) sBias[tid] = tid < q.rows && p.delta_bias ? p.delta_bias[q.d0 + tid] : 0.0f;
  float carry[NT] = {};
  const T* Cv = p.is_variable_C ? bc_base<T>(p.C, p.C_stride, q) : nullptr;
  const BcView<NT, NP> vC(sC, Cv, ln.fixed, r, ln.s);
  __syncthreads();  // sBias

  float dsum = 0.0f;  // every lane of a row adds the same Δs
  for (int64_t c = cr.end - 1; c >= cr.begin; --c) {
    const int64_t t0 = c * kChunk;
    const int len = int(L - t0 < kChunk ? L - t0 : kChunk);
    {
      float pd[KP], pg[KP], pz[KP], pc[KBC];
      load_tile<T, R>(pd, p.delta, p.delta_stride, q, t0, len);
      load_tile<T, R>(pg, p.grad_out, gst, q, t0, len);
      if (p.z) load_tile<T, R>(pz, p.z, p.z_stride, q, t0, len);
      if (Cv) load_bc<T, NP>(pc, Cv, p.C_stride[2], N, t0, len);
#pragma unroll
      for (int j = 0; j < KP; ++j) {
        const int rr = TI::row(j), t = TI::step(j);
        const bool ok = rr < q.rows && t < len;
        const float x = pd[j] + sBias[rr];
        sDt[rr][t] = !ok ? 0.0f : p.delta_softplus ? softplus(x) : x;  // past the end: Δ = 0, the identity
        sGy[rr][t] = p.z ? pg[j] * pz[j] * sigmoid(pz[j]) : pg[j];      // zero past the end (pg = 0)
      }
      if (Cv) store_bc<T, NP>(sC, pc);
    }
    __syncthreads();
#pragma unroll 1
    for (int g0 = (len - 1) / 8 * 8; g0 >= 0; g0 -= 8) {
      float dt[8], gy[8];
#pragma unroll
      for (int k = 0; k < 8; ++k) dt[k] = sDt[r][g0 + k], gy[k] = sGy[r][g0 + k];
#pragma unroll
      for (int k = 7; k >= 0; --k) {
        float cc[NT];
        vC.at(cc, g0 + k);
#pragma unroll
        for (int i = 0; i < NT; ++i) carry[i] = ex2(dt[k] * ln.A2[i]) * fmaf(gy[k], cc[i], carry[i]);
        dsum += dt[k];
      }
    }
    __syncthreads();
  }
  ln.store(ws.seg, carry, dsum);
}

inline void check_state_size(int64_t N) {
  if (N < 1 || N > 64)
    throw std::invalid_argument("selective_scan (cuda): state size N = " + std::to_string(N) +
                                " is not supported by the CUDA kernel (1 <= N <= 64); use backend='ref' or the CPU");
}

// Raises a kernel's dynamic shared-memory limit, once per device: `done` is a
// static of the calling instantiation (one kernel), so graph captures that
// follow the first call issue no attribute calls.
template <typename K>
void set_smem(K kernel, size_t bytes, bool (&done)[64]) {
  int dev = 0;
  cuda_check(cudaGetDevice(&dev), "selective_scan: cudaGetDevice");
  if (dev < 64 && done[dev]) return;
  cuda_check(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, int(bytes)),
             "selective_scan: raising the shared-memory limit");
  if (dev < 64) done[dev] = true;
}

inline unsigned grid_size(const P& p, int rows_per_block) {
  const int64_t dpg = p.dim / p.groups, nblk = (dpg + rows_per_block - 1) / rows_per_block;
  const int64_t n = p.batch * p.groups * nblk;
  if (n > 0x7fffffffLL) throw std::invalid_argument("selective_scan (cuda): batch * dim too large for the grid");
  return unsigned(n);
}

// p.segments is resolved (>= 1) by the entry points; blockIdx.y is the piece.
template <typename T, int NT, int S>
void run_fwd(const P& p) {
  using Sh = Shape<NT, S>;
  const unsigned blocks = grid_size(p, Sh::kRows);
  auto stream = reinterpret_cast<cudaStream_t>(p.stream);
  if (p.segments > 1) {
    static bool done_seg[64] = {};
    auto k1 = fwd_seg_kernel<T, NT, S>;
    set_smem(k1, Sh::fwd_seg_smem(), done_seg);
    k1<<<dim3(blocks, unsigned(p.segments - 1)), kThreads, Sh::fwd_seg_smem(), stream>>>(p);
    cuda_check(cudaGetLastError(), "selective_scan forward, first pass of the split length");
  }
  static bool done[64] = {};
  auto k = fwd_kernel<T, NT, S>;
  set_smem(k, Sh::fwd_smem(), done);
  k<<<dim3(blocks, unsigned(p.segments)), kThreads, Sh::fwd_smem(), stream>>>(p);
  cuda_check(cudaGetLastError(), "selective_scan forward kernel");
}

template <typename T, int NT, int S, bool kVarBC>
void run_bwd_as(const P& p, const BwdWorkspace& ws) {
  using Sh = Shape<NT, S>;
  static bool done[64] = {};  // per instantiation: each kernel needs its own shared-memory attribute
  auto k = bwd_kernel<T, NT, S, kVarBC>;
  set_smem(k, Sh::bwd_smem(), done);
  k<<<dim3(grid_size(p, Sh::kRows), unsigned(p.segments)), kThreads, Sh::bwd_smem(),
      reinterpret_cast<cudaStream_t>(p.stream)>>>(p, ws);
  cuda_check(cudaGetLastError(), "selective_scan backward kernel");
}

template <typename T, int NT, int S>
void run_bwd(const P& p, const BwdWorkspace& ws) {
  if (p.segments > 1) {
    using Sh = Shape<NT, S>;
    static bool done_seg[64] = {};
    auto k1 = bwd_seg_kernel<T, NT, S>;
    set_smem(k1, Sh::bwd_seg_smem(), done_seg);
    k1<<<dim3(grid_size(p, Sh::kRows), unsigned(p.segments - 1)), kThreads, Sh::bwd_seg_smem(),
         reinterpret_cast<cudaStream_t>(p.stream)>>>(p, ws);
    cuda_check(cudaGetLastError(), "selective_scan backward, first pass of the split length");
  }
  if (p.is_variable_B && p.is_variable_C) run_bwd_as<T, NT, S, true>(p, ws);
  else run_bwd_as<T, NT, S, false>(p, ws);
}

// (NT, S) by state size: S = 4 lanes a channel, NT states a lane.
template <typename T>
void launch_fwd(const P& p) {
  check_state_size(p.dstate);
  if (p.dstate <= 16) run_fwd<T, 4, 4>(p);
  else if (p.dstate <= 32) run_fwd<T, 8, 4>(p);
  else run_fwd<T, 16, 4>(p);
}

template <typename T>
void launch_bwd(const P& p, const BwdWorkspace& ws) {
  check_state_size(p.dstate);
  if (p.dstate <= 16) run_bwd<T, 4, 4>(p, ws);
  else if (p.dstate <= 32) run_bwd<T, 8, 4>(p, ws);
  else run_bwd<T, 16, 4>(p, ws);
}

}  // namespace ss
}  // namespace ssmlab

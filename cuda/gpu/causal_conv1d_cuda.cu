// CUDA causal depthwise conv (the maths in ssmlab/causal_conv1d.h).
//
// A block of 128 threads owns one chunk of kConvChunk = 1024 steps of one
// (batch, channel) row; a thread owns 8 consecutive steps, read and written
// as one 16-byte vector when the row allows it (unit-stride rows whose length
// and strides are multiples of 8 elements), so a warp moves 512 contiguous
// bytes per access. The K-1 neighbours a thread needs outside its 8 steps
// (before them in the forward; on both sides in the backward, which recomputes
// the pre-activation instead of storing it) are scalar loads that hit the
// cache lines the neighbouring threads bring in. The work is a few FMAs an
// element: the kernels are bound by memory traffic, one read of x (and of
// grad_out) and one write of the output.
//
// The backward reduces its weight and bias partial sums over the block with
// shuffles and a fixed tree, and writes one partial per (batch, chunk): no
// atomics, so the gradients are bitwise repeatable.
#include <cstdint>
#include <stdexcept>
#include <string>

#include "cuda_utils.cuh"
#include "ssmlab/causal_conv1d.h"

namespace ssmlab {
namespace {

constexpr int kThreads = 128, kPer = 8;
static_assert(kThreads * kPer == kConvChunk, "a block covers one chunk");

// 8 consecutive elements as floats: one 16-byte load when `vec`, else scalars (masked at the end).
template <typename T, bool vec>
__device__ __forceinline__ void ld8(const T* p, int64_t t0, int64_t L, float (&v)[kPer]) {
  if constexpr (vec) {
    if constexpr (sizeof(T) == 2) {
      const uint4 raw = *reinterpret_cast<const uint4*>(p + t0);
      const T* e = reinterpret_cast<const T*>(&raw);
#pragma unroll
      for (int i = 0; i < kPer; ++i) v[i] = Dev<T>::ld(e + i);
    } else {
      const float4 a = *reinterpret_cast<const float4*>(p + t0), b = *reinterpret_cast<const float4*>(p + t0 + 4);
      v[0] = a.x, v[1] = a.y, v[2] = a.z, v[3] = a.w, v[4] = b.x, v[5] = b.y, v[6] = b.z, v[7] = b.w;
    }
  } else {
#pragma unroll
    for (int i = 0; i < kPer; ++i) v[i] = t0 + i < L ? Dev<T>::ld(p + t0 + i) : 0.0f;
  }
}

template <typename T, bool vec>
__device__ __forceinline__ void st8(T* p, int64_t t0, int64_t L, const float (&v)[kPer]) {
  if constexpr (vec) {
    if constexpr (sizeof(T) == 2) {
      uint4 raw;
      T* e = reinterpret_cast<T*>(&raw);
#pragma unroll
      for (int i = 0; i < kPer; ++i) Dev<T>::st(e + i, v[i]);
      *reinterpret_cast<uint4*>(p + t0) = raw;
    } else {
      *reinterpret_cast<float4*>(p + t0) = make_float4(v[0], v[1], v[2], v[3]);
      *reinterpret_cast<float4*>(p + t0 + 4) = make_float4(v[4], v[5], v[6], v[7]);
    }
  } else {
#pragma unroll
    for (int i = 0; i < kPer; ++i)
      if (t0 + i < L) Dev<T>::st(p + t0 + i, v[i]);
  }
}

__device__ __forceinline__ float sigmoid(float v) { return 1.0f / (1.0f + __expf(-v)); }

struct Row {
  int64_t b, c, t0;
};

// blockIdx.x = channel * chunks + chunk, blockIdx.y = batch
__device__ __forceinline__ Row row_of(const CausalConv1dParams& p) {
  const int64_t nch = causal_conv1d_chunks(p.length);
  const int64_t c = blockIdx.x / nch, chunk = blockIdx.x % nch;
  return {int64_t(blockIdx.y), c, chunk * kConvChunk + int64_t(threadIdx.x) * kPer};
}

template <typename T, int K, bool vec>
__global__ void __launch_bounds__(kThreads) fwd_kernel(CausalConv1dParams p) {
  const Row r = row_of(p);
  const int64_t L = p.length;
  if (r.t0 >= L) return;
  const T* x = static_cast<const T*>(p.x) + r.b * p.x_stride[0] + r.c * p.x_stride[1];
  float w[K];
#pragma unroll
  for (int k = 0; k < K; ++k) w[k] = p.weight[r.c * K + k];
  const float bias = p.bias ? p.bias[r.c] : 0.0f;
  float xs[kPer + K - 1];  // x[t0 - (K-1) .. t0 + 7]
#pragma unroll
  for (int i = 0; i < K - 1; ++i) {
    const int64_t t = r.t0 - (K - 1) + i;
    xs[i] = t >= 0 ? Dev<T>::ld(x + t) : 0.0f;
  }
  float cur[kPer];
  ld8<T, vec>(x, r.t0, L, cur);
#pragma unroll
  for (int i = 0; i < kPer; ++i) xs[K - 1 + i] = cur[i];
  float out[kPer];
#pragma unroll
  for (int i = 0; i < kPer; ++i) {
    float acc = bias;
#pragma unroll
    for (int k = 0; k < K; ++k) acc = fmaf(w[k], xs[i + k], acc);
    out[i] = p.silu ? acc * sigmoid(acc) : acc;
  }
  st8<T, vec>(static_cast<T*>(p.out) + (r.b * p.channels + r.c) * L, r.t0, L, out);
}

// Sum over the block, in a fixed order: a butterfly within each warp, then warp 0 adds the four warps.
__device__ __forceinline__ float block_sum(float v, float* scratch) {
#pragma unroll
  for (int off = 16; off > 0; off >>= 1) v += __shfl_xor_sync(0xffffffffu, v, off);
  if ((threadIdx.x & 31) == 0) scratch[threadIdx.x >> 5] = v;
  __syncthreads();
  float total = 0.0f;
#pragma unroll
  for (int w = 0; w < kThreads / 32; ++w) total += scratch[w];
  __syncthreads();  // scratch is reused by the next sum
  return total;
}

template <typename T, int K, bool vec>
__global__ void __launch_bounds__(kThreads) bwd_kernel(CausalConv1dParams p) {
  __shared__ float scratch[kThreads / 32];
  const Row r = row_of(p);
  const int64_t L = p.length, nch = causal_conv1d_chunks(L);
  const bool active = r.t0 < L;  // inactive threads still join the block sums, with zeros
  const T* x = static_cast<const T*>(p.x) + r.b * p.x_stride[0] + r.c * p.x_stride[1];
  const int64_t o = (r.b * p.channels + r.c) * L;
  const T* g = static_cast<const T*>(p.grad_out) + o;
  float w[K];
#pragma unroll
  for (int k = 0; k < K; ++k) w[k] = p.weight[r.c * K + k];
  const float bias = p.bias ? p.bias[r.c] : 0.0f;

  // x over [t0 - (K-1), t0 + 8 + (K-1)), grad_out over [t0, t0 + 8 + (K-1))
  constexpr int H = K - 1;
  float xs[kPer + 2 * H], gs[kPer + H];
  float gw[K], gb = 0.0f, gx[kPer];
#pragma unroll
  for (int k = 0; k < K; ++k) gw[k] = 0.0f;
  if (active) {
    float cur[kPer];
    ld8<T, vec>(x, r.t0, L, cur);
#pragma unroll
    for (int i = 0; i < kPer; ++i) xs[H + i] = cur[i];
    ld8<T, vec>(g, r.t0, L, cur);
#pragma unroll
    for (int i = 0; i < kPer; ++i) gs[i] = cur[i];
#pragma unroll
    for (int i = 0; i < H; ++i) {
      const int64_t tb = r.t0 - H + i, ta = r.t0 + kPer + i;
      xs[i] = tb >= 0 ? Dev<T>::ld(x + tb) : 0.0f;
      xs[H + kPer + i] = ta < L ? Dev<T>::ld(x + ta) : 0.0f;
      gs[kPer + i] = ta < L ? Dev<T>::ld(g + ta) : 0.0f;
    }
    // gp over [t0, t0 + 8 + H): the activation's derivative at the recomputed pre-activation
    float gp[kPer + H];
#pragma unroll
    for (int i = 0; i < kPer + H; ++i) {
      if (p.silu) {
        float pre = bias;
#pragma unroll
        for (int k = 0; k < K; ++k) pre = fmaf(w[k], xs[i + k], pre);
        const float s = sigmoid(pre);
        gp[i] = gs[i] * s * (1.0f + pre * (1.0f - s));
      } else {
        gp[i] = gs[i];
      }
    }
#pragma unroll
    for (int i = 0; i < kPer; ++i) {
      float acc = 0.0f;
#pragma unroll
      for (int k = 0; k < K; ++k) acc = fmaf(w[k], gp[i + H - k], acc);
      gx[i] = acc;
      gb += gp[i];
#pragma unroll
      for (int k = 0; k < K; ++k) gw[k] = fmaf(gp[i], xs[i + k], gw[k]);
    }
    st8<T, vec>(static_cast<T*>(p.grad_x) + o, r.t0, L, gx);
  }
  const int64_t part = r.b * nch + blockIdx.x % nch;
#pragma unroll
  for (int k = 0; k < K; ++k) {
    const float s = block_sum(gw[k], scratch);
    if (threadIdx.x == 0) p.grad_weight_partial[(part * p.channels + r.c) * K + k] = s;
  }
  if (p.grad_bias_partial) {
    const float s = block_sum(gb, scratch);
    if (threadIdx.x == 0) p.grad_bias_partial[part * p.channels + r.c] = s;
  }
}

// Outside the bounds gp is 0 and x is 0 (the causal padding): t >= L gives gs = 0, t < 0 gives xs = 0.

bool vectorisable(const CausalConv1dParams& p) {
  const int64_t a = 16 / (p.dtype == DType::kFloat32 ? 4 : 2);  // elements in 16 bytes
  const auto aligned = [](const void* q) { return q == nullptr || reinterpret_cast<std::uintptr_t>(q) % 16 == 0; };
  return p.length % kPer == 0 && p.x_stride[0] % a == 0 && p.x_stride[1] % a == 0 && aligned(p.x) &&
         aligned(p.out) && aligned(p.grad_out) && aligned(p.grad_x);
}

template <typename T, int K, bool vec>
void launch(const CausalConv1dParams& p, bool backward) {
  const dim3 grid(unsigned(p.channels * causal_conv1d_chunks(p.length)), unsigned(p.batch));
  auto stream = reinterpret_cast<cudaStream_t>(p.stream);
  if (backward) bwd_kernel<T, K, vec><<<grid, kThreads, 0, stream>>>(p);
  else fwd_kernel<T, K, vec><<<grid, kThreads, 0, stream>>>(p);
  cuda_check(cudaGetLastError(), "causal_conv1d kernel launch");
}

template <typename T, int K>
void launch_vec(const CausalConv1dParams& p, bool backward) {
  if (vectorisable(p)) launch<T, K, true>(p, backward);
  else launch<T, K, false>(p, backward);
}

template <typename T>
void launch_width(const CausalConv1dParams& p, bool backward) {
  switch (p.width) {
    case 1: return launch_vec<T, 1>(p, backward);
    case 2: return launch_vec<T, 2>(p, backward);
    case 3: return launch_vec<T, 3>(p, backward);
    case 4: return launch_vec<T, 4>(p, backward);
    case 5: return launch_vec<T, 5>(p, backward);
    case 6: return launch_vec<T, 6>(p, backward);
    case 7: return launch_vec<T, 7>(p, backward);
    case 8: return launch_vec<T, 8>(p, backward);
  }
  throw std::invalid_argument("causal_conv1d: width " + std::to_string(p.width) + " outside [1, 8]");
}

void dispatch(const CausalConv1dParams& p, bool backward) {
  if (p.batch == 0 || p.channels == 0 || p.length == 0) return;
  if (p.batch > 65535) throw std::invalid_argument("causal_conv1d (CUDA): batch above 65535");
  if (p.channels * causal_conv1d_chunks(p.length) > 2147483647LL)
    throw std::invalid_argument("causal_conv1d (CUDA): channels x length chunks above 2^31 blocks");
  switch (p.dtype) {
    case DType::kFloat32: return launch_width<float>(p, backward);
    case DType::kFloat16: return launch_width<Half>(p, backward);
    case DType::kBFloat16: return launch_width<BFloat16>(p, backward);
    case DType::kFloat64: break;
  }
  throw std::invalid_argument(std::string("causal_conv1d (CUDA): unsupported dtype ") + dtype_name(p.dtype));
}

}  // namespace

void causal_conv1d_fwd_cuda(const CausalConv1dParams& p) { dispatch(p, false); }
void causal_conv1d_bwd_cuda(const CausalConv1dParams& p) { dispatch(p, true); }

}  // namespace ssmlab

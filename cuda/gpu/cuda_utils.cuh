// Small device-side helpers shared by the CUDA kernels.
#pragma once
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <stdexcept>
#include <string>

#include "ssmlab/dtype.h"

namespace ssmlab {

inline void cuda_check(cudaError_t err, const char* what) {
  if (err != cudaSuccess)
    throw std::runtime_error(std::string(what) + ": " + cudaGetErrorString(err));
}

// Device loads/stores of an element as its accumulation type.
template <typename T> struct Dev;
template <> struct Dev<float> {
  using acc = float;
  __device__ static float ld(const float* p) { return *p; }
  __device__ static void st(float* p, float v) { *p = v; }
};
template <> struct Dev<double> {
  using acc = double;
  __device__ static double ld(const double* p) { return *p; }
  __device__ static void st(double* p, double v) { *p = v; }
};
template <> struct Dev<Half> {
  using acc = float;
  __device__ static float ld(const Half* p) { return __half2float(*reinterpret_cast<const __half*>(p)); }
  __device__ static void st(Half* p, float v) { *reinterpret_cast<__half*>(p) = __float2half_rn(v); }
};
template <> struct Dev<BFloat16> {
  using acc = float;
  __device__ static float ld(const BFloat16* p) {
    return __bfloat162float(*reinterpret_cast<const __nv_bfloat16*>(p));
  }
  __device__ static void st(BFloat16* p, float v) {
    *reinterpret_cast<__nv_bfloat16*>(p) = __float2bfloat16_rn(v);
  }
};

// An element of the linear-recurrence monoid: the affine map h -> a h + b.
template <typename Acc> struct Affine { Acc a, b; };

// Apply `first`, then `second`: (a1, b1) o (a2, b2) = (a1 a2, a2 b1 + b2).
template <typename Acc>
__device__ __forceinline__ Affine<Acc> compose(Affine<Acc> first, Affine<Acc> second) {
  return {first.a * second.a, second.a * first.b + second.b};
}

// Block-wide exclusive scan of one Affine per thread, in thread order.
// `warp_total` is shared scratch of blockDim.x / 32 entries.
template <typename Acc, int kThreads>
__device__ __forceinline__ Affine<Acc> block_exclusive_scan(Affine<Acc> v, Affine<Acc>* warp_total) {
  constexpr unsigned kFull = 0xffffffffu;
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  Affine<Acc> inc = v;
#pragma unroll
  for (int off = 1; off < 32; off <<= 1) {
    Affine<Acc> prev{__shfl_up_sync(kFull, inc.a, off), __shfl_up_sync(kFull, inc.b, off)};
    if (lane >= off) inc = compose(prev, inc);
  }
  Affine<Acc> excl{__shfl_up_sync(kFull, inc.a, 1), __shfl_up_sync(kFull, inc.b, 1)};
  if (lane == 0) excl = {Acc(1), Acc(0)};
  if (lane == 31) warp_total[warp] = inc;
  __syncthreads();
  Affine<Acc> before{Acc(1), Acc(0)};
#pragma unroll
  for (int w = 0; w < kThreads / 32; ++w)
    if (w < warp) before = compose(before, warp_total[w]);
  __syncthreads();  // warp_total may be reused by the caller's next scan
  return compose(before, excl);
}

}  // namespace ssmlab

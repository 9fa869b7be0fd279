// CUDA single-token decoding steps (the maths in ssmlab/decode_step.h).
//
// One thread per (batch, channel). For the SSM step a block is a tile of
// kThreads channels of one batch row: the row's B and C (N values each, shared
// by every channel) are staged once in shared memory, and each thread keeps
// its channel's N states and A row in registers (N <= 64: the loops below are
// unrolled to kMaxN with a guard, so the arrays never leave registers; beyond,
// a plain loop). A step reads and writes each state once, so the kernel is a
// single pass over the state at memory speed; at small batch its cost is the
// launch, which is the point of fusing the ~30 elementwise ops it replaces.
//
// Dtypes are run-time codes: every thread of a launch takes the same branch of
// each switch, so mixed precisions cost no divergence. All offsets are 64-bit.
#include <cstdint>
#include <stdexcept>
#include <string>

#include "cuda_utils.cuh"
#include "ssmlab/decode_step.h"

namespace ssmlab {
namespace {

constexpr int kThreads = 64;          // channels per block: small, so that batch 1 still spreads over SMs
constexpr int64_t kMaxDstate = 4096;  // B and C rows in shared memory: 2 N floats (32 KiB)

__device__ __forceinline__ float ld(const void* p, DType d, int64_t i) {
  switch (d) {
    case DType::kFloat16: return __half2float(static_cast<const __half*>(p)[i]);
    case DType::kBFloat16: return __bfloat162float(static_cast<const __nv_bfloat16*>(p)[i]);
    case DType::kFloat64: return float(static_cast<const double*>(p)[i]);
    case DType::kFloat32: break;
  }
  return static_cast<const float*>(p)[i];
}

__device__ __forceinline__ void st(void* p, DType d, int64_t i, float v) {
  switch (d) {
    case DType::kFloat16: static_cast<__half*>(p)[i] = __float2half_rn(v); return;
    case DType::kBFloat16: static_cast<__nv_bfloat16*>(p)[i] = __float2bfloat16_rn(v); return;
    case DType::kFloat64: static_cast<double*>(p)[i] = v; return;
    case DType::kFloat32: break;
  }
  static_cast<float*>(p)[i] = v;
}

__device__ __forceinline__ float silu(float v) { return v / (1.0f + __expf(-v)); }

// PyTorch's softplus: the identity above 20, where log1p(exp(v)) == v in float.
__device__ __forceinline__ float softplus(float v) { return v <= 20.0f ? log1pf(__expf(v)) : v; }

__global__ void __launch_bounds__(kThreads) conv_kernel(CausalConv1dUpdateParams p) {
  const int64_t r = int64_t(blockIdx.x) * kThreads + threadIdx.x;
  if (r >= p.batch * p.channels) return;
  const int64_t bi = r / p.channels, ci = r % p.channels, K = p.width;
  const int64_t s0 = bi * p.state_stride[0] + ci * p.state_stride[1], sk = p.state_stride[2];
  // Shift left by one, then append x; the sum reads the stored values back, so
  // a 16-bit state gives the rounded input now exactly as in later steps.
  for (int64_t k = 0; k + 1 < K; ++k)
    st(p.state, p.state_dtype, s0 + k * sk, ld(p.state, p.state_dtype, s0 + (k + 1) * sk));
  st(p.state, p.state_dtype, s0 + (K - 1) * sk, ld(p.x, p.x_dtype, bi * p.x_stride[0] + ci * p.x_stride[1]));
  float acc = p.bias ? ld(p.bias, p.bias_dtype, ci * p.bias_stride) : 0.0f;
  for (int64_t k = 0; k < K; ++k)
    acc += ld(p.state, p.state_dtype, s0 + k * sk) *
           ld(p.weight, p.weight_dtype, ci * p.weight_stride[0] + k * p.weight_stride[1]);
  st(p.out, p.x_dtype, r, p.silu ? silu(acc) : acc);
}

// A row of up to kMaxN floats into registers: four at a time when the row is
// unit-stride, 16-byte aligned and N a multiple of 4, else one at a time.
__device__ __forceinline__ bool vectorizable(const float* row, int64_t stride, int N) {
  return stride == 1 && N % 4 == 0 && (reinterpret_cast<std::uintptr_t>(row) & 15) == 0;
}

template <int kMaxN>
__device__ __forceinline__ void load_row(float (&v)[kMaxN], const float* row, int64_t stride, int N) {
  if (vectorizable(row, stride, N)) {
#pragma unroll
    for (int q = 0; q < kMaxN / 4; ++q)
      if (4 * q < N) {
        const float4 f = reinterpret_cast<const float4*>(row)[q];
        v[4 * q] = f.x, v[4 * q + 1] = f.y, v[4 * q + 2] = f.z, v[4 * q + 3] = f.w;
      }
  } else {
#pragma unroll
    for (int n = 0; n < kMaxN; ++n)
      if (n < N) v[n] = row[n * stride];
  }
}

template <int kMaxN>
__device__ __forceinline__ void store_row(const float (&v)[kMaxN], float* row, int64_t stride, int N) {
  if (vectorizable(row, stride, N)) {
#pragma unroll
    for (int q = 0; q < kMaxN / 4; ++q)
      if (4 * q < N) reinterpret_cast<float4*>(row)[q] = make_float4(v[4 * q], v[4 * q + 1], v[4 * q + 2], v[4 * q + 3]);
  } else {
#pragma unroll
    for (int n = 0; n < kMaxN; ++n)
      if (n < N) row[n * stride] = v[n];
  }
}

// kMaxN > 0: N <= kMaxN, states in registers; kMaxN == 0: any N, a loop.
template <int kMaxN>
__global__ void __launch_bounds__(kThreads) ssm_kernel(SelectiveStateUpdateParams p, int64_t tiles) {
  extern __shared__ float smem[];  // B row, then C row
  const int N = int(p.dstate);
  float* sB = smem;
  float* sC = smem + N;
  const int64_t bi = blockIdx.x / tiles;
  const int64_t ci = (blockIdx.x % tiles) * kThreads + threadIdx.x;
  for (int n = threadIdx.x; n < N; n += kThreads) {
    sB[n] = ld(p.B, p.B_dtype, bi * p.B_stride[0] + n * p.B_stride[1]);
    sC[n] = ld(p.C, p.C_dtype, bi * p.C_stride[0] + n * p.C_stride[1]);
  }
  __syncthreads();
  if (ci >= p.dim) return;

  const float x = ld(p.x, p.x_dtype, bi * p.x_stride[0] + ci * p.x_stride[1]);
  float delta = ld(p.dt, p.dt_dtype, bi * p.dt_stride[0] + ci * p.dt_stride[1]);
  if (p.dt_bias) delta += p.dt_bias[ci * p.dt_bias_stride];
  if (p.dt_softplus) delta = softplus(delta);
  const float dx = delta * x;
  float* state = p.state + bi * p.state_stride[0] + ci * p.state_stride[1];
  const float* A = p.A + ci * p.A_stride[0];
  const int64_t sn = p.state_stride[2], an = p.A_stride[1];
  float y = 0.0f;
  if constexpr (kMaxN > 0) {
    float h[kMaxN] = {}, a[kMaxN] = {};
    load_row<kMaxN>(h, state, sn, N);
    load_row<kMaxN>(a, A, an, N);
#pragma unroll
    for (int n = 0; n < kMaxN; ++n)
      if (n < N) {
        h[n] = __expf(delta * a[n]) * h[n] + dx * sB[n];
        y += sC[n] * h[n];
      }
    store_row<kMaxN>(h, state, sn, N);
  } else {
    for (int n = 0; n < N; ++n) {
      const float hn = __expf(delta * A[n * an]) * state[n * sn] + dx * sB[n];
      state[n * sn] = hn;
      y += sC[n] * hn;
    }
  }
  if (p.D) y += p.D[ci * p.D_stride] * x;
  if (p.z) y *= silu(ld(p.z, p.z_dtype, bi * p.z_stride[0] + ci * p.z_stride[1]));
  st(p.out, p.x_dtype, bi * p.dim + ci, y);
}

void require_kernel_dtype(DType d, const char* fn, const char* name) {
  if (d != DType::kFloat32 && d != DType::kFloat16 && d != DType::kBFloat16)
    throw std::invalid_argument(std::string(fn) + ": " + name + " must be float32, float16 or bfloat16, got " +
                                dtype_name(d));
}

unsigned grid_size(int64_t blocks, const char* fn) {
  if (blocks > 0x7fffffffLL) throw std::invalid_argument(std::string(fn) + ": the problem exceeds the CUDA grid limit");
  return unsigned(blocks);
}

}  // namespace

void causal_conv1d_update_cuda(const CausalConv1dUpdateParams& p) {
  const char* fn = "causal_conv1d_update_cuda";
  require_kernel_dtype(p.state_dtype, fn, "conv_state");
  require_kernel_dtype(p.x_dtype, fn, "x");
  require_kernel_dtype(p.weight_dtype, fn, "weight");
  if (p.bias) require_kernel_dtype(p.bias_dtype, fn, "bias");
  const int64_t rows = p.batch * p.channels;
  if (rows == 0 || p.width == 0) return;
  const unsigned blocks = grid_size((rows + kThreads - 1) / kThreads, fn);
  conv_kernel<<<blocks, kThreads, 0, reinterpret_cast<cudaStream_t>(p.stream)>>>(p);
  cuda_check(cudaGetLastError(), fn);
}

void selective_state_update_cuda(const SelectiveStateUpdateParams& p) {
  const char* fn = "selective_state_update_cuda";
  require_kernel_dtype(p.x_dtype, fn, "x");
  require_kernel_dtype(p.dt_dtype, fn, "dt");
  require_kernel_dtype(p.B_dtype, fn, "B");
  require_kernel_dtype(p.C_dtype, fn, "C");
  if (p.z) require_kernel_dtype(p.z_dtype, fn, "z");
  if (p.dstate > kMaxDstate)
    throw std::invalid_argument(std::string(fn) + ": N = " + std::to_string(p.dstate) + " exceeds the limit of " +
                                std::to_string(kMaxDstate));
  if (p.batch == 0 || p.dim == 0 || p.dstate == 0) return;
  const int64_t tiles = (p.dim + kThreads - 1) / kThreads;
  const unsigned blocks = grid_size(p.batch * tiles, fn);
  const size_t smem = 2 * size_t(p.dstate) * sizeof(float);
  auto stream = reinterpret_cast<cudaStream_t>(p.stream);
  if (p.dstate <= 16)
    ssm_kernel<16><<<blocks, kThreads, smem, stream>>>(p, tiles);
  else if (p.dstate <= 32)
    ssm_kernel<32><<<blocks, kThreads, smem, stream>>>(p, tiles);
  else if (p.dstate <= 64)
    ssm_kernel<64><<<blocks, kThreads, smem, stream>>>(p, tiles);
  else
    ssm_kernel<0><<<blocks, kThreads, smem, stream>>>(p, tiles);
  cuda_check(cudaGetLastError(), fn);
}

}  // namespace ssmlab

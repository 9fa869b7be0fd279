// Single-token decoding steps of the Mamba block (inference only: no backward).
//
// Decoding one token through a Mamba layer is two small recurrences between
// matrix products; unfused they are some thirty elementwise kernels a layer,
// and at small batch the launches, not the arithmetic, set the time. Each
// function here is one kernel.
//
// causal_conv1d_update: the depthwise causal conv, one step.
//   state[b, c, :] <- (state[b, c, 1:], x[b, c])        (oldest first, in place)
//   out[b, c]       = act(sum_k state[b, c, k] w[c, k] + bias[c]),  act = silu or identity
//
// selective_state_update: the selective SSM (S6), one step.
//   Δ         = softplus(dt + dt_bias)                   (softplus only if dt_softplus)
//   h[b,c,n] <- exp(Δ A[c,n]) h[b,c,n] + Δ B[b,n] x[b,c]  (in place)
//   y[b,c]    = sum_n C[b,n] h[b,c,n] + D[c] x[b,c],  times silu(z[b,c]) when z is given
//
// One plain struct of sizes, strides and pointers per kernel; Python validates
// every buffer before a pointer reaches this code. Every input and the state
// carry their own strides (in elements), so views such as the two halves of
// in_proj's output need no copy; `out` is allocated by the caller, contiguous.
// Each activation carries its own dtype code (float32, float16 or bfloat16:
// mixed precisions are allowed); all arithmetic is float32. Optional buffers
// are null when absent.
//
// Sizes: B batch, C channels, K conv width, N state size.
//   conv:  state (B, C, K) in state_dtype; x (B, C) in x_dtype; weight (C, K) in
//          weight_dtype; bias (C,) in bias_dtype; out (B, C) in x_dtype
//   ssm:   state (B, C, N) float32; x, dt, z (B, C); A (C, N) float32;
//          B, C (B, N); D, dt_bias (C,) float32; out (B, C) in x_dtype
//
// The CUDA kernels map one thread to one (batch, channel) pair, a block to a
// tile of channels of one batch row (whose B and C rows it stages in shared
// memory), and keep the N states of a thread in registers up to N = 64 (a loop
// beyond). They run on `stream` and return without synchronising.
#pragma once
#include <cstdint>

#include "ssmlab/dtype.h"

namespace ssmlab {

struct CausalConv1dUpdateParams {
  int64_t batch = 0, channels = 0, width = 0;
  DType state_dtype = DType::kFloat32, x_dtype = DType::kFloat32;
  DType weight_dtype = DType::kFloat32, bias_dtype = DType::kFloat32;
  bool silu = true;

  int64_t state_stride[3] = {0, 0, 0}, x_stride[2] = {0, 0}, weight_stride[2] = {0, 0};
  int64_t bias_stride = 0;

  void* state = nullptr;
  const void* x = nullptr;
  const void* weight = nullptr;
  const void* bias = nullptr;
  void* out = nullptr;  // (B, C) contiguous, in x_dtype

  std::uintptr_t stream = 0;  // cudaStream_t for the CUDA path
};

struct SelectiveStateUpdateParams {
  int64_t batch = 0, dim = 0, dstate = 0;
  DType x_dtype = DType::kFloat32, dt_dtype = DType::kFloat32, z_dtype = DType::kFloat32;
  DType B_dtype = DType::kFloat32, C_dtype = DType::kFloat32;
  bool dt_softplus = true;

  int64_t state_stride[3] = {0, 0, 0}, A_stride[2] = {0, 0};
  int64_t x_stride[2] = {0, 0}, dt_stride[2] = {0, 0}, z_stride[2] = {0, 0};
  int64_t B_stride[2] = {0, 0}, C_stride[2] = {0, 0};
  int64_t D_stride = 0, dt_bias_stride = 0;

  float* state = nullptr;
  const void* x = nullptr;
  const void* dt = nullptr;
  const void* z = nullptr;
  const float* A = nullptr;
  const void* B = nullptr;
  const void* C = nullptr;
  const float* D = nullptr;
  const float* dt_bias = nullptr;
  void* out = nullptr;  // (B, C) contiguous, in x_dtype

  std::uintptr_t stream = 0;
};

void causal_conv1d_update_cpu(const CausalConv1dUpdateParams& p);
void selective_state_update_cpu(const SelectiveStateUpdateParams& p);
#ifdef SSMLAB_WITH_CUDA
void causal_conv1d_update_cuda(const CausalConv1dUpdateParams& p);
void selective_state_update_cuda(const SelectiveStateUpdateParams& p);
#endif

}  // namespace ssmlab

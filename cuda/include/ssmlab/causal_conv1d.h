// The causal depthwise convolution of the Mamba block, over whole sequences,
// with its backward (training and prefill).
//
//   pre[b, c, t] = sum_k w[c, k] x[b, c, t - (K-1) + k] + bias[c]     (x = 0 before t = 0)
//   out[b, c, t] = silu(pre) or pre
//
// Backward, from grad_out g:  gp = g * act'(pre)  (pre recomputed, not stored)
//   grad_x[b, c, t] = sum_k w[c, k] gp[b, c, t + (K-1) - k]
//   grad_w[c, k]    = sum_{b,t} gp[b, c, t] x[b, c, t - (K-1) + k]
//   grad_bias[c]    = sum_{b,t} gp[b, c, t]
//
// The weight and bias gradients are sums over batch and length. To keep them
// deterministic without atomics, each (batch, chunk of kConvChunk steps)
// writes its own partial sums, and the caller adds the partials in index
// order: grad_w_partial (P, C, K), grad_bias_partial (P, C) with
// P = batch * causal_conv1d_chunks(length).
//
// x, out, grad_out, grad_x share `dtype` (float32, float16 or bfloat16);
// weight (C, K) and bias (C,) are contiguous float32; x has unit stride along
// L and any (batch, channel) strides; out, grad_out and grad_x are contiguous.
// All arithmetic is float32; offsets are 64-bit. 1 <= K <= kConvMaxWidth.
#pragma once
#include <cstdint>

#include "ssmlab/dtype.h"

namespace ssmlab {

constexpr int64_t kConvChunk = 1024;  // steps per partial sum (and per CUDA block)
constexpr int kConvMaxWidth = 8;

#ifdef __CUDACC__
__host__ __device__
#endif
inline int64_t causal_conv1d_chunks(int64_t length) { return (length + kConvChunk - 1) / kConvChunk; }

struct CausalConv1dParams {
  int64_t batch = 0, channels = 0, length = 0, width = 0;
  DType dtype = DType::kFloat32;
  bool silu = true;
  int64_t x_stride[2] = {0, 0};  // (batch, channel), in elements

  const void* x = nullptr;
  const float* weight = nullptr;
  const float* bias = nullptr;
  void* out = nullptr;  // forward

  const void* grad_out = nullptr;  // backward
  void* grad_x = nullptr;
  float* grad_weight_partial = nullptr;
  float* grad_bias_partial = nullptr;  // null when there is no bias

  std::uintptr_t stream = 0;  // cudaStream_t for the CUDA path
};

void causal_conv1d_fwd_cpu(const CausalConv1dParams& p);
void causal_conv1d_bwd_cpu(const CausalConv1dParams& p);
#ifdef SSMLAB_WITH_CUDA
void causal_conv1d_fwd_cuda(const CausalConv1dParams& p);
void causal_conv1d_bwd_cuda(const CausalConv1dParams& p);
#endif

}  // namespace ssmlab

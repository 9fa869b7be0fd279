// The selective scan (Mamba's S6 operator), forward and backward.
//
// NOTE FOR THE CUDA KERNELS: cuda/module.cpp binds the four *_cuda functions
// below only when the macro SSMLAB_WITH_CUDA_SELECTIVE_SCAN is defined (and
// SSMLAB_WITH_CUDA is), so the CUDA build links before they exist. Once
// cuda/gpu/*.cu defines all four, define it for the _native target
// (`target_compile_definitions(_native PRIVATE SSMLAB_WITH_CUDA_SELECTIVE_SCAN)`
// in the SSMLAB_HAVE_CUDA block of CMakeLists.txt). Python finds them as
// native_module().selective_scan_{fwd,bwd}_cuda, selective_scan_chunk_len_cuda()
// and selective_scan_bwd_workspace_bytes_cuda(params); it allocates
// chunk_states with n_chunks = ceil(L / chunk_len) and a uint8 workspace of
// the queried size, and passes the current stream in `stream`.
//
//   delta_t = softplus(delta_t + delta_bias)      (when delta_softplus)
//   h_t     = exp(delta_t A) * h_{t-1} + delta_t B_t u_t
//   y_t     = C_t . h_t + D u_t,  out_t = y_t * silu(z_t)   (when z given)
//
// One plain struct of sizes, strides and pointers; Python validates and
// normalises every buffer before a pointer reaches native code. The length
// axis always has unit stride. All state and accumulation is float32.
//
// Buffers (optional ones are null when absent):
//   u, delta, z, out        (batch, dim, L) in `dtype`, strides {batch, dim}
//   A                       (dim, N) float32, contiguous
//   B, C  input-dependent   (batch, groups, N, L) in `dtype`, strides {batch, group, state}
//         time-invariant    (dim, N) float32, contiguous   (is_variable_* false)
//   D, delta_bias           (dim,) float32
//   h0, last_state          (batch, dim, N) float32, contiguous
//   chunk_states            (batch, dim, n_chunks, N) float32, contiguous, with
//                           n_chunks = ceil(L / chunk_len): the state at the END
//                           of each chunk. The forward writes it when not null;
//                           the backward reads it and recomputes states inside a
//                           chunk instead of storing h for every step.
// Backward, additionally:
//   grad_out                (batch, dim, L) in `dtype`, contiguous
//   grad_last_state         (batch, dim, N) float32 or null
//   grad_u, grad_delta, grad_z   (batch, dim, L) in `dtype`, contiguous
//   grad_A                  (dim, N) float32
//   grad_B, grad_C          float32, contiguous, same logical shape as B, C
//   grad_D, grad_delta_bias (dim,) float32 (written only when D / delta_bias given)
//   grad_h0                 (batch, dim, N) float32 (written only when h0 given)
//   workspace               scratch of selective_scan_bwd_workspace_bytes(params) bytes
// Forward, CUDA: workspace    scratch of selective_scan_fwd_workspace_bytes(params)
//                             bytes (0 when the length is not split; null is fine then)
//
// segments: how many pieces the CUDA kernels split the length into (0: chosen
// from the batch, channels and the GPU's SM count; a positive value forces at
// most that many, for tests and benchmarks). A split scan runs each piece in its
// own thread block: a first pass computes each piece's local end state (forward)
// or adjoint carry (backward) from zero, a short sequential combine turns them
// into true start values (a piece's decay is exp(A * sum of its Delta)), and the
// main pass runs every piece in parallel. It fills the GPU when batch * dim is
// small (long sequences at a fixed number of tokens a step). The CPU ignores it.
// grad_delta is the gradient with respect to the `delta` argument (before bias
// and softplus). All reductions are deterministic: no floating-point atomics.
#pragma once
#include <cstddef>
#include <cstdint>

#include "ssmlab/dtype.h"

namespace ssmlab {

struct SelectiveScanParams {
  int64_t batch = 0, dim = 0, length = 0, dstate = 0, groups = 1;
  int64_t chunk_len = 0;
  int64_t segments = 0;  // CUDA: length split (0 = automatic); see above
  DType dtype = DType::kFloat32;
  bool is_variable_B = false, is_variable_C = false, delta_softplus = false;

  int64_t u_stride[2] = {0, 0}, delta_stride[2] = {0, 0}, z_stride[2] = {0, 0}, out_stride[2] = {0, 0};
  int64_t B_stride[3] = {0, 0, 0}, C_stride[3] = {0, 0, 0};

  const void* u = nullptr;
  const void* delta = nullptr;
  const void* z = nullptr;
  const float* A = nullptr;
  const void* B = nullptr;
  const void* C = nullptr;
  const float* D = nullptr;
  const float* delta_bias = nullptr;
  const float* h0 = nullptr;
  void* out = nullptr;
  float* last_state = nullptr;
  float* chunk_states = nullptr;

  const void* grad_out = nullptr;
  const float* grad_last_state = nullptr;
  void* grad_u = nullptr;
  void* grad_delta = nullptr;
  void* grad_z = nullptr;
  float* grad_A = nullptr;
  float* grad_B = nullptr;
  float* grad_C = nullptr;
  float* grad_D = nullptr;
  float* grad_delta_bias = nullptr;
  float* grad_h0 = nullptr;
  void* workspace = nullptr;

  std::uintptr_t stream = 0;  // cudaStream_t for the CUDA path
};

void selective_scan_fwd_cpu(const SelectiveScanParams& p);
void selective_scan_bwd_cpu(const SelectiveScanParams& p);
int64_t selective_scan_chunk_len_cpu();
size_t selective_scan_bwd_workspace_bytes_cpu(const SelectiveScanParams& p);
size_t selective_scan_fwd_workspace_bytes_cpu(const SelectiveScanParams& p);
#ifdef SSMLAB_WITH_CUDA
void selective_scan_fwd_cuda(const SelectiveScanParams& p);
void selective_scan_bwd_cuda(const SelectiveScanParams& p);
int64_t selective_scan_chunk_len_cuda();
size_t selective_scan_bwd_workspace_bytes_cuda(const SelectiveScanParams& p);
size_t selective_scan_fwd_workspace_bytes_cuda(const SelectiveScanParams& p);
int64_t selective_scan_segments_cuda(const SelectiveScanParams& p);
#endif

}  // namespace ssmlab

// The linear-recurrence scan h_t = a_t * h_{t-1} + b_t along the last axis of
// (batch, channels, length) buffers.
//
// One plain struct of sizes, strides and pointers per call; validation is done
// in Python before any pointer reaches this code. The length axis must have
// unit stride; batch and channel strides are free (broadcast views work).
#pragma once
#include <cstdint>
#include "ssmlab/dtype.h"

namespace ssmlab {

struct LinearScanParams {
  int64_t batch = 0, channels = 0, length = 0;
  DType dtype = DType::kFloat32;  // of a, b, out, grad_out, grad_a, grad_b
  // Strides in elements over (batch, channels); length stride is 1.
  int64_t a_stride[2] = {0, 0}, b_stride[2] = {0, 0}, out_stride[2] = {0, 0};
  const void* a = nullptr;
  const void* b = nullptr;
  // Optional initial state, (batch, channels) contiguous, in the accumulation
  // type (float64 for float64 inputs, else float32). Null means zero.
  const void* h0 = nullptr;
  void* out = nullptr;
  // Backward only: out above is the forward output (read), grad_out is read,
  // grad_a / grad_b are written with out_stride, grad_h0 (accumulation type,
  // contiguous) is written when not null.
  const void* grad_out = nullptr;
  void* grad_a = nullptr;
  void* grad_b = nullptr;
  void* grad_h0 = nullptr;
  std::uintptr_t stream = 0;  // cudaStream_t for the CUDA path
};

void linear_scan_fwd_cpu(const LinearScanParams& p);
void linear_scan_bwd_cpu(const LinearScanParams& p);
#ifdef SSMLAB_WITH_CUDA
void linear_scan_fwd_cuda(const LinearScanParams& p);
void linear_scan_bwd_cuda(const LinearScanParams& p);
#endif

}  // namespace ssmlab

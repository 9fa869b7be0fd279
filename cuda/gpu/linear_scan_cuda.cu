// CUDA linear-recurrence scan: one block per (batch, channel) row, the row
// walked in chunks of kThreads * kItems elements with the state carried from
// chunk to chunk. Inside a chunk each thread owns kItems consecutive steps:
// it composes them into one affine map, the block scans those maps, and each
// thread then replays its steps from the state that enters its segment.
//
// Loads and stores go through shared memory so that global accesses are
// coalesced (thread i touches elements i, i + kThreads, ...), while the scan
// itself reads consecutive elements per thread. The shared arrays are padded
// by one word every 32 so that the strided per-thread reads hit distinct banks.
#include "cuda_utils.cuh"
#include "ssmlab/linear_scan.h"

namespace ssmlab {
namespace {

constexpr int kThreads = 128;
constexpr int kItems = 8;
constexpr int kChunk = kThreads * kItems;
constexpr int kPadded = kChunk + kChunk / 32;

__device__ __forceinline__ int pad(int i) { return i + (i >> 5); }

template <typename T>
__global__ void __launch_bounds__(kThreads) fwd_kernel(LinearScanParams p) {
  using D = Dev<T>;
  using Acc = typename D::acc;
  __shared__ Acc sa[kPadded], sb[kPadded];
  __shared__ Affine<Acc> warp_total[kThreads / 32];

  const int64_t r = blockIdx.x, bi = r / p.channels, ci = r % p.channels, L = p.length;
  const T* a = static_cast<const T*>(p.a) + bi * p.a_stride[0] + ci * p.a_stride[1];
  const T* b = static_cast<const T*>(p.b) + bi * p.b_stride[0] + ci * p.b_stride[1];
  T* out = static_cast<T*>(p.out) + bi * p.out_stride[0] + ci * p.out_stride[1];
  Acc carry = p.h0 ? static_cast<const Acc*>(p.h0)[r] : Acc(0);

  for (int64_t base = 0; base < L; base += kChunk) {
#pragma unroll
    for (int k = 0; k < kItems; ++k) {
      const int i = threadIdx.x + k * kThreads;
      const int64_t t = base + i;
      // Past the end, the identity map (1, 0) leaves the state unchanged.
      sa[pad(i)] = t < L ? D::ld(a + t) : Acc(1);
      sb[pad(i)] = t < L ? D::ld(b + t) : Acc(0);
    }
    __syncthreads();
    Acc ra[kItems], rb[kItems];
    Affine<Acc> mine{Acc(1), Acc(0)};
#pragma unroll
    for (int k = 0; k < kItems; ++k) {
      ra[k] = sa[pad(threadIdx.x * kItems + k)];
      rb[k] = sb[pad(threadIdx.x * kItems + k)];
      mine = compose(mine, Affine<Acc>{ra[k], rb[k]});
    }
    const Affine<Acc> before = block_exclusive_scan<Acc, kThreads>(mine, warp_total);
    Acc h = before.a * carry + before.b;
#pragma unroll
    for (int k = 0; k < kItems; ++k) {
      h = ra[k] * h + rb[k];
      sb[pad(threadIdx.x * kItems + k)] = h;  // this thread alone owns these slots
    }
    __syncthreads();
#pragma unroll
    for (int k = 0; k < kItems; ++k) {
      const int i = threadIdx.x + k * kThreads;
      if (base + i < L) D::st(out + base + i, sb[pad(i)]);
    }
    carry = sb[pad(kChunk - 1)];
    __syncthreads();
  }
}

// Reverse scan for the adjoint g_t = gy_t + a_{t+1} g_{t+1}, walked in the
// logical order s = L - 1 - t so the same block scan applies unchanged.
template <typename T>
__global__ void __launch_bounds__(kThreads) bwd_kernel(LinearScanParams p) {
  using D = Dev<T>;
  using Acc = typename D::acc;
  __shared__ Acc sa[kPadded], sb[kPadded];
  __shared__ Affine<Acc> warp_total[kThreads / 32];

  const int64_t r = blockIdx.x, bi = r / p.channels, ci = r % p.channels, L = p.length;
  const int64_t o_off = bi * p.out_stride[0] + ci * p.out_stride[1];
  const T* a = static_cast<const T*>(p.a) + bi * p.a_stride[0] + ci * p.a_stride[1];
  const T* h = static_cast<const T*>(p.out) + o_off;
  const T* gy = static_cast<const T*>(p.grad_out) + o_off;
  T* ga = static_cast<T*>(p.grad_a) + o_off;
  T* gb = static_cast<T*>(p.grad_b) + o_off;
  const Acc h0 = p.h0 ? static_cast<const Acc*>(p.h0)[r] : Acc(0);
  Acc carry = 0;

  for (int64_t base = 0; base < L; base += kChunk) {
#pragma unroll
    for (int k = 0; k < kItems; ++k) {
      const int i = threadIdx.x + k * kThreads;
      const int64_t t = L - 1 - (base + i);
      sa[pad(i)] = t < 0 ? Acc(1) : (t + 1 < L ? D::ld(a + t + 1) : Acc(0));
      sb[pad(i)] = t < 0 ? Acc(0) : D::ld(gy + t);
    }
    __syncthreads();
    Acc ra[kItems], rb[kItems];
    Affine<Acc> mine{Acc(1), Acc(0)};
#pragma unroll
    for (int k = 0; k < kItems; ++k) {
      ra[k] = sa[pad(threadIdx.x * kItems + k)];
      rb[k] = sb[pad(threadIdx.x * kItems + k)];
      mine = compose(mine, Affine<Acc>{ra[k], rb[k]});
    }
    const Affine<Acc> before = block_exclusive_scan<Acc, kThreads>(mine, warp_total);
    Acc g = before.a * carry + before.b;
#pragma unroll
    for (int k = 0; k < kItems; ++k) {
      g = ra[k] * g + rb[k];
      sb[pad(threadIdx.x * kItems + k)] = g;
    }
    __syncthreads();
#pragma unroll
    for (int k = 0; k < kItems; ++k) {
      const int i = threadIdx.x + k * kThreads;
      const int64_t t = L - 1 - (base + i);
      if (t >= 0) {
        const Acc gt = sb[pad(i)];
        D::st(gb + t, gt);
        D::st(ga + t, gt * (t > 0 ? D::ld(h + t - 1) : h0));
      }
    }
    carry = sb[pad(kChunk - 1)];
    __syncthreads();
  }
  if (p.grad_h0 && threadIdx.x == 0) static_cast<Acc*>(p.grad_h0)[r] = D::ld(a) * carry;
}

template <template <typename> class Kernel>
void launch(const LinearScanParams& p, const char* what) {
  const int64_t rows = p.batch * p.channels;
  if (rows == 0 || p.length == 0) return;
  if (rows > 0x7fffffffLL) throw std::invalid_argument("linear_scan: batch * channels exceeds the CUDA grid limit");
  auto stream = reinterpret_cast<cudaStream_t>(p.stream);
  dispatch_dtype(p.dtype, [&](auto tag) {
    using T = decltype(tag);
    Kernel<T>::run(dim3(unsigned(rows)), dim3(kThreads), stream, p);
  });
  cuda_check(cudaGetLastError(), what);
}

template <typename T> struct Fwd {
  static void run(dim3 g, dim3 b, cudaStream_t s, const LinearScanParams& p) { fwd_kernel<T><<<g, b, 0, s>>>(p); }
};
template <typename T> struct Bwd {
  static void run(dim3 g, dim3 b, cudaStream_t s, const LinearScanParams& p) { bwd_kernel<T><<<g, b, 0, s>>>(p); }
};

}  // namespace

void linear_scan_fwd_cuda(const LinearScanParams& p) { launch<Fwd>(p, "linear_scan forward kernel"); }
void linear_scan_bwd_cuda(const LinearScanParams& p) { launch<Bwd>(p, "linear_scan backward kernel"); }

}  // namespace ssmlab

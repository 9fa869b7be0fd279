// Public entry points of the CUDA selective scan (ssmlab/selective_scan.h):
// dtype dispatch, the backward's workspace, and the deterministic reduction
// that turns the backward's per-row / per-block partial sums into grad A, B,
// C, D and delta_bias, always adding in index order.
#include <algorithm>

#include "selective_scan_kernels.cuh"

namespace ssmlab {
namespace ss {

extern template void launch_fwd<float>(const P&);
extern template void launch_fwd<Half>(const P&);
extern template void launch_fwd<BFloat16>(const P&);
extern template void launch_bwd<float>(const P&, const BwdWorkspace&);
extern template void launch_bwd<Half>(const P&, const BwdWorkspace&);
extern template void launch_bwd<BFloat16>(const P&, const BwdWorkspace&);

namespace {

// grad A (dim, N), time-invariant grad B / C (dim, N): sum over batch (and
// the pieces of a split length, piece-major).
// grad D, grad delta_bias (dim,): the same sums.
__global__ void reduce_params_kernel(P p, BwdWorkspace ws) {
  const int64_t N = p.dstate, DN = p.dim * N, parts = p.batch * p.segments;
  for (int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < DN + p.dim; i += int64_t(gridDim.x) * blockDim.x) {
    if (i < DN) {
      float a = 0.0f, b = 0.0f, c = 0.0f;
      for (int64_t bi = 0; bi < parts; ++bi) {
        a += ws.gA[bi * DN + i];
        if (!p.is_variable_B) b += ws.gBc[bi * DN + i];
        if (!p.is_variable_C) c += ws.gCc[bi * DN + i];
      }
      p.grad_A[i] = a;
      if (!p.is_variable_B) p.grad_B[i] = b;
      if (!p.is_variable_C) p.grad_C[i] = c;
    } else {
      const int64_t d = i - DN;
      float gd = 0.0f, gb = 0.0f;
      for (int64_t bi = 0; bi < parts; ++bi) {
        gd += ws.gD[bi * p.dim + d];
        gb += ws.gbias[bi * p.dim + d];
      }
      if (p.grad_D) p.grad_D[d] = gd;
      if (p.grad_delta_bias) p.grad_delta_bias[d] = gb;
    }
  }
}

// Input-dependent grad B / C (batch, groups, N, L): sum of the blocks' partials
// (batch, groups, block, N, L) over the blocks of each group, in block order.
__global__ void reduce_bc_kernel(const float* __restrict__ part, float* __restrict__ out, int64_t bg, int64_t nblk,
                                 int64_t NL) {
  const int64_t total = bg * NL;
  for (int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < total; i += int64_t(gridDim.x) * blockDim.x) {
    const int64_t k = i / NL, j = i % NL;
    const float* src = part + k * nblk * NL + j;
    float acc = 0.0f;
    for (int64_t blk = 0; blk < nblk; ++blk) acc += src[blk * NL];
    out[i] = acc;
  }
}

unsigned blocks_for(int64_t n, int threads) {
  const int64_t b = (n + threads - 1) / threads;
  return unsigned(b < 65535 * 16 ? (b > 0 ? b : 1) : 65535 * 16);
}

void check(const P& p, const char* fn) {
  if (p.dtype == DType::kFloat64)
    throw std::invalid_argument(std::string(fn) + ": float64 inputs are not supported by the CUDA kernel");
  if (p.groups <= 0 || p.dim % p.groups != 0)
    throw std::invalid_argument(std::string(fn) + ": groups must divide dim");
  if (p.chunk_len != 0 && p.chunk_len != kChunk)
    throw std::invalid_argument(std::string(fn) + ": chunk_len must be selective_scan_chunk_len_cuda() = " +
                                std::to_string(kChunk));
  check_state_size(p.dstate);
}

template <typename F>
void by_dtype(DType dt, F&& f) {
  switch (dt) {
    case DType::kFloat32: f(float{}); return;
    case DType::kFloat16: f(Half{}); return;
    case DType::kBFloat16: f(BFloat16{}); return;
    default: throw std::invalid_argument("selective_scan (cuda): unsupported dtype");
  }
}

int sm_count() {
  static int cache[64] = {};
  int dev = 0;
  cuda_check(cudaGetDevice(&dev), "selective_scan: cudaGetDevice");
  if (dev < 64 && cache[dev]) return cache[dev];
  int n = 0;
  cuda_check(cudaDeviceGetAttribute(&n, cudaDevAttrMultiProcessorCount, dev), "selective_scan: SM count");
  if (dev < 64) cache[dev] = n;
  return n;
}

constexpr int64_t kMaxSegments = 64;
constexpr int64_t kMinChunksPerSegment = 4;  // 256 steps: keeps the first pass and the combine short

// How many pieces to split the length into. The grid is one block per 32
// channels of one batch row; when that is too few blocks for the GPU (B = 4,
// D = 1536 gives 192 blocks for 132 SMs that hold 3 each), splitting the length
// multiplies the blocks, at the price of a first pass over all pieces but one.
// Measured on the H100 at 65,536 tokens, D = 1536, N = 16, bf16 (forward +
// backward, stages/04_selective_scan/bench_split.py): at 768 or 384 blocks
// (B = 16 or 8) any split is slower (5.9 -> 6.9 ms for 2 pieces), at 192
// blocks 2 pieces are best (9.8 -> 7.6 ms; 4 pieces 7.7 ms). So: no split
// from 60% of one wave up, else as many pieces as fill one wave.
// p.segments > 0 forces (at most) that many. The count is trimmed so that no
// piece is empty; an empty or malformed shape (no chunks, no rows, groups not
// dividing dim) gets 1, so every caller can ask.
int64_t resolve_segments(const P& p) {
  const int64_t nch = (p.length + kChunk - 1) / kChunk;
  if (nch <= 1 || p.batch <= 0 || p.dim <= 0 || p.groups <= 0 || p.dim % p.groups != 0) return 1;
  int64_t want = p.segments;
  if (want <= 0) {
    const int64_t blocks = grid_size(p, BwdWorkspace::kRowsPerBlock), slots = 3 * int64_t(sm_count());
    want = 5 * blocks >= 3 * slots ? 1 : slots / blocks;
    want = std::min(want, nch / kMinChunksPerSegment);
  }
  want = std::max<int64_t>(1, std::min({want, nch, kMaxSegments}));
  const int64_t per = (nch + want - 1) / want;
  return (nch + per - 1) / per;
}

P resolved(const P& p) {
  P q = p;
  q.segments = resolve_segments(p);
  return q;
}

}  // namespace
}  // namespace ss

void selective_scan_fwd_cuda(const SelectiveScanParams& params) {
  ss::check(params, "selective_scan_fwd_cuda");
  if (params.batch == 0 || params.dim == 0 || params.length == 0) return;
  const SelectiveScanParams p = ss::resolved(params);
  if (p.segments > 1 && !p.workspace)
    throw std::invalid_argument("selective_scan_fwd_cuda: workspace is null (see selective_scan_fwd_workspace_bytes)");
  ss::by_dtype(p.dtype, [&](auto tag) { ss::launch_fwd<decltype(tag)>(p); });
}

void selective_scan_bwd_cuda(const SelectiveScanParams& params) {
  ss::check(params, "selective_scan_bwd_cuda");
  if (params.batch == 0 || params.dim == 0 || params.length == 0) return;
  const SelectiveScanParams p = ss::resolved(params);
  if (!p.chunk_states && p.length > ss::kChunk)
    throw std::invalid_argument("selective_scan_bwd_cuda: chunk_states from the forward are required");
  if (!p.workspace) throw std::invalid_argument("selective_scan_bwd_cuda: workspace is null");
  const ss::BwdWorkspace ws = ss::BwdWorkspace::make(p);
  ss::by_dtype(p.dtype, [&](auto tag) { ss::launch_bwd<decltype(tag)>(p, ws); });
  auto stream = reinterpret_cast<cudaStream_t>(p.stream);
  constexpr int kT = 256;
  ss::reduce_params_kernel<<<ss::blocks_for(p.dim * p.dstate + p.dim, kT), kT, 0, stream>>>(p, ws);
  cuda_check(cudaGetLastError(), "selective_scan backward reduction");
  const int64_t bg = p.batch * p.groups, NL = p.dstate * p.length;
  if (p.is_variable_B) {
    ss::reduce_bc_kernel<<<ss::blocks_for(bg * NL, kT), kT, 0, stream>>>(ws.gBv, p.grad_B, bg, ws.blocks_per_group, NL);
    cuda_check(cudaGetLastError(), "selective_scan backward reduction of grad B");
  }
  if (p.is_variable_C) {
    ss::reduce_bc_kernel<<<ss::blocks_for(bg * NL, kT), kT, 0, stream>>>(ws.gCv, p.grad_C, bg, ws.blocks_per_group, NL);
    cuda_check(cudaGetLastError(), "selective_scan backward reduction of grad C");
  }
}

int64_t selective_scan_chunk_len_cuda() { return ss::kChunk; }

size_t selective_scan_bwd_workspace_bytes_cuda(const SelectiveScanParams& p) {
  if (p.groups <= 0 || p.dim % p.groups != 0) return 0;
  return size_t(ss::BwdWorkspace::floats(ss::resolved(p))) * sizeof(float);
}

size_t selective_scan_fwd_workspace_bytes_cuda(const SelectiveScanParams& p) {
  return size_t(ss::SegScratch::floats(ss::resolved(p))) * sizeof(float);
}

int64_t selective_scan_segments_cuda(const SelectiveScanParams& p) { return ss::resolve_segments(p); }

}  // namespace ssmlab

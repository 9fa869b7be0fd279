// Selective scan kernels instantiated for BFloat16 inputs (one file per dtype so
// that they compile in parallel); see selective_scan_kernels.cuh.
#include "selective_scan_kernels.cuh"

namespace ssmlab {
namespace ss {
template void launch_fwd<BFloat16>(const P&);
template void launch_bwd<BFloat16>(const P&, const BwdWorkspace&);
}  // namespace ss
}  // namespace ssmlab

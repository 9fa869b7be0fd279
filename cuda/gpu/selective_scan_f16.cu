// Selective scan kernels instantiated for Half inputs (one file per dtype so
// that they compile in parallel); see selective_scan_kernels.cuh.
#include "selective_scan_kernels.cuh"

namespace ssmlab {
namespace ss {
template void launch_fwd<Half>(const P&);
template void launch_bwd<Half>(const P&, const BwdWorkspace&);
}  // namespace ss
}  // namespace ssmlab

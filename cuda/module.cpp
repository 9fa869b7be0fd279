// Python bindings of the native module. Only plain integers cross this
// boundary: pointers as addresses, dtypes as codes, streams as handles, so the
// module is independent of the PyTorch version it is used with.
#include <pybind11/pybind11.h>

#include <cstdint>

#include "ssmlab/linear_scan.h"

#ifdef SSMLAB_WITH_CUDA
#include <cuda_runtime.h>
#endif

namespace py = pybind11;
using namespace ssmlab;

namespace {

// Exposes a `const void*` / `void*` field as an integer address.
template <typename Class, typename Ptr>
void pointer_field(py::class_<Class>& cls, const char* name, Ptr Class::*field) {
  cls.def_property(
      name, [field](const Class& c) { return reinterpret_cast<std::uintptr_t>(c.*field); },
      [field](Class& c, std::uintptr_t v) { c.*field = reinterpret_cast<Ptr>(v); });
}

int cuda_device_count() {
#ifdef SSMLAB_WITH_CUDA
  int n = 0;
  // No driver or no device is not an error here: it means no CUDA backend.
  if (cudaGetDeviceCount(&n) != cudaSuccess) {
    cudaGetLastError();
    return 0;
  }
  return n;
#else
  return 0;
#endif
}

void bind_linear_scan(py::module_& m) {
  py::class_<LinearScanParams> cls(m, "LinearScanParams");
  cls.def(py::init<>())
      .def_readwrite("batch", &LinearScanParams::batch)
      .def_readwrite("channels", &LinearScanParams::channels)
      .def_readwrite("length", &LinearScanParams::length)
      .def_property(
          "dtype", [](const LinearScanParams& p) { return int(p.dtype); },
          [](LinearScanParams& p, int d) { p.dtype = DType(d); })
      .def_property(
          "a_stride", [](const LinearScanParams& p) { return py::make_tuple(p.a_stride[0], p.a_stride[1]); },
          [](LinearScanParams& p, std::pair<int64_t, int64_t> s) { p.a_stride[0] = s.first; p.a_stride[1] = s.second; })
      .def_property(
          "b_stride", [](const LinearScanParams& p) { return py::make_tuple(p.b_stride[0], p.b_stride[1]); },
          [](LinearScanParams& p, std::pair<int64_t, int64_t> s) { p.b_stride[0] = s.first; p.b_stride[1] = s.second; })
      .def_property(
          "out_stride", [](const LinearScanParams& p) { return py::make_tuple(p.out_stride[0], p.out_stride[1]); },
          [](LinearScanParams& p, std::pair<int64_t, int64_t> s) { p.out_stride[0] = s.first; p.out_stride[1] = s.second; })
      .def_readwrite("stream", &LinearScanParams::stream);
  pointer_field(cls, "a", &LinearScanParams::a);
  pointer_field(cls, "b", &LinearScanParams::b);
  pointer_field(cls, "h0", &LinearScanParams::h0);
  pointer_field(cls, "out", &LinearScanParams::out);
  pointer_field(cls, "grad_out", &LinearScanParams::grad_out);
  pointer_field(cls, "grad_a", &LinearScanParams::grad_a);
  pointer_field(cls, "grad_b", &LinearScanParams::grad_b);
  pointer_field(cls, "grad_h0", &LinearScanParams::grad_h0);

  auto nogil = py::call_guard<py::gil_scoped_release>();
  m.def("linear_scan_fwd_cpu", &linear_scan_fwd_cpu, nogil);
  m.def("linear_scan_bwd_cpu", &linear_scan_bwd_cpu, nogil);
#ifdef SSMLAB_WITH_CUDA
  m.def("linear_scan_fwd_cuda", &linear_scan_fwd_cuda, nogil);
  m.def("linear_scan_bwd_cuda", &linear_scan_bwd_cuda, nogil);
#endif
}

}  // namespace

PYBIND11_MODULE(_native, m) {
  m.doc() = "ssmlab native kernels (C++ CPU, and CUDA when built with nvcc)";
#ifdef SSMLAB_WITH_CUDA
  m.attr("built_with_cuda") = true;
#else
  m.attr("built_with_cuda") = false;
#endif
#ifdef _OPENMP
  m.attr("built_with_openmp") = true;
#else
  m.attr("built_with_openmp") = false;
#endif
  m.def("cuda_device_count", &cuda_device_count, "CUDA devices visible to the native module (0 without a GPU).");
  bind_linear_scan(m);
}

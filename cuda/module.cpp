// Python bindings of the native module. Only plain integers cross this
// boundary: pointers as addresses, dtypes as codes, streams as handles, so the
// module is independent of the PyTorch version it is used with.
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <cstdint>
#include <stdexcept>
#include <vector>

#include "ssmlab/causal_conv1d.h"
#include "ssmlab/decode_step.h"
#include "ssmlab/linear_scan.h"
#include "ssmlab/selective_scan.h"

#ifdef SSMLAB_WITH_CUDA
#include <cuda_runtime.h>
#endif
#ifdef _OPENMP
#include <omp.h>
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

template <size_t K>
py::tuple stride_tuple(const int64_t (&s)[K]) {
  py::tuple t(K);
  for (size_t i = 0; i < K; ++i) t[i] = s[i];
  return t;
}

template <size_t K>
void set_stride(int64_t (&s)[K], const std::vector<int64_t>& v) {
  if (v.size() != K) throw std::invalid_argument("stride tuple has the wrong length");
  for (size_t i = 0; i < K; ++i) s[i] = v[i];
}

#define SSMLAB_STRIDE(cls, T, name)                                              \
  cls.def_property(                                                              \
      #name, [](const T& p) { return stride_tuple(p.name); },                   \
      [](T& p, const std::vector<int64_t>& v) { set_stride(p.name, v); })

void bind_selective_scan(py::module_& m) {
  using P = SelectiveScanParams;
  py::class_<P> cls(m, "SelectiveScanParams");
  cls.def(py::init<>())
      .def_readwrite("batch", &P::batch)
      .def_readwrite("dim", &P::dim)
      .def_readwrite("length", &P::length)
      .def_readwrite("dstate", &P::dstate)
      .def_readwrite("groups", &P::groups)
      .def_readwrite("chunk_len", &P::chunk_len)
      .def_readwrite("segments", &P::segments)
      .def_property(
          "dtype", [](const P& p) { return int(p.dtype); }, [](P& p, int d) { p.dtype = DType(d); })
      .def_readwrite("is_variable_B", &P::is_variable_B)
      .def_readwrite("is_variable_C", &P::is_variable_C)
      .def_readwrite("delta_softplus", &P::delta_softplus)
      .def_readwrite("stream", &P::stream);
  SSMLAB_STRIDE(cls, P, u_stride);
  SSMLAB_STRIDE(cls, P, delta_stride);
  SSMLAB_STRIDE(cls, P, z_stride);
  SSMLAB_STRIDE(cls, P, out_stride);
  SSMLAB_STRIDE(cls, P, B_stride);
  SSMLAB_STRIDE(cls, P, C_stride);
  pointer_field(cls, "u", &P::u);
  pointer_field(cls, "delta", &P::delta);
  pointer_field(cls, "z", &P::z);
  pointer_field(cls, "A", &P::A);
  pointer_field(cls, "B", &P::B);
  pointer_field(cls, "C", &P::C);
  pointer_field(cls, "D", &P::D);
  pointer_field(cls, "delta_bias", &P::delta_bias);
  pointer_field(cls, "h0", &P::h0);
  pointer_field(cls, "out", &P::out);
  pointer_field(cls, "last_state", &P::last_state);
  pointer_field(cls, "chunk_states", &P::chunk_states);
  pointer_field(cls, "grad_out", &P::grad_out);
  pointer_field(cls, "grad_last_state", &P::grad_last_state);
  pointer_field(cls, "grad_u", &P::grad_u);
  pointer_field(cls, "grad_delta", &P::grad_delta);
  pointer_field(cls, "grad_z", &P::grad_z);
  pointer_field(cls, "grad_A", &P::grad_A);
  pointer_field(cls, "grad_B", &P::grad_B);
  pointer_field(cls, "grad_C", &P::grad_C);
  pointer_field(cls, "grad_D", &P::grad_D);
  pointer_field(cls, "grad_delta_bias", &P::grad_delta_bias);
  pointer_field(cls, "grad_h0", &P::grad_h0);
  pointer_field(cls, "workspace", &P::workspace);

  auto nogil = py::call_guard<py::gil_scoped_release>();
  m.def("selective_scan_fwd_cpu", &selective_scan_fwd_cpu, nogil);
  m.def("selective_scan_bwd_cpu", &selective_scan_bwd_cpu, nogil);
  m.def("selective_scan_chunk_len_cpu", &selective_scan_chunk_len_cpu);
  m.def("selective_scan_bwd_workspace_bytes_cpu", &selective_scan_bwd_workspace_bytes_cpu);
  m.def("selective_scan_fwd_workspace_bytes_cpu", &selective_scan_fwd_workspace_bytes_cpu);
#if defined(SSMLAB_WITH_CUDA) && defined(SSMLAB_WITH_CUDA_SELECTIVE_SCAN)
  // See the note at the top of ssmlab/selective_scan.h.
  m.def("selective_scan_fwd_cuda", &selective_scan_fwd_cuda, nogil);
  m.def("selective_scan_bwd_cuda", &selective_scan_bwd_cuda, nogil);
  m.def("selective_scan_chunk_len_cuda", &selective_scan_chunk_len_cuda);
  m.def("selective_scan_bwd_workspace_bytes_cuda", &selective_scan_bwd_workspace_bytes_cuda);
  m.def("selective_scan_fwd_workspace_bytes_cuda", &selective_scan_fwd_workspace_bytes_cuda);
  m.def("selective_scan_segments_cuda", &selective_scan_segments_cuda);
#endif
}

// Dtype fields cross as their integer codes.
template <typename T>
void dtype_field(py::class_<T>& cls, const char* name, DType T::*field) {
  cls.def_property(
      name, [field](const T& p) { return int(p.*field); }, [field](T& p, int d) { p.*field = DType(d); });
}

void bind_decode_step(py::module_& m) {
  {
    using P = CausalConv1dUpdateParams;
    py::class_<P> cls(m, "CausalConv1dUpdateParams");
    cls.def(py::init<>())
        .def_readwrite("batch", &P::batch)
        .def_readwrite("channels", &P::channels)
        .def_readwrite("width", &P::width)
        .def_readwrite("silu", &P::silu)
        .def_readwrite("bias_stride", &P::bias_stride)
        .def_readwrite("stream", &P::stream);
    dtype_field(cls, "state_dtype", &P::state_dtype);
    dtype_field(cls, "x_dtype", &P::x_dtype);
    dtype_field(cls, "weight_dtype", &P::weight_dtype);
    dtype_field(cls, "bias_dtype", &P::bias_dtype);
    SSMLAB_STRIDE(cls, P, state_stride);
    SSMLAB_STRIDE(cls, P, x_stride);
    SSMLAB_STRIDE(cls, P, weight_stride);
    pointer_field(cls, "state", &P::state);
    pointer_field(cls, "x", &P::x);
    pointer_field(cls, "weight", &P::weight);
    pointer_field(cls, "bias", &P::bias);
    pointer_field(cls, "out", &P::out);
  }
  {
    using P = SelectiveStateUpdateParams;
    py::class_<P> cls(m, "SelectiveStateUpdateParams");
    cls.def(py::init<>())
        .def_readwrite("batch", &P::batch)
        .def_readwrite("dim", &P::dim)
        .def_readwrite("dstate", &P::dstate)
        .def_readwrite("dt_softplus", &P::dt_softplus)
        .def_readwrite("D_stride", &P::D_stride)
        .def_readwrite("dt_bias_stride", &P::dt_bias_stride)
        .def_readwrite("stream", &P::stream);
    dtype_field(cls, "x_dtype", &P::x_dtype);
    dtype_field(cls, "dt_dtype", &P::dt_dtype);
    dtype_field(cls, "z_dtype", &P::z_dtype);
    dtype_field(cls, "B_dtype", &P::B_dtype);
    dtype_field(cls, "C_dtype", &P::C_dtype);
    SSMLAB_STRIDE(cls, P, state_stride);
    SSMLAB_STRIDE(cls, P, A_stride);
    SSMLAB_STRIDE(cls, P, x_stride);
    SSMLAB_STRIDE(cls, P, dt_stride);
    SSMLAB_STRIDE(cls, P, z_stride);
    SSMLAB_STRIDE(cls, P, B_stride);
    SSMLAB_STRIDE(cls, P, C_stride);
    pointer_field(cls, "state", &P::state);
    pointer_field(cls, "x", &P::x);
    pointer_field(cls, "dt", &P::dt);
    pointer_field(cls, "z", &P::z);
    pointer_field(cls, "A", &P::A);
    pointer_field(cls, "B", &P::B);
    pointer_field(cls, "C", &P::C);
    pointer_field(cls, "D", &P::D);
    pointer_field(cls, "dt_bias", &P::dt_bias);
    pointer_field(cls, "out", &P::out);
  }
  auto nogil = py::call_guard<py::gil_scoped_release>();
  m.def("causal_conv1d_update_cpu", &causal_conv1d_update_cpu, nogil);
  m.def("selective_state_update_cpu", &selective_state_update_cpu, nogil);
#ifdef SSMLAB_WITH_CUDA
  m.def("causal_conv1d_update_cuda", &causal_conv1d_update_cuda, nogil);
  m.def("selective_state_update_cuda", &selective_state_update_cuda, nogil);
#endif
}
void bind_causal_conv1d(py::module_& m) {
  using P = CausalConv1dParams;
  py::class_<P> cls(m, "CausalConv1dParams");
  cls.def(py::init<>())
      .def_readwrite("batch", &P::batch)
      .def_readwrite("channels", &P::channels)
      .def_readwrite("length", &P::length)
      .def_readwrite("width", &P::width)
      .def_readwrite("silu", &P::silu)
      .def_readwrite("stream", &P::stream);
  dtype_field(cls, "dtype", &P::dtype);
  SSMLAB_STRIDE(cls, P, x_stride);
  pointer_field(cls, "x", &P::x);
  pointer_field(cls, "weight", &P::weight);
  pointer_field(cls, "bias", &P::bias);
  pointer_field(cls, "out", &P::out);
  pointer_field(cls, "grad_out", &P::grad_out);
  pointer_field(cls, "grad_x", &P::grad_x);
  pointer_field(cls, "grad_weight_partial", &P::grad_weight_partial);
  pointer_field(cls, "grad_bias_partial", &P::grad_bias_partial);
  auto nogil = py::call_guard<py::gil_scoped_release>();
  m.def("causal_conv1d_fwd_cpu", &causal_conv1d_fwd_cpu, nogil);
  m.def("causal_conv1d_bwd_cpu", &causal_conv1d_bwd_cpu, nogil);
#ifdef SSMLAB_WITH_CUDA
  m.def("causal_conv1d_fwd_cuda", &causal_conv1d_fwd_cuda, nogil);
  m.def("causal_conv1d_bwd_cuda", &causal_conv1d_bwd_cuda, nogil);
#endif
}
#undef SSMLAB_STRIDE

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
  // The native kernels use the OpenMP runtime this module links, which may not
  // be the one PyTorch ships (torch.set_num_threads need not reach it).
  m.def("openmp_max_threads", []() {
#ifdef _OPENMP
    return omp_get_max_threads();
#else
    return 1;
#endif
  }, "Threads the native CPU kernels use.");
  m.def("set_openmp_threads", [](int n) {
    if (n < 1) throw std::invalid_argument("set_openmp_threads: n must be >= 1");
#ifdef _OPENMP
    omp_set_num_threads(n);
#endif
  }, "Set the threads of the native CPU kernels (results do not depend on it).");
  m.def("cuda_device_count", &cuda_device_count, "CUDA devices visible to the native module (0 without a GPU).");
  bind_linear_scan(m);
  bind_selective_scan(m);
  bind_decode_step(m);
  bind_causal_conv1d(m);
}

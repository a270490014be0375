#include "version.hpp"

#include "check.hpp"

namespace py = pybind11;

namespace pyengine {

namespace {

py::tuple nccl_version() {
  int v = 0;
  PYENGINE_CHECK_NCCL(ncclGetVersion(&v));
  // NCCL >= 2.9 encodes major*10000 + minor*100 + patch.
  return py::make_tuple(v / 10000, (v % 10000) / 100, v % 100);
}

py::tuple cuda_runtime_version() {
  int v = 0;
  PYENGINE_CHECK_CUDA(cudaRuntimeGetVersion(&v));
  return py::make_tuple(v / 1000, (v % 1000) / 10);
}

int driver_version() {
  int v = 0;
  PYENGINE_CHECK_CUDA(cudaDriverGetVersion(&v));  // 0 when no driver is installed
  return v;
}

int device_count() {
  int n = 0;
  PYENGINE_CHECK_CUDA(cudaGetDeviceCount(&n));
  return n;
}

}  // namespace

void register_version(py::module_& m) {
  m.def("nccl_version", &nccl_version, "NCCL library version as (major, minor, patch).");
  m.def("cuda_runtime_version", &cuda_runtime_version,
        "CUDA runtime version this module was built against, as (major, minor).");
  m.def("driver_version", &driver_version,
        "CUDA driver version as an int (e.g. 13000); 0 when no driver is installed.");
  m.def("device_count", &device_count,
        "Number of visible CUDA devices; raises pyengine._C.Error when there is no driver/device.");
}

}  // namespace pyengine

#pragma once
#include <pybind11/pybind11.h>

namespace pyengine {
// nccl_version(), cuda_runtime_version(), driver_version(), device_count().
void register_version(pybind11::module_& m);
}  // namespace pyengine

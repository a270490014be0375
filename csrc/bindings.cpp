// Registration only: each domain lives in its own .hpp/.cpp.
#include <pybind11/pybind11.h>

#include "check.hpp"
#include "nccl.hpp"
#include "poll.hpp"
#include "stream.hpp"
#include "version.hpp"

namespace py = pybind11;

PYBIND11_MODULE(_C, m) {
  m.doc() = "pyengine native engine: CUDA streams/events and NCCL communicators";
  py::register_exception<pyengine::Error>(m, "Error", PyExc_RuntimeError);
  pyengine::register_version(m);
  pyengine::register_streams(m);
  pyengine::register_nccl(m);
  pyengine::register_poll(m);
}

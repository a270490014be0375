#include "stream.hpp"

#include <pybind11/stl.h>

#include "check.hpp"

namespace py = pybind11;

namespace pyengine {

DeviceGuard::DeviceGuard(int device) {
  PYENGINE_CHECK(device >= 0, "invalid CUDA device index " << device);
  PYENGINE_CHECK_CUDA(cudaGetDevice(&previous_));
  if (previous_ != device) {
    PYENGINE_CHECK_CUDA(cudaSetDevice(device));
    switched_ = true;
  }
}

DeviceGuard::~DeviceGuard() {
  if (switched_) {
    (void)cudaSetDevice(previous_);  // best effort: destructors must not throw
  }
}

Stream::Stream(int device, int priority) : device_(device), priority_(priority), owned_(true) {
  DeviceGuard guard(device);
  PYENGINE_CHECK_CUDA(cudaStreamCreateWithPriority(&stream_, cudaStreamNonBlocking, priority));
  int actual = priority;
  PYENGINE_CHECK_CUDA(cudaStreamGetPriority(stream_, &actual));
  priority_ = actual;
}

std::unique_ptr<Stream> Stream::from_handle(std::uintptr_t handle, int device) {
  std::unique_ptr<Stream> s(new Stream());
  s->stream_ = reinterpret_cast<cudaStream_t>(handle);
  s->device_ = device;
  s->owned_ = false;
  if (handle != 0) {
    // Validates the handle and reports "no CUDA driver/device" when CUDA is absent.
    PYENGINE_CHECK_CUDA(cudaStreamGetPriority(s->stream_, &s->priority_));
  } else {
    int count = 0;
    PYENGINE_CHECK_CUDA(cudaGetDeviceCount(&count));
  }
  return s;
}

Stream::~Stream() {
  if (owned_ && stream_ != nullptr) {
    // Does not wait: CUDA releases the stream once its queued work completes.
    (void)cudaStreamDestroy(stream_);
  }
}

void Stream::synchronize() {
  cudaError_t err;
  {
    py::gil_scoped_release nogil;
    err = cudaStreamSynchronize(stream_);
  }
  PYENGINE_CHECK_CUDA(err);
}

bool Stream::query() {
  cudaError_t err = cudaStreamQuery(stream_);
  if (err == cudaErrorNotReady) {
    (void)cudaGetLastError();
    return false;
  }
  PYENGINE_CHECK_CUDA(err);
  return true;
}

Event::Event(int device, bool enable_timing) : device_(device), timing_(enable_timing) {
  DeviceGuard guard(device);
  unsigned flags = enable_timing ? cudaEventDefault : cudaEventDisableTiming;
  PYENGINE_CHECK_CUDA(cudaEventCreateWithFlags(&event_, flags));
}

Event::~Event() {
  if (event_ != nullptr) {
    (void)cudaEventDestroy(event_);
  }
}

void Event::record(cudaStream_t stream) { PYENGINE_CHECK_CUDA(cudaEventRecord(event_, stream)); }

void Event::wait(cudaStream_t stream) { PYENGINE_CHECK_CUDA(cudaStreamWaitEvent(stream, event_, 0)); }

bool Event::query() {
  cudaError_t err = cudaEventQuery(event_);
  if (err == cudaErrorNotReady) {
    (void)cudaGetLastError();
    return false;
  }
  PYENGINE_CHECK_CUDA(err);
  return true;
}

void Event::synchronize() {
  cudaError_t err;
  {
    py::gil_scoped_release nogil;
    err = cudaEventSynchronize(event_);
  }
  PYENGINE_CHECK_CUDA(err);
}

float Event::elapsed_ms(const Event& end) {
  PYENGINE_CHECK(timing_ && end.timing_,
                 "Event.elapsed_ms needs both events created with enable_timing=True");
  float ms = 0.0f;
  PYENGINE_CHECK_CUDA(cudaEventElapsedTime(&ms, event_, end.event_));
  return ms;
}

cudaStream_t stream_from_py(py::handle obj) {
  if (py::isinstance<Stream>(obj)) {
    return obj.cast<Stream&>().get();
  }
  if (py::isinstance<py::int_>(obj)) {
    return reinterpret_cast<cudaStream_t>(obj.cast<std::uintptr_t>());
  }
  throw py::type_error("expected a pyengine._C.Stream or an int stream handle, got " +
                       std::string(py::str(py::type::of(obj))));
}

void register_streams(py::module_& m) {
  py::class_<Stream>(m, "Stream", "A CUDA stream: owned (created here) or wrapped (external handle).")
      .def(py::init<int, int>(), py::arg("device") = 0, py::arg("priority") = 0,
           "Create a non-blocking stream on `device`; lower priority values run first "
           "(clamped to the device's range).")
      .def_static("from_handle", &Stream::from_handle, py::arg("handle"), py::arg("device") = 0,
                  "Wrap an existing cudaStream_t (int) without taking ownership.")
      .def("synchronize", &Stream::synchronize, "Block until all queued work is done (GIL released).")
      .def("query", &Stream::query, "True when all queued work has completed.")
      .def_property_readonly("handle", &Stream::handle, "The cudaStream_t as an int.")
      .def_property_readonly("device", &Stream::device)
      .def_property_readonly("priority", &Stream::priority)
      .def_property_readonly("owned", &Stream::owned)
      .def("__repr__", [](const Stream& s) {
        return "<pyengine._C.Stream device=" + std::to_string(s.device()) +
               " handle=" + std::to_string(s.handle()) + (s.owned() ? " owned>" : " external>");
      });

  py::class_<Event>(m, "Event", "A CUDA event; timing is disabled unless asked for.")
      .def(py::init<int, bool>(), py::arg("device") = 0, py::arg("enable_timing") = false)
      .def(
          "record", [](Event& e, py::handle stream) { e.record(stream_from_py(stream)); },
          py::arg("stream"), "Record on `stream` (a Stream or an int handle).")
      .def(
          "wait", [](Event& e, py::handle stream) { e.wait(stream_from_py(stream)); },
          py::arg("stream"), "Make `stream` wait for this event; the host does not block.")
      .def("query", &Event::query, "True when the recorded work has completed.")
      .def("synchronize", &Event::synchronize, "Block until the recorded work is done (GIL released).")
      .def("elapsed_ms", &Event::elapsed_ms, py::arg("end"),
           "Milliseconds from this event to `end` (both need enable_timing=True).")
      .def_property_readonly("handle", &Event::handle, "The cudaEvent_t as an int.")
      .def_property_readonly("device", &Event::device)
      .def_property_readonly("timing", &Event::timing);
}

}  // namespace pyengine

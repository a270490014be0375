// CUDA streams and events for pyengine._C. Cross-stream ordering goes through events,
// never a host synchronisation between streams; every call that may block releases the GIL.
#pragma once

#include <cuda_runtime_api.h>
#include <pybind11/pybind11.h>

#include <cstdint>
#include <memory>

namespace pyengine {

// Makes `device` current for the scope and restores the previous device after.
// Raises pyengine::Error (decoded "no CUDA driver/device") when CUDA is unusable.
class DeviceGuard {
 public:
  explicit DeviceGuard(int device);
  ~DeviceGuard();
  DeviceGuard(const DeviceGuard&) = delete;
  DeviceGuard& operator=(const DeviceGuard&) = delete;

 private:
  int previous_ = -1;
  bool switched_ = false;
};

class Stream {
 public:
  // Creates and owns a non-blocking stream on `device` (lower priority number
  // = higher priority; out-of-range values are clamped by CUDA).
  Stream(int device, int priority);
  // Wraps an existing stream (e.g. torch.cuda.Stream.cuda_stream) without owning it.
  static std::unique_ptr<Stream> from_handle(std::uintptr_t handle, int device);
  ~Stream();
  Stream(const Stream&) = delete;
  Stream& operator=(const Stream&) = delete;

  cudaStream_t get() const { return stream_; }
  std::uintptr_t handle() const { return reinterpret_cast<std::uintptr_t>(stream_); }
  int device() const { return device_; }
  int priority() const { return priority_; }
  bool owned() const { return owned_; }
  void synchronize();  // GIL released while waiting
  bool query();        // true when all work queued so far has finished

 private:
  Stream() = default;
  cudaStream_t stream_ = nullptr;
  int device_ = 0;
  int priority_ = 0;
  bool owned_ = false;
};

class Event {
 public:
  Event(int device, bool enable_timing);
  ~Event();
  Event(const Event&) = delete;
  Event& operator=(const Event&) = delete;

  cudaEvent_t get() const { return event_; }
  std::uintptr_t handle() const { return reinterpret_cast<std::uintptr_t>(event_); }
  int device() const { return device_; }
  bool timing() const { return timing_; }
  void record(cudaStream_t stream);
  void wait(cudaStream_t stream);  // `stream` waits for this event (host does not block)
  bool query();                    // true when the recorded work has finished
  void synchronize();              // GIL released while waiting
  float elapsed_ms(const Event& end);

 private:
  cudaEvent_t event_ = nullptr;
  int device_ = 0;
  bool timing_ = false;
};

// Accepts a pyengine._C.Stream or a raw stream handle (int, 0 = legacy default stream).
cudaStream_t stream_from_py(pybind11::handle obj);

// Stream, Event.
void register_streams(pybind11::module_& m);

}  // namespace pyengine

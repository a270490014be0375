#include "nccl.hpp"

#include <nvtx3/nvToolsExt.h>
#include <pybind11/stl.h>

#include <chrono>
#include <cstdio>
#include <cstring>
#include <sstream>
#include <thread>

#include "check.hpp"
#include "poll.hpp"
#include "stream.hpp"

namespace py = pybind11;

namespace pyengine {

namespace {

// One NVTX range per communication call, named by the caller (fallback: the op).
class NvtxRange {
 public:
  explicit NvtxRange(const std::string& label) { nvtxRangePushA(label.c_str()); }
  ~NvtxRange() { nvtxRangePop(); }
  NvtxRange(const NvtxRange&) = delete;
  NvtxRange& operator=(const NvtxRange&) = delete;
};

std::string nccl_text(ncclResult_t res, ncclComm_t comm) {
  std::string text = ncclGetErrorString(res);
  const char* last = ncclGetLastError(comm);
  if (last != nullptr && last[0] != '\0') {
    text += std::string(" | ") + last;
  }
  return text;
}

}  // namespace

ncclDataType_t to_nccl(DType dtype) {
  switch (dtype) {
    case DType::float32: return ncclFloat32;
    case DType::float16: return ncclFloat16;
    case DType::bfloat16: return ncclBfloat16;
    case DType::int32: return ncclInt32;
    case DType::int64: return ncclInt64;
    case DType::uint8: return ncclUint8;
    case DType::float64: return ncclFloat64;
  }
  PYENGINE_CHECK(false, "unknown DType " << static_cast<int>(dtype));
}

ncclRedOp_t to_nccl(RedOp op) {
  switch (op) {
    case RedOp::sum: return ncclSum;
    case RedOp::max: return ncclMax;
    case RedOp::min: return ncclMin;
    case RedOp::prod: return ncclProd;
  }
  PYENGINE_CHECK(false, "unknown RedOp " << static_cast<int>(op));
}

std::size_t dtype_size(DType dtype) {
  switch (dtype) {
    case DType::float32: return 4;
    case DType::float16: return 2;
    case DType::bfloat16: return 2;
    case DType::int32: return 4;
    case DType::int64: return 8;
    case DType::uint8: return 1;
    case DType::float64: return 8;
  }
  PYENGINE_CHECK(false, "unknown DType " << static_cast<int>(dtype));
}

std::string Communicator::unique_id() {
  ncclUniqueId id;
  PYENGINE_CHECK_NCCL(ncclGetUniqueId(&id));
  return std::string(id.internal, NCCL_UNIQUE_ID_BYTES);
}

Communicator::Communicator(const std::string& unique_id, int nranks, int rank, int device,
                           double timeout_s)
    : nranks_(nranks), rank_(rank), device_(device), timeout_s_(timeout_s) {
  PYENGINE_CHECK(unique_id.size() == NCCL_UNIQUE_ID_BYTES,
                 "Communicator: unique_id must be " << NCCL_UNIQUE_ID_BYTES << " bytes from "
                                                    << "Communicator.unique_id(), got " << unique_id.size());
  PYENGINE_CHECK(nranks >= 1 && rank >= 0 && rank < nranks,
                 "Communicator: rank " << rank << " is outside [0, " << nranks << ")");
  PYENGINE_CHECK(timeout_s > 0.0, "Communicator: timeout_s must be > 0, got " << timeout_s);

  py::gil_scoped_release nogil;
  std::lock_guard<std::mutex> lock(mu_);
  DeviceGuard guard(device);  // raises "no CUDA driver/device" on a machine without CUDA
  PYENGINE_CHECK_CUDA(cudaEventCreateWithFlags(&wait_event_, cudaEventDisableTiming));

  ncclUniqueId id;
  std::memcpy(id.internal, unique_id.data(), NCCL_UNIQUE_ID_BYTES);
  ncclConfig_t config = NCCL_CONFIG_INITIALIZER;
  config.blocking = 0;  // init returns at once; readiness is polled below, with a timeout
  ncclResult_t res = ncclCommInitRankConfig(&comm_, nranks, id, rank, &config);
  std::ostringstream what;
  what << "NCCL communicator init (rank " << rank << " of " << nranks << ", device " << device << ")";
  if (res != ncclSuccess && res != ncclInProgress) {
    std::string text = nccl_text(res, comm_);
    abort_locked();
    (void)cudaEventDestroy(wait_event_);
    wait_event_ = nullptr;
    PYENGINE_CHECK(false, what.str() << " failed: " << text);
  }
  bool timed_out = false;
  res = poll_ready_locked(timeout_s, &timed_out);
  if (timed_out || res != ncclSuccess) {
    std::string text = timed_out ? "" : nccl_text(res, comm_);
    abort_locked();
    (void)cudaEventDestroy(wait_event_);
    wait_event_ = nullptr;
    if (timed_out) {
      PYENGINE_CHECK(false, what.str() << " timed out after " << timeout_s
                                       << " s: not every rank joined with this unique id "
                                       << "(a peer is missing, slow or crashed); init aborted");
    }
    PYENGINE_CHECK(false, what.str() << " failed: " << text);
  }
}

Communicator::~Communicator() {
  if (comm_ != nullptr) {
    // Destroying or aborting here could wait on peers during interpreter shutdown
    // (STYLE 10); the owner must call destroy()/abort() or use a context manager.
    std::fprintf(stderr,
                 "pyengine: Communicator (rank %d of %d, device %d) was neither destroyed nor "
                 "aborted; leaking it\n",
                 rank_, nranks_, device_);
  }
  if (wait_event_ != nullptr) {
    (void)cudaEventDestroy(wait_event_);
  }
}

std::string Communicator::describe(const char* op, const std::string& name, int peer) const {
  std::ostringstream os;
  os << "NCCL " << op;
  if (!name.empty()) os << " '" << name << "'";
  os << " (rank " << rank_ << " of " << nranks_;
  if (peer >= 0) os << ", peer " << peer;
  os << ", device " << device_ << ")";
  return os.str();
}

void Communicator::check_alive_locked(const char* op) const {
  PYENGINE_CHECK(comm_ != nullptr, "NCCL " << op << " on rank " << rank_ << ": the communicator was "
                                           << (aborted_ ? "aborted" : "destroyed"));
}

bool Communicator::alive() {
  std::lock_guard<std::mutex> lock(mu_);
  return comm_ != nullptr;
}

ncclResult_t Communicator::poll_ready_locked(double timeout_s, bool* timed_out) {
  ncclResult_t state = ncclInProgress;
  ncclResult_t failed = ncclSuccess;
  const bool settled = poll_until(
      [&] {
        failed = ncclCommGetAsyncError(comm_, &state);
        return failed != ncclSuccess || state != ncclInProgress;
      },
      deadline_after(timeout_s));
  *timed_out = !settled;
  if (failed != ncclSuccess) return failed;
  return settled ? state : ncclInProgress;
}

void Communicator::abort_locked() {
  if (comm_ != nullptr) {
    (void)ncclCommAbort(comm_);
    comm_ = nullptr;
    aborted_ = true;
  }
}

template <typename Fn>
void Communicator::enqueue(const char* op, const std::string& name, int peer, Fn&& fn) {
  py::gil_scoped_release nogil;
  std::lock_guard<std::mutex> lock(mu_);
  check_alive_locked(op);
  if (peer >= 0) {
    PYENGINE_CHECK(peer < nranks_, describe(op, name, peer) << ": peer out of range");
  }
  ncclResult_t state = ncclSuccess;
  PYENGINE_CHECK_NCCL_COMM(ncclCommGetAsyncError(comm_, &state), comm_);
  PYENGINE_CHECK(state == ncclSuccess || state == ncclInProgress,
                 describe(op, name, peer) << " refused: the communicator has an async error: "
                                          << nccl_text(state, comm_));
  DeviceGuard guard(device_);
  NvtxRange range(name.empty() ? std::string(op) : name);
  ncclResult_t res = fn();
  PYENGINE_CHECK(res == ncclSuccess || res == ncclInProgress,
                 describe(op, name, peer) << " failed: " << nccl_text(res, comm_));
  if (group_depth_ == 0 && res == ncclInProgress) {
    // A non-blocking communicator must be ready before the next NCCL call.
    bool timed_out = false;
    res = poll_ready_locked(timeout_s_, &timed_out);
    if (timed_out || res != ncclSuccess) {
      std::string text = timed_out ? "timed out enqueuing" : nccl_text(res, comm_);
      abort_locked();
      PYENGINE_CHECK(false, describe(op, name, peer) << " failed: " << text << "; communicator aborted");
    }
  }
}

void Communicator::send(std::uintptr_t ptr, std::size_t count, DType dtype, int peer,
                        cudaStream_t stream, const std::string& name) {
  enqueue("send", name, peer, [&] {
    return ncclSend(reinterpret_cast<const void*>(ptr), count, to_nccl(dtype), peer, comm_, stream);
  });
}

void Communicator::recv(std::uintptr_t ptr, std::size_t count, DType dtype, int peer,
                        cudaStream_t stream, const std::string& name) {
  enqueue("recv", name, peer, [&] {
    return ncclRecv(reinterpret_cast<void*>(ptr), count, to_nccl(dtype), peer, comm_, stream);
  });
}

void Communicator::all_reduce(std::uintptr_t send_ptr, std::uintptr_t recv_ptr, std::size_t count,
                              DType dtype, RedOp op, cudaStream_t stream, const std::string& name) {
  enqueue("all_reduce", name, -1, [&] {
    return ncclAllReduce(reinterpret_cast<const void*>(send_ptr), reinterpret_cast<void*>(recv_ptr),
                         count, to_nccl(dtype), to_nccl(op), comm_, stream);
  });
}

void Communicator::reduce_scatter(std::uintptr_t send_ptr, std::uintptr_t recv_ptr,
                                  std::size_t recv_count, DType dtype, RedOp op,
                                  cudaStream_t stream, const std::string& name) {
  enqueue("reduce_scatter", name, -1, [&] {
    return ncclReduceScatter(reinterpret_cast<const void*>(send_ptr),
                             reinterpret_cast<void*>(recv_ptr), recv_count, to_nccl(dtype),
                             to_nccl(op), comm_, stream);
  });
}

void Communicator::broadcast(std::uintptr_t send_ptr, std::uintptr_t recv_ptr, std::size_t count,
                             DType dtype, int root, cudaStream_t stream, const std::string& name) {
  PYENGINE_CHECK(root >= 0 && root < nranks_,
                 describe("broadcast", name, -1) << ": root " << root << " out of range");
  enqueue("broadcast", name, -1, [&] {
    return ncclBroadcast(reinterpret_cast<const void*>(send_ptr), reinterpret_cast<void*>(recv_ptr),
                         count, to_nccl(dtype), root, comm_, stream);
  });
}

void Communicator::group_start() {
  std::lock_guard<std::mutex> lock(mu_);
  check_alive_locked("group_start");
  PYENGINE_CHECK_NCCL_COMM(ncclGroupStart(), comm_);
  ++group_depth_;
}

void Communicator::group_end() {
  py::gil_scoped_release nogil;
  std::lock_guard<std::mutex> lock(mu_);
  check_alive_locked("group_end");
  PYENGINE_CHECK(group_depth_ > 0, "NCCL group_end on rank " << rank_ << " without group_start");
  --group_depth_;
  ncclResult_t res = ncclGroupEnd();
  if (res == ncclInProgress && group_depth_ == 0) {
    bool timed_out = false;
    res = poll_ready_locked(timeout_s_, &timed_out);
    if (timed_out) res = ncclInProgress;
  }
  if (res != ncclSuccess && !(res == ncclInProgress && group_depth_ > 0)) {
    std::string text = res == ncclInProgress ? "timed out enqueuing the group" : nccl_text(res, comm_);
    abort_locked();
    PYENGINE_CHECK(false, describe("group_end", "", -1) << " failed: " << text
                                                          << "; communicator aborted");
  }
}

std::optional<std::string> Communicator::async_error() {
  std::lock_guard<std::mutex> lock(mu_);
  if (comm_ == nullptr) {
    return aborted_ ? std::optional<std::string>("communicator aborted") : std::nullopt;
  }
  ncclResult_t state = ncclSuccess;
  PYENGINE_CHECK_NCCL_COMM(ncclCommGetAsyncError(comm_, &state), comm_);
  if (state == ncclSuccess || state == ncclInProgress) return std::nullopt;
  return nccl_text(state, comm_);
}

void Communicator::wait_event(cudaEvent_t event, double timeout_s, const std::string& what, int peer) {
  py::gil_scoped_release nogil;
  cudaError_t query = cudaSuccess;
  std::optional<std::string> failure;
  const bool finished = poll_until(
      [&] {
        query = cudaEventQuery(event);
        if (query != cudaErrorNotReady) return true;  // done, or a CUDA error
        (void)cudaGetLastError();  // NotReady is a status, not an error: keep the next call clean
        std::lock_guard<std::mutex> lock(mu_);
        if (comm_ != nullptr) {
          ncclResult_t state = ncclSuccess;
          const ncclResult_t res = ncclCommGetAsyncError(comm_, &state);
          if (res != ncclSuccess) state = res;
          if (state != ncclSuccess && state != ncclInProgress) failure = nccl_text(state, comm_);
        }
        return failure.has_value();
      },
      deadline_after(timeout_s));
  if (finished && !failure) {
    PYENGINE_CHECK_CUDA(query);
    return;
  }
  std::lock_guard<std::mutex> lock(mu_);
  abort_locked();
  if (failure) {
    PYENGINE_CHECK(false, describe("wait", what, peer) << " failed: " << *failure << "; communicator aborted");
  }
  PYENGINE_CHECK(false, describe("wait", what, peer)
                            << " timed out after " << timeout_s
                            << " s (peer missing, stalled or mismatched op order); "
                            << "communicator aborted");
}

void Communicator::wait_stream(cudaStream_t stream, double timeout_s, const std::string& what, int peer) {
  {
    std::lock_guard<std::mutex> lock(mu_);
    PYENGINE_CHECK(wait_event_ != nullptr, "Communicator.wait: no event (init failed?)");
    PYENGINE_CHECK_CUDA(cudaEventRecord(wait_event_, stream));
  }
  wait_event(wait_event_, timeout_s, what, peer);
}

void Communicator::abort() {
  py::gil_scoped_release nogil;
  std::lock_guard<std::mutex> lock(mu_);
  abort_locked();
}

void Communicator::destroy() {
  py::gil_scoped_release nogil;
  std::lock_guard<std::mutex> lock(mu_);
  if (comm_ == nullptr) return;
  ncclResult_t res = ncclCommFinalize(comm_);
  bool timed_out = false;
  if (res == ncclSuccess || res == ncclInProgress) {
    res = poll_ready_locked(timeout_s_, &timed_out);
  }
  if (timed_out || res != ncclSuccess) {
    std::string text = timed_out ? "timed out flushing outstanding operations" : nccl_text(res, comm_);
    abort_locked();
    PYENGINE_CHECK(false, describe("destroy", "", -1) << " failed: " << text << "; communicator aborted");
  }
  res = ncclCommDestroy(comm_);
  comm_ = nullptr;
  PYENGINE_CHECK(res == ncclSuccess, describe("destroy", "", -1) << " failed: " << ncclGetErrorString(res));
}

void register_nccl(py::module_& m) {
  py::enum_<DType>(m, "DType", "Element types understood by Communicator.")
      .value("float32", DType::float32)
      .value("float16", DType::float16)
      .value("bfloat16", DType::bfloat16)
      .value("int32", DType::int32)
      .value("int64", DType::int64)
      .value("uint8", DType::uint8)
      .value("float64", DType::float64);
  py::enum_<RedOp>(m, "RedOp", "Reduction operators.")
      .value("sum", RedOp::sum)
      .value("max", RedOp::max)
      .value("min", RedOp::min)
      .value("prod", RedOp::prod);
  m.def("dtype_size", &dtype_size, py::arg("dtype"), "Bytes per element of a DType.");

  py::class_<Communicator>(m, "Communicator",
                           "An NCCL communicator (non-blocking). Call destroy() or abort() explicitly.")
      .def_static(
          "unique_id", [] { return py::bytes(Communicator::unique_id()); },
          "128 opaque bytes to share with every rank before constructing (host only, no GPU).")
      .def(py::init([](py::bytes unique_id, int nranks, int rank, int device, double timeout_s) {
             return std::make_unique<Communicator>(std::string(unique_id), nranks, rank, device, timeout_s);
           }),
           py::arg("unique_id"), py::arg("nranks"), py::arg("rank"), py::arg("device"),
           py::arg("timeout_s") = 60.0)
      .def(
          "send",
          [](Communicator& c, std::uintptr_t ptr, std::size_t count, DType dtype, int peer,
             py::handle stream, const std::string& name) {
            c.send(ptr, count, dtype, peer, stream_from_py(stream), name);
          },
          py::arg("ptr"), py::arg("count"), py::arg("dtype"), py::arg("peer"), py::arg("stream"),
          py::arg("name") = "")
      .def(
          "recv",
          [](Communicator& c, std::uintptr_t ptr, std::size_t count, DType dtype, int peer,
             py::handle stream, const std::string& name) {
            c.recv(ptr, count, dtype, peer, stream_from_py(stream), name);
          },
          py::arg("ptr"), py::arg("count"), py::arg("dtype"), py::arg("peer"), py::arg("stream"),
          py::arg("name") = "")
      .def(
          "all_reduce",
          [](Communicator& c, std::uintptr_t send_ptr, std::uintptr_t recv_ptr, std::size_t count,
             DType dtype, RedOp op, py::handle stream, const std::string& name) {
            c.all_reduce(send_ptr, recv_ptr, count, dtype, op, stream_from_py(stream), name);
          },
          py::arg("send_ptr"), py::arg("recv_ptr"), py::arg("count"), py::arg("dtype"), py::arg("op"),
          py::arg("stream"), py::arg("name") = "")
      .def(
          "reduce_scatter",
          [](Communicator& c, std::uintptr_t send_ptr, std::uintptr_t recv_ptr, std::size_t recv_count,
             DType dtype, RedOp op, py::handle stream, const std::string& name) {
            c.reduce_scatter(send_ptr, recv_ptr, recv_count, dtype, op, stream_from_py(stream), name);
          },
          py::arg("send_ptr"), py::arg("recv_ptr"), py::arg("recv_count"), py::arg("dtype"),
          py::arg("op"), py::arg("stream"), py::arg("name") = "")
      .def(
          "broadcast",
          [](Communicator& c, std::uintptr_t send_ptr, std::uintptr_t recv_ptr, std::size_t count,
             DType dtype, int root, py::handle stream, const std::string& name) {
            c.broadcast(send_ptr, recv_ptr, count, dtype, root, stream_from_py(stream), name);
          },
          py::arg("send_ptr"), py::arg("recv_ptr"), py::arg("count"), py::arg("dtype"), py::arg("root"),
          py::arg("stream"), py::arg("name") = "")
      .def("group_start", &Communicator::group_start)
      .def("group_end", &Communicator::group_end)
      .def("async_error", &Communicator::async_error,
           "None while healthy, else the decoded asynchronous NCCL error.")
      .def(
          "wait",
          [](Communicator& c, py::handle target, double timeout_s, const std::string& what, int peer) {
            if (py::isinstance<Event>(target)) {
              c.wait_event(target.cast<Event&>().get(), timeout_s, what, peer);
            } else {
              c.wait_stream(stream_from_py(target), timeout_s, what, peer);
            }
          },
          py::arg("target"), py::arg("timeout_s"), py::arg("what"), py::arg("peer") = -1,
          "Block (GIL released) until `target` (an Event, or a Stream / int stream handle whose "
          "queued work is awaited) completes; raises Error naming `what` and `peer` on an async "
          "NCCL error or after timeout_s, aborting the communicator.")
      .def("abort", &Communicator::abort)
      .def("destroy", &Communicator::destroy)
      .def_property_readonly("rank", &Communicator::rank)
      .def_property_readonly("nranks", &Communicator::nranks)
      .def_property_readonly("device", &Communicator::device)
      .def_property_readonly("timeout_s", &Communicator::timeout_s)
      .def_property_readonly("alive", &Communicator::alive);
}

}  // namespace pyengine

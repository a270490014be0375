// The NCCL communicator: non-blocking init, ops enqueued and polled until NCCL has taken
// them, bounded waits on completion events, explicit abort and destroy. A failure aborts
// the rank's whole set (nccl_abort.cpp).
#include <nvtx3/nvToolsExt.h>

#include <algorithm>
#include <cstdio>
#include <cstring>
#include <sstream>

#include "check.hpp"
#include "nccl.hpp"
#include "nccl_detail.hpp"
#include "poll.hpp"
#include "stream.hpp"

namespace pyengine {

using detail::nccl_text;
using detail::ranks_text;
using detail::seconds_text;

namespace {

// One NVTX range per communication call, named by the caller (fallback: the op).
class NvtxRange {
 public:
  explicit NvtxRange(const std::string& label) { nvtxRangePushA(label.c_str()); }
  ~NvtxRange() { nvtxRangePop(); }
  NvtxRange(const NvtxRange&) = delete;
  NvtxRange& operator=(const NvtxRange&) = delete;
};

}  // namespace

std::string Communicator::unique_id() {
  ncclUniqueId id;
  PYENGINE_CHECK_NCCL(ncclGetUniqueId(&id));
  return std::string(id.internal, NCCL_UNIQUE_ID_BYTES);
}

std::shared_ptr<Communicator> Communicator::create(const std::string& unique_id, int nranks,
                                                   int rank, int device, double timeout_s,
                                                   std::vector<int> global_ranks,
                                                   std::shared_ptr<CommSet> set) {
  auto comm = std::make_shared<Communicator>(unique_id, nranks, rank, device, timeout_s,
                                             std::move(global_ranks));
  comm->set_ = set ? std::move(set) : std::make_shared<CommSet>();
  comm->set_->add(comm);
  return comm;
}

Communicator::Communicator(const std::string& unique_id, int nranks, int rank, int device,
                           double timeout_s, std::vector<int> global_ranks)
    : global_ranks_(std::move(global_ranks)),
      nranks_(nranks),
      rank_(rank),
      device_(device),
      timeout_s_(timeout_s) {
  PYENGINE_CHECK(unique_id.size() == NCCL_UNIQUE_ID_BYTES,
                 "Communicator: unique_id must be " << NCCL_UNIQUE_ID_BYTES << " bytes from "
                                                    << "Communicator.unique_id(), got " << unique_id.size());
  PYENGINE_CHECK(nranks >= 1 && rank >= 0 && rank < nranks,
                 "Communicator: rank " << rank << " is outside [0, " << nranks << ")");
  PYENGINE_CHECK(timeout_s > 0.0, "Communicator: timeout_s must be > 0, got " << timeout_s);
  if (global_ranks_.empty()) {
    for (int r = 0; r < nranks; ++r) global_ranks_.push_back(r);
  }
  std::vector<int> sorted = global_ranks_;
  std::sort(sorted.begin(), sorted.end());
  PYENGINE_CHECK(static_cast<int>(global_ranks_.size()) == nranks &&
                     std::adjacent_find(sorted.begin(), sorted.end()) == sorted.end() && sorted.front() >= 0,
                 "Communicator: ranks " << ranks_text(global_ranks_) << " must list " << nranks
                                        << " distinct global ranks >= 0, one per member");

  std::lock_guard<std::mutex> lock(mu_);
  DeviceGuard guard(device);  // raises "no CUDA driver/device" on a machine without CUDA

  ncclUniqueId id;
  std::memcpy(id.internal, unique_id.data(), NCCL_UNIQUE_ID_BYTES);
  ncclConfig_t config = NCCL_CONFIG_INITIALIZER;
  config.blocking = 0;  // init returns at once; readiness is polled below, with a timeout
  ncclResult_t res = ncclCommInitRankConfig(&comm_, nranks, id, rank, &config);
  const std::string what = "NCCL communicator init (" + label() + ")";
  std::optional<std::string> failure;
  if (res != ncclSuccess && res != ncclInProgress) {
    failure = what + " failed: " + nccl_text(res, comm_);
  } else {
    failure = wait_ready_locked(what, timeout_s,
                                "not every rank joined with this unique id (a peer is missing, "
                                "slow or crashed)");
  }
  if (failure) {
    // Not in a set yet: only this half-built communicator exists to abort. Its abort result
    // is secondary to the init failure being reported.
    (void)abort_locked();
    PYENGINE_CHECK(false, *failure << "; init aborted");
  }
}

Communicator::~Communicator() {
  if (comm_ != nullptr) {
    // Destroying or aborting here could wait on peers, and a destructor that waits can hang
    // the interpreter's shutdown: the owner must call destroy()/abort() or use a context
    // manager, so a communicator still held here is leaked, loudly.
    std::fprintf(stderr, "pyengine: NCCL communicator %s was neither destroyed nor aborted; leaking it\n",
                 label().c_str());
  }
}

int Communicator::global(int local) const {
  return local >= 0 && local < nranks_ ? global_ranks_[static_cast<std::size_t>(local)] : local;
}

std::string Communicator::label() const {
  std::ostringstream os;
  os << "group " << ranks_text(global_ranks_) << " on rank " << global_rank() << ", device " << device_;
  return os.str();
}

std::string Communicator::describe(const char* op, const std::string& name, int peer) const {
  std::ostringstream os;
  os << "NCCL " << op;
  if (!name.empty()) os << " '" << name << "'";
  os << " (rank " << global_rank();
  if (peer >= 0) os << ", peer " << global(peer);
  os << ", group " << ranks_text(global_ranks_) << ", device " << device_ << ")";
  return os.str();
}

std::string Communicator::nccl_state_text_locked() {
  if (comm_ == nullptr) return aborted_ ? "communicator aborted" : "communicator destroyed";
  ncclResult_t state = ncclSuccess;
  const ncclResult_t res = ncclCommGetAsyncError(comm_, &state);
  return nccl_text(res != ncclSuccess ? res : state, comm_);
}

void Communicator::check_alive_locked(const char* op, const std::string& name, int peer) const {
  PYENGINE_CHECK(comm_ != nullptr, describe(op, name, peer) << ": the communicator was "
                                                            << (aborted_ ? "aborted" : "destroyed"));
}

bool Communicator::alive() {
  std::lock_guard<std::mutex> lock(mu_);
  return comm_ != nullptr;
}

std::optional<std::string> Communicator::wait_ready_locked(const std::string& what, double timeout_s,
                                                           const char* hint) {
  ncclResult_t state = ncclInProgress;
  const bool settled = poll_until(
      [&] {
        if (abort_requested_.load(std::memory_order_relaxed)) return true;
        const ncclResult_t res = ncclCommGetAsyncError(comm_, &state);
        if (res != ncclSuccess) state = res;
        return state != ncclInProgress;
      },
      deadline_after(timeout_s));
  if (abort_requested_.load()) {
    return what + " interrupted: the communicator is being aborted (a failure elsewhere on this rank)";
  }
  if (!settled) {
    return what + " timed out after " + seconds_text(timeout_s) + ": " + hint + "; NCCL reports: " +
           nccl_text(state, comm_);
  }
  if (state != ncclSuccess) return what + " failed: " + nccl_text(state, comm_);
  return std::nullopt;
}

ncclResult_t Communicator::abort_locked() {
  if (comm_ == nullptr) return ncclSuccess;
  const ncclResult_t res = ncclCommAbort(comm_);
  comm_ = nullptr;  // the handle is gone either way: NCCL freed what it could
  aborted_ = true;
  return res;
}

void Communicator::abort() {
  abort_requested_.store(true);  // pollers holding mu_ see this and let go of it
  std::lock_guard<std::mutex> lock(mu_);
  const ncclResult_t res = abort_locked();
  PYENGINE_CHECK(res == ncclSuccess, "ncclCommAbort of " << label() << " failed: " << ncclGetErrorString(res));
}

void Communicator::fail(const char* file, int line, const std::string& what) {
  if (detail::in_group()) {
    detail::defer_abort(set_->members());
    detail::defer_failure(what);
    throw_error(file, line, what + "; every NCCL communicator of rank " + std::to_string(global_rank()) +
                                " is aborted when this thread's NCCL group ends");
  }
  throw_error(file, line, what + "; " + detail::abort_summary(set_->members(), timeout_s_));
}

template <typename Fn>
void Communicator::enqueue(const char* op, const std::string& name, int peer, Fn&& fn) {
  std::optional<std::string> failure;
  {
    std::lock_guard<std::mutex> lock(mu_);
    check_alive_locked(op, name, peer);
    PYENGINE_CHECK(peer < nranks_, describe(op, name, -1) << ": peer " << peer << " is outside [0, "
                                                          << nranks_ << ") of group "
                                                          << ranks_text(global_ranks_));
    ncclResult_t state = ncclSuccess;
    ncclResult_t res = ncclCommGetAsyncError(comm_, &state);
    if (res != ncclSuccess) state = res;
    if (state != ncclSuccess && state != ncclInProgress) {
      failure = describe(op, name, peer) + " refused: the communicator has an async error: " +
                nccl_text(state, comm_);
    } else {
      DeviceGuard guard(device_);
      NvtxRange range(name.empty() ? std::string(op) : name);
      res = fn();
      if (res != ncclSuccess && res != ncclInProgress) {
        failure = describe(op, name, peer) + " failed: " + nccl_text(res, comm_);
      } else if (detail::in_group()) {
        detail::group_touch(shared_from_this());  // group_end() enqueues and polls it
      } else if (res == ncclInProgress) {
        // NCCL needs the communicator ready before the next call, and nothing may be queued
        // on the stream (our completion event included) before the op is: poll now, fast.
        failure = wait_ready_locked(describe(op, name, peer) + " enqueue", timeout_s_,
                                    "NCCL did not finish enqueuing the op");
      }
    }
  }
  if (failure) fail(__FILE__, __LINE__, *failure);
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
                 describe("broadcast", name, -1) << ": root " << root << " is outside [0, " << nranks_
                                                 << ") of group " << ranks_text(global_ranks_));
  enqueue("broadcast", name, root, [&] {
    return ncclBroadcast(reinterpret_cast<const void*>(send_ptr), reinterpret_cast<void*>(recv_ptr),
                         count, to_nccl(dtype), root, comm_, stream);
  });
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

std::optional<std::string> Communicator::try_async_error() {
  std::unique_lock<std::mutex> lock(mu_, std::try_to_lock);
  if (!lock.owns_lock() || comm_ == nullptr) return std::nullopt;
  ncclResult_t state = ncclSuccess;
  const ncclResult_t res = ncclCommGetAsyncError(comm_, &state);
  if (res != ncclSuccess) state = res;
  if (state == ncclSuccess || state == ncclInProgress) return std::nullopt;
  return "communicator " + label() + " reports: " + nccl_text(state, comm_);
}

std::optional<std::string> Communicator::wait_group_ready() {
  std::lock_guard<std::mutex> lock(mu_);
  if (comm_ == nullptr) {
    return describe("group_end", "", -1) + ": the communicator was " + (aborted_ ? "aborted" : "destroyed");
  }
  return wait_ready_locked(describe("group_end", "", -1), timeout_s_,
                           "NCCL did not finish enqueuing the group");
}

void Communicator::wait_event(cudaEvent_t event, double timeout_s, const std::string& op,
                              const std::string& name, int peer) {
  const std::string what = describe(op.c_str(), name, peer);
  std::optional<std::string> failure;
  cudaError_t query = cudaSuccess;
  const bool finished = poll_until(
      [&] {
        query = cudaEventQuery(event);
        if (query != cudaErrorNotReady) return true;  // done, or a CUDA error
        (void)cudaGetLastError();  // NotReady is a status, not an error: keep the next call clean
        if (abort_requested_.load(std::memory_order_relaxed)) {
          failure = what + " interrupted: the communicator was aborted (a failure elsewhere on this "
                           "rank, or an explicit abort)";
        } else if (auto own = try_async_error()) {
          failure = what + " failed: " + *own;
        } else if (auto other = set_->first_error(this)) {
          failure = what + " failed: " + *other;
        }
        return failure.has_value();
      },
      deadline_after(timeout_s));
  if (!failure && finished && query != cudaSuccess) {
    (void)cudaGetLastError();
    failure = what + " failed: the completion event reports " + cuda_error_text(query);
  }
  if (!failure && !finished) {
    std::string state;
    {
      std::lock_guard<std::mutex> lock(mu_);
      state = nccl_state_text_locked();
    }
    failure = what + " timed out after " + seconds_text(timeout_s) +
              " (a peer is missing, stalled, or issued its ops in another order); NCCL reports: " + state;
  }
  if (failure) fail(__FILE__, __LINE__, *failure);
}

void Communicator::wait_stream(cudaStream_t stream, double timeout_s, const std::string& op,
                               const std::string& name, int peer) {
  // An event of this call's own (created timing-free: a few microseconds): with one event
  // per communicator, a second thread's wait re-recorded it on its stream, so the first
  // waiter polled the wrong stream's position and returned before its own work was done.
  Event event(device_, /*enable_timing=*/false);
  event.record(stream);
  wait_event(event.get(), timeout_s, op, name, peer);
}

void Communicator::destroy() {
  std::optional<std::string> failure;
  {
    std::lock_guard<std::mutex> lock(mu_);
    if (comm_ == nullptr) return;
    const std::string what = describe("destroy", "", -1);
    ncclResult_t res = ncclCommFinalize(comm_);
    if (res == ncclInProgress) {
      failure = wait_ready_locked(what + " flush", timeout_s_,
                                  "outstanding operations did not complete (a peer is missing or stalled)");
    } else if (res != ncclSuccess) {
      failure = what + " failed: " + nccl_text(res, comm_);
    }
    if (!failure) {
      res = ncclCommDestroy(comm_);
      comm_ = nullptr;
      PYENGINE_CHECK(res == ncclSuccess, what << " failed: " << ncclGetErrorString(res));
      return;
    }
  }
  fail(__FILE__, __LINE__, *failure);
}

}  // namespace pyengine

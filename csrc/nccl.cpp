#include "nccl.hpp"

#include <nvtx3/nvToolsExt.h>
#include <pybind11/stl.h>

#include <algorithm>
#include <condition_variable>
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

std::string seconds_text(double seconds) {
  std::ostringstream os;
  os << seconds << " s";
  return os.str();
}

// "(0, 1, 2)", "(3,)": a Python tuple, as the transports print groups.
std::string ranks_text(const std::vector<int>& ranks) {
  std::ostringstream os;
  os << "(";
  for (std::size_t i = 0; i < ranks.size(); ++i) {
    os << (i ? ", " : "") << ranks[i];
  }
  os << (ranks.size() == 1 ? ",)" : ")");
  return os.str();
}

std::string join(const std::vector<std::string>& parts, const char* sep) {
  std::string out;
  for (std::size_t i = 0; i < parts.size(); ++i) {
    out += (i ? sep : "") + parts[i];
  }
  return out;
}

// Aborts `comms` together and says what happened, for the end of an error message.
std::string abort_summary(const std::vector<std::shared_ptr<Communicator>>& comms,
                          double timeout_s) {
  if (comms.empty()) return "no communicator to abort";
  std::vector<std::string> labels;
  for (const auto& c : comms) labels.push_back("group " + ranks_text(c->global_ranks()));
  const std::vector<std::string> problems = abort_together(comms, timeout_s);
  std::ostringstream os;
  os << "aborted every NCCL communicator of rank " << comms.front()->global_rank() << " ("
     << join(labels, ", ") << ")";
  if (!problems.empty()) os << ", but: " << join(problems, "; ");
  return os.str();
}

// -- thread-wide NCCL groups ------------------------------------------------------------------

// While a thread has an NCCL group open, NCCL's thread-local group state refers to every
// communicator an op was issued on; aborting one of them then (on another thread, as
// abort_together does) would free it under the group. So failures and aborts inside a group
// are deferred: group_end() first lets NCCL close the group, then aborts.
struct GroupState {
  int depth = 0;
  std::vector<std::shared_ptr<Communicator>> touched;      // kept alive until the group ends
  std::vector<std::shared_ptr<Communicator>> abort_at_end;  // deferred aborts
  std::vector<std::string> failures;                        // deferred failures, reported at end
};

thread_local GroupState t_group;

void add_unique(std::vector<std::shared_ptr<Communicator>>& comms,
                const std::shared_ptr<Communicator>& comm) {
  if (std::find(comms.begin(), comms.end(), comm) == comms.end()) comms.push_back(comm);
}

void group_touch(const std::shared_ptr<Communicator>& comm) { add_unique(t_group.touched, comm); }

void defer_abort(const std::vector<std::shared_ptr<Communicator>>& comms) {
  for (const auto& comm : comms) add_unique(t_group.abort_at_end, comm);
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

// -- CommSet ----------------------------------------------------------------------------------

void CommSet::add(const std::shared_ptr<Communicator>& comm) {
  std::lock_guard<std::mutex> lock(mu_);
  members_.push_back(comm);
}

std::vector<std::shared_ptr<Communicator>> CommSet::members() {
  std::lock_guard<std::mutex> lock(mu_);
  std::vector<std::shared_ptr<Communicator>> out;
  for (const auto& weak : members_) {
    if (auto comm = weak.lock()) out.push_back(std::move(comm));
  }
  return out;
}

std::vector<std::string> CommSet::abort(double timeout_s) { return abort_together(members(), timeout_s); }

std::optional<std::string> CommSet::first_error(const Communicator* except) {
  for (const auto& comm : members()) {
    if (comm.get() == except) continue;
    if (auto error = comm->try_async_error()) return error;
  }
  return std::nullopt;
}

std::vector<std::string> abort_together(const std::vector<std::shared_ptr<Communicator>>& comms,
                                        double timeout_s) {
  // Each abort runs on a fresh thread: concurrently with the others, and never inside an NCCL
  // group the calling thread may have open (ncclCommAbort opens a group internally).
  // Shared with the abort threads, which may outlive this call (detached when stuck).
  struct Progress {
    std::mutex mu;
    std::condition_variable cv;
    std::vector<bool> done;
    std::vector<std::string> errors;
  };
  auto progress = std::make_shared<Progress>();
  progress->done.assign(comms.size(), false);
  progress->errors.assign(comms.size(), "");
  for (std::size_t i = 0; i < comms.size(); ++i) {
    std::thread([progress, comm = comms[i], i] {
      std::string error;
      try {
        comm->abort();
      } catch (const std::exception& e) {  // reported to the caller below, not swallowed
        error = e.what();
      }
      std::lock_guard<std::mutex> lock(progress->mu);
      progress->done[i] = true;
      progress->errors[i] = std::move(error);
      progress->cv.notify_all();
    }).detach();
  }
  std::unique_lock<std::mutex> lock(progress->mu);
  progress->cv.wait_until(lock, deadline_after(timeout_s), [&] {
    return std::all_of(progress->done.begin(), progress->done.end(), [](bool d) { return d; });
  });
  std::vector<std::string> problems;
  for (std::size_t i = 0; i < comms.size(); ++i) {
    if (!progress->done[i]) {
      problems.push_back("ncclCommAbort of " + comms[i]->label() + " did not return within " +
                         seconds_text(timeout_s) + " (left running on a detached thread)");
    } else if (!progress->errors[i].empty()) {
      problems.push_back(progress->errors[i]);
    }
  }
  return problems;
}

// -- Communicator -------------------------------------------------------------------------------

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
    // Destroying or aborting here could wait on peers during interpreter shutdown
    // (STYLE 10); the owner must call destroy()/abort() or use a context manager.
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
  if (t_group.depth > 0) {
    defer_abort(set_->members());
    t_group.failures.push_back(what);
    throw_error(file, line, what + "; every NCCL communicator of rank " + std::to_string(global_rank()) +
                                " is aborted when this thread's NCCL group ends");
  }
  throw_error(file, line, what + "; " + abort_summary(set_->members(), timeout_s_));
}

std::vector<std::string> abort_now_or_at_group_end(
    const std::vector<std::shared_ptr<Communicator>>& comms, double timeout_s) {
  if (t_group.depth > 0) {
    defer_abort(comms);
    return {};
  }
  return abort_together(comms, timeout_s);
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
      } else if (t_group.depth > 0) {
        group_touch(shared_from_this());  // group_end() enqueues and polls it
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

// -- groups -------------------------------------------------------------------------------------

void group_start() {
  PYENGINE_CHECK_NCCL(ncclGroupStart());
  ++t_group.depth;
}

int group_depth() { return t_group.depth; }

void group_end() {
  PYENGINE_CHECK(t_group.depth > 0, "NCCL group_end without a matching group_start on this thread");
  --t_group.depth;
  const ncclResult_t res = ncclGroupEnd();
  const bool ok = res == ncclSuccess || res == ncclInProgress;
  if (ok && t_group.depth > 0) return;  // nested: the outermost group_end enqueues everything
  std::vector<std::shared_ptr<Communicator>> touched, to_abort;
  std::vector<std::string> failures;
  touched.swap(t_group.touched);
  to_abort.swap(t_group.abort_at_end);
  failures.swap(t_group.failures);
  std::optional<std::string> failure;
  if (!ok) {
    std::vector<std::string> states;
    for (const auto& comm : touched) {
      states.push_back(comm->label() + ": " + comm->async_error().value_or("no async error"));
    }
    failure = std::string("NCCL group_end failed: ") + ncclGetErrorString(res) + " (" +
              (states.empty() ? "no communicator touched" : join(states, "; ")) + ")";
  } else if (to_abort.empty()) {
    // NCCL enqueues a non-blocking group asynchronously: every communicator touched by it
    // (not only one of them) must be ready before its streams are used or it is called again.
    // (Not when aborts are pending: ncclCommAbort joins NCCL's group job itself.)
    for (const auto& comm : touched) {
      failure = comm->wait_group_ready();
      if (failure) break;
    }
  }
  if (!failures.empty()) {
    failure = "inside the NCCL group: " + join(failures, "; ") + (failure ? "; then " + *failure : "");
  }
  double timeout_s = 0.0;
  for (const auto& comm : touched) timeout_s = std::max(timeout_s, comm->timeout_s());
  for (const auto& comm : to_abort) timeout_s = std::max(timeout_s, comm->timeout_s());
  if (failure) {
    for (const auto& comm : touched) {
      for (const auto& member : comm->set()->members()) add_unique(to_abort, member);
    }
    throw_error(__FILE__, __LINE__, *failure + "; " + abort_summary(to_abort, timeout_s));
  }
  if (!to_abort.empty()) {  // aborts requested inside the group, no failure: report only problems
    const std::vector<std::string> problems = abort_together(to_abort, timeout_s);
    PYENGINE_CHECK(problems.empty(), "NCCL group_end: deferred abort: " << join(problems, "; "));
  }
}

// -- bindings -----------------------------------------------------------------------------------

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

  using nogil = py::call_guard<py::gil_scoped_release>;

  py::class_<CommSet, std::shared_ptr<CommSet>>(
      m, "CommSet",
      "The communicators of one rank: a failure on any member aborts all of them together.")
      .def(py::init<>())
      .def(
          "abort",
          [](CommSet& s, double timeout_s) {
            py::gil_scoped_release release;
            return abort_now_or_at_group_end(s.members(), timeout_s);
          },
          py::arg("timeout_s"),
          "Abort every member, each on its own thread, waiting at most timeout_s; returns one "
          "line per member whose abort did not return in time or failed (empty: all aborted). "
          "Inside an open NCCL group on this thread the abort happens when the group ends.")
      .def("__len__", [](CommSet& s) {
        py::gil_scoped_release release;
        return s.members().size();
      });

  m.def("group_start", &group_start,
        "Open (or nest) this thread's NCCL group; ops on any communicator are deferred.");
  m.def("group_end", &group_end, nogil(),
        "Close this thread's group; the outermost end enqueues it and polls every communicator "
        "touched until ready (GIL released). On failure every communicator of the touched sets "
        "is aborted and Error names them.");
  m.def("group_depth", &group_depth, "Nesting depth of this thread's open NCCL group (0: none).");

  py::class_<Communicator, std::shared_ptr<Communicator>>(
      m, "Communicator",
      "A non-blocking NCCL communicator. Call destroy() or abort() explicitly.")
      .def_static(
          "unique_id", [] { return py::bytes(Communicator::unique_id()); },
          "128 opaque bytes to share with every rank before constructing (host only, no GPU).")
      .def(py::init([](py::bytes unique_id, int nranks, int rank, int device, double timeout_s,
                       std::optional<std::vector<int>> ranks, std::shared_ptr<CommSet> comm_set) {
             std::string id(unique_id);
             py::gil_scoped_release release;
             return Communicator::create(id, nranks, rank, device, timeout_s,
                                         ranks.value_or(std::vector<int>{}), std::move(comm_set));
           }),
           py::arg("unique_id"), py::arg("nranks"), py::arg("rank"), py::arg("device"),
           py::arg("timeout_s") = 60.0, py::arg("ranks") = py::none(),
           py::arg("comm_set") = py::none())
      .def(
          "send",
          [](Communicator& c, std::uintptr_t ptr, std::size_t count, DType dtype, int peer,
             py::handle stream, const std::string& name) {
            cudaStream_t s = stream_from_py(stream);
            py::gil_scoped_release release;
            c.send(ptr, count, dtype, peer, s, name);
          },
          py::arg("ptr"), py::arg("count"), py::arg("dtype"), py::arg("peer"), py::arg("stream"),
          py::arg("name") = "")
      .def(
          "recv",
          [](Communicator& c, std::uintptr_t ptr, std::size_t count, DType dtype, int peer,
             py::handle stream, const std::string& name) {
            cudaStream_t s = stream_from_py(stream);
            py::gil_scoped_release release;
            c.recv(ptr, count, dtype, peer, s, name);
          },
          py::arg("ptr"), py::arg("count"), py::arg("dtype"), py::arg("peer"), py::arg("stream"),
          py::arg("name") = "")
      .def(
          "all_reduce",
          [](Communicator& c, std::uintptr_t send_ptr, std::uintptr_t recv_ptr, std::size_t count,
             DType dtype, RedOp op, py::handle stream, const std::string& name) {
            cudaStream_t s = stream_from_py(stream);
            py::gil_scoped_release release;
            c.all_reduce(send_ptr, recv_ptr, count, dtype, op, s, name);
          },
          py::arg("send_ptr"), py::arg("recv_ptr"), py::arg("count"), py::arg("dtype"), py::arg("op"),
          py::arg("stream"), py::arg("name") = "")
      .def(
          "reduce_scatter",
          [](Communicator& c, std::uintptr_t send_ptr, std::uintptr_t recv_ptr, std::size_t recv_count,
             DType dtype, RedOp op, py::handle stream, const std::string& name) {
            cudaStream_t s = stream_from_py(stream);
            py::gil_scoped_release release;
            c.reduce_scatter(send_ptr, recv_ptr, recv_count, dtype, op, s, name);
          },
          py::arg("send_ptr"), py::arg("recv_ptr"), py::arg("recv_count"), py::arg("dtype"),
          py::arg("op"), py::arg("stream"), py::arg("name") = "")
      .def(
          "broadcast",
          [](Communicator& c, std::uintptr_t send_ptr, std::uintptr_t recv_ptr, std::size_t count,
             DType dtype, int root, py::handle stream, const std::string& name) {
            cudaStream_t s = stream_from_py(stream);
            py::gil_scoped_release release;
            c.broadcast(send_ptr, recv_ptr, count, dtype, root, s, name);
          },
          py::arg("send_ptr"), py::arg("recv_ptr"), py::arg("count"), py::arg("dtype"), py::arg("root"),
          py::arg("stream"), py::arg("name") = "")
      .def("async_error", &Communicator::async_error, nogil(),
           "None while healthy, else the decoded asynchronous NCCL error.")
      .def(
          "wait",
          [](Communicator& c, py::handle target, double timeout_s, const std::string& op,
             const std::string& name, int peer) {
            if (py::isinstance<Event>(target)) {
              cudaEvent_t event = target.cast<Event&>().get();
              py::gil_scoped_release release;
              c.wait_event(event, timeout_s, op, name, peer);
            } else {
              cudaStream_t stream = stream_from_py(target);
              py::gil_scoped_release release;
              c.wait_stream(stream, timeout_s, op, name, peer);
            }
          },
          py::arg("target"), py::arg("timeout_s"), py::arg("op"), py::arg("name") = "",
          py::arg("peer") = -1,
          "Block (GIL released) until `target` (an Event, or a Stream / int stream handle whose "
          "queued work is awaited) completes, polling the async errors of every communicator of "
          "this rank's set. On an error, an abort, or after timeout_s the whole set is aborted "
          "and Error names op, name, this rank and the local `peer` as global ranks.")
      .def(
          "abort",
          [](Communicator& c) {
            // On a thread of its own: ncclCommAbort opens an NCCL group internally, which would
            // nest into a group the caller has open on this thread and be deferred to its end.
            std::vector<std::string> problems;
            {
              py::gil_scoped_release release;
              problems = abort_now_or_at_group_end({c.shared_from_this()}, c.timeout_s());
            }
            PYENGINE_CHECK(problems.empty(), join(problems, "; "));
          },
          "Abort this communicator only, on a helper thread, waiting at most timeout_s "
          "(idempotent; never waits for peers). Error if ncclCommAbort failed or did not return. "
          "Inside an open NCCL group on this thread the abort happens when the group ends.")
      .def("destroy", &Communicator::destroy, nogil(),
           "Flush outstanding work (bounded by timeout_s, else the set is aborted and Error "
           "raised), then free; idempotent.")
      .def_property_readonly("rank", &Communicator::rank, "Local (NCCL) index of this member.")
      .def_property_readonly("nranks", &Communicator::nranks)
      .def_property_readonly("device", &Communicator::device)
      .def_property_readonly("timeout_s", &Communicator::timeout_s)
      .def_property_readonly("ranks", &Communicator::global_ranks,
                             "Global rank of each member, in communicator order.")
      .def_property_readonly("global_rank", &Communicator::global_rank)
      .def_property_readonly("label", &Communicator::label)
      .def_property_readonly("comm_set", &Communicator::set)
      .def_property_readonly("alive", [](Communicator& c) {
        py::gil_scoped_release release;
        return c.alive();
      });
}

}  // namespace pyengine

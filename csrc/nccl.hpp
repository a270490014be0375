// NCCL communicators for pyengine._C: non-blocking init, point-to-point and collectives on
// raw device pointers, thread-wide groups, async-error polling with timeouts, abort of all
// communicators of a rank together, explicit destroy.
//
// Ranks: NCCL addresses members by their index in the communicator ("local"), so every
// argument that NCCL needs (rank, peer, root) is local. Every message prints GLOBAL ranks,
// from the global rank list given at construction.
//
// Python: nothing here touches the interpreter; the bindings (register_nccl) convert
// arguments with the GIL held and release it before any call that locks or may wait.
#pragma once

#include <cuda_runtime_api.h>
#include <nccl.h>
#include <pybind11/pybind11.h>

#include <atomic>
#include <cstddef>
#include <cstdint>
#include <memory>
#include <mutex>
#include <optional>
#include <string>
#include <vector>

namespace pyengine {

enum class DType : int { float32, float16, bfloat16, int32, int64, uint8, float64 };
enum class RedOp : int { sum, max, min, prod };

ncclDataType_t to_nccl(DType dtype);
ncclRedOp_t to_nccl(RedOp op);
std::size_t dtype_size(DType dtype);

class Communicator;

// The communicators of one rank (one transport). A failure or timeout on any member aborts
// every member, together: ncclCommAbort can wait for work already queued on the device,
// and that work may be stuck behind another member's op (through a shared stream or an
// event), so aborting members one after the other can hang where aborting them all at
// once, each on its own thread, returns.
class CommSet {
 public:
  void add(const std::shared_ptr<Communicator>& comm);
  std::vector<std::shared_ptr<Communicator>> members();  // those still referenced
  // Aborts every member on its own thread and waits at most timeout_s for all of them.
  // Returns one line per member whose abort did not return in time (its thread is left
  // running, detached) or failed; empty when every member is aborted.
  std::vector<std::string> abort(double timeout_s);
  // The first member (other than `except`) with an asynchronous NCCL error, as
  // "<label>: <NCCL text>"; members busy on another thread are skipped, not waited for.
  std::optional<std::string> first_error(const Communicator* except);

 private:
  std::mutex mu_;
  std::vector<std::weak_ptr<Communicator>> members_;
};

// Aborts `comms` together (one thread each), bounded by timeout_s; see CommSet::abort.
std::vector<std::string> abort_together(const std::vector<std::shared_ptr<Communicator>>& comms,
                                        double timeout_s);
// abort_together, or, while the calling thread has an NCCL group open (NCCL's group state
// still refers to the communicators), recorded for that group's end (returns no problems).
std::vector<std::string> abort_now_or_at_group_end(
    const std::vector<std::shared_ptr<Communicator>>& comms, double timeout_s);

class Communicator : public std::enable_shared_from_this<Communicator> {
 public:
  // 128 opaque bytes from ncclGetUniqueId (host only; opens NCCL's bootstrap socket).
  static std::string unique_id();

  // Joins the communicator identified by `unique_id` as local `rank` of `nranks` on
  // `device`; the non-blocking init is polled until ready. After `timeout_s` the
  // half-built communicator is aborted and pyengine::Error names the rank.
  // `global_ranks`: the global rank of each member in communicator order (empty: 0..n-1),
  // used only in messages. `set`: the rank's CommSet to join (nullptr: a set of its own).
  static std::shared_ptr<Communicator> create(const std::string& unique_id, int nranks, int rank,
                                              int device, double timeout_s,
                                              std::vector<int> global_ranks,
                                              std::shared_ptr<CommSet> set);
  Communicator(const std::string& unique_id, int nranks, int rank, int device, double timeout_s,
               std::vector<int> global_ranks);
  ~Communicator();  // never waits: a communicator not destroyed explicitly is leaked with a warning
  Communicator(const Communicator&) = delete;
  Communicator& operator=(const Communicator&) = delete;

  // Ops take local peers/roots. Outside a group each one returns once NCCL has enqueued it
  // on `stream` (a non-blocking call is polled until the communicator is ready: NCCL needs
  // that before the next call, and before anything else is queued on the stream). Inside
  // a group the op is only recorded; group_end() enqueues and polls.
  void send(std::uintptr_t ptr, std::size_t count, DType dtype, int peer, cudaStream_t stream,
            const std::string& name);
  void recv(std::uintptr_t ptr, std::size_t count, DType dtype, int peer, cudaStream_t stream,
            const std::string& name);
  void all_reduce(std::uintptr_t send_ptr, std::uintptr_t recv_ptr, std::size_t count, DType dtype,
                  RedOp op, cudaStream_t stream, const std::string& name);
  // `recv_count` elements land on each rank; send_ptr holds nranks * recv_count.
  void reduce_scatter(std::uintptr_t send_ptr, std::uintptr_t recv_ptr, std::size_t recv_count,
                      DType dtype, RedOp op, cudaStream_t stream, const std::string& name);
  void broadcast(std::uintptr_t send_ptr, std::uintptr_t recv_ptr, std::size_t count, DType dtype,
                 int root, cudaStream_t stream, const std::string& name);

  // None while healthy (or still initialising / enqueuing), else NCCL's decoded error
  // ("communicator aborted" once aborted).
  std::optional<std::string> async_error();

  // Polls `event` and the async errors of every communicator of this rank's set until the
  // event completes. On an async error, an abort from another thread, or after timeout_s,
  // the whole set is aborted and pyengine::Error names op, name, this rank, the local
  // `peer` (-1: none) as a global rank, and NCCL's own text.
  void wait_event(cudaEvent_t event, double timeout_s, const std::string& op,
                  const std::string& name, int peer);
  // Records an event of the call's own on `stream` and waits on it: safe for concurrent callers.
  void wait_stream(cudaStream_t stream, double timeout_s, const std::string& op,
                   const std::string& name, int peer);

  // This communicator only; idempotent; never waits for peers. Runs ncclCommAbort on the
  // calling thread: call it through abort_together (the bindings do) unless the thread has
  // no NCCL group open.
  void abort();
  void destroy();  // finalize (flush, polled with the timeout) then destroy; idempotent

  int rank() const { return rank_; }  // local (NCCL) index
  int nranks() const { return nranks_; }
  int device() const { return device_; }
  double timeout_s() const { return timeout_s_; }
  const std::vector<int>& global_ranks() const { return global_ranks_; }
  int global_rank() const { return global_ranks_[static_cast<std::size_t>(rank_)]; }
  // "group (0, 1, 2) on rank 1, device 1": global ranks.
  std::string label() const;
  bool alive();
  const std::shared_ptr<CommSet>& set() const { return set_; }

  // group_end(): polls until NCCL has enqueued the group on this communicator.
  // Returns the failure text, if any (the caller aborts and throws).
  std::optional<std::string> wait_group_ready();
  // "<label>: <NCCL state and last error>" when it has an async error; skipped (nullopt)
  // when another thread holds the communicator.
  std::optional<std::string> try_async_error();

 private:
  template <typename Fn>
  void enqueue(const char* op, const std::string& name, int peer, Fn&& fn);
  // Polls ncclCommGetAsyncError while it reports ncclInProgress (caller holds mu_).
  // Returns the failure text: NCCL error, timeout, or an abort requested meanwhile.
  // `hint` says what a timeout means here.
  std::optional<std::string> wait_ready_locked(const std::string& what, double timeout_s,
                                               const char* hint);
  ncclResult_t abort_locked();  // frees the handle either way; returns ncclCommAbort's result
  // Aborts this rank's set, then throws pyengine::Error: `what` plus what the abort did.
  [[noreturn]] void fail(const char* file, int line, const std::string& what);
  std::string describe(const char* op, const std::string& name, int peer) const;
  std::string nccl_state_text_locked();
  void check_alive_locked(const char* op, const std::string& name, int peer) const;
  int global(int local) const;

  std::mutex mu_;
  std::atomic<bool> abort_requested_{false};  // read by pollers without the lock
  ncclComm_t comm_ = nullptr;
  std::shared_ptr<CommSet> set_;
  std::vector<int> global_ranks_;
  int nranks_ = 0;
  int rank_ = 0;
  int device_ = 0;
  double timeout_s_ = 0.0;
  bool aborted_ = false;
};

// NCCL groups are per thread (ncclGroupStart/End act on the calling thread's group), so the
// group state is thread-local: group_start() opens (or nests) a group; ops issued inside on
// any communicator are recorded as touched; the outermost group_end() calls ncclGroupEnd
// and polls EVERY touched communicator until ready (NCCL enqueues a non-blocking group
// asynchronously). A failure aborts the sets of all touched communicators. Failures and
// aborts that happen while the group is open are deferred to its end (see GroupState).
void group_start();
void group_end();
int group_depth();

// DType, RedOp, CommSet, Communicator, group_start/group_end/group_depth.
void register_nccl(pybind11::module_& m);

}  // namespace pyengine

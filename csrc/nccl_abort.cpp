// The abort and group policy of a rank's NCCL communicators: a failure on any member of a
// rank's set aborts every member together (each on its own thread, bounded in time), and
// failures or aborts inside a thread's open NCCL group wait for that group to end.
#include <nccl.h>

#include <algorithm>
#include <condition_variable>
#include <mutex>
#include <sstream>
#include <thread>

#include "check.hpp"
#include "nccl.hpp"
#include "nccl_detail.hpp"
#include "poll.hpp"

namespace pyengine {

namespace {

// The calling thread's NCCL group (see detail::in_group).
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

}  // namespace

namespace detail {

bool in_group() { return t_group.depth > 0; }

void group_touch(const std::shared_ptr<Communicator>& comm) { add_unique(t_group.touched, comm); }

void defer_abort(const std::vector<std::shared_ptr<Communicator>>& comms) {
  for (const auto& comm : comms) add_unique(t_group.abort_at_end, comm);
}

void defer_failure(const std::string& what) { t_group.failures.push_back(what); }

std::string abort_summary(const std::vector<std::shared_ptr<Communicator>>& comms, double timeout_s) {
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

}  // namespace detail

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
                         detail::seconds_text(timeout_s) + " (left running on a detached thread)");
    } else if (!progress->errors[i].empty()) {
      problems.push_back(progress->errors[i]);
    }
  }
  return problems;
}


std::vector<std::string> abort_now_or_at_group_end(
    const std::vector<std::shared_ptr<Communicator>>& comms, double timeout_s) {
  if (detail::in_group()) {
    detail::defer_abort(comms);
    return {};
  }
  return abort_together(comms, timeout_s);
}

void group_start() {
  PYENGINE_CHECK_NCCL(ncclGroupStart());
  ++t_group.depth;
}

int group_depth() { return t_group.depth; }

namespace {

// Why a closed group failed, if it did: ncclGroupEnd's own error, a member not getting ready,
// or failures recorded while the group was open.
std::optional<std::string> group_failure(ncclResult_t res, const GroupState& closed) {
  using detail::join;
  std::optional<std::string> failure;
  if (res != ncclSuccess && res != ncclInProgress) {
    std::vector<std::string> states;
    for (const auto& comm : closed.touched) {
      states.push_back(comm->label() + ": " + comm->async_error().value_or("no async error"));
    }
    failure = std::string("NCCL group_end failed: ") + ncclGetErrorString(res) + " (" +
              (states.empty() ? "no communicator touched" : join(states, "; ")) + ")";
  } else if (closed.abort_at_end.empty()) {
    // NCCL enqueues a non-blocking group asynchronously: every communicator touched by it
    // (not only one of them) must be ready before its streams are used or it is called again.
    // (Not when aborts are pending: ncclCommAbort joins NCCL's group job itself.)
    for (const auto& comm : closed.touched) {
      failure = comm->wait_group_ready();
      if (failure) break;
    }
  }
  if (!closed.failures.empty()) {
    failure = "inside the NCCL group: " + join(closed.failures, "; ") + (failure ? "; then " + *failure : "");
  }
  return failure;
}

}  // namespace

void group_end() {
  PYENGINE_CHECK(t_group.depth > 0, "NCCL group_end without a matching group_start on this thread");
  --t_group.depth;
  const ncclResult_t res = ncclGroupEnd();
  const bool ok = res == ncclSuccess || res == ncclInProgress;
  if (ok && t_group.depth > 0) return;  // nested: the outermost group_end enqueues everything
  GroupState closed;
  closed.touched.swap(t_group.touched);
  closed.abort_at_end.swap(t_group.abort_at_end);
  closed.failures.swap(t_group.failures);
  const std::optional<std::string> failure = group_failure(res, closed);
  std::vector<std::shared_ptr<Communicator>>& to_abort = closed.abort_at_end;
  double timeout_s = 0.0;
  for (const auto& comm : closed.touched) timeout_s = std::max(timeout_s, comm->timeout_s());
  for (const auto& comm : to_abort) timeout_s = std::max(timeout_s, comm->timeout_s());
  if (failure) {
    for (const auto& comm : closed.touched) {
      for (const auto& member : comm->set()->members()) add_unique(to_abort, member);
    }
    throw_error(__FILE__, __LINE__, *failure + "; " + detail::abort_summary(to_abort, timeout_s));
  }
  if (!to_abort.empty()) {  // aborts requested inside the group, no failure: report only problems
    const std::vector<std::string> problems = abort_together(to_abort, timeout_s);
    PYENGINE_CHECK(problems.empty(), "NCCL group_end: deferred abort: " << detail::join(problems, "; "));
  }
}

}  // namespace pyengine

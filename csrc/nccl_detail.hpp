// Internal to the NCCL domain (nccl.cpp, nccl_group.cpp, nccl_bindings.cpp): message text and
// the calling thread's NCCL group state, shared by the communicator and the abort policy.
#pragma once

#include <nccl.h>

#include <memory>
#include <string>
#include <vector>

#include "nccl.hpp"

namespace pyengine::detail {

// NCCL's error string, plus ncclGetLastError's text for `comm` when it has one.
std::string nccl_text(ncclResult_t res, ncclComm_t comm);
// "0.5 s".
std::string seconds_text(double seconds);
// "(0, 1, 2)", "(3,)": a Python tuple, as the transports print groups.
std::string ranks_text(const std::vector<int>& ranks);
std::string join(const std::vector<std::string>& parts, const char* sep);

// Aborts `comms` together and says what happened, for the end of an error message.
std::string abort_summary(const std::vector<std::shared_ptr<Communicator>>& comms, double timeout_s);

// The calling thread's NCCL group. While a thread has a group open, NCCL's thread-local
// group state refers to every communicator an op was issued on; aborting one of them then
// (on another thread, as abort_together does) would free it under the group. So failures
// and aborts inside a group are deferred: group_end() first lets NCCL close the group, then
// aborts.
bool in_group();
// An op was issued on `comm` inside the open group: group_end() enqueues and polls it.
void group_touch(const std::shared_ptr<Communicator>& comm);
// Aborts `comms` when the open group ends.
void defer_abort(const std::vector<std::shared_ptr<Communicator>>& comms);
// A failure inside the open group, reported again when the group ends.
void defer_failure(const std::string& what);

}  // namespace pyengine::detail

// NCCL communicators for pyengine._C: non-blocking init, point-to-point and
// collectives on raw device pointers, async-error polling with timeouts, abort,
// explicit destroy. Every call that may wait releases the GIL.
#pragma once

#include <cuda_runtime_api.h>
#include <nccl.h>
#include <pybind11/pybind11.h>

#include <cstddef>
#include <cstdint>
#include <mutex>
#include <optional>
#include <string>

namespace pyengine {

enum class DType : int { float32, float16, bfloat16, int32, int64, uint8, float64 };
enum class RedOp : int { sum, max, min, prod };

ncclDataType_t to_nccl(DType dtype);
ncclRedOp_t to_nccl(RedOp op);
std::size_t dtype_size(DType dtype);

class Communicator {
 public:
  // 128 opaque bytes from ncclGetUniqueId (host only; opens NCCL's bootstrap socket).
  static std::string unique_id();

  // Joins the communicator identified by `unique_id` as `rank` of `nranks` on
  // `device`; non-blocking init polled until ready. After `timeout_s` the
  // half-built communicator is aborted and pyengine::Error names the rank.
  Communicator(const std::string& unique_id, int nranks, int rank, int device, double timeout_s);
  ~Communicator();  // never waits: a communicator not destroyed explicitly is leaked with a warning
  Communicator(const Communicator&) = delete;
  Communicator& operator=(const Communicator&) = delete;

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

  void group_start();
  void group_end();  // polls this communicator until the group is enqueued

  // None while healthy (or still initialising / enqueuing), else the decoded error.
  std::optional<std::string> async_error();

  // Polls `event` and the communicator's async error until the event completes.
  // On an async error or after `timeout_s` the communicator is aborted and
  // pyengine::Error names `what`, this rank and `peer` (-1: no single peer).
  void wait_event(cudaEvent_t event, double timeout_s, const std::string& what, int peer);
  void wait_stream(cudaStream_t stream, double timeout_s, const std::string& what, int peer);

  void abort();    // idempotent; frees the communicator without waiting for peers
  void destroy();  // finalize (flush, polled with the timeout) then destroy; idempotent

  int rank() const { return rank_; }
  int nranks() const { return nranks_; }
  int device() const { return device_; }
  double timeout_s() const { return timeout_s_; }
  bool alive();

 private:
  template <typename Fn>
  void enqueue(const char* op, const std::string& name, int peer, Fn&& fn);
  // Polls ncclCommGetAsyncError while it reports ncclInProgress (caller holds mu_).
  ncclResult_t poll_ready_locked(double timeout_s, bool* timed_out);
  void abort_locked();
  std::string describe(const char* op, const std::string& name, int peer) const;
  void check_alive_locked(const char* op) const;

  std::mutex mu_;
  ncclComm_t comm_ = nullptr;
  cudaEvent_t wait_event_ = nullptr;  // recorded by wait_stream
  int nranks_ = 0;
  int rank_ = 0;
  int device_ = 0;
  double timeout_s_ = 0.0;
  int group_depth_ = 0;
  bool aborted_ = false;
};

// DType, RedOp, Communicator.
void register_nccl(pybind11::module_& m);

}  // namespace pyengine

// One error path for the whole extension: every CUDA, NCCL and host check
// throws pyengine::Error carrying file:line and the decoded error.
#pragma once

#include <cuda_runtime_api.h>
#include <nccl.h>

#include <sstream>
#include <stdexcept>
#include <string>

namespace pyengine {

class Error : public std::runtime_error {
 public:
  using std::runtime_error::runtime_error;
};

[[noreturn]] inline void throw_error(const char* file, int line, const std::string& what) {
  std::ostringstream os;
  os << what << " (" << file << ":" << line << ")";
  throw Error(os.str());
}

inline std::string cuda_error_text(cudaError_t err) {
  if (err == cudaErrorNoDevice || err == cudaErrorInsufficientDriver) {
    return std::string("no CUDA driver/device available: ") + cudaGetErrorString(err);
  }
  return std::string(cudaGetErrorName(err)) + ": " + cudaGetErrorString(err);
}

}  // namespace pyengine

#define PYENGINE_CHECK_CUDA(expr)                                                         \
  do {                                                                                    \
    cudaError_t pyengine_err_ = (expr);                                                   \
    if (pyengine_err_ != cudaSuccess) {                                                   \
      (void)cudaGetLastError(); /* clear sticky-less errors so the next call is clean */  \
      ::pyengine::throw_error(__FILE__, __LINE__,                                         \
                              std::string(#expr) + " failed: " +                          \
                                  ::pyengine::cuda_error_text(pyengine_err_));            \
    }                                                                                     \
  } while (0)

#define PYENGINE_CHECK_NCCL_COMM(expr, comm)                                              \
  do {                                                                                    \
    ncclResult_t pyengine_res_ = (expr);                                                  \
    if (pyengine_res_ != ncclSuccess && pyengine_res_ != ncclInProgress) {                \
      std::string pyengine_msg_ = std::string(#expr) + " failed: " +                      \
                                  ncclGetErrorString(pyengine_res_);                      \
      const char* pyengine_last_ = ncclGetLastError(comm);                                \
      if (pyengine_last_ != nullptr && pyengine_last_[0] != '\0') {                       \
        pyengine_msg_ += std::string(" | ") + pyengine_last_;                             \
      }                                                                                   \
      ::pyengine::throw_error(__FILE__, __LINE__, pyengine_msg_);                         \
    }                                                                                     \
  } while (0)

#define PYENGINE_CHECK_NCCL(expr) PYENGINE_CHECK_NCCL_COMM(expr, nullptr)

#define PYENGINE_CHECK(cond, msg)                                                         \
  do {                                                                                    \
    if (!(cond)) {                                                                        \
      std::ostringstream pyengine_os_;                                                    \
      pyengine_os_ << msg;                                                                \
      ::pyengine::throw_error(__FILE__, __LINE__, pyengine_os_.str());                    \
    }                                                                                     \
  } while (0)

// NCCL element types and reductions, and the message text every NCCL file shares.
#include <nccl.h>

#include <sstream>

#include "check.hpp"
#include "nccl.hpp"
#include "nccl_detail.hpp"

namespace pyengine {

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

namespace detail {

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

}  // namespace detail

}  // namespace pyengine

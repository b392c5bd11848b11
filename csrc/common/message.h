// A channel message: 1..kMaxMessageTensors arrays, each with its dtype and shape. The checks and
// error texts the MPI Channel and the NcclChannel share (dpsgs/comm/message.py words them alike).
#pragma once

#include <cstdint>
#include <string>
#include <vector>

#include "common/buffer.h"

namespace dpsgs {

constexpr int kMaxMessageTensors = 16;  // dpsgs.comm.protocol.MAX_MESSAGE_TENSORS agrees (checked on import)
constexpr int kMaxDims = 8;             // dimensions per tensor a header can carry

// What a receiver expects of (or a header says about) one tensor of a message.
struct TensorSpec {
  DType dtype = DType::UInt8;
  std::vector<int64_t> shape;
};

std::string shape_str(const std::vector<int64_t>& shape);  // "(2, 3)", "(4,)", "()"
std::string specs_str(const std::vector<TensorSpec>& specs);  // "[float32 (2, 3), int64 (4,)]"

// ValueError unless 1 <= n <= kMaxMessageTensors. `what`: "got" (a sender) or "expected" (a
// receiver); `where()` names the channel end, formatted only on failure (sends stay cheap).
[[noreturn]] void throw_message_length(size_t n, const char* what, const std::string& where);
template <class Where>
void check_message_length(size_t n, const char* what, Where&& where) {
  if (n < 1 || n > size_t(kMaxMessageTensors)) throw_message_length(n, what, where());
}

// The mismatch between what a receiver expects and what arrived, first difference only: the
// count, then tensor i's dtype or shape. Empty when they agree.
std::string message_mismatch(const std::vector<TensorSpec>& expected, const std::vector<TensorSpec>& received);

}  // namespace dpsgs

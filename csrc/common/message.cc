// Message checks and texts shared by the MPI and NCCL channels (see message.h).
#include "common/message.h"

#include "common/error.h"

namespace dpsgs {

std::string shape_str(const std::vector<int64_t>& shape) {
  std::string s = "(";
  for (size_t i = 0; i < shape.size(); ++i) s += (i ? ", " : "") + std::to_string(shape[i]);
  return s + (shape.size() == 1 ? ",)" : ")");
}

std::string specs_str(const std::vector<TensorSpec>& specs) {
  std::string s = "[";
  for (size_t i = 0; i < specs.size(); ++i)
    s += str_cat(i ? ", " : "", dtype_name(specs[i].dtype), " ", shape_str(specs[i].shape));
  return s + "]";
}

void throw_message_length(size_t n, const char* what, const std::string& where) {
  throw ValueError(str_cat(where, ": a message holds 1 to ", kMaxMessageTensors, " tensors; ", what, " ", n));
}

std::string message_mismatch(const std::vector<TensorSpec>& expected, const std::vector<TensorSpec>& received) {
  if (expected.size() != received.size())
    return str_cat("expected ", expected.size(), " tensor(s) ", specs_str(expected), " but received ",
                   received.size(), " ", specs_str(received));
  for (size_t i = 0; i < expected.size(); ++i) {
    const TensorSpec &e = expected[i], &r = received[i];
    if (e.dtype != r.dtype || e.shape != r.shape)
      return str_cat("tensor ", i, " of ", expected.size(), ": expected dtype ", dtype_name(e.dtype), " shape ",
                     shape_str(e.shape), " but received dtype ", dtype_name(r.dtype), " shape ", shape_str(r.shape));
  }
  return "";
}

}  // namespace dpsgs

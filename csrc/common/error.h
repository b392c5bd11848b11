// Exception types and DPSGS_* check macros: every MPI/NCCL/CUDA failure carries call, where, rank, peer, library message.
#pragma once

#include <mpi.h>

#include <sstream>
#include <stdexcept>
#include <string>

namespace dpsgs {

// A failed library call (MPI, NCCL, CUDA). Python: dpsgs._C.CommError(RuntimeError).
class CommError : public std::runtime_error {
 public:
  explicit CommError(const std::string& what) : std::runtime_error(what) {}
};

// A wait past its deadline. Python: dpsgs._C.CommTimeout(CommError, TimeoutError).
class CommTimeout : public CommError {
 public:
  explicit CommTimeout(const std::string& what) : CommError(what) {}
};

// A precondition the caller broke (header mismatch, bad dtype, non-contiguous ...). Python: ValueError.
class ValueError : public std::invalid_argument {
 public:
  explicit ValueError(const std::string& what) : std::invalid_argument(what) {}
};

// A channel message whose dtype or shape is not what the receiver expects (both channels,
// MPI and NCCL, throw it). Python: dpsgs._C.HeaderMismatch(ValueError).
class HeaderMismatch : public ValueError {
 public:
  explicit HeaderMismatch(const std::string& what) : ValueError(what) {}
};

// Peer value meaning "no single peer" (collectives, local checks).
constexpr int kNoPeer = -1;

inline std::string mpi_error_string(int code) {
  char text[MPI_MAX_ERROR_STRING + 1] = {0};
  int len = 0;
  if (MPI_Error_string(code, text, &len) != MPI_SUCCESS) return "MPI error code " + std::to_string(code);
  return std::string(text, static_cast<size_t>(len));
}

// Builds "<lib> call `<call>` failed at file:line (rank R, peer P): <message>".
inline std::string format_call_error(const char* lib, const char* call, const char* file, int line,
                                     int rank, int peer, const std::string& message) {
  std::ostringstream os;
  os << lib << " call `" << call << "` failed at " << file << ":" << line << " (rank " << rank;
  if (peer != kNoPeer) os << ", peer " << peer;
  os << "): " << message;
  return os.str();
}

[[noreturn]] inline void throw_call_error(const char* lib, const char* call, const char* file, int line,
                                          int rank, int peer, const std::string& message) {
  throw CommError(format_call_error(lib, call, file, line, rank, peer, message));
}

// Concatenates its arguments with operator<< into a std::string.
template <typename... Args>
std::string str_cat(const Args&... args) {
  std::ostringstream os;
  (os << ... << args);
  return os.str();
}

}  // namespace dpsgs

// Checks an MPI return code; `rank`/`peer` are ints in scope of the caller (kNoPeer for none).
#define DPSGS_CHECK_MPI(call, rank, peer)                                                          \
  do {                                                                                              \
    int dpsgs_rc_ = (call);                                                                         \
    if (dpsgs_rc_ != MPI_SUCCESS)                                                                   \
      ::dpsgs::throw_call_error("MPI", #call, __FILE__, __LINE__, (rank), (peer),                   \
                                ::dpsgs::mpi_error_string(dpsgs_rc_));                             \
  } while (0)

// Precondition check: throws dpsgs::ValueError with the streamed message parts.
#define DPSGS_CHECK_ARG(cond, ...)                                                                 \
  do {                                                                                              \
    if (!(cond)) throw ::dpsgs::ValueError(::dpsgs::str_cat(__VA_ARGS__));                          \
  } while (0)

// Generic library failure for other backends (NCCL/CUDA check macros build on this).
#define DPSGS_THROW_CALL(lib, call_text, rank, peer, message)                                      \
  ::dpsgs::throw_call_error((lib), (call_text), __FILE__, __LINE__, (rank), (peer), (message))

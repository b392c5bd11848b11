// CUDA/NCCL check macros and dtype mapping: every failure names the call, rank, peer and the
// library's own message (cudaGetErrorString / ncclGetErrorString + ncclGetLastError).
#pragma once

#include <cuda_runtime.h>
#include <nccl.h>

#include <string>

#include "common/buffer.h"
#include "common/error.h"

namespace dpsgs {

inline std::string cuda_error_text(cudaError_t rc) {
  return str_cat(cudaGetErrorName(rc), ": ", cudaGetErrorString(rc));
}

// ncclGetLastError carries the detail ("peer 3 closed connection ...") that the bare result
// code lacks; it may describe an older asynchronous failure, so both are printed.
inline std::string nccl_error_text(ncclResult_t rc, ncclComm_t comm = nullptr) {
  std::string text = ncclGetErrorString(rc);
  const char* last = ncclGetLastError(comm);
  if (last != nullptr && last[0] != '\0') text += str_cat(" (last NCCL error: ", last, ")");
  return text;
}

// NCCL has no bool type: bool travels as uint8 (channels only; the reducer rejects it).
inline ncclDataType_t nccl_dtype(DType t) {
  switch (t) {
    case DType::Float16: return ncclFloat16;
    case DType::BFloat16: return ncclBfloat16;
    case DType::Float32: return ncclFloat32;
    case DType::Float64: return ncclFloat64;
    case DType::Int32: return ncclInt32;
    case DType::Int64: return ncclInt64;
    case DType::UInt8: return ncclUint8;
    case DType::Int8: return ncclInt8;
    case DType::Bool: return ncclUint8;
  }
  throw ValueError(str_cat("no NCCL type for dtype code ", static_cast<int>(t)));
}

}  // namespace dpsgs

// Checks a cudaError_t; `rank`/`peer` are ints of the caller (kNoPeer for none).
#define DPSGS_CHECK_CUDA(call, rank, peer)                                                         \
  do {                                                                                              \
    cudaError_t dpsgs_cuda_rc_ = (call);                                                            \
    if (dpsgs_cuda_rc_ != cudaSuccess)                                                              \
      DPSGS_THROW_CALL("CUDA", #call, (rank), (peer), ::dpsgs::cuda_error_text(dpsgs_cuda_rc_));   \
  } while (0)

// Checks an ncclResult_t. ncclInProgress is success for non-blocking communicators: the
// caller then settles the communicator (NcclHandle::settle) before its next call.
#define DPSGS_CHECK_NCCL(call, comm, rank, peer)                                                   \
  do {                                                                                              \
    ncclResult_t dpsgs_nccl_rc_ = (call);                                                           \
    if (dpsgs_nccl_rc_ != ncclSuccess && dpsgs_nccl_rc_ != ncclInProgress)                          \
      DPSGS_THROW_CALL("NCCL", #call, (rank), (peer),                                               \
                       ::dpsgs::nccl_error_text(dpsgs_nccl_rc_, (comm)));                           \
  } while (0)

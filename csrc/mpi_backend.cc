// MPI backend for host buffers: datatypes, float16/bfloat16 sum ops, MPI_Iallreduce with a deadline.
#include "mpi_backend.h"

#include <climits>
#include <cstdio>
#include <mutex>

#include "common/backoff.h"
#include "common/error.h"
#include "communicator.h"
#include "reduce_kernels.h"

namespace dpsgs {

namespace {
void half_sum(void* in, void* inout, int* len, MPI_Datatype*) {
  reduce_add(DType::Float16, inout, in, size_t(*len), 1);
}
void bf16_sum(void* in, void* inout, int* len, MPI_Datatype*) {
  reduce_add(DType::BFloat16, inout, in, size_t(*len), 1);
}
}  // namespace

MPI_Datatype mpi_datatype(DType dtype) {
  switch (dtype) {
    case DType::Float16:
    case DType::BFloat16: return MPI_UINT16_T;
    case DType::Float32: return MPI_FLOAT;
    case DType::Float64: return MPI_DOUBLE;
    case DType::Int32: return MPI_INT32_T;
    case DType::Int64: return MPI_INT64_T;
    case DType::UInt8: return MPI_UINT8_T;
    case DType::Int8: return MPI_INT8_T;
    case DType::Bool: return MPI_C_BOOL;
  }
  return MPI_BYTE;
}

MPI_Op mpi_sum_op(DType dtype) {
  static std::once_flag once;
  static MPI_Op half = MPI_OP_NULL, bf16 = MPI_OP_NULL;
  std::call_once(once, [] {
    MPI_Op_create(&half_sum, 1, &half);
    MPI_Op_create(&bf16_sum, 1, &bf16);
  });
  if (dtype == DType::Float16) return half;
  if (dtype == DType::BFloat16) return bf16;
  return MPI_SUM;
}

MpiAllreduceWork::MpiAllreduceWork(const Communicator& c, MPI_Comm comm, const Buffer& buf, int divisor,
                                   std::function<std::string()> what)
    : Work(c.timeout(), c.warn_after()), buf_(buf), divisor_(divisor), rank_(c.rank()), what_(std::move(what)) {
  size_t n = buf.numel();
  DPSGS_CHECK_ARG(n <= size_t(INT_MAX), what_(), ": ", n, " elements exceed MPI's int count; use algorithm 'ring'");
  DPSGS_CHECK_MPI(MPI_Iallreduce(MPI_IN_PLACE, buf.ptr, int(n), mpi_datatype(buf.dtype), mpi_sum_op(buf.dtype),
                                 comm, &req_), rank_, kNoPeer);
}

MpiAllreduceWork::~MpiAllreduceWork() {
  // The Reducer keeps the work (and the buffer's owner) until completion; this is a last resort.
  if (req_ != MPI_REQUEST_NULL) {
    int fin = 0;
    MPI_Finalized(&fin);
    if (!fin) {
      std::fprintf(stderr, "[dpsgs] ERROR: %s dropped before completion\n", what_().c_str());
      MPI_Request_free(&req_);
    }
  }
}

bool MpiAllreduceWork::is_completed() {
  std::lock_guard<std::mutex> lock(mu_);
  if (done_) return true;
  int flag = 0;
  DPSGS_CHECK_MPI(MPI_Test(&req_, &flag, MPI_STATUS_IGNORE), rank_, kNoPeer);
  if (!flag) return false;
  scale_div(buf_.dtype, buf_.ptr, buf_.numel(), divisor_);
  done_ = true;
  return true;
}

void mpi_allreduce_blocking(Communicator& c, MPI_Comm comm, const Buffer& buf, int divisor,
                            const std::function<std::string()>& what) {
  size_t n = buf.numel();
  DPSGS_CHECK_ARG(n <= size_t(INT_MAX), what(), ": ", n, " elements exceed MPI's int count; use algorithm 'ring'");
  {
    Communicator::BlockingCallGuard deadline(c, what);
    DPSGS_CHECK_MPI(MPI_Allreduce(MPI_IN_PLACE, buf.ptr, int(n), mpi_datatype(buf.dtype), mpi_sum_op(buf.dtype),
                                  comm), c.rank(), kNoPeer);
  }
  scale_div(buf.dtype, buf.ptr, n, divisor);
}

void mpi_allreduce(const Communicator& c, MPI_Comm comm, const Buffer& buf, int divisor,
                   const std::function<std::string()>& what) {
  size_t n = buf.numel();
  DPSGS_CHECK_ARG(n <= size_t(INT_MAX), what(), ": ", n, " elements exceed MPI's int count; use algorithm 'ring'");
  MPI_Request req;
  DPSGS_CHECK_MPI(MPI_Iallreduce(MPI_IN_PLACE, buf.ptr, int(n), mpi_datatype(buf.dtype), mpi_sum_op(buf.dtype),
                                 comm, &req), c.rank(), kNoPeer);
  poll_until(
      [&] {
        if (c.cancelled()) throw CommError(what() + ": cancelled (communicator shut down)");
        int flag = 0;
        DPSGS_CHECK_MPI(MPI_Test(&req, &flag, MPI_STATUS_IGNORE), c.rank(), kNoPeer);
        return flag != 0;
      },
      c.timeout(), c.warn_after(), what, Backoff::kTransferYieldSeconds, Backoff::kTransferSpinSeconds);
  scale_div(buf.dtype, buf.ptr, n, divisor);
}

}  // namespace dpsgs

// Host-memory collectives over MPI: datatype/op mapping and the "mpi" all-reduce (MPI_Iallreduce).
#pragma once

#include <mpi.h>

#include <atomic>
#include <functional>
#include <mutex>
#include <string>

#include "common/buffer.h"
#include "common/work.h"

namespace dpsgs {

class Communicator;

MPI_Datatype mpi_datatype(DType dtype);
// MPI_SUM, or a user op that sums float16/bfloat16 through float32.
MPI_Op mpi_sum_op(DType dtype);

// Non-blocking variant issued from the caller's thread: MPI_Iallreduce now, the division when
// a test first finds it complete. Polled by is_completed()/wait() (and by any MPI progress).
class MpiAllreduceWork : public Work {
 public:
  // `what` is called only for messages (errors, repr): issuing stays cheap.
  MpiAllreduceWork(const Communicator& c, MPI_Comm comm, const Buffer& buf, int divisor,
                   std::function<std::string()> what);
  ~MpiAllreduceWork() override;
  bool is_completed() override;
  std::string describe() const override { return what_(); }

 private:
  std::mutex mu_;
  MPI_Request req_ = MPI_REQUEST_NULL;
  bool done_ = false;
  Buffer buf_;
  int divisor_, rank_;
  std::function<std::string()> what_;
};

// MPI_Allreduce in place on the caller's thread, under c's BlockingCallGuard (the job is
// aborted, naming what(), if it overruns c's timeout), then the division by `divisor`.
void mpi_allreduce_blocking(Communicator& c, MPI_Comm comm, const Buffer& buf, int divisor,
                            const std::function<std::string()>& what);

// In-place sum via MPI_Iallreduce on `comm`, polled until done or the deadline (the progress
// thread's MPI all-reduce), then the division by `divisor` (1 = plain sum). `what` names the
// operation for errors.
void mpi_allreduce(const Communicator& c, MPI_Comm comm, const Buffer& buf, int divisor,
                   const std::function<std::string()>& what);

}  // namespace dpsgs

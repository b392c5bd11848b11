// Reducer: ordered, asynchronous averaging all-reduce of host buffers on the progress thread.
#pragma once

#include <deque>
#include <memory>
#include <string>
#include <utility>

#include "common/buffer.h"
#include "communicator.h"
#include "ring_allreduce.h"
#include "common/work.h"

namespace dpsgs {

enum class Algorithm { Auto, Ring, Mpi };
Algorithm parse_algorithm(const std::string& name);
const char* algorithm_name(Algorithm a);

struct ReducerOptions {
  Algorithm algorithm = Algorithm::Auto;
  RingOptions ring;
  // "auto" uses MPI's own all-reduce below this many bytes and the ring from here up: MPICH
  // is as fast or faster below (2 ranks, this machine: the ring wins from 4-8 MiB).
  size_t mpi_below_bytes = 4 * 1024 * 1024;
  // MPI all-reduces below this many bytes are issued at once from the caller's thread
  // (MPI_Iallreduce, progressed when tested): a hand-off to the progress thread would cost
  // more than the operation. From here up they are queued FIFO to the progress thread with
  // the ring ones, so they progress while Python computes.
  size_t caller_thread_below_bytes = 256 * 1024;
  // Opt-in: MPI buffers below this many bytes are reduced with a blocking MPI_Allreduce on
  // the caller's thread (GIL released; the communicator's watchdog enforces the deadline) and
  // come back complete. MPICH's MPI_Iallreduce costs 1-2 us more per call (10-25 % at these
  // sizes), so callers that wait at once gain. Off by default: allreduce() then returns
  // before its peers arrive, a contract that programs rely on (a rank may issue and go on).
  size_t blocking_below_bytes = 0;
};

// Contract: every rank calls allreduce() with buffers of the same dtype and size in the same
// order (the progress thread issues them FIFO). The buffer must stay untouched until its Work
// completes; the Reducer keeps its owner alive until then. After a failed all-reduce the
// communicator's collective stream is unusable: later all-reduces fail at once (abort the job).
class Reducer {
 public:
  Reducer(std::shared_ptr<Communicator> comm, ReducerOptions opt);
  ~Reducer();  // waits (bounded) for its queued all-reduces; reports any dropped
  Reducer(const Reducer&) = delete;
  Reducer& operator=(const Reducer&) = delete;

  std::shared_ptr<Work> allreduce(const Buffer& buf, Owner owner, bool average);
  Algorithm choose(const Buffer& buf) const;
  // True when allreduce(buf) blocks until done (the bindings release the GIL around it).
  bool blocks(const Buffer& buf) const;
  const ReducerOptions& options() const { return opt_; }
  uint64_t issued() const { return issued_; }
  // Releases owners of completed all-reduces (the caller's thread; bindings hold the GIL).
  void release_completed();

 private:
  struct Shared;  // state the progress thread uses (outlives the Reducer while tasks run)
  std::shared_ptr<Communicator> comm_;
  ReducerOptions opt_;
  std::shared_ptr<Shared> shared_;
  std::deque<std::pair<std::shared_ptr<Work>, Owner>> pending_;
  uint64_t issued_ = 0;
};

}  // namespace dpsgs

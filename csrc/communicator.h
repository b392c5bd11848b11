// Communicator: duplicates of the caller's MPI communicator plus one progress thread for collectives.
#pragma once

#include <mpi.h>

#include <atomic>
#include <chrono>
#include <condition_variable>
#include <deque>
#include <functional>
#include <memory>
#include <mutex>
#include <string>
#include <thread>
#include <utility>
#include <vector>

#include "common/buffer.h"
#include "common/backoff.h"
#include "common/mpi_wait.h"
#include "common/rank_labels.h"
#include "common/work.h"

namespace dpsgs {

// Owns two duplicates of the caller's communicator, both MPI_ERRORS_RETURN, one per thread:
//  - p2p_:  used by the caller's thread (channels, barrier, split, small all-reduces);
//  - coll_: used only by the progress thread (the reducer's queued all-reduces),
// so the two streams never match each other's messages, and the collectives on each are
// issued by one thread in program order (the same on every rank, as MPI requires).
// Construction, split() and barrier() are collective over the communicator. Never calls
// MPI_Init/MPI_Finalize. Requires MPI_THREAD_MULTIPLE (two threads call MPI).
class Communicator : public std::enable_shared_from_this<Communicator> {
 public:
  Communicator(MPI_Comm parent, double timeout_s, double warn_after_s);
  ~Communicator();  // never throws; reports queued tasks it drops
  Communicator(const Communicator&) = delete;
  Communicator& operator=(const Communicator&) = delete;

  int rank() const { return rank_; }
  int size() const { return size_; }
  double timeout() const { return timeout_s_; }
  double warn_after() const { return warn_after_s_; }
  void set_timeout(double t) { timeout_s_ = t; }
  MPI_Comm p2p() const { return p2p_; }
  MPI_Comm coll() const { return coll_; }
  // Rank of this process in MPI_COMM_WORLD (for messages: "world rank").
  int world_rank() const { return world_rank_; }
  // How messages name rank r of this communicator: "rank r" unless labels were set. The
  // trainer sets "rank W (replica q, stage k)" (W its rank in the job), so every message
  // names ranks alike, a stage group's included. set_labels: one per rank, before use.
  void set_labels(std::vector<std::string> labels);
  std::string label(int r) const;
  bool labelled() const;

  // Collective. color < 0: this rank joins no group and gets nullptr.
  std::shared_ptr<Communicator> split(int color, int key);
  void barrier();
  [[noreturn]] void abort(int code, const std::string& message);

  // Queues a task for the progress thread; tasks run one at a time in FIFO order. A task
  // reports its own errors (it owns a StateWork); it may poll cancelled() to give up early.
  // `key` identifies the task for run_now_if_next (e.g. the Work it completes).
  void enqueue(std::function<void()> task, const void* key = nullptr);
  // If the task queued with `key` is next and nothing is running, runs it on the calling
  // thread (FIFO order and one-task-at-a-time are kept) and returns true. A caller that waits
  // right after queuing thus skips the hand-off to the progress thread, which on a full
  // machine costs a wake-up and a time slice.
  bool run_now_if_next(const void* key);
  bool cancelled() const { return stop_; }
  // Stops the progress thread (pending tasks are reported on stderr and dropped). Idempotent.
  void shutdown() noexcept;
  size_t queued() const;

  // A deadline for a blocking MPI call on the caller's thread (MPI itself has none). While a
  // guard lives, the progress thread, which wakes every kWatchdogPeriod when idle, checks it;
  // once the call is overdue by the communicator's timeout it prints what() and aborts the
  // job. Registering costs an uncontended lock, no wake-up. One guard at a time per thread.
  class BlockingCallGuard {
   public:
    BlockingCallGuard(Communicator& c, std::function<std::string()> what);
    ~BlockingCallGuard();
    BlockingCallGuard(const BlockingCallGuard&) = delete;
    BlockingCallGuard& operator=(const BlockingCallGuard&) = delete;

   private:
    Communicator& c_;
  };

  // Keeps `owner` alive until `work` completes (for a Reducer destroyed with work in flight,
  // without blocking its destructor). Released by release_adopted() on a caller's thread.
  void adopt(std::shared_ptr<Work> work, Owner owner);
  void release_adopted() noexcept;

 private:
  void progress_loop();
  void check_blocking_call();  // the watchdog: aborts the job when the guarded call is overdue
  void free_comms() noexcept;

  MPI_Comm p2p_ = MPI_COMM_NULL;
  MPI_Comm coll_ = MPI_COMM_NULL;
  int rank_ = 0, size_ = 1, world_rank_ = 0;
  RankLabels labels_;
  double timeout_s_, warn_after_s_;

  mutable std::mutex mu_;
  std::condition_variable cv_;
  struct QueuedTask {
    std::function<void()> run;
    const void* key;
  };
  std::deque<QueuedTask> tasks_;
  std::atomic<bool> stop_{false};
  bool running_task_ = false;            // a task runs (on the progress thread or a caller)
  std::thread thread_;
  std::mutex watch_mu_;                  // the guarded blocking call, if any
  bool watching_ = false;
  std::chrono::steady_clock::time_point watch_deadline_;
  std::function<std::string()> watch_what_;
  std::mutex adopted_mu_;
  std::vector<std::pair<std::shared_ptr<Work>, Owner>> adopted_;
};

// wait_mpi_request (common/mpi_wait.h) with this communicator's rank, deadline and stall warning.
// `what` names the operation for timeout/stall messages. Cancels nothing on timeout.
void wait_request(MPI_Request* req, const Communicator& comm, const std::function<std::string()>& what,
                  int peer, double timeout_s = -1.0, double yield_s = Backoff::kDefaultYieldSeconds,
                  double spin_s = Backoff::kDefaultSpinSeconds);

// Live communicators are shut down by _C's atexit hook before mpi4py finalizes MPI.
void shutdown_all_communicators() noexcept;

}  // namespace dpsgs

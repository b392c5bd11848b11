// OpEngine: issues the torch backend's operations in order; the engine thread or a waiter completes them.
#pragma once

#include <mpi.h>

#include <atomic>
#include <condition_variable>
#include <cstdint>
#include <deque>
#include <exception>
#include <functional>
#include <memory>
#include <mutex>
#include <string>
#include <thread>
#include <vector>

#include "collectives.h"
#include "communicator.h"
#include "op_work.h"
#include "peer_probe.h"
#include "ring_allreduce.h"

namespace dpsgs {

struct EngineOptions {
  RingOptions ring;
  // All-reduces (sum) of at least this many bytes go through the core's ring; MPI's own below
  // (the Reducer's "auto" threshold: MPICH is as fast or faster below, 2 ranks on 2 cores).
  size_t ring_from_bytes = 4 * 1024 * 1024;
  // How long an operation about to time out spends asking its peers whether they are alive
  // and in the same operation, so that the error names the rank that is missing. The probe
  // runs in the last probe_s of the deadline (at most a quarter of it), so the error comes
  // at the deadline, not after it.
  double probe_s = 1.0;
};

// Contract. Collectives are issued in call order, one at a time (the next starts when the
// previous has completed), so every rank must call them in the same order, as MPI requires;
// the buffers of one collective may be those of the next. Sends and receives start at once
// (in call order per peer and tag) and run beside the collectives, so a receive posted before
// a collective never holds it up. Every operation has the communicator's deadline from the
// moment it starts; on expiry it fails with CommTimeout naming the operation and the rank(s)
// it waited for (a short probe of the peers tells which did not reach it). After a timed-out
// or failed collective the engine's collective stream is out of step with its peers: later
// collectives fail at once. The caller keeps each buffer alive through `owner`, which the
// engine holds until the operation ends and then drops on a caller's thread (in the next
// submit() or shutdown(): Python owners need the GIL). Progress is made by whoever holds
// drive_mu_: the engine thread, or a thread waiting on an operation (OpWork::wait drives the
// engine itself, so a blocking call pays no thread hand-off); either tests every pending
// request with polite backoff (common/backoff.h), runs ring all-reduces and answers probes.
// Neither ever takes the GIL.
class OpEngine : public std::enable_shared_from_this<OpEngine> {
 public:
  OpEngine(std::shared_ptr<Communicator> comm, EngineOptions opt);  // collective: dups the communicator
  ~OpEngine();  // never throws; fails operations still pending
  OpEngine(const OpEngine&) = delete;
  OpEngine& operator=(const OpEngine&) = delete;

  // wake: hand the operation to the engine thread now (an asynchronous call); false for a call
  // that waits at once, whose waiter drives it (the engine thread still finds it within 50 ms).
  std::shared_ptr<OpWork> submit(OpSpec spec, Owner owner, bool wake = true);
  // Progresses every pending operation on the calling thread (the GIL released) until `work`
  // ends; the engine thread stands aside meanwhile. CommTimeout after timeout_s (< 0: a little
  // after the operation's own deadline, which fails it first, naming the peer).
  void drive(OpWork& work, double timeout_s);
  const std::shared_ptr<Communicator>& comm() const { return comm_; }
  int rank() const { return comm_->rank(); }
  int size() const { return comm_->size(); }
  int tag_upper_bound() const { return tag_ub_; }
  uint64_t issued() const;
  // Fails every pending operation (cancelled) and stops both threads. Idempotent.
  void shutdown() noexcept;

 private:
  struct Pending {
    std::shared_ptr<OpWork> work;
    OpSpec spec;
    Owner owner;
    uint64_t seq = 0;                  // collectives: their number in the collective stream
    MPI_Request req = MPI_REQUEST_NULL;
    Clock::time_point deadline, probe_at;
    std::string probed;                // what the probe found ("" = not probed yet)
  };
  void loop();
  bool iterate();                       // one pass: start, test, complete; drive_mu_ held
  void start(Pending& p);               // issues p's MPI call (or runs its ring); mu_ held by the caller
  bool test(Pending& p);                // true when p has ended (completed or failed)
  void fail(Pending& p, std::exception_ptr e, bool collective_stream_broken);
  std::string describe(const OpSpec& s, uint64_t seq) const;
  std::string waited_for(const OpSpec& s) const;
  std::string probe_peers(const Pending& p);
  std::string timed_out(const std::string& what, const std::string& probed) const;
  void retire(Owner owner);             // the engine thread: dropped later by a caller (GIL)

  std::shared_ptr<Communicator> comm_;
  EngineOptions opt_;
  double timeout_s_ = 0, probe_window_s_ = 0;  // the group's deadline; the probe's share of it
  MPI_Comm coll_ = MPI_COMM_NULL, p2p_ = MPI_COMM_NULL;
  std::unique_ptr<PeerProbe> probe_;    // answered and asked by whoever holds drive_mu_
  int tag_ub_ = 32767;
  std::shared_ptr<CompletionThread> completions_;

  mutable std::mutex mu_;
  std::condition_variable cv_;
  std::deque<Pending> queued_;          // collectives waiting for the one in flight (or a ring)
  std::deque<Pending> incoming_;        // started by the caller; the next iteration takes them
  int drivers_ = 0;                     // waiters driving (the engine thread stands aside)
  std::mutex drive_mu_;                 // held by whoever iterates: guards active_ and the probe
  std::vector<Pending> active_;         // started operations
  std::atomic<size_t> active_count_{0};
  bool collective_active_ = false;      // a collective is started and not yet ended
  int64_t active_seq_ = -1;             // its number (for probes)
  std::string broken_;                  // why the collective stream is out of step ("" = fine)
  uint64_t next_seq_ = 0, p2p_count_ = 0, completed_seq_ = 0;  // completed: collectives ended
  bool stop_ = false;
  std::thread thread_;
  std::mutex retired_mu_;
  std::vector<Owner> retired_;          // owners of ended operations, released by submit()
};

// Shuts every live engine down (the bindings' atexit hook, before mpi4py finalizes MPI).
void shutdown_all_engines() noexcept;

}  // namespace dpsgs

// A simulated NCCL communicator: identity (ranks, MPI tags), the state that
// ncclCommGetAsyncError reports, its background jobs (bootstrap, split, finalize) and
// abort. Its operations run on streams (sim_ops.h); groups launch them (sim_group.h).
#pragma once

#include <mpi.h>
#include <nccl.h>

#include <atomic>
#include <cstdint>
#include <functional>
#include <memory>
#include <mutex>
#include <string>
#include <vector>

#include "sim/sim_settings.h"

namespace dpsgs::sim {

// A group launch waiting for its communicators' polls (non-blocking communicators put
// their operations on the streams only when they turn ncclSuccess).
struct Launch {
  std::mutex mu;
  bool launched = false;
  std::function<void()> go;  // puts the group's operations on their streams
};

// What a unique id carries: the root's world rank and a serial, from which every member
// derives the same MPI tags.
struct IdInfo {
  uint64_t magic;
  int32_t root_world;
  int32_t reserved;
  uint64_t serial;
};

class Comm : public std::enable_shared_from_this<Comm> {
 public:
  Comm(int rank, int nranks, const ncclConfig_t* config, int device);

  int rank() const { return rank_; }
  int nranks() const { return nranks_; }
  int device() const { return device_; }
  bool blocking() const { return blocking_; }
  const std::string& name() const { return name_; }
  int world_rank_of(int r) const { return world_[r]; }
  int data_tag() const { return tag_; }
  int control_tag() const { return tag_ + 1; }

  // ncclCommGetAsyncError: an error, ncclInProgress (consuming one poll of a call in
  // progress; the poll that ends a group launch's wait launches it) or ncclSuccess.
  ncclResult_t poll();
  // The same answer without consuming a poll: may the next NCCL call be made?
  ncclResult_t peek();
  // After a non-blocking call: in progress for a few (seeded) polls. With `launch`, the
  // call's operations wait for it (shared by every communicator of the group).
  void start_progress(std::shared_ptr<Launch> launch);
  // Runs `job` (bootstrap, split, finalize) on a thread of its own when non-blocking (the
  // communicator is in progress until it ends, then for a few polls), else here.
  ncclResult_t run_job(std::function<ncclResult_t(Comm&)> job);

  void set_error(ncclResult_t rc, const std::string& message);
  void note(const std::string& message);  // what ncclGetLastError says, without an error state
  std::string last_error();
  void abort();
  bool aborted() const { return aborted_.load(); }

  // Operations queued on streams and not yet finished (ncclCommFinalize waits for 0).
  void op_queued() { outstanding_.fetch_add(1); }
  void op_done() { outstanding_.fetch_sub(1); }
  int outstanding() const { return outstanding_.load(); }

  // Identity, set by the bootstrap or split before the communicator turns ncclSuccess.
  void set_identity(std::vector<int> world, int tag);
  void set_rank(int rank) { rank_ = rank; }

 private:
  int rank_, nranks_, device_;
  bool blocking_;
  std::string name_;
  std::vector<int> world_;
  int tag_ = 0;
  Rng rng_;
  std::mutex mu_;
  bool job_running_ = false;
  int polls_left_ = 0;
  std::shared_ptr<Launch> launch_;
  ncclResult_t error_ = ncclSuccess;
  std::string last_error_;
  std::atomic<bool> aborted_{false};
  std::atomic<int> outstanding_{0};
};

// A fresh id with this process as root (ncclGetUniqueId); false before MPI_Init.
bool make_unique_id(ncclUniqueId* id);
bool read_unique_id(const ncclUniqueId& id, IdInfo* info);
// MPI tag pair (data, data + 1) of the communicator whose root is `root_world` with
// `serial`: the same on every member, different for every communicator in practice.
int tag_for(int root_world, uint64_t serial);
// A serial of this process, for ids and split candidates.
uint64_t next_serial();

// Polls `reqs` (MPI_Testall with back-off: waits never burn a core) until all are done;
// false once stop() is true (the unfinished requests released: the caller abandon()s their
// buffers) or with `error` set when MPI fails.
bool wait_requests(std::vector<MPI_Request>& reqs, const std::function<bool()>& stop,
                   std::string* error = nullptr);

// Keeps `storage` (buffers of MPI requests released by wait_requests) alive forever.
void abandon(std::shared_ptr<void> storage);

// The bootstrap of ncclCommInitRankConfig (the members meet their root over MPI).
ncclResult_t bootstrap(Comm& comm, const IdInfo& id);

}  // namespace dpsgs::sim

// The handle NCCL users hold: never freed, so a stale handle is reported, not followed.
struct ncclComm {
  uint64_t magic;
  std::shared_ptr<dpsgs::sim::Comm> impl;
};

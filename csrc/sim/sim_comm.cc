// Simulated NCCL communicator: state, jobs, bootstrap over MPI (see sim_comm.h).
#include "sim/sim_comm.h"

#include <cstring>
#include <thread>

#include "common/backoff.h"
#include "sim/sim_faults.h"

namespace dpsgs::sim {

namespace {
constexpr uint64_t kIdMagic = 0x4d49535347535044ULL;  // "DPSGSSIM"
std::atomic<uint64_t> g_serial{1};
}  // namespace

Comm::Comm(int rank, int nranks, const ncclConfig_t* config, int device)
    : rank_(rank), nranks_(nranks), device_(device),
      blocking_(config == nullptr || config->blocking != 0),
      name_(config != nullptr && config->commName != nullptr ? config->commName : "sim-comm"),
      rng_(next_serial()) {}

void Comm::set_identity(std::vector<int> world, int tag) {
  std::lock_guard<std::mutex> lock(mu_);
  world_ = std::move(world);
  tag_ = tag;
}

ncclResult_t Comm::peek() {
  std::lock_guard<std::mutex> lock(mu_);
  if (error_ != ncclSuccess) return error_;
  if (job_running_ || polls_left_ > 0) return ncclInProgress;
  if (launch_) {
    std::lock_guard<std::mutex> l(launch_->mu);
    if (!launch_->launched) return ncclInProgress;
  }
  return ncclSuccess;
}

ncclResult_t Comm::poll() {
  std::shared_ptr<Launch> launch;
  {
    std::lock_guard<std::mutex> lock(mu_);
    if (error_ != ncclSuccess) return error_;
    if (job_running_) return ncclInProgress;
    if (polls_left_ > 0) {
      --polls_left_;
      return ncclInProgress;
    }
    launch = std::move(launch_);
  }
  if (launch) {
    // The first communicator of the group to finish its polls launches the whole group:
    // the operations reach their streams before anyone sees ncclSuccess.
    std::lock_guard<std::mutex> l(launch->mu);
    if (!launch->launched) {
      launch->launched = true;
      launch->go();
    }
  }
  std::lock_guard<std::mutex> lock(mu_);
  return error_;
}

void Comm::start_progress(std::shared_ptr<Launch> launch) {
  std::lock_guard<std::mutex> lock(mu_);
  polls_left_ = rng_.progress_polls();
  if (launch) launch_ = std::move(launch);
}

ncclResult_t Comm::run_job(std::function<ncclResult_t(Comm&)> job) {
  if (blocking_) {
    ncclResult_t rc = job(*this);
    if (rc != ncclSuccess) set_error(rc, last_error());
    return rc;
  }
  {
    std::lock_guard<std::mutex> lock(mu_);
    job_running_ = true;
  }
  std::thread([self = shared_from_this(), job = std::move(job)] {
    ncclResult_t rc = job(*self);
    if (rc != ncclSuccess && !self->aborted()) self->set_error(rc, self->last_error());
    std::lock_guard<std::mutex> lock(self->mu_);
    self->job_running_ = false;
    self->polls_left_ = self->rng_.progress_polls();
  }).detach();
  return ncclInProgress;
}

void Comm::set_error(ncclResult_t rc, const std::string& message) {
  std::lock_guard<std::mutex> lock(mu_);
  if (error_ == ncclSuccess) error_ = rc;
  if (!message.empty()) last_error_ = message;
}

void Comm::note(const std::string& message) {
  std::lock_guard<std::mutex> lock(mu_);
  last_error_ = message;
}

std::string Comm::last_error() {
  std::lock_guard<std::mutex> lock(mu_);
  return last_error_;
}

void Comm::abort() { aborted_.store(true); }

bool make_unique_id(ncclUniqueId* id) {
  int world = world_rank();
  if (world < 0) return false;
  IdInfo info{kIdMagic, world, 0, next_serial()};
  std::memset(id, 0, sizeof(*id));
  std::memcpy(id->internal, &info, sizeof(info));
  return true;
}

bool read_unique_id(const ncclUniqueId& id, IdInfo* info) {
  std::memcpy(info, id.internal, sizeof(*info));
  return info->magic == kIdMagic && info->root_world >= 0;
}

uint64_t next_serial() { return g_serial.fetch_add(1); }

int tag_for(int root_world, uint64_t serial) {
  static const int ub = [] {
    void* value = nullptr;
    int flag = 0;
    MPI_Comm_get_attr(MPI_COMM_WORLD, MPI_TAG_UB, &value, &flag);
    return flag ? *static_cast<int*>(value) : 32767;
  }();
  // The upper half of the tag space: dpsgs's own tags and the tests' are small.
  int64_t base = ub / 2 + 1;
  int64_t pairs = (int64_t(ub) - base) / 2;
  uint64_t key = uint64_t(root_world) * 1000003ULL + serial;
  return static_cast<int>(base + 2 * int64_t(key % uint64_t(pairs)));
}

bool wait_requests(std::vector<MPI_Request>& reqs, const std::function<bool()>& stop, std::string* error) {
  Backoff backoff;
  for (;;) {
    int done = 0;
    int rc = MPI_Testall(static_cast<int>(reqs.size()), reqs.data(), &done, MPI_STATUSES_IGNORE);
    if (rc != MPI_SUCCESS) {
      char text[MPI_MAX_ERROR_STRING + 1] = {0};
      int len = 0;
      MPI_Error_string(rc, text, &len);
      if (error) *error = std::string("MPI failed under the simulated NCCL: ") + text;
      return false;
    }
    if (done) return true;
    if (stop && stop()) {
      // Not cancelled (cancelling a rendezvous send crashes some transports, UCX's among
      // them): released, with their buffers kept alive forever by the caller (abandon()).
      for (auto& r : reqs)
        if (r != MPI_REQUEST_NULL) MPI_Request_free(&r);
      return false;
    }
    backoff.pause();
  }
}

void abandon(std::shared_ptr<void> storage) {
  static std::mutex mu;
  static auto* kept = new std::vector<std::shared_ptr<void>>();  // never freed: MPI may still write them
  std::lock_guard<std::mutex> lock(mu);
  kept->push_back(std::move(storage));
}

ncclResult_t bootstrap(Comm& comm, const IdInfo& id) {
  int me = world_rank();
  int n = comm.nranks();
  int tag = tag_for(id.root_world, id.serial);
  if (next_init_hangs()) {  // fault hook: never completes (until aborted)
    while (!comm.aborted()) sleep_for(1e-3);
    return ncclSuccess;
  }
  // The buffers MPI uses, abandoned (kept forever) if the bootstrap is aborted mid-way.
  struct Buffers {
    std::vector<int> world, hello;
    int mine[2];
  };
  auto bufs = std::make_shared<Buffers>();
  std::vector<int>& world = bufs->world;
  world.assign(n, -1);
  auto stop = [&comm] { return comm.aborted(); };
  std::string error;
  auto failed = [&] {
    abandon(bufs);
    if (error.empty()) return ncclSuccess;  // aborted: nothing to report
    comm.set_error(ncclSystemError, "bootstrap of '" + comm.name() + "': " + error);
    return ncclSystemError;
  };
  if (comm.rank() == 0) {
    // The root hears from every other member (rank, world rank), then tells all.
    world[0] = me;
    std::vector<int>& hello = bufs->hello;
    hello.resize(2 * (n - 1));
    std::vector<MPI_Request> reqs(n - 1, MPI_REQUEST_NULL);
    for (int i = 0; i < n - 1; ++i)
      MPI_Irecv(&hello[2 * i], 2, MPI_INT, MPI_ANY_SOURCE, tag + 1, MPI_COMM_WORLD, &reqs[i]);
    if (!wait_requests(reqs, stop, &error)) return failed();
    for (int i = 0; i < n - 1; ++i) {
      int r = hello[2 * i], w = hello[2 * i + 1];
      if (r <= 0 || r >= n || world[r] != -1) {
        comm.set_error(ncclInvalidUsage, "bootstrap of '" + comm.name() + "': rank " + std::to_string(r) +
                                             " joined twice or is outside the communicator of " +
                                             std::to_string(n) + " ranks");
        return ncclInvalidUsage;
      }
      world[r] = w;
    }
    std::vector<MPI_Request> sends(n - 1, MPI_REQUEST_NULL);
    for (int r = 1; r < n; ++r) MPI_Isend(world.data(), n, MPI_INT, world[r], tag + 1, MPI_COMM_WORLD, &sends[r - 1]);
    if (!wait_requests(sends, stop, &error)) return failed();
  } else {
    int* hello = bufs->mine;
    hello[0] = comm.rank();
    hello[1] = me;
    std::vector<MPI_Request> reqs(2, MPI_REQUEST_NULL);
    MPI_Isend(hello, 2, MPI_INT, id.root_world, tag + 1, MPI_COMM_WORLD, &reqs[0]);
    MPI_Irecv(world.data(), n, MPI_INT, id.root_world, tag + 1, MPI_COMM_WORLD, &reqs[1]);
    if (!wait_requests(reqs, stop, &error)) return failed();
  }
  comm.set_identity(world, tag);
  return ncclSuccess;
}

}  // namespace dpsgs::sim

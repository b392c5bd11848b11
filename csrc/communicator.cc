// Communicator: dup'd MPI communicators, split/barrier/abort, the FIFO progress thread.
#include "communicator.h"

#include <pthread.h>
#include <sched.h>

#include <algorithm>
#include <cstdio>
#include <set>

#include "common/backoff.h"
#include "common/error.h"
#include "common/mpi_lifecycle.h"

namespace dpsgs {

namespace {
constexpr auto kWatchdogPeriod = std::chrono::milliseconds(250);  // idle wake-up: blocking-call deadlines
std::mutex g_live_mu;
std::set<Communicator*> g_live;

const char* thread_level_name(int level) {
  switch (level) {
    case MPI_THREAD_SINGLE: return "MPI_THREAD_SINGLE";
    case MPI_THREAD_FUNNELED: return "MPI_THREAD_FUNNELED";
    case MPI_THREAD_SERIALIZED: return "MPI_THREAD_SERIALIZED";
    case MPI_THREAD_MULTIPLE: return "MPI_THREAD_MULTIPLE";
  }
  return "unknown";
}

}  // namespace

void Communicator::set_labels(std::vector<std::string> labels) {
  labels_.set(std::move(labels), size_, str_cat("Communicator.set_labels on rank ", rank_));
}

std::string Communicator::label(int r) const { return labels_(r); }

bool Communicator::labelled() const { return !labels_.empty(); }

void wait_request(MPI_Request* req, const Communicator& comm, const std::function<std::string()>& what,
                  int peer, double timeout_s, double yield_s, double spin_s) {
  wait_mpi_request(req, comm.rank(), peer, timeout_s < 0 ? comm.timeout() : timeout_s, comm.warn_after(), what,
                   yield_s, spin_s);
}

Communicator::Communicator(MPI_Comm parent, double timeout_s, double warn_after_s)
    : timeout_s_(timeout_s), warn_after_s_(warn_after_s) {
  DPSGS_CHECK_ARG(parent != MPI_COMM_NULL, "Communicator: got MPI_COMM_NULL");
  int wr = 0;
  MPI_Comm_rank(MPI_COMM_WORLD, &wr);
  world_rank_ = wr;
  int level = MPI_THREAD_SINGLE;
  DPSGS_CHECK_MPI(MPI_Query_thread(&level), world_rank_, kNoPeer);
  DPSGS_CHECK_ARG(level == MPI_THREAD_MULTIPLE, "dpsgs needs MPI initialised with MPI_THREAD_MULTIPLE "
                  "(mpi4py's default) but MPI provides ", thread_level_name(level),
                  "; do not lower mpi4py.rc.thread_level (world rank ", world_rank_, ")");
  int prank = 0;
  DPSGS_CHECK_MPI(MPI_Comm_rank(parent, &prank), world_rank_, kNoPeer);
  // An Ibarrier with a deadline first: MPI_Comm_dup itself would block forever if a rank never comes.
  MPI_Request req;
  DPSGS_CHECK_MPI(MPI_Ibarrier(parent, &req), prank, kNoPeer);
  rank_ = prank;
  wait_request(&req, *this, [&] {
    return str_cat("rank ", prank, ": Communicator construction (barrier over the parent communicator; "
                   "some rank did not create its Communicator)");
  }, kNoPeer);
  DPSGS_CHECK_MPI(MPI_Comm_dup(parent, &p2p_), prank, kNoPeer);
  DPSGS_CHECK_MPI(MPI_Comm_dup(parent, &coll_), prank, kNoPeer);
  DPSGS_CHECK_MPI(MPI_Comm_set_errhandler(p2p_, MPI_ERRORS_RETURN), prank, kNoPeer);
  DPSGS_CHECK_MPI(MPI_Comm_set_errhandler(coll_, MPI_ERRORS_RETURN), prank, kNoPeer);
  DPSGS_CHECK_MPI(MPI_Comm_rank(p2p_, &rank_), prank, kNoPeer);
  DPSGS_CHECK_MPI(MPI_Comm_size(p2p_, &size_), prank, kNoPeer);
  thread_ = std::thread([this] { progress_loop(); });
  std::lock_guard<std::mutex> lock(g_live_mu);
  g_live.insert(this);
}

Communicator::~Communicator() {
  {
    std::lock_guard<std::mutex> lock(g_live_mu);
    g_live.erase(this);
  }
  shutdown();
  free_comms();
}

void Communicator::free_comms() noexcept {
  if (!mpi_alive()) return;  // MPI already finalized: the handles are gone with it
  if (p2p_ != MPI_COMM_NULL) MPI_Comm_free(&p2p_);
  if (coll_ != MPI_COMM_NULL) MPI_Comm_free(&coll_);
}

void Communicator::shutdown() noexcept {
  std::deque<QueuedTask> dropped;
  {
    std::lock_guard<std::mutex> lock(mu_);
    if (!thread_.joinable()) return;
    stop_ = true;
    dropped.swap(tasks_);
  }
  cv_.notify_all();
  if (!dropped.empty()) {
    std::fprintf(stderr, "[dpsgs] rank %d: ERROR: communicator shut down with %zu queued all-reduce(s) "
                 "never issued; their Work handles report failure\n", rank_, dropped.size());
    std::fflush(stderr);
  }
  // Run the dropped tasks in cancelled mode: each sees cancelled() and fails its Work.
  for (auto& t : dropped) {
    try { t.run(); } catch (...) {}
  }
  if (thread_.get_id() != std::this_thread::get_id()) thread_.join();
  else thread_.detach();
  release_adopted();
}

void Communicator::adopt(std::shared_ptr<Work> work, Owner owner) {
  std::lock_guard<std::mutex> lock(adopted_mu_);
  adopted_.emplace_back(std::move(work), std::move(owner));
}

void Communicator::release_adopted() noexcept {
  std::vector<Owner> release;  // dropped outside the lock (deleters may take the GIL)
  {
    std::lock_guard<std::mutex> lock(adopted_mu_);
    bool stopped = stop_;
    for (size_t i = 0; i < adopted_.size();) {
      bool done = stopped;
      try {
        done = done || adopted_[i].first->is_completed();
      } catch (...) {
        done = true;  // failed: its requests were cancelled/freed
      }
      if (done) {
        release.push_back(std::move(adopted_[i].second));
        adopted_[i] = std::move(adopted_.back());
        adopted_.pop_back();
      } else {
        ++i;
      }
    }
  }
}

size_t Communicator::queued() const {
  std::lock_guard<std::mutex> lock(mu_);
  return tasks_.size() + (running_task_ ? 1 : 0);
}

void Communicator::enqueue(std::function<void()> task, const void* key) {
  {
    std::lock_guard<std::mutex> lock(mu_);
    if (!stop_) {
      tasks_.push_back({std::move(task), key});
      cv_.notify_one();
      return;
    }
  }
  task();  // cancelled: the task fails its own Work
}

namespace {
void run_task(const std::function<void()>& task, int rank) {
  try {
    task();
  } catch (const std::exception& e) {  // tasks catch their own errors; this is a last resort
    std::fprintf(stderr, "[dpsgs] rank %d: queued task failed: %s\n", rank, e.what());
  } catch (...) {
    std::fprintf(stderr, "[dpsgs] rank %d: queued task failed (unknown)\n", rank);
  }
}
}  // namespace

bool Communicator::run_now_if_next(const void* key) {
  std::function<void()> task;
  {
    std::lock_guard<std::mutex> lock(mu_);
    if (stop_ || running_task_ || tasks_.empty() || tasks_.front().key != key) return false;
    task = std::move(tasks_.front().run);
    tasks_.pop_front();
    running_task_ = true;
  }
  run_task(task, rank_);
  {
    std::lock_guard<std::mutex> lock(mu_);
    running_task_ = false;
  }
  cv_.notify_one();  // the progress thread may take the next task
  return true;
}

void Communicator::progress_loop() {
  // SCHED_BATCH: a woken progress thread must not preempt the Python thread that just queued
  // work for it (wakeup preemption cost that thread a whole time slice on a full machine, so
  // it could not even start its compute: no overlap). It still runs on any free core.
  sched_param batch{};
  pthread_setschedparam(pthread_self(), SCHED_BATCH, &batch);
  for (;;) {
    std::function<void()> task;
    {
      std::unique_lock<std::mutex> lock(mu_);
      auto ready = [this] { return stop_ || (!tasks_.empty() && !running_task_); };
      while (!cv_.wait_for(lock, kWatchdogPeriod, ready)) {
        lock.unlock();
        check_blocking_call();
        lock.lock();
      }
      if (stop_) return;
      task = std::move(tasks_.front().run);
      tasks_.pop_front();
      running_task_ = true;
    }
    run_task(task, rank_);
    std::lock_guard<std::mutex> lock(mu_);
    running_task_ = false;  // a waiting caller may now run the next task itself
  }
}

Communicator::BlockingCallGuard::BlockingCallGuard(Communicator& c, std::function<std::string()> what) : c_(c) {
  std::lock_guard<std::mutex> lock(c_.watch_mu_);
  c_.watching_ = c_.timeout_s_ > 0;
  c_.watch_deadline_ = Clock::now() + std::chrono::duration_cast<Clock::duration>(
                                          std::chrono::duration<double>(c_.timeout_s_));
  c_.watch_what_ = std::move(what);
}

Communicator::BlockingCallGuard::~BlockingCallGuard() {
  std::lock_guard<std::mutex> lock(c_.watch_mu_);
  c_.watching_ = false;
  c_.watch_what_ = nullptr;
}

void Communicator::check_blocking_call() {
  std::string what;
  {
    std::lock_guard<std::mutex> lock(watch_mu_);
    if (!watching_ || Clock::now() < watch_deadline_) return;
    what = watch_what_();
  }
  // The caller's thread is inside MPI and cannot raise: end the job, naming the call.
  abort(1, timeout_message(what, timeout_s_));
}

std::shared_ptr<Communicator> Communicator::split(int color, int key) {
  barrier();  // bounded arrival check: MPI_Comm_split itself has no deadline
  MPI_Comm out = MPI_COMM_NULL;
  DPSGS_CHECK_MPI(MPI_Comm_split(p2p_, color < 0 ? MPI_UNDEFINED : color, key, &out), rank_, kNoPeer);
  if (out == MPI_COMM_NULL) return nullptr;
  std::shared_ptr<Communicator> sub;
  try {
    sub = std::make_shared<Communicator>(out, timeout_s_, warn_after_s_);
  } catch (...) {
    MPI_Comm_free(&out);
    throw;
  }
  MPI_Comm_free(&out);
  return sub;
}

void Communicator::barrier() {
  MPI_Request req;
  DPSGS_CHECK_MPI(MPI_Ibarrier(p2p_, &req), rank_, kNoPeer);
  wait_request(&req, *this, [this] {
    return str_cat(label(rank_), ": barrier over ", size_, " ranks (some rank has not reached it)");
  }, kNoPeer);
}

void Communicator::abort(int code, const std::string& message) {
  std::fprintf(stderr, "[dpsgs] rank %d (world rank %d): aborting the job (code %d): %s\n", rank_,
               world_rank_, code, message.c_str());
  wait_for_output_drain();
  // The whole job, not just this communicator's group: under `mpirun -disable-auto-cleanup`
  // MPICH aborting a dup'd or split communicator ends only its members, and a peer outside
  // it (blocked on another communicator) would wait forever.
  MPI_Abort(MPI_COMM_WORLD, code);
  std::_Exit(code);  // MPI_Abort should not return
}

void shutdown_all_communicators() noexcept {
  std::set<Communicator*> live;
  {
    std::lock_guard<std::mutex> lock(g_live_mu);
    live = g_live;
  }
  for (auto* c : live) c->shutdown();
}

}  // namespace dpsgs

// Reducer: validates, queues each all-reduce to the communicator's progress thread, keeps owners alive.
#include "reducer.h"

#include <cstdio>
#include <mutex>

#include "common/backoff.h"
#include "common/error.h"
#include "mpi_backend.h"
#include "reduce_kernels.h"

namespace dpsgs {

namespace {
// A queued all-reduce's handle: waiting on it first offers to run it on the waiting thread if
// the progress thread has not started it yet (Communicator::run_now_if_next), so an
// all-reduce waited on at once pays no thread hand-off; one queued earlier has progressed
// in the background meanwhile.
class QueuedWork : public StateWork {
 public:
  QueuedWork(std::weak_ptr<Communicator> comm, std::string what, double timeout_s, double warn_after_s)
      : StateWork(std::move(what), timeout_s, warn_after_s), comm_(std::move(comm)) {}
  void wait(double timeout_s = -1.0) override {
    if (auto c = comm_.lock()) c->run_now_if_next(this);
    StateWork::wait(timeout_s);
  }

 private:
  std::weak_ptr<Communicator> comm_;
};
}  // namespace

Algorithm parse_algorithm(const std::string& name) {
  if (name == "auto") return Algorithm::Auto;
  if (name == "ring") return Algorithm::Ring;
  if (name == "mpi") return Algorithm::Mpi;
  throw ValueError("Reducer: unknown algorithm '" + name + "' (choose auto, ring or mpi)");
}

const char* algorithm_name(Algorithm a) {
  switch (a) {
    case Algorithm::Auto: return "auto";
    case Algorithm::Ring: return "ring";
    case Algorithm::Mpi: return "mpi";
  }
  return "?";
}

// Touched only by the progress thread once tasks run.
struct Reducer::Shared {
  std::mutex mu;
  std::string failed;  // first failure; later all-reduces fail at once
  std::string get() {
    std::lock_guard<std::mutex> l(mu);
    return failed;
  }
  void set(const std::string& e) {
    std::lock_guard<std::mutex> l(mu);
    if (failed.empty()) failed = e;
  }
};

Reducer::Reducer(std::shared_ptr<Communicator> comm, ReducerOptions opt)
    : comm_(std::move(comm)), opt_(opt), shared_(std::make_shared<Shared>()) {
  DPSGS_CHECK_ARG(comm_ != nullptr, "Reducer: communicator is None");
  DPSGS_CHECK_ARG(opt_.ring.chunk_bytes >= 64, "Reducer: chunk_bytes ", opt_.ring.chunk_bytes, " < 64");
}

Reducer::~Reducer() {
  // Never blocks: work still in flight is handed to the communicator, which keeps the buffers
  // alive until it completes (the progress thread does not need this object).
  for (auto& [work, owner] : pending_) {
    bool done;
    try {
      done = work->is_completed();
    } catch (...) {
      done = true;
    }
    if (!done) comm_->adopt(work, std::move(owner));
  }
}

Algorithm Reducer::choose(const Buffer& buf) const {
  if (opt_.algorithm != Algorithm::Auto) return opt_.algorithm;
  return buf.bytes < opt_.mpi_below_bytes ? Algorithm::Mpi : Algorithm::Ring;
}

bool Reducer::blocks(const Buffer& buf) const {
  return buf.bytes > 0 && buf.bytes < opt_.blocking_below_bytes && comm_->size() > 1 &&
         buf.device == Device::CPU && choose(buf) == Algorithm::Mpi;
}

void Reducer::release_completed() {
  while (!pending_.empty()) {
    bool done;
    try {
      done = pending_.front().first->is_completed();
    } catch (...) {
      done = true;  // failed: MPI no longer reads the buffer (requests were cancelled/freed)
    }
    if (!done) break;
    pending_.pop_front();
  }
}

std::shared_ptr<Work> Reducer::allreduce(const Buffer& buf, Owner owner, bool average) {
  const int rank = comm_->rank(), n = comm_->size();
  uint64_t id = issued_;
  // Names this all-reduce in messages; formatted only when one is needed (errors, stall
  // reports, repr), so issuing a small all-reduce stays cheap.
  auto name_for = [comm = comm_, rank, id, n, b = buf](const std::string& how) {
    std::string members;  // a labelled group names everyone it waits for
    for (int r = 0; comm->labelled() && r < n; ++r)
      if (r != rank) members += (members.empty() ? " with " : ", ") + comm->label(r);
    return str_cat(comm->label(rank), ": all-reduce #", id, " (", b.bytes, " bytes ", dtype_name(b.dtype), " ",
                   b.shape_string(), ") over ", n, " ranks", how, members);
  };
  DPSGS_CHECK_ARG(buf.device == Device::CPU, name_for(""), ": CUDA buffer given to the MPI reducer; use the NCCL backend");
  DPSGS_CHECK_ARG(reducible(buf.dtype), name_for(""), ": dtype ", dtype_name(buf.dtype), " cannot be summed");
  release_completed();
  comm_->release_adopted();
  ++issued_;
  if (buf.bytes == 0 || n == 1) {  // averaging over one rank is the identity
    return std::make_shared<CompletedWork>(std::function<std::string()>([name_for] { return name_for(""); }));
  }
  Algorithm algo = choose(buf);
  int divisor = average ? n : 1;
  if (blocks(buf)) {
    std::function<std::string()> what = [name_for] { return name_for(" [mpi, blocking]"); };
    mpi_allreduce_blocking(*comm_, comm_->p2p(), buf, divisor, what);
    return std::make_shared<CompletedWork>(what);
  }
  const bool on_progress_thread = algo == Algorithm::Ring || buf.bytes >= opt_.caller_thread_below_bytes;
  if (!on_progress_thread) {
    // Issued now from this thread, on the caller's communicator (its collectives keep this
    // thread's program order; the progress thread's all-reduces use coll()).
    auto work = std::make_shared<MpiAllreduceWork>(*comm_, comm_->p2p(), buf, divisor,
                                                   [name_for] { return name_for(" [mpi]"); });
    pending_.emplace_back(work, std::move(owner));
    return work;
  }
  std::string what = algo == Algorithm::Mpi
                         ? name_for(" [mpi]")
                         : name_for(str_cat(" [ring: from ", comm_->label((rank + n - 1) % n), ", to ",
                                            comm_->label((rank + 1) % n), "]"));
  auto work = std::make_shared<QueuedWork>(comm_, what, comm_->timeout(), comm_->warn_after());
  pending_.emplace_back(work, std::move(owner));
  auto comm = comm_;
  auto shared = shared_;
  RingOptions ring = opt_.ring;
  Buffer b = buf;
  const void* key = work.get();
  comm_->enqueue([comm, shared, work, b, divisor, ring, algo] {
    try {
      if (comm->cancelled()) throw CommError(work->describe() + ": cancelled (communicator shut down)");
      std::string earlier = shared->get();
      if (!earlier.empty())
        throw CommError(work->describe() + ": not run because an earlier all-reduce failed: " + earlier);
      auto what = [&] { return work->describe(); };
      if (algo == Algorithm::Ring)
        ring_allreduce(*comm, comm->coll(), b, divisor, ring, what);
      else
        mpi_allreduce(*comm, comm->coll(), b, divisor, what);
      work->set_done();
    } catch (const std::exception& e) {
      shared->set(e.what());
      work->set_error(std::current_exception());
    }
  }, key);
  return work;
}

}  // namespace dpsgs

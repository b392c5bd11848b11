// NcclWork: polling completion of one NCCL operation with async-error checks (see nccl_work.h).
#include "cuda/nccl_work.h"

#include <algorithm>
#include <iterator>
#include <vector>

#include "common/backoff.h"
#include "cuda/cuda_check.h"

namespace dpsgs {

namespace {

struct Unfinished {
  std::unique_ptr<CudaEvent> done;
  Owner owner;
  int rank = 0;
};

bool finished(const Unfinished& u) noexcept {
  try {
    return u.done->query(u.rank, -1);
  } catch (const std::exception&) {
    return false;  // a broken context or CUDA unloading: it cannot say, so the memory stays
  }
}

// Keeps `u` (the owner of a destroyed Work whose operation may still run on the GPU, with its
// event; none: nothing to keep) and releases those kept before whose operation has finished
// since: every Work's destruction sweeps.
void keep_until_done(Unfinished u) {
  static std::mutex mu;
  static auto* kept = new std::vector<Unfinished>();  // never destroyed: used at exit
  std::vector<Unfinished> released;  // let go outside the lock (an owner may be a Python buffer)
  std::lock_guard<std::mutex> lock(mu);
  if (u.owner) kept->push_back(std::move(u));
  if (kept->empty()) return;
  auto still = std::stable_partition(kept->begin(), kept->end(), [](const Unfinished& k) { return !finished(k); });
  std::move(still, kept->end(), std::back_inserter(released));
  kept->erase(still, kept->end());
}

}  // namespace

NcclWork::NcclWork(std::string what, std::shared_ptr<NcclHandle> handle, int device, int peer, Owner owner)
    : Work(handle->timeout(), handle->warn_after()),
      what_(std::move(what)),
      handle_(std::move(handle)),
      device_(device),
      peer_(peer),
      owner_(std::move(owner)),
      done_(std::make_unique<CudaEvent>(device, handle_->rank())) {}

NcclWork::~NcclWork() {
  Unfinished u;  // completed and checked, or nothing issued: the memory is free to go now
  if (!trivial_ && owner_ && !verified_.load(std::memory_order_acquire)) {
    u = {std::move(done_), std::move(owner_), handle_->rank()};
  }
  keep_until_done(std::move(u));
}

void NcclWork::set_error(std::exception_ptr e) {
  {
    std::lock_guard<std::mutex> lock(mu_);
    error_ = std::move(e);
  }
  failed_.store(true, std::memory_order_release);
}

bool NcclWork::issued() {
  if (failed_.load(std::memory_order_acquire)) {
    std::lock_guard<std::mutex> lock(mu_);
    std::rethrow_exception(error_);
  }
  return issued_.load(std::memory_order_acquire);
}

bool NcclWork::is_completed() {
  if (!issued()) return false;
  if (trivial_) return true;
  if (done_->query(handle_->rank(), peer_)) {
    // A completed event proves nothing after an asynchronous error ("nothing can be assumed
    // about the completion or correctness of enqueued operations"): check NCCL once. A
    // communicator closed since (finalize flushed it without error) has nothing to say.
    if (!verified_.load(std::memory_order_acquire)) {
      if (!handle_->closed()) handle_->check_async(what_.c_str(), peer_);  // throws on an error
      verified_.store(true, std::memory_order_release);
    }
    return true;
  }
  // Still running: a network failure shows up only here, never as a completed event.
  handle_->check_async(what_.c_str(), peer_);
  return false;
}

void NcclWork::wait(double timeout_s) {
  try {
    Work::wait(timeout_s);
  } catch (const CommTimeout&) {
    handle_->abort(what_ + " timed out");
    throw;
  }
}

void NcclWork::wait_stream(uintptr_t stream, double timeout_s) {
  double t = timeout_s < 0 ? timeout_s_ : timeout_s;
  try {
    poll_until([this] { return issued(); }, t, warn_after_s_,
               [this] { return what_ + " (waiting for the issuing thread to issue it)"; });
  } catch (const CommTimeout&) {
    handle_->abort(what_ + " was not issued in time");
    throw;
  }
  if (trivial_) return;
  DeviceGuard guard(device_);
  DPSGS_CHECK_CUDA(cudaStreamWaitEvent(reinterpret_cast<cudaStream_t>(stream), done_->get(), 0),
                   handle_->rank(), peer_);
}

}  // namespace dpsgs

// NcclCommunicator: NCCL bootstrap over MPI, split, one-group connect; version info (see nccl_backend.h).
#include "cuda/nccl_backend.h"

#include <cuda_runtime.h>

#include <algorithm>
#include <cstdio>
#include <cstdlib>
#include <mutex>
#include <vector>

#include "common/backoff.h"
#include "common/error.h"
#include "common/mpi_lifecycle.h"
#include "cuda/cuda_check.h"

namespace dpsgs {

namespace {
constexpr size_t kScratchBytes = 4096;  // warm-up bytes: 8 per channel
// The all-reduce warm-up: one all-reduce (float32, ncclAvg) of each size, 4 B .. 4 MiB by 16x,
// so each protocol/algorithm NCCL picks by size is connected at connect(), not on first use.
constexpr size_t kWarmCounts[] = {1, 16, 256, 4096, 65536, 1048576};
constexpr size_t kWarmBytes = 4 * (1 + 16 + 256 + 4096 + 65536 + 1048576);

// Polls a CUDA stream until it is idle, checking NCCL's asynchronous error on every poll.
void poll_stream(cudaStream_t stream, NcclHandle& handle, const char* what, int peer) {
  try {
    poll_until(
        [&] {
          cudaError_t rc = cudaStreamQuery(stream);
          if (rc == cudaSuccess) return true;
          if (rc != cudaErrorNotReady)
            DPSGS_THROW_CALL("CUDA", "cudaStreamQuery", handle.rank(), peer, cuda_error_text(rc));
          handle.check_async(what, peer);
          return false;
        },
        handle.timeout(), handle.warn_after(),
        [&] { return str_cat("rank ", handle.rank(), ": ", what, " on NCCL communicator ", handle.name(),
                             peer == kNoPeer ? std::string() : str_cat(" with peer ", peer)); });
  } catch (const CommTimeout&) {
    handle.abort(str_cat(what, " timed out"));
    throw;
  }
}
// Every NcclCommunicator of the process, for close_all_nccl().
std::mutex registry_mu;
std::vector<std::weak_ptr<NcclCommunicator>>& registry() {
  static auto* all = new std::vector<std::weak_ptr<NcclCommunicator>>();  // never destroyed: used at exit
  return *all;
}

void register_communicator(const std::shared_ptr<NcclCommunicator>& c) {
  std::lock_guard<std::mutex> lock(registry_mu);
  auto& all = registry();
  all.erase(std::remove_if(all.begin(), all.end(), [](const auto& w) { return w.expired(); }), all.end());
  all.push_back(c);
}

// A split that failed may still complete later on NCCL's own thread and write the new
// communicator into its handle's slot: keep such handles forever rather than free memory
// that NCCL may still write.
void abandon(std::shared_ptr<NcclHandle> handle) {
  static auto* kept = new std::vector<std::shared_ptr<NcclHandle>>();
  static std::mutex mu;
  std::lock_guard<std::mutex> lock(mu);
  kept->push_back(std::move(handle));
}
}  // namespace

std::string nccl_version_string() {
  int v = 0;
  if (ncclGetVersion(&v) != ncclSuccess) return "unknown";
  // Codes >= 2.9 are MAJOR*10000 + MINOR*100 + PATCH; older ones MAJOR*1000 + MINOR*100 + PATCH.
  int major = v >= 10000 ? v / 10000 : v / 1000;
  int minor = v >= 10000 ? (v % 10000) / 100 : (v % 1000) / 100;
  return str_cat(major, ".", minor, ".", v % 100);
}

std::string nccl_header_version_string() { return str_cat(NCCL_MAJOR, ".", NCCL_MINOR, ".", NCCL_PATCH); }

std::string cuda_runtime_version_string() {
  int v = 0;
  if (cudaRuntimeGetVersion(&v) != cudaSuccess) return "";
  return str_cat(v / 1000, ".", (v % 1000) / 10);
}

int cuda_device_count() {
  int n = 0;
  if (cudaGetDeviceCount(&n) != cudaSuccess) {
    cudaGetLastError();  // "no device"/"no driver" is an answer here, not a sticky error
    return 0;
  }
  return n;
}

void NcclCommunicator::init_mpi(MPI_Comm mpi) {
  mpi_ = mpi;
  DPSGS_CHECK_MPI(MPI_Comm_set_errhandler(mpi_, MPI_ERRORS_RETURN), rank_, kNoPeer);
  DPSGS_CHECK_MPI(MPI_Comm_rank(mpi_, &rank_), rank_, kNoPeer);
  DPSGS_CHECK_MPI(MPI_Comm_size(mpi_, &size_), rank_, kNoPeer);
}

NcclCommunicator::NcclCommunicator(MPI_Comm parent, int device, double timeout_s, double warn_after_s)
    : device_(device), timeout_s_(timeout_s), warn_after_s_(warn_after_s) {
  DPSGS_CHECK_ARG(parent != MPI_COMM_NULL, "NcclCommunicator: got MPI_COMM_NULL");
  int prank = 0;
  DPSGS_CHECK_MPI(MPI_Comm_rank(parent, &prank), prank, kNoPeer);
  rank_ = prank;
  int visible = cuda_device_count();
  DPSGS_CHECK_ARG(device >= 0 && device < visible, "NcclCommunicator on rank ", prank, ": device ", device,
                  " requested but ", visible, " CUDA device(s) are visible",
                  visible == 0 ? " (no GPU or no driver on this host)" : "");
  // An Ibarrier with a deadline first: MPI_Comm_dup would block forever if a rank never comes.
  MPI_Request req;
  DPSGS_CHECK_MPI(MPI_Ibarrier(parent, &req), prank, kNoPeer);
  wait_mpi_request(&req, prank, kNoPeer, timeout_s_, warn_after_s_, [&] {
    return str_cat("rank ", prank, ": NcclCommunicator construction (some rank did not create its NcclCommunicator)");
  });
  MPI_Comm dup = MPI_COMM_NULL;
  DPSGS_CHECK_MPI(MPI_Comm_dup(parent, &dup), prank, kNoPeer);
  init_mpi(dup);
  name_ = str_cat("dpsgs-", size_, "ranks");
  issuer_ = DeviceIssuer::for_device(device_);
  stream_ = std::make_unique<CudaStream>(device_, rank_);

  ncclUniqueId id{};
  if (rank_ == 0) DPSGS_CHECK_NCCL(ncclGetUniqueId(&id), nullptr, rank_, kNoPeer);
  DPSGS_CHECK_MPI(MPI_Ibcast(&id, sizeof(id), MPI_BYTE, 0, mpi_, &req), rank_, 0);
  wait_mpi_request(&req, rank_, 0, timeout_s_, warn_after_s_,
                   [&] { return str_cat("rank ", rank_, ": MPI_Ibcast of the NCCL unique id from rank 0"); });

  handle_ = std::make_shared<NcclHandle>(rank_, name_, timeout_s_, warn_after_s_);
  issuer_->run([&] {
    DPSGS_CHECK_NCCL(ncclCommInitRankConfig(handle_->slot(), size_, id, rank_, handle_->config()), nullptr, rank_,
                     kNoPeer);
  });
  handle_->settle("ncclCommInitRankConfig", kNoPeer);

  alloc_scratch();
}

std::shared_ptr<NcclCommunicator> NcclCommunicator::create(MPI_Comm parent, int device, double timeout_s,
                                                           double warn_after_s) {
  auto comm = std::make_shared<NcclCommunicator>(parent, device, timeout_s, warn_after_s);
  register_communicator(comm);
  return comm;
}

NcclCommunicator::NcclCommunicator(SplitTag, MPI_Comm mpi, int device, double timeout_s, double warn_after_s,
                                   std::shared_ptr<DeviceIssuer> issuer, std::shared_ptr<NcclHandle> handle)
    : device_(device), timeout_s_(timeout_s), warn_after_s_(warn_after_s), name_(handle->name()),
      issuer_(std::move(issuer)), handle_(std::move(handle)) {
  init_mpi(mpi);
  stream_ = std::make_unique<CudaStream>(device_, rank_);
  alloc_scratch();
}

NcclCommunicator::~NcclCommunicator() {
  // Release our NCCL handle on the issuer so its finalize is ordered after every queued call
  // (works still holding the handle keep it alive; the last one finalizes it). Queued, not
  // awaited: this may run with the GIL held, which a queued task may need.
  if (issuer_ && handle_) {
    try {
      issuer_->submit([h = std::move(handle_)]() mutable { h.reset(); });
    } catch (const std::exception& e) {
      std::fprintf(stderr, "[dpsgs] rank %d: closing NcclCommunicator %s: %s\n", rank_, name_.c_str(), e.what());
    }
  }
  if (scratch_ != nullptr) {
    cudaError_t rc = free_scratch();
    if (rc != cudaSuccess && rc != cudaErrorCudartUnloading)
      std::fprintf(stderr, "[dpsgs] rank %d: freeing the warm-up scratch failed: %s\n", rank_,
                   cudaGetErrorString(rc));
  }
  if (mpi_ != MPI_COMM_NULL && mpi_alive()) MPI_Comm_free(&mpi_);
}

std::shared_ptr<NcclCommunicator> NcclCommunicator::split(int color, int key) {
  check_open("split");
  MPI_Request req;
  DPSGS_CHECK_MPI(MPI_Ibarrier(mpi_, &req), rank_, kNoPeer);
  wait_mpi_request(&req, rank_, kNoPeer, timeout_s_, warn_after_s_,
                   [&] { return str_cat("rank ", rank_, ": NcclCommunicator.split (some rank did not call it)"); });
  MPI_Comm child_mpi = MPI_COMM_NULL;
  DPSGS_CHECK_MPI(MPI_Comm_split(mpi_, color < 0 ? MPI_UNDEFINED : color, key, &child_mpi), rank_, kNoPeer);
  // The parent must be idle: finish what its stream still runs before the collective split.
  synchronize();
  // The child's handle exists before the call: NCCL writes the new communicator into its
  // slot from the split's own thread, and keeps the name pointer of its config.
  int child_rank = -1;
  if (child_mpi != MPI_COMM_NULL) DPSGS_CHECK_MPI(MPI_Comm_rank(child_mpi, &child_rank), rank_, kNoPeer);
  std::string child_name = str_cat(name_, "/", color < 0 ? std::string("none") : std::to_string(color));
  auto child = std::make_shared<NcclHandle>(child_rank, child_name, timeout_s_, warn_after_s_);
  try {
    issuer_->run([&] {
      auto guard = handle_->lock("ncclCommSplit", kNoPeer);
      DPSGS_CHECK_NCCL(ncclCommSplit(handle_->get(), color < 0 ? NCCL_SPLIT_NOCOLOR : color, key, child->slot(),
                                     child->config()),
                       handle_->get(), rank_, kNoPeer);
    });
    // Settling the parent joins the split: the child's slot is written by then.
    handle_->settle("ncclCommSplit", kNoPeer);
  } catch (...) {
    abandon(child);
    if (child_mpi != MPI_COMM_NULL) MPI_Comm_free(&child_mpi);
    throw;
  }
  if (color < 0 || child->get() == nullptr) {
    if (child_mpi != MPI_COMM_NULL) MPI_Comm_free(&child_mpi);
    return nullptr;
  }
  child->settle("ncclCommSplit (new communicator)", kNoPeer);
  auto sub = std::make_shared<NcclCommunicator>(SplitTag{}, child_mpi, device_, timeout_s_, warn_after_s_, issuer_,
                                                std::move(child));
  register_communicator(sub);
  return sub;
}

void NcclCommunicator::set_labels(std::vector<std::string> labels) {
  labels_.set(std::move(labels), size_, str_cat("NcclCommunicator.set_labels on rank ", rank_));
}

void NcclCommunicator::add_pending(PendingConnect p) {
  check_open("creating a channel");
  std::lock_guard<std::mutex> lock(mu_);
  channel_handles_.erase(std::remove_if(channel_handles_.begin(), channel_handles_.end(),
                                        [](const auto& w) { return w.expired(); }),
                         channel_handles_.end());
  channel_handles_.push_back(p.handle);
  pending_.push_back(std::move(p));
}

void NcclCommunicator::check_open(const char* what) const {
  if (closed_) throw CommError(str_cat("rank ", rank_, ": ", what, " on NCCL communicator ", name_,
                                       " after close()"));
}

void NcclCommunicator::connect() {
  check_open("connect");
  std::vector<PendingConnect> pending;
  {
    std::lock_guard<std::mutex> lock(mu_);
    pending.swap(pending_);
  }
  DPSGS_CHECK_ARG(8 * pending.size() <= kScratchBytes, "NcclCommunicator.connect on rank ", rank_, ": ",
                  pending.size(), " new channels at once; at most ", kScratchBytes / 8);
  // Every rank is inside connect() now, so each channel's 2-rank init can complete.
  for (auto& p : pending) p.handle->settle("ncclCommInitRankConfig (channel)", p.peer);
  bool warm_collective = allreduce_.load() && !collective_warm_ && size_ > 1;
  if (!warm_collective && pending.empty()) {
    connected_ = true;
    return;
  }
  char* scratch = static_cast<char*>(scratch_);
  // The all-reduce warm-up's bytes, stream-ordered on our stream (see alloc_scratch).
  void* warm = nullptr;
  bool warm_pooled = false;
  if (warm_collective) {
    DeviceGuard guard(device_);
    warm_pooled = cudaMallocAsync(&warm, kWarmBytes, stream_->get()) == cudaSuccess;
    if (!warm_pooled) {
      cudaGetLastError();  // no memory pools here: a plain allocation, freed once the warm-up is done
      DPSGS_CHECK_CUDA(cudaMalloc(&warm, kWarmBytes), rank_, kNoPeer);
    }
    DPSGS_CHECK_CUDA(cudaMemsetAsync(warm, 0, kWarmBytes, stream_->get()), rank_, kNoPeer);
  }
  issuer_->run([&] {
    // Every communicator of the group is used exclusively until the group is launched (only
    // this thread ever holds several of these locks, so no lock order can deadlock).
    std::vector<std::unique_lock<std::mutex>> guards;
    if (warm_collective) guards.push_back(handle_->lock("connect (all-reduce warm-up)", kNoPeer));
    for (auto& p : pending) guards.push_back(p.handle->lock("connect (p2p warm-up)", p.peer));
    DPSGS_CHECK_NCCL(ncclGroupStart(), nullptr, rank_, kNoPeer);
    // A failed call inside the group must still close it, or every later NCCL call of this
    // thread would be swallowed by the open group.
    struct GroupCloser {
      bool open = true;
      ~GroupCloser() {
        if (open) ncclGroupEnd();
      }
    } closer;
    if (warm_collective) {
      float* at = static_cast<float*>(warm);
      for (size_t count : kWarmCounts) {
        DPSGS_CHECK_NCCL(ncclAllReduce(at, at, count, ncclFloat32, ncclAvg, handle_->get(), stream_->get()),
                         handle_->get(), rank_, kNoPeer);
        at += count;
      }
    }
    for (size_t i = 0; i < pending.size(); ++i) {
      auto& p = pending[i];
      char* byte = scratch + 8 * i;
      if (p.is_sender)
        DPSGS_CHECK_NCCL(ncclSend(byte, 1, ncclUint8, 1, p.handle->get(), p.stream->get()), p.handle->get(), rank_, p.peer);
      else
        DPSGS_CHECK_NCCL(ncclRecv(byte, 1, ncclUint8, 0, p.handle->get(), p.stream->get()), p.handle->get(), rank_, p.peer);
    }
    closer.open = false;
    DPSGS_CHECK_NCCL(ncclGroupEnd(), nullptr, rank_, kNoPeer);
    guards.clear();
    // A non-blocking group is launched once every communicator in it has settled.
    if (warm_collective) handle_->settle("ncclGroupEnd (connect: all-reduce warm-up)", kNoPeer);
    for (auto& p : pending) p.handle->settle("ncclGroupEnd (connect: p2p warm-up)", p.peer);
    for (auto& p : pending) p.on_connected();
  });
  if (warm_collective) {
    poll_stream(stream_->get(), *handle_, "connect (all-reduce warm-up)", kNoPeer);
    DeviceGuard guard(device_);
    DPSGS_CHECK_CUDA(warm_pooled ? cudaFreeAsync(warm, stream_->get()) : cudaFree(warm), rank_, kNoPeer);
    collective_warm_ = true;
  }
  for (auto& p : pending) poll_stream(p.stream->get(), *p.handle, "connect (p2p warm-up)", p.peer);
  connected_ = true;
}

void NcclCommunicator::synchronize() {
  issuer_->run([] {});  // every call queued so far is on the stream now
  poll_stream(stream_->get(), *handle_, "synchronize", kNoPeer);
}

// The warm-up scratch is stream-ordered on the communicator's stream where the device has
// memory pools: a cudaFree would wait for the whole device, behind NCCL kernels of other
// communicators that may wait for peers (a hang when a communicator is dropped mid-run).
void NcclCommunicator::alloc_scratch() {
  DeviceGuard guard(device_);
  cudaStream_t s = stream_->get();
  scratch_pooled_ = cudaMallocAsync(&scratch_, kScratchBytes, s) == cudaSuccess;
  if (!scratch_pooled_) {
    cudaGetLastError();  // no memory pools here (e.g. some virtual GPUs): a plain allocation
    DPSGS_CHECK_CUDA(cudaMalloc(&scratch_, kScratchBytes), rank_, kNoPeer);
  }
  DPSGS_CHECK_CUDA(cudaMemsetAsync(scratch_, 0, kScratchBytes, s), rank_, kNoPeer);
  DPSGS_CHECK_CUDA(cudaStreamSynchronize(s), rank_, kNoPeer);  // ready for the channels' streams too
}

cudaError_t NcclCommunicator::free_scratch() {
  DeviceGuard guard(device_);
  cudaError_t rc = scratch_pooled_ ? cudaFreeAsync(scratch_, stream_->get()) : cudaFree(scratch_);
  scratch_ = nullptr;
  return rc;
}

void NcclCommunicator::close() {
  std::vector<std::shared_ptr<NcclHandle>> handles;
  {
    std::lock_guard<std::mutex> lock(mu_);
    if (closed_) return;
    closed_ = true;
    for (auto& w : channel_handles_)
      if (auto h = w.lock()) handles.push_back(std::move(h));
    channel_handles_.clear();
    pending_.clear();
  }
  if (handle_) handles.push_back(handle_);
  // On the issuer: after every call queued so far, and never beside another NCCL call.
  issuer_->run([&] {
    for (auto& h : handles) h->close();
  });
  if (scratch_ != nullptr && !cuda_runtime_unloading()) free_scratch();
}

void close_all_nccl() {
  std::vector<std::shared_ptr<NcclCommunicator>> alive;
  {
    std::lock_guard<std::mutex> lock(registry_mu);
    for (auto it = registry().rbegin(); it != registry().rend(); ++it)
      if (auto c = it->lock()) alive.push_back(std::move(c));
    registry().clear();
  }
  for (auto& c : alive) {
    try {
      c->close();
    } catch (const std::exception& e) {
      std::fprintf(stderr, "[dpsgs] closing NcclCommunicator at exit: %s\n", e.what());
    }
  }
}

void NcclCommunicator::abort(const std::string& why) noexcept {
  if (handle_) handle_->abort(why);
  std::lock_guard<std::mutex> lock(mu_);
  for (auto& p : pending_) p.handle->abort(why);
}

}  // namespace dpsgs

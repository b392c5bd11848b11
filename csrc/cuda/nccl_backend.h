// NCCL backend entry: NcclCommunicator (bootstrap over MPI, split, connect) and version info.
//
// build_info(): module.cc's nccl_version()/cuda_version() (declared in bindings/nccl_bindings.h,
// defined in nccl_bindings.cc) return nccl_version_string() -- the libnccl actually loaded,
// e.g. "2.32.3" -- and cuda_runtime_version_string().
#pragma once

#include <mpi.h>
#include <nccl.h>

#include <atomic>
#include <functional>
#include <memory>
#include <mutex>
#include <string>
#include <vector>

#include "common/mpi_wait.h"
#include "common/rank_labels.h"
#include "cuda/cuda_stream.h"
#include "cuda/device_issuer.h"
#include "cuda/nccl_handle.h"

namespace dpsgs {

std::string nccl_version_string();          // ncclGetVersion of the loaded library, "2.32.3"
std::string nccl_header_version_string();   // NCCL_VERSION_CODE the extension was compiled with
std::string cuda_runtime_version_string();  // cudaRuntimeGetVersion, "13.0"; "" if unavailable
int cuda_device_count();                    // 0 when no driver / no GPU (never throws)


// One p2p connection waiting for NcclCommunicator::connect() (registered by NcclChannel).
struct PendingConnect {
  std::shared_ptr<NcclHandle> handle;   // the channel's own 2-rank communicator
  int peer;                             // rank of the other end in the NcclCommunicator
  bool is_sender;
  std::shared_ptr<CudaStream> stream;   // the channel's stream
  std::function<void()> on_connected;   // run on the issuer after the warm-up is issued
};

// A NCCL communicator over the ranks of an MPI communicator, one GPU per rank.
//
// Bootstrap (collective over `parent`): rank 0 calls ncclGetUniqueId, MPI_Bcast sends it,
// every rank calls ncclCommInitRankConfig (non-blocking) and settles it with a deadline.
// split() is ncclCommSplit (collective, parent settled first) plus MPI_Comm_split of the
// MPI duplicate, so stage and pipeline groups exist on both backends. The MPI duplicate
// (MPI_ERRORS_RETURN) carries this backend's bootstrap and channel headers only.
//
// All NCCL calls go through the device's single DeviceIssuer (see device_issuer.h).
//
// Lifetime: close() (collective, like MPI_Comm_free) finalizes and destroys, on the issuer
// and after every queued call, the NCCL communicators of this object and of every channel
// created on it, bounded in time; later use raises CommError. close_all_nccl() closes every
// live NcclCommunicator of the process, newest first; the module runs it from a Python
// atexit hook, so communicators die while CUDA is still alive (CUDA's own teardown runs
// after the interpreter's). A communicator never closed is released when its last user
// drops it, quietly skipped if CUDA is already unloading.
// connect() warms up in ONE NCCL group every connection this rank will use: the p2p
// connection of every channel created on it so far and, where a reducer was made on it
// (will_allreduce), its all-reduce at one size of every size class NCCL switches protocol
// or algorithm at (4 B .. 4 MiB, x16). NCCL connects lazily on first use (we keep its
// default, NCCL_RUNTIME_CONNECT=1: an eager connect would make every communicator, the
// 2-rank channel ones too, connect every collective algorithm at init), and a first use is
// a rendezvous with the peers; doing all of them at one collective point keeps it from
// deadlocking against other traffic on the device's one issuing thread.
class NcclCommunicator : public std::enable_shared_from_this<NcclCommunicator> {
 public:
  // Collective over `parent`; registered for close_all_nccl().
  static std::shared_ptr<NcclCommunicator> create(MPI_Comm parent, int device, double timeout_s,
                                                  double warn_after_s);
  NcclCommunicator(MPI_Comm parent, int device, double timeout_s, double warn_after_s);
  ~NcclCommunicator();  // never throws
  NcclCommunicator(const NcclCommunicator&) = delete;
  NcclCommunicator& operator=(const NcclCommunicator&) = delete;

  int rank() const { return rank_; }
  int size() const { return size_; }
  int device() const { return device_; }
  double timeout() const { return timeout_s_; }
  double warn_after() const { return warn_after_s_; }
  MPI_Comm mpi() const { return mpi_; }
  const std::shared_ptr<NcclHandle>& handle() const { return handle_; }
  DeviceIssuer& issuer() const { return *issuer_; }
  cudaStream_t stream() const { return stream_->get(); }  // the collectives' stream
  bool connected() const { return connected_; }
  bool closed() const { return closed_; }
  // How messages name rank r of this communicator ("rank r" unless set; see RankLabels).
  void set_labels(std::vector<std::string> labels);
  std::string label(int r) const { return labels_(r); }

  // Collective over this communicator. color < 0: this rank joins no group (nullptr).
  std::shared_ptr<NcclCommunicator> split(int color, int key);
  // Collective over this communicator; see the class comment. Call after creating every
  // channel on it and before the first send/recv/allreduce. Idempotent per new channel set.
  void connect();
  // Blocks until every operation issued on the collectives' stream so far has completed.
  void synchronize();
  // See the class comment. Idempotent; the caller must not hold the GIL.
  void close();

  void add_pending(PendingConnect p);
  // A reducer will all-reduce on this communicator: connect() warms its collective up.
  void will_allreduce() { allreduce_.store(true); }
  // Aborts every NCCL communicator of this object (bounded); for error paths.
  void abort(const std::string& why) noexcept;

 private:
  struct SplitTag {};

 public:
  // Used by split(): adopts an already created (still settling) communicator.
  NcclCommunicator(SplitTag, MPI_Comm mpi, int device, double timeout_s, double warn_after_s,
                   std::shared_ptr<DeviceIssuer> issuer, std::shared_ptr<NcclHandle> handle);

 private:
  void init_mpi(MPI_Comm mpi);
  void check_open(const char* what) const;
  void alloc_scratch();
  cudaError_t free_scratch();

  MPI_Comm mpi_ = MPI_COMM_NULL;
  int rank_ = 0, size_ = 1, device_;
  double timeout_s_, warn_after_s_;
  std::string name_;
  std::shared_ptr<DeviceIssuer> issuer_;
  std::unique_ptr<CudaStream> stream_;
  std::shared_ptr<NcclHandle> handle_;
  void* scratch_ = nullptr;  // device bytes for warm-up transfers
  bool scratch_pooled_ = false;  // from the device's memory pool (cudaMallocAsync)
  bool connected_ = false;
  std::atomic<bool> allreduce_{false};  // a reducer exists (will_allreduce)
  bool collective_warm_ = false;        // its all-reduce connections are made
  bool closed_ = false;
  std::mutex mu_;
  std::vector<PendingConnect> pending_;
  std::vector<std::weak_ptr<NcclHandle>> channel_handles_;  // closed by close(), before ours
  RankLabels labels_;
};

// Closes every NcclCommunicator of the process still alive, newest first (children before
// their parents). The caller must not hold the GIL.
void close_all_nccl();

}  // namespace dpsgs

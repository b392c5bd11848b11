// NcclChannel: device-memory channel, MPI header + grouped ncclSend/ncclRecv payloads (see nccl_channel.h).
#include "cuda/nccl_channel.h"

#include <algorithm>
#include <climits>
#include <cstddef>
#include <cstdio>
#include <cstring>
#include <mutex>
#include <utility>
#include <vector>

#include "common/error.h"
#include "common/mpi_lifecycle.h"
#include "cuda/cuda_check.h"

namespace dpsgs {

namespace {
constexpr uint32_t kMagic = 0x4e43434cu;  // "NCCL"

// Bytes of a header carrying `count` tensors (only those entries travel).
int header_bytes(size_t count) { return int(offsetof(NcclHeader, tensors) + count * sizeof(NcclTensorHeader)); }

using Parts = std::vector<std::pair<void*, size_t>>;  // the non-empty arrays of a message

// One ncclSend/ncclRecv per part; several inside one group, which NCCL matches with the
// peer's group in order. A one-array message is the single call it always was.
template <class Call>
ncclResult_t grouped(const Parts& parts, Call call) {
  if (parts.size() == 1) return call(parts[0].first, parts[0].second);
  ncclResult_t rc = ncclGroupStart();
  if (rc != ncclSuccess) return rc;
  for (auto& [ptr, bytes] : parts) {
    rc = call(ptr, bytes);
    if (rc != ncclSuccess && rc != ncclInProgress) break;
  }
  ncclResult_t end = ncclGroupEnd();  // always closes the group it opened
  return rc != ncclSuccess && rc != ncclInProgress ? rc : end;
}

// Sends a destroyed channel left in flight, with the buffers their Works own: ncclSend may
// still read those, so they are released only once complete (or failed), checked whenever
// a channel is destroyed.
void keep_until_complete(std::deque<std::shared_ptr<NcclWork>> works) {
  static std::mutex mu;
  static auto* kept = new std::vector<std::shared_ptr<NcclWork>>();  // never destroyed: used at exit
  std::lock_guard<std::mutex> lock(mu);
  for (auto& w : works) kept->push_back(std::move(w));
  kept->erase(std::remove_if(kept->begin(), kept->end(), [](const std::shared_ptr<NcclWork>& w) {
                try {
                  return w->is_completed();
                } catch (const std::exception&) {
                  return true;  // failed: its communicator is aborted and reads nothing more
                }
              }),
              kept->end());
}

}  // namespace

NcclChannel::NcclChannel(std::shared_ptr<NcclCommunicator> comm, int peer, int tag, bool is_sender,
                         std::string name)
    : comm_(std::move(comm)), peer_(peer), tag_(tag), is_sender_(is_sender), name_(std::move(name)) {
  DPSGS_CHECK_ARG(comm_ != nullptr, "NcclChannel: communicator is None");
  rank_ = comm_->rank();
  device_ = comm_->device();
  DPSGS_CHECK_ARG(peer >= 0 && peer < comm_->size() && peer != rank_, "NcclChannel '", name_, "' on rank ", rank_,
                  ": peer ", peer, " is not another rank of a communicator of size ", comm_->size());
  void* ub = nullptr;
  int flag = 0;
  DPSGS_CHECK_MPI(MPI_Comm_get_attr(comm_->mpi(), MPI_TAG_UB, &ub, &flag), rank_, peer_);
  int max_tag = flag ? *static_cast<int*>(ub) : 32767;
  DPSGS_CHECK_ARG(tag >= 0 && tag <= max_tag, "NcclChannel '", name_, "' on rank ", rank_, ": tag ", tag,
                  " outside [0, ", max_tag, "]");
  pair_name_ = str_cat("dpsgs-chan-", name_, "-", is_sender_ ? rank_ : peer_, "to", is_sender_ ? peer_ : rank_);
  double timeout = comm_->timeout(), warn = comm_->warn_after();

  // Point-to-point bootstrap of the channel's own communicator. The sender never waits here;
  // the receiver waits only for the sender's constructor.
  if (is_sender_) {
    DPSGS_CHECK_NCCL(ncclGetUniqueId(&id_), nullptr, rank_, peer_);
    DPSGS_CHECK_MPI(MPI_Isend(&id_, sizeof(id_), MPI_BYTE, peer_, tag_, comm_->mpi(), &id_req_), rank_, peer_);
  } else {
    MPI_Request req;
    DPSGS_CHECK_MPI(MPI_Irecv(&id_, sizeof(id_), MPI_BYTE, peer_, tag_, comm_->mpi(), &req), rank_, peer_);
    wait_mpi_request(&req, rank_, peer_, timeout, warn, [&] {
      return str_cat("rank ", rank_, ": ", describe_end(), " construction (waiting for the sender, rank ", peer_,
                     ", to construct its end)");
    });
  }
  handle_ = std::make_shared<NcclHandle>(rank_, pair_name_, timeout, warn);
  comm_->issuer().run([&] {
    DPSGS_CHECK_NCCL(ncclCommInitRankConfig(handle_->slot(), 2, id_, is_sender_ ? 0 : 1, handle_->config()), nullptr,
                     rank_, peer_);
  });
  stream_ = std::make_shared<CudaStream>(device_, rank_);
  connected_ = std::make_shared<std::atomic<bool>>(false);
  comm_->add_pending(PendingConnect{handle_, peer_, is_sender_, stream_,
                                    [flag = connected_] { flag->store(true); }});
  if (!is_sender_) {
    post_header(0);
    post_header(1);
  }
}

NcclChannel::~NcclChannel() {
  size_t unfinished = 0;
  try {
    for (auto& w : inflight_)
      if (!w->is_completed()) ++unfinished;
  } catch (const std::exception& e) {
    std::fprintf(stderr, "[dpsgs] rank %d: %s closed after a failed send: %s\n", rank_, describe_end().c_str(),
                 e.what());
  }
  if (unfinished > 0)
    std::fprintf(stderr, "[dpsgs] rank %d: %s closed with %zu sends still in flight (their buffers stay alive "
                 "until they complete)\n", rank_, describe_end().c_str(), unfinished);
  keep_until_complete(std::move(inflight_));
  if (mpi_alive()) {
    // Pre-posted header receives nobody will match, and the sender's finished Isends.
    for (auto& r : hreq_) {
      if (r == MPI_REQUEST_NULL) continue;
      if (!is_sender_) MPI_Cancel(&r);
      MPI_Request_free(&r);
    }
    if (id_req_ != MPI_REQUEST_NULL) MPI_Request_free(&id_req_);
  }
  // Drop our handle on the issuer so its finalize is ordered after every queued call; queued,
  // not awaited (this may run with the GIL held, which a queued task may need).
  try {
    comm_->issuer().submit([h = std::move(handle_)]() mutable { h.reset(); });
  } catch (const std::exception& e) {
    std::fprintf(stderr, "[dpsgs] rank %d: closing %s: %s\n", rank_, describe_end().c_str(), e.what());
  }
}

std::string NcclChannel::describe_end() const {
  int src = is_sender_ ? rank_ : peer_, dst = is_sender_ ? peer_ : rank_;
  return str_cat("NcclChannel '", name_, "' (", comm_->label(src), " -> ", comm_->label(dst), ", tag ", tag_, ")");
}

std::string NcclChannel::op_name(const char* op, uint64_t seq) const {
  return str_cat(comm_->label(rank_), ": ", describe_end(), " ", op, " #", seq, is_sender_ ? " to " : " from ",
                 comm_->label(peer_));
}

void NcclChannel::check_buffer(const Buffer& b, const char* op) const {
  DPSGS_CHECK_ARG(b.device == Device::CUDA, describe_end(), ": ", op, " of a host buffer over the NCCL channel "
                  "(use the MPI Channel for host memory)");
  DPSGS_CHECK_ARG(b.device_index == device_, describe_end(), ": ", op, " of a buffer on cuda:", b.device_index,
                  " but this rank's NCCL communicator uses cuda:", device_);
  DPSGS_CHECK_ARG(b.shape.size() <= size_t(kMaxDims), describe_end(), ": ", b.shape.size(),
                  " dimensions; at most ", kMaxDims);
  DPSGS_CHECK_ARG(connected_->load(), describe_end(), ": ", op, " before NcclCommunicator.connect(); call "
                  "connect() on every rank after creating the channels");
  if (comm_->closed()) throw CommError(str_cat(describe_end(), ": ", op, " after its NcclCommunicator was closed"));
}

uintptr_t NcclChannel::check_message(const std::vector<Buffer>& bufs, const char* op) const {
  check_message_length(bufs.size(), is_sender_ ? "got" : "expected", [&] { return describe_end(); });
  for (size_t i = 0; i < bufs.size(); ++i) {
    check_buffer(bufs[i], op);
    DPSGS_CHECK_ARG(bufs[i].stream == bufs[0].stream, describe_end(), ": ", op, ": tensor ", i, " is on stream ",
                    bufs[i].stream, " but tensor 0 on stream ", bufs[0].stream, "; a message is ordered after one "
                    "producer stream");
  }
  return bufs[0].stream;
}

void NcclChannel::post_header(int slot) {
  DPSGS_CHECK_MPI(MPI_Irecv(&headers_[slot], int(sizeof(NcclHeader)), MPI_BYTE, peer_, tag_, comm_->mpi(), &hreq_[slot]),
                  rank_, peer_);
}

int NcclChannel::in_flight() {
  while (!inflight_.empty() && inflight_.front()->is_completed()) inflight_.pop_front();
  return static_cast<int>(inflight_.size());
}

std::shared_ptr<NcclWork> NcclChannel::issue(const char* op, uint64_t seq, uintptr_t producer, Owner owner,
                                             std::function<ncclResult_t(ncclComm_t, cudaStream_t)> call,
                                             const char* call_name) {
  auto work = std::make_shared<NcclWork>(op_name(op, seq), handle_, device_, peer_, std::move(owner));
  auto ready = std::make_shared<CudaEvent>(device_, rank_);
  {
    DeviceGuard guard(device_);
    ready->record(reinterpret_cast<cudaStream_t>(producer), rank_, peer_);
  }
  comm_->issuer().submit([handle = handle_, stream = stream_, work, ready, call = std::move(call), call_name,
                          rank = rank_, peer = peer_] {
    try {
      DPSGS_CHECK_CUDA(cudaStreamWaitEvent(stream->get(), ready->get(), 0), rank, peer);
      ncclResult_t rc;
      {
        auto guard = handle->lock(call_name, peer);
        rc = call(handle->get(), stream->get());
      }
      if (rc != ncclSuccess && rc != ncclInProgress)
        DPSGS_THROW_CALL("NCCL", call_name, rank, peer, nccl_error_text(rc, handle->get()));
      handle->settle(call_name, peer);
      work->done_event().record(stream->get(), rank, peer);
      work->mark_issued();
    } catch (...) {
      work->set_error(std::current_exception());
    }
  });
  return work;
}

std::shared_ptr<NcclWork> NcclChannel::send(const std::vector<Buffer>& src, Owner owner) {
  DPSGS_CHECK_ARG(is_sender_, describe_end(), ": send() called on the receiving end (rank ", rank_, ")");
  uintptr_t producer = check_message(src, "send");
  // The bound: a third send waits for the oldest one.
  while (in_flight() >= 2) inflight_.front()->wait();
  if (id_req_ != MPI_REQUEST_NULL)
    wait_mpi_request(&id_req_, rank_, peer_, comm_->timeout(), comm_->warn_after(),
                     [&] { return op_name("send (unique id)", sent_); });
  uint64_t seq = sent_;
  int slot = static_cast<int>(seq % 2);
  // The header sent two messages ago left this slot long ago (its payload has completed).
  if (hreq_[slot] != MPI_REQUEST_NULL)
    wait_mpi_request(&hreq_[slot], rank_, peer_, comm_->timeout(), comm_->warn_after(),
                     [&] { return op_name("send header", seq - 2); });
  NcclHeader& h = headers_[slot];
  std::memset(&h, 0, sizeof(h));
  h.magic = kMagic;
  h.count = static_cast<uint32_t>(src.size());
  h.seq = seq;
  size_t total = 0;
  for (size_t i = 0; i < src.size(); ++i) {
    NcclTensorHeader& t = h.tensors[i];
    t.dtype = static_cast<int32_t>(src[i].dtype);
    t.ndim = static_cast<int32_t>(src[i].shape.size());
    t.nbytes = src[i].bytes;
    for (size_t d = 0; d < src[i].shape.size(); ++d) t.shape[d] = src[i].shape[d];
    total += src[i].bytes;
  }
  DPSGS_CHECK_MPI(MPI_Isend(&h, header_bytes(src.size()), MPI_BYTE, peer_, tag_, comm_->mpi(), &hreq_[slot]), rank_,
                  peer_);
  ++sent_;
  if (total == 0) {
    auto work = std::make_shared<NcclWork>(op_name("send", seq), handle_, device_, peer_, std::move(owner));
    work->mark_trivial();
    return work;
  }
  // Raw bytes: byte-exact for every dtype (bool and bfloat16 included), no reduction involved.
  Parts parts;
  for (const Buffer& b : src)
    if (b.bytes) parts.emplace_back(b.ptr, b.bytes);
  auto work = issue("send", seq, producer, std::move(owner),
                    [parts](ncclComm_t c, cudaStream_t s) {
                      return grouped(parts, [&](void* p, size_t n) { return ncclSend(p, n, ncclUint8, 1, c, s); });
                    },
                    "ncclSend");
  inflight_.push_back(work);
  return work;
}

std::shared_ptr<NcclWork> NcclChannel::recv_into(const std::vector<Buffer>& dst, Owner owner) {
  DPSGS_CHECK_ARG(!is_sender_, describe_end(), ": recv() called on the sending end (rank ", rank_, ")");
  uintptr_t consumer = check_message(dst, "recv");
  uint64_t seq = received_;
  int slot = static_cast<int>(seq % 2);
  wait_mpi_request(&hreq_[slot], rank_, peer_, comm_->timeout(), comm_->warn_after(),
                   [&] { return op_name("recv header", seq); });
  NcclHeader h = headers_[slot];
  bool sane = h.magic == kMagic && h.count >= 1 && h.count <= uint32_t(kMaxMessageTensors);
  for (uint32_t i = 0; sane && i < h.count; ++i)
    sane = h.tensors[i].ndim >= 0 && h.tensors[i].ndim <= kMaxDims && valid_dtype_code(h.tensors[i].dtype);
  DPSGS_CHECK_ARG(sane, describe_end(), " message #", seq, " on ", comm_->label(rank_), " from ", comm_->label(peer_),
                  ": malformed header (is the peer using the MPI Channel with the same tag?)");
  DPSGS_CHECK_ARG(h.seq == seq, describe_end(), " on ", comm_->label(rank_), ": expected message #", seq, " from ",
                  comm_->label(peer_), " but received #", h.seq);
  std::vector<TensorSpec> expected, received;
  for (const Buffer& b : dst) expected.push_back({b.dtype, b.shape});
  for (uint32_t i = 0; i < h.count; ++i) {
    const NcclTensorHeader& t = h.tensors[i];
    received.push_back({static_cast<DType>(t.dtype), std::vector<int64_t>(t.shape, t.shape + t.ndim)});
  }
  std::string diff = message_mismatch(expected, received);
  if (!diff.empty())
    throw HeaderMismatch(str_cat(describe_end(), " message #", seq, " on ", comm_->label(rank_), " from ",
                                 comm_->label(peer_), ": ", diff));
  Parts parts;
  for (size_t i = 0; i < dst.size(); ++i) {
    // dtype and shape agree, so the byte counts do unless the header lies: refuse before ncclRecv
    DPSGS_CHECK_ARG(h.tensors[i].nbytes == dst[i].bytes, describe_end(), " message #", seq, ": tensor ", i, " of ",
                    h.tensors[i].nbytes, " bytes for a buffer of ", dst[i].bytes);
    if (dst[i].bytes) parts.emplace_back(dst[i].ptr, dst[i].bytes);
  }
  post_header(slot);  // for message seq + 2
  ++received_;
  if (parts.empty()) {
    auto work = std::make_shared<NcclWork>(op_name("recv", seq), handle_, device_, peer_, std::move(owner));
    work->mark_trivial();
    return work;
  }
  return issue("recv", seq, consumer, std::move(owner),
               [parts](ncclComm_t c, cudaStream_t s) {
                 return grouped(parts, [&](void* p, size_t n) { return ncclRecv(p, n, ncclUint8, 0, c, s); });
               },
               "ncclRecv");
}

}  // namespace dpsgs

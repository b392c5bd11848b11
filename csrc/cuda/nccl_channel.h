// NcclChannel: directed, ordered, double-buffered queue of device arrays over ncclSend/ncclRecv.
#pragma once

#include <mpi.h>
#include <nccl.h>

#include <atomic>
#include <cstdint>
#include <deque>
#include <memory>
#include <string>

#include "common/buffer.h"
#include "common/message.h"
#include "cuda/cuda_stream.h"
#include "cuda/nccl_backend.h"
#include "cuda/nccl_work.h"

namespace dpsgs {

// Header of one message (1..kMaxMessageTensors device arrays). It travels over MPI (the
// NcclCommunicator's duplicate, this channel's tag), not NCCL: the receiver must know the exact
// byte counts before it may post ncclRecv (NCCL requires matching counts and has no probe), and
// it checks seq, the count and each array's dtype and shape against what the caller expects
// before any device memory is written. Only the first `count` tensor entries are sent.
struct NcclTensorHeader {
  int32_t dtype;
  int32_t ndim;
  uint64_t nbytes;
  int64_t shape[kMaxDims];
};
struct NcclHeader {
  uint32_t magic;
  uint32_t count;
  uint64_t seq;
  NcclTensorHeader tensors[kMaxMessageTensors];
};

// Semantics match the MPI Channel (csrc/channel.h): one sender, one receiver, same (peer,
// tag) on both ends, messages in order, seq/count/dtypes/shapes checked, at most two messages
// in flight. A message's arrays travel as one ncclSend/ncclRecv each inside one
// ncclGroupStart/End on the channel's stream (so one event orders the whole message), in
// their own memory: no packing copy on the GPU.
//
// Why each channel owns a 2-rank NCCL communicator (bootstrapped point-to-point: the sender
// makes the unique id and MPI-sends it to the receiver) and a CUDA stream: NCCL runs the
// operations of one communicator in issue order, and a pipeline sends activations one way while gradients
// come back the other way, each send waiting on the GPU for the peer's matching recv. On one
// shared communicator the forward send of step t would block the backward recv queued
// behind it, which the peer only matches after its own blocked send: a deadlock. Separate
// communicators and streams per direction remove the cycle.
//
// Construction never blocks on the peer except for the receiver waiting for the sender's
// unique id, and the sender never waits, so channels may be created in any order. The first
// send/recv requires NcclCommunicator::connect() (collective) to have run.
//
// Ordering: send() records an event on the caller's stream (Buffer::stream, the same for every
// array of a message) and the channel stream waits for it, so the data are read only after the compute that produced them.
// recv_into() likewise waits for the caller's stream before overwriting `dst`; the caller
// then makes its stream wait for the returned Work (NcclWork::wait_stream) before reading.
// `owner` keeps the caller's memory alive until the Work is destroyed.
//
// One thread per end calls send/recv (as a pipeline stage does); not safe for two.
class NcclChannel {
 public:
  NcclChannel(std::shared_ptr<NcclCommunicator> comm, int peer, int tag, bool is_sender, std::string name);
  ~NcclChannel();  // never throws; reports unfinished sends
  NcclChannel(const NcclChannel&) = delete;
  NcclChannel& operator=(const NcclChannel&) = delete;

  // Sender: queues the message's ncclSends (zero-copy). Blocks (politely, deadline) while two
  // messages are in flight.
  std::shared_ptr<NcclWork> send(const std::vector<Buffer>& src, Owner owner);
  // Receiver: waits for the next header, checks the count and each array's dtype and shape
  // against dst (HeaderMismatch naming both ranks and the tensor index), queues the ncclRecvs.
  std::shared_ptr<NcclWork> recv_into(const std::vector<Buffer>& dst, Owner owner);

  int in_flight();
  uint64_t sent() const { return sent_; }
  uint64_t received() const { return received_; }
  int peer() const { return peer_; }
  int tag() const { return tag_; }
  bool is_sender() const { return is_sender_; }
  const std::string& name() const { return name_; }
  uintptr_t stream() const { return reinterpret_cast<uintptr_t>(stream_->get()); }
  std::string describe_end() const;  // "NcclChannel 'x' (rank 0 -> rank 1, tag 3)"

 private:
  void check_buffer(const Buffer& b, const char* op) const;
  // The message's length, each buffer, and one producer stream for all; returns that stream.
  uintptr_t check_message(const std::vector<Buffer>& bufs, const char* op) const;
  void post_header(int slot);
  std::string op_name(const char* op, uint64_t seq) const;
  // Queues `call` (ncclSend/ncclRecv) on the issuing thread, ordered after `producer`.
  std::shared_ptr<NcclWork> issue(const char* op, uint64_t seq, uintptr_t producer, Owner owner,
                                  std::function<ncclResult_t(ncclComm_t, cudaStream_t)> call, const char* call_name);

  std::shared_ptr<NcclCommunicator> comm_;
  int peer_, tag_;
  bool is_sender_;
  std::string name_, pair_name_;
  int rank_, device_;
  std::shared_ptr<NcclHandle> handle_;   // this channel's 2-rank communicator: sender 0, receiver 1
  std::shared_ptr<CudaStream> stream_;
  std::shared_ptr<std::atomic<bool>> connected_;
  ncclUniqueId id_{};
  MPI_Request id_req_ = MPI_REQUEST_NULL;  // sender: the unique id's Isend
  NcclHeader headers_[2]{};
  MPI_Request hreq_[2] = {MPI_REQUEST_NULL, MPI_REQUEST_NULL};
  std::deque<std::shared_ptr<NcclWork>> inflight_;
  uint64_t sent_ = 0, received_ = 0;
};

}  // namespace dpsgs

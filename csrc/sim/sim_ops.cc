// Simulated NCCL operations on a stream's worker (see sim_ops.h).
#include "sim/sim_ops.h"

#include <mpi.h>

#include <algorithm>
#include <climits>
#include <cmath>
#include <cstdio>
#include <cstring>

#include "sim/sim.h"
#include "sim/sim_faults.h"
#include "sim/sim_memory.h"
#include "sim/sim_reduce.h"
#include "sim/sim_settings.h"

namespace dpsgs::sim {

namespace {
constexpr size_t kChunk = size_t(1) << 30;  // MPI counts are ints: larger messages go in pieces

thread_local Rng* tls_rng = nullptr;
Rng& rng() {
  if (tls_rng == nullptr) tls_rng = new Rng(0xd31a7ULL + next_serial());  // one per worker thread
  return *tls_rng;
}

bool mpi_gone() {
  int finalized = 0;
  MPI_Finalized(&finalized);
  return finalized || unloading();
}

uint64_t checksum(const void* p, size_t n) {
  // FNV-1a over bytes: enough to notice any change to a buffer in flight.
  uint64_t h = 1469598103934665603ULL;
  const auto* b = static_cast<const unsigned char*>(p);
  for (size_t i = 0; i < n; ++i) h = (h ^ b[i]) * 1099511628211ULL;
  return h;
}

void post(bool send, const void* buf, size_t bytes, int world_peer, int tag, std::vector<MPI_Request>& reqs) {
  for (size_t off = 0; off < bytes || (bytes == 0 && off == 0); off += kChunk) {
    int n = static_cast<int>(std::min(kChunk, bytes - off));
    MPI_Request r = MPI_REQUEST_NULL;
    char* at = const_cast<char*>(static_cast<const char*>(buf)) + off;
    if (send)  // synchronous: complete only once the peer's receive has matched it
      MPI_Issend(at, n, MPI_BYTE, world_peer, tag, MPI_COMM_WORLD, &r);
    else
      MPI_Irecv(at, n, MPI_BYTE, world_peer, tag, MPI_COMM_WORLD, &r);
    reqs.push_back(r);
    if (bytes == 0) break;
  }
}

// Applies this process's fault hook to `op`; true when the op must not run.
bool faulted(const NcclOp& op) {
  switch (next_op_fault()) {
    case Fault::None: return false;
    case Fault::Stall:
      std::fprintf(stderr, "[dpsgs-sim] fault hook: %s stalls its stream\n", op.what().c_str());
      while (!op.comm->aborted() && !mpi_gone()) sleep_for(1e-3);
      return true;
    case Fault::AsyncError:
      op.comm->set_error(ncclRemoteError, "simulated: connection to the peer lost during " + op.what());
      return true;
    case Fault::InitHang: return false;
  }
  return false;
}

void all_reduce(const NcclOp& op) {
  Comm& c = *op.comm;
  int n = c.nranks(), me = c.rank();
  size_t bytes = op.bytes();
  // Every contribution, in sim-owned memory MPI may keep using if the op is abandoned.
  auto parts = std::make_shared<std::vector<std::vector<char>>>(n);
  (*parts)[me].assign(static_cast<const char*>(op.src), static_cast<const char*>(op.src) + bytes);
  poison(op.dst, bytes);  // in place too: the buffer holds garbage until the result lands
  std::vector<MPI_Request> reqs;
  for (int r = 0; r < n; ++r) {
    if (r == me) continue;
    (*parts)[r].resize(bytes);
    post(false, (*parts)[r].data(), bytes, c.world_rank_of(r), c.data_tag(), reqs);
    post(true, (*parts)[me].data(), bytes, c.world_rank_of(r), c.data_tag(), reqs);
  }
  std::string error;
  if (!wait_requests(reqs, [&c] { return c.aborted() || mpi_gone(); }, &error)) {
    abandon(parts);
    if (!error.empty()) c.set_error(ncclSystemError, op.what() + ": " + error);
    return;
  }
  std::vector<const void*> inputs(n);
  for (int r = 0; r < n; ++r) inputs[r] = (*parts)[r].data();
  std::vector<char> result(bytes);
  reduce(inputs, result.data(), op.count, op.type, op.op);  // rank order: every rank gets the same bits
  sleep_for(rng().delay_s());
  std::memcpy(op.dst, result.data(), bytes);
}

struct P2P {
  const NcclOp* op;
  // What MPI reads or writes: a send's bytes as they were when the op started (the send
  // buffer itself is checked at the end), a receive's landing place (copied out late).
  std::vector<char> staging;
  uint64_t sum_at_start = 0;
};

void point_to_point(const std::vector<const NcclOp*>& ops) {
  auto p2p = std::make_shared<std::vector<P2P>>();
  std::vector<MPI_Request> reqs;
  p2p->reserve(ops.size());
  for (const NcclOp* op : ops) {
    p2p->push_back(P2P{op, {}, 0});
    P2P& p = p2p->back();
    Comm& c = *op->comm;
    size_t bytes = op->bytes();
    if (op->kind == NcclOp::Send) {
      const char* src = static_cast<const char*>(op->src);
      p.staging.assign(src, src + bytes);
      if (settings().check_sends) p.sum_at_start = checksum(op->src, bytes);
      post(true, p.staging.data(), bytes, c.world_rank_of(op->peer), c.data_tag(), reqs);
    } else {
      poison(op->dst, bytes);
      p.staging.resize(bytes);
      post(false, p.staging.data(), bytes, c.world_rank_of(op->peer), c.data_tag(), reqs);
    }
  }
  std::string error;
  bool ok = wait_requests(reqs, [&ops] {
    if (mpi_gone()) return true;
    for (auto* op : ops)
      if (op->comm->aborted()) return true;
    return false;
  }, &error);
  if (!ok) {
    abandon(p2p);
    if (!error.empty())  // e.g. a message longer than its receive: NCCL requires equal counts
      for (auto* op : ops) op->comm->set_error(ncclSystemError, op->what() + ": " + error);
    return;
  }
  for (auto& p : *p2p) {
    const NcclOp& op = *p.op;
    if (op.kind == NcclOp::Recv) {
      sleep_for(rng().delay_s());  // late, so a reader that did not wait on this stream sees poison
      if (!p.staging.empty()) std::memcpy(op.dst, p.staging.data(), p.staging.size());
    } else if (settings().check_sends) {
      uint64_t now = checksum(op.src, op.bytes());
      if (now != p.sum_at_start) {
        std::string text = op.what() + ": the send buffer changed while the send was in flight (written, reused "
                           "or freed before the send completed)";
        std::fprintf(stderr, "[dpsgs-sim] %s\n", text.c_str());
        op.comm->set_error(ncclInvalidUsage, text);
      }
    }
  }
}
}  // namespace

size_t type_size(ncclDataType_t type) {
  switch (type) {
    case ncclInt8:
    case ncclUint8: return 1;
    case ncclFloat16:
    case ncclBfloat16: return 2;
    case ncclInt32:
    case ncclUint32:
    case ncclFloat32: return 4;
    case ncclInt64:
    case ncclUint64:
    case ncclFloat64: return 8;
    default: return 0;
  }
}

size_t NcclOp::bytes() const { return count * type_size(type); }

std::string NcclOp::what() const {
  const char* name = kind == Send ? "ncclSend" : kind == Recv ? "ncclRecv" : "ncclAllReduce";
  std::string s = std::string(name) + " of " + std::to_string(bytes()) + " bytes";
  if (kind != AllReduce) s += (kind == Send ? " to rank " : " from rank ") + std::to_string(peer);
  return s + " on '" + comm->name() + "' (rank " + std::to_string(comm->rank()) + ")";
}

void run_ops(const std::vector<NcclOp>& ops) {
  std::vector<const NcclOp*> p2p;
  for (const NcclOp& op : ops) {
    if (op.comm->aborted() || mpi_gone() || faulted(op)) continue;
    if (op.kind == NcclOp::AllReduce)
      all_reduce(op);
    else
      p2p.push_back(&op);
  }
  if (!p2p.empty()) point_to_point(p2p);
}

}  // namespace dpsgs::sim

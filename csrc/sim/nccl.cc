// The simulated NCCL API (see include/nccl.h): argument checks and NCCL's result codes over
// the communicators, groups and operations of sim_comm.h, sim_group.h and sim_ops.h.
#include <nccl.h>

#include <algorithm>
#include <cstdio>
#include <map>
#include <mutex>
#include <set>
#include <string>
#include <thread>
#include <vector>

#include "sim/sim.h"
#include "sim/sim_comm.h"
#include "sim/sim_group.h"
#include "sim/sim_memory.h"
#include "sim/sim_ops.h"
#include "sim/sim_stream.h"

using namespace dpsgs::sim;

namespace {
constexpr uint64_t kCommMagic = 0x6e63636c53494dULL;

std::mutex g_mu;
std::set<const ncclComm*>& live() {
  static auto* s = new std::set<const ncclComm*>();
  return *s;
}
std::string& global_last_error() {
  static auto* s = new std::string();
  return *s;
}

ncclResult_t fail(ncclResult_t rc, const std::string& why) {
  std::lock_guard<std::mutex> lock(g_mu);
  global_last_error() = why;
  return rc;
}

ncclComm_t wrap(std::shared_ptr<Comm> impl) {
  auto* c = new ncclComm{kCommMagic, std::move(impl)};  // never freed: see sim_comm.h
  std::lock_guard<std::mutex> lock(g_mu);
  live().insert(c);
  return c;
}

// The communicator behind a handle; nullptr (and the reason recorded) for one destroyed,
// aborted or never made.
std::shared_ptr<Comm> resolve(ncclComm_t comm, const char* call) {
  std::lock_guard<std::mutex> lock(g_mu);
  if (comm == nullptr || live().count(comm) == 0) {
    global_last_error() = std::string(call) + ": invalid, destroyed or aborted communicator";
    return nullptr;
  }
  return comm->impl;
}

void retire(ncclComm_t comm) {
  std::lock_guard<std::mutex> lock(g_mu);
  live().erase(comm);
}

// NCCL: after a call answered ncclInProgress, poll until ncclSuccess before the next call.
ncclResult_t ready(const std::shared_ptr<Comm>& c, const char* call) {
  ncclResult_t state = c->peek();
  if (state == ncclInProgress) {
    c->note(std::string(call) + " on '" + c->name() + "' while its previous call is still in progress "
            "(poll ncclCommGetAsyncError until ncclSuccess first)");
    return ncclInvalidUsage;
  }
  return state;
}

bool valid_device_buffer(const void* p, size_t bytes) {
  return bytes == 0 || (p != nullptr && dpsgs::sim::attributes(p).type != cudaMemoryTypeHost);
}

ncclResult_t op(NcclOp o, const void* buf, cudaStream_t stream, const char* call) {
  if (unloading()) return ncclUnhandledCudaError;
  if (!o.comm) return ncclInvalidArgument;
  if (ncclResult_t rc = ready(o.comm, call); rc != ncclSuccess) return rc;
  if (type_size(o.type) == 0) return fail(ncclInvalidArgument, std::string(call) + ": unknown data type");
  if (o.kind != NcclOp::AllReduce && (o.peer < 0 || o.peer >= o.comm->nranks()))
    return fail(ncclInvalidArgument, std::string(call) + ": peer " + std::to_string(o.peer) + " outside [0, " +
                                         std::to_string(o.comm->nranks()) + ")");
  if (o.kind == NcclOp::AllReduce && (o.op < ncclSum || o.op >= ncclNumOps))
    return fail(ncclInvalidArgument, std::string(call) + ": unknown reduction");
  if (!valid_device_buffer(buf, o.bytes()) ||
      (o.kind == NcclOp::AllReduce && !valid_device_buffer(o.dst, o.bytes())))
    return fail(ncclInvalidArgument, o.what() + ": the buffer is not device memory");
  return submit(std::move(o), stream);
}
}  // namespace

extern "C" {

const char* ncclGetErrorString(ncclResult_t result) {
  switch (result) {
    case ncclSuccess: return "no error";
    case ncclUnhandledCudaError: return "unhandled cuda error (run with NCCL_DEBUG=INFO for details)";
    case ncclSystemError: return "unhandled system error (run with NCCL_DEBUG=INFO for details)";
    case ncclInternalError: return "internal error - please report this issue to the NCCL developers";
    case ncclInvalidArgument: return "invalid argument (run with NCCL_DEBUG=WARN for details)";
    case ncclInvalidUsage: return "invalid usage (run with NCCL_DEBUG=WARN for details)";
    case ncclRemoteError: return "remote process exited or there was a network error";
    case ncclInProgress: return "NCCL operation in progress";
    default: return "unknown result code";
  }
}

const char* ncclGetLastError(ncclComm_t comm) {
  // The text must outlive the call: one buffer per thread (never destroyed, see sim_group.cc).
  thread_local std::string* text_ptr = new std::string();
  std::string& text = *text_ptr;
  std::shared_ptr<Comm> c;
  {
    std::lock_guard<std::mutex> lock(g_mu);
    if (comm != nullptr && live().count(comm)) c = comm->impl;
    text = global_last_error();
  }
  if (c) {
    std::string own = c->last_error();
    if (!own.empty()) text = own;
  }
  return text.c_str();
}

ncclResult_t ncclGetVersion(int* version) {
  if (version == nullptr) return ncclInvalidArgument;
  *version = NCCL_VERSION_CODE;
  return ncclSuccess;
}

ncclResult_t ncclGetUniqueId(ncclUniqueId* id) {
  if (id == nullptr) return ncclInvalidArgument;
  return make_unique_id(id) ? ncclSuccess
                            : fail(ncclSystemError, "ncclGetUniqueId: the simulated NCCL needs MPI initialised");
}

ncclResult_t ncclCommInitRankConfig(ncclComm_t* out, int nranks, ncclUniqueId commId, int rank, ncclConfig_t* config) {
  if (unloading()) return ncclUnhandledCudaError;
  IdInfo info{};
  if (out == nullptr || nranks < 1 || rank < 0 || rank >= nranks)
    return fail(ncclInvalidArgument, "ncclCommInitRankConfig: rank " + std::to_string(rank) + " of " +
                                         std::to_string(nranks));
  if (!read_unique_id(commId, &info)) return fail(ncclInvalidArgument, "ncclCommInitRankConfig: not a unique id");
  if (world_rank() < 0) return fail(ncclSystemError, "ncclCommInitRankConfig: the simulated NCCL needs MPI");
  auto impl = std::make_shared<Comm>(rank, nranks, config, current_device());
  *out = wrap(impl);
  return impl->run_job([info](Comm& c) { return bootstrap(c, info); });
}

ncclResult_t ncclCommInitRank(ncclComm_t* out, int nranks, ncclUniqueId commId, int rank) {
  return ncclCommInitRankConfig(out, nranks, commId, rank, nullptr);
}

ncclResult_t ncclCommSplit(ncclComm_t comm, int color, int key, ncclComm_t* newcomm, ncclConfig_t* config) {
  if (unloading()) return ncclUnhandledCudaError;
  auto parent = resolve(comm, "ncclCommSplit");
  if (!parent || newcomm == nullptr) return ncclInvalidArgument;
  if (ncclResult_t rc = ready(parent, "ncclCommSplit"); rc != ncclSuccess) return rc;
  *newcomm = nullptr;
  ncclConfig_t inherited = NCCL_CONFIG_INITIALIZER;
  inherited.blocking = parent->blocking() ? 1 : 0;
  ncclConfig_t child_config = config != nullptr ? *config : inherited;
  uint64_t candidate = next_serial();  // this rank's tag serial, used if it becomes the root
  int me_world = world_rank();
  // Collective over the parent: every member tells every other (color, key, world rank,
  // candidate serial) on the parent's control tag; members of one color, ordered by (key,
  // parent rank), form a new communicator whose tags come from its first member.
  auto job = [=](Comm& p) -> ncclResult_t {
    int n = p.nranks(), me = p.rank();
    auto store = std::make_shared<std::vector<long long>>(4 * n);  // abandoned if the split is aborted
    std::vector<long long>& all = *store;
    long long* mine = &all[4 * me];
    mine[0] = color;
    mine[1] = key;
    mine[2] = me_world;
    mine[3] = static_cast<long long>(candidate);
    std::vector<MPI_Request> reqs;
    for (int r = 0; r < n; ++r) {
      if (r == me) continue;
      MPI_Request a, b;
      MPI_Irecv(&all[4 * r], 4, MPI_LONG_LONG, p.world_rank_of(r), p.control_tag(), MPI_COMM_WORLD, &a);
      MPI_Isend(mine, 4, MPI_LONG_LONG, p.world_rank_of(r), p.control_tag(), MPI_COMM_WORLD, &b);
      reqs.push_back(a);
      reqs.push_back(b);
    }
    std::string error;
    if (!wait_requests(reqs, [&p] { return p.aborted(); }, &error)) {
      abandon(store);
      if (error.empty()) return ncclSuccess;
      p.set_error(ncclSystemError, "ncclCommSplit of '" + p.name() + "': " + error);
      return ncclSystemError;
    }
    if (color == NCCL_SPLIT_NOCOLOR) return ncclSuccess;
    std::vector<int> members;
    for (int r = 0; r < n; ++r)
      if (all[4 * r] == color) members.push_back(r);
    std::stable_sort(members.begin(), members.end(), [&](int a, int b) { return all[4 * a + 1] < all[4 * b + 1]; });
    std::vector<int> world;
    int new_rank = -1;
    for (size_t i = 0; i < members.size(); ++i) {
      world.push_back(static_cast<int>(all[4 * members[i] + 2]));
      if (members[i] == me) new_rank = static_cast<int>(i);
    }
    int root = members.front();
    auto child = std::make_shared<Comm>(new_rank, static_cast<int>(members.size()), &child_config, p.device());
    child->set_identity(world, tag_for(static_cast<int>(all[4 * root + 2]), static_cast<uint64_t>(all[4 * root + 3])));
    if (!child->blocking()) child->start_progress(nullptr);
    *newcomm = wrap(child);  // written from this job's thread, before the parent settles
    return ncclSuccess;
  };
  return parent->run_job(job);
}

ncclResult_t ncclCommGetAsyncError(ncclComm_t comm, ncclResult_t* asyncError) {
  auto c = resolve(comm, "ncclCommGetAsyncError");
  if (!c || asyncError == nullptr) return ncclInvalidArgument;
  *asyncError = c->poll();
  return ncclSuccess;
}

ncclResult_t ncclCommFinalize(ncclComm_t comm) {
  if (unloading()) return ncclUnhandledCudaError;
  auto c = resolve(comm, "ncclCommFinalize");
  if (!c) return ncclInvalidArgument;
  if (ncclResult_t rc = ready(c, "ncclCommFinalize"); rc != ncclSuccess) return rc;
  // Flushes every issued operation: in progress until they have all finished.
  return c->run_job([](Comm& self) {
    while (self.outstanding() > 0 && !self.aborted()) sleep_for(1e-3);
    return ncclSuccess;
  });
}

ncclResult_t ncclCommDestroy(ncclComm_t comm) {
  if (comm == nullptr) return ncclSuccess;
  auto c = resolve(comm, "ncclCommDestroy");
  if (!c) return ncclInvalidArgument;
  retire(comm);
  // As NCCL's: an implicit finalize first (waits for the issued operations); a non-blocking
  // communicator finishes its teardown in the background and answers ncclInProgress.
  if (c->blocking()) {
    while (c->outstanding() > 0 && !c->aborted()) sleep_for(1e-3);
    return ncclSuccess;
  }
  std::thread([c] {
    while (c->outstanding() > 0 && !c->aborted()) sleep_for(1e-3);
  }).detach();
  return ncclInProgress;
}

ncclResult_t ncclCommAbort(ncclComm_t comm) {
  if (comm == nullptr) return ncclSuccess;
  auto c = resolve(comm, "ncclCommAbort");
  if (!c) return ncclInvalidArgument;
  retire(comm);
  c->abort();  // every operation of it on every stream ends now
  return c->blocking() ? ncclSuccess : ncclInProgress;  // non-blocking: torn down in the background
}

ncclResult_t ncclCommCount(const ncclComm_t comm, int* count) {
  auto c = resolve(comm, "ncclCommCount");
  if (!c || count == nullptr) return ncclInvalidArgument;
  *count = c->nranks();
  return ncclSuccess;
}

ncclResult_t ncclCommUserRank(const ncclComm_t comm, int* rank) {
  auto c = resolve(comm, "ncclCommUserRank");
  if (!c || rank == nullptr) return ncclInvalidArgument;
  *rank = c->rank();
  return ncclSuccess;
}

ncclResult_t ncclGroupStart(void) {
  group_start();
  return ncclSuccess;
}

ncclResult_t ncclGroupEnd(void) { return group_end(); }

ncclResult_t ncclSend(const void* sendbuff, size_t count, ncclDataType_t datatype, int peer, ncclComm_t comm,
                      cudaStream_t stream) {
  NcclOp o{NcclOp::Send, resolve(comm, "ncclSend")};
  o.src = sendbuff;
  o.count = count;
  o.type = datatype;
  o.peer = peer;
  return op(std::move(o), sendbuff, stream, "ncclSend");
}

ncclResult_t ncclRecv(void* recvbuff, size_t count, ncclDataType_t datatype, int peer, ncclComm_t comm,
                      cudaStream_t stream) {
  NcclOp o{NcclOp::Recv, resolve(comm, "ncclRecv")};
  o.dst = recvbuff;
  o.count = count;
  o.type = datatype;
  o.peer = peer;
  return op(std::move(o), recvbuff, stream, "ncclRecv");
}

ncclResult_t ncclAllReduce(const void* sendbuff, void* recvbuff, size_t count, ncclDataType_t datatype, ncclRedOp_t red,
                           ncclComm_t comm, cudaStream_t stream) {
  NcclOp o{NcclOp::AllReduce, resolve(comm, "ncclAllReduce")};
  o.src = sendbuff;
  o.dst = recvbuff;
  o.count = count;
  o.type = datatype;
  o.op = red;
  return op(std::move(o), sendbuff, stream, "ncclAllReduce");
}

}  // extern "C"

// NCCL groups in the simulator (see sim_group.h).
#include "sim/sim_group.h"

#include <map>
#include <memory>
#include <mutex>
#include <set>
#include <vector>

#include "sim/sim_stream.h"

namespace dpsgs::sim {

namespace {
struct Pending {
  NcclOp op;
  std::shared_ptr<Stream> stream;
};

struct Group {
  int depth = 0;
  std::vector<Pending> ops;
};

// Per thread and never destroyed: a thread-local destructor runs in the exiting thread while
// glibc may hand its TLS block to the next thread, a reuse ThreadSanitizer cannot see.
thread_local Group* tls_group_ptr = nullptr;
Group& group() {
  if (tls_group_ptr == nullptr) tls_group_ptr = new Group();
  return *tls_group_ptr;
}

std::mutex counts_mu;
std::map<std::string, std::map<std::string, long>>& counts() {
  static auto* c = new std::map<std::string, std::map<std::string, long>>();
  return *c;
}

// Puts each stream's share of `ops` on that stream, in call order.
void launch(const std::vector<Pending>& ops) {
  std::map<Stream*, std::pair<std::shared_ptr<Stream>, std::vector<NcclOp>>> by_stream;
  std::vector<Stream*> order;
  for (const auto& p : ops) {
    auto& slot = by_stream[p.stream.get()];
    if (!slot.first) {
      slot.first = p.stream;
      order.push_back(p.stream.get());
    }
    slot.second.push_back(p.op);
    p.op.comm->op_queued();
  }
  for (Stream* s : order) {
    auto& [stream, list] = by_stream[s];
    std::string what = list.size() == 1 ? list[0].what() : "NCCL group of " + std::to_string(list.size()) + " operations";
    stream->enqueue(StreamOp{what, true, [list = std::move(list)] {
                               run_ops(list);
                               for (const auto& op : list) op.comm->op_done();
                             }});
  }
}
}  // namespace

void group_start() { ++group().depth; }

ncclResult_t group_end() {
  if (group().depth == 0) return ncclInvalidUsage;
  if (--group().depth > 0) return ncclSuccess;
  std::vector<Pending> ops;
  ops.swap(group().ops);
  if (ops.empty()) return ncclSuccess;
  std::set<Comm*> seen;
  std::vector<std::shared_ptr<Comm>> comms;
  bool blocking = true;
  for (auto& p : ops)
    if (seen.insert(p.op.comm.get()).second) {
      comms.push_back(p.op.comm);
      blocking = blocking && p.op.comm->blocking();
    }
  if (blocking) {
    launch(ops);
    return ncclSuccess;
  }
  auto pending = std::make_shared<Launch>();
  pending->go = [ops = std::move(ops)] { launch(ops); };
  for (auto& c : comms) c->start_progress(pending);
  return ncclInProgress;
}

ncclResult_t submit(NcclOp op, cudaStream_t stream) {
  auto s = find_stream(stream);
  if (!s) {
    op.comm->note(op.what() + ": invalid CUDA stream");
    return ncclInvalidArgument;
  }
  {
    std::lock_guard<std::mutex> lock(counts_mu);
    const char* kind = op.kind == NcclOp::Send ? "ncclSend" : op.kind == NcclOp::Recv ? "ncclRecv" : "ncclAllReduce";
    ++counts()[op.comm->name()][kind];
  }
  group_start();
  group().ops.push_back(Pending{std::move(op), std::move(s)});
  return group_end();
}

std::map<std::string, std::map<std::string, long>> submitted() {
  std::lock_guard<std::mutex> lock(counts_mu);
  return counts();
}

}  // namespace dpsgs::sim

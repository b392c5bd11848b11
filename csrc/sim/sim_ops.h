// The simulated NCCL operations (send, recv, all-reduce) as a stream's worker runs them,
// over MPI point-to-point on MPI_COMM_WORLD with each communicator's own tags.
#pragma once

#include <nccl.h>

#include <memory>
#include <string>
#include <vector>

#include "sim/sim_comm.h"

namespace dpsgs::sim {

struct NcclOp {
  enum Kind { Send, Recv, AllReduce } kind;
  std::shared_ptr<Comm> comm;
  const void* src = nullptr;
  void* dst = nullptr;
  size_t count = 0;
  ncclDataType_t type = ncclUint8;
  ncclRedOp_t op = ncclSum;
  int peer = -1;

  size_t bytes() const;
  std::string what() const;  // "ncclSend of 4096 bytes to rank 1 on 'dpsgs-chan-x'"
};

size_t type_size(ncclDataType_t type);  // 0 for an unknown type

// Runs one group's operations of one stream, on that stream's worker: the collectives
// first, in call order, then every send and receive at once (a group's p2p operations
// progress together, as NCCL's do). Honours abort, fault hooks and the send checks.
void run_ops(const std::vector<NcclOp>& ops);

}  // namespace dpsgs::sim

// NCCL groups in the simulator: operations collected between ncclGroupStart and
// ncclGroupEnd (an operation outside a group is a group of one), then launched together.
#pragma once

#include <nccl.h>

#include <map>
#include <string>

#include "sim/sim_ops.h"

namespace dpsgs::sim {

// Per calling thread, as NCCL's: nested starts count; the outermost end launches.
void group_start();
// Ends one level; at the outermost level launches what was collected: each stream gets one
// operation running its part of the group (sim_ops.h run_ops). Blocking communicators
// launch at once and answer ncclSuccess; non-blocking ones answer ncclInProgress and
// launch when the first of them turns ncclSuccess (sim_comm.h Comm::poll).
ncclResult_t group_end();
// Adds `op` to the current group (opening and closing one around it when none is open).
ncclResult_t submit(NcclOp op, cudaStream_t stream);

// How many operations of each kind ("ncclSend", ...) were submitted per communicator name,
// for tests of what dpsgs issues (e.g. which communicators connect() warms up).
std::map<std::string, std::map<std::string, long>> submitted();

}  // namespace dpsgs::sim

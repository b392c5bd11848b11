// Fault hooks of the simulator: a stream that stalls, an asynchronous error, an init that
// never completes. Each fires once, at the n-th NCCL operation (or init) of this process.
//
// Set from the environment (DPSGS_SIM_FAULT=stall:N | async_error:N | init_hang:N, read
// once) or from Python (dpsgs._C.sim.set_fault) on the ranks that should fail. What each
// must end in (the tests hold dpsgs to it):
// - stall: the operation never completes (its stream blocks in it until the communicator
//   is aborted): a wait on it ends in CommTimeout at its deadline, naming the operation;
// - async_error: ncclCommGetAsyncError reports ncclRemoteError ("simulated: connection to
//   the peer lost") and the operation does nothing: CommError naming NCCL's message;
// - init_hang: the communicator's bootstrap never completes (it stays ncclInProgress):
//   CommTimeout naming ncclCommInitRankConfig at the deadline.
#pragma once

#include <string>

namespace dpsgs::sim {

enum class Fault { None, Stall, AsyncError, InitHang };

// Arms `fault` to fire at the nth (1-based) event of its kind from now; Fault::None clears.
void set_fault(Fault fault, int nth);
// Called once per NCCL operation that starts on a stream: the fault to apply to it.
Fault next_op_fault();
// Called once per communicator bootstrap: true if it must never complete.
bool next_init_hangs();
// Parses "stall:3" etc.; throws std::invalid_argument naming the text.
void set_fault_from_text(const std::string& text);

}  // namespace dpsgs::sim

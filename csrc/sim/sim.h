// The CUDA/NCCL simulator (DPSGS_CUDA=sim): what it is for, what it shows and what it cannot.
//
// dpsgs's NCCL backend (csrc/cuda/) is compiled here against stand-ins of cuda_runtime.h
// and nccl.h (csrc/sim/include/) and runs on CPUs, unchanged, so CI executes the GPU code
// path. The stand-ins copy CUDA's and NCCL's semantics, not MPI's:
// - a stream is a worker thread running its queue in order (sim_stream.h); an event is a
//   position in a stream; cudaStreamWaitEvent enqueues a wait; every "kernel" (copy, memset,
//   NCCL operation) starts after a seeded random delay, so work that is not ordered by
//   streams and events races for real;
// - NCCL operations run on the issuing stream's worker over MPI (sim_comm.h, sim_ops.h): a
//   send completes only when its peer has received; a receive first fills its buffer with
//   poison (0xFF bytes: NaN in every float type), then writes the bytes after another
//   seeded random delay, so a consumer that reads before it waited on the right stream
//   sees poison;
// - non-blocking communicators answer ncclInProgress from init, split and group launches
//   and stay in progress for a few polls; their operations reach the streams only when the
//   communicator turns ncclSuccess, so an event recorded before that misses them;
// - every send buffer is checksummed when its operation starts on the stream and again
//   when the transfer is over (DPSGS_SIM_CHECK_SENDS, on by default): a buffer written,
//   reused or freed while its send was in flight is reported as an asynchronous error of
//   the communicator; memory freed through the simulator is poisoned first;
// - fault hooks (sim_faults.h): a stream that stalls, an asynchronous error, an init that
//   never completes.
// It cannot show: speed, bandwidth, NVLink/PCIe/network behaviour, kernel concurrency
// limits and the deadlocks they cause between communicators (the simulator runs every
// stream concurrently), CUDA kernel correctness (there are none), torch's own CUDA paths
// (the caching allocator, autograd's device threads, cuBLAS determinism), driver and
// toolkit mismatches, NCCL's own bugs and its environment variables, memory limits.
//
// Settings (environment, read once): DPSGS_SIM_SEED (0), DPSGS_SIM_DELAY_US (200: the
// largest random delay before a simulated kernel and before a receive writes),
// DPSGS_SIM_CHECK_SENDS (1), DPSGS_SIM_DEVICES (8; CUDA_VISIBLE_DEVICES wins where set),
// DPSGS_SIM_PROGRESS_POLLS (3: the most polls a non-blocking call stays in progress).
#pragma once

namespace dpsgs::sim {

// True once exit() has begun (the CUDA runtime then answers cudaErrorCudartUnloading).
bool unloading();

}  // namespace dpsgs::sim

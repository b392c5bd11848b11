// The torch backend's operations as non-blocking MPI calls over host buffers (no torch types).
#pragma once

#include <mpi.h>

#include <string>
#include <vector>

#include "common/buffer.h"

namespace dpsgs {

// Reductions of torch.distributed's ReduceOp that MPI does itself (AVG is SUM then a division,
// done by the caller; float16/bfloat16 MIN/MAX/PRODUCT are upcast by the caller).
enum class RedOp { Sum, Min, Max, Product };
RedOp parse_red_op(const std::string& name);
const char* red_op_name(RedOp op);
// MPI_Op for `op` on `dtype` (bool: SUM/MAX are MPI_LOR, MIN/PRODUCT MPI_LAND); ValueError
// for a pair MPI cannot reduce (float16/bfloat16 with anything but SUM).
MPI_Op mpi_red_op(RedOp op, DType dtype, const std::string& where);

// One operation, described so that start_op() can issue it and describe() name it.
// Byte counts and displacements (alltoall, allgather) are ints: MPI's counts are.
struct OpSpec {
  enum class Kind { Allreduce, Broadcast, Allgather, ReduceScatter, Alltoall, Reduce, Gather, Scatter, Barrier,
                    Send, Recv };
  Kind kind = Kind::Barrier;
  Buffer send;             // allgather/reduce-scatter/alltoall/gather/scatter(root)/send input
  Buffer recv;             // allreduce/broadcast/reduce (in place), outputs (gather: root's), recv target
  RedOp red = RedOp::Sum;  // allreduce, reduce-scatter, reduce
  int peer = -1;           // broadcast/reduce/gather/scatter root, send/recv peer
  int tag = 0;             // send/recv
  bool ring = false;       // allreduce by the core's ring (run on the engine thread)
  bool in_place = false;   // allgather: the input is this rank's block of the output (MPI_IN_PLACE)
  std::vector<int> send_counts, send_displs;  // alltoall, scatter (root): bytes
  std::vector<int> recv_counts, recv_displs;  // alltoall/allgather/gather (root): bytes; reduce-scatter: elements

  bool is_p2p() const { return kind == Kind::Send || kind == Kind::Recv; }
};

const char* kind_name(OpSpec::Kind kind);

// Checks the spec against a communicator of `size` ranks (ValueError naming `where`).
void check_op(const OpSpec& spec, int rank, int size, const std::string& where);

// MPI forbids a collective's input to overlap its output; torch allows it (FSDP2 gathers into
// an output whose block for this rank is the input). After check_op: an all-gather whose input
// is exactly this rank's block runs in place (MPI_IN_PLACE); any other overlap gets a private
// copy of the input, made now, which the returned owner keeps alive with `owner`.
Owner unalias(OpSpec& spec, int rank, Owner owner);

// Issues the non-blocking MPI call of `spec` (not a ring all-reduce) on `comm`; returns its
// request. MPI errors raise CommError naming the call, `rank` and the peer.
MPI_Request start_op(const OpSpec& spec, MPI_Comm comm, int rank);

}  // namespace dpsgs

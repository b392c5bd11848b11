// The torch backend's operations: reduction ops, argument checks, and each as one MPI_I* call.
#include "collectives.h"

#include <climits>
#include <memory>
#include <numeric>
#include <utility>
#include <vector>

#include "common/error.h"
#include "mpi_backend.h"

namespace dpsgs {

RedOp parse_red_op(const std::string& name) {
  if (name == "sum") return RedOp::Sum;
  if (name == "min") return RedOp::Min;
  if (name == "max") return RedOp::Max;
  if (name == "product") return RedOp::Product;
  throw ValueError("unknown reduction '" + name + "' (choose sum, min, max or product)");
}

const char* red_op_name(RedOp op) {
  switch (op) {
    case RedOp::Sum: return "sum";
    case RedOp::Min: return "min";
    case RedOp::Max: return "max";
    case RedOp::Product: return "product";
  }
  return "?";
}

const char* kind_name(OpSpec::Kind kind) {
  switch (kind) {
    case OpSpec::Kind::Allreduce: return "all-reduce";
    case OpSpec::Kind::Broadcast: return "broadcast";
    case OpSpec::Kind::Allgather: return "all-gather";
    case OpSpec::Kind::ReduceScatter: return "reduce-scatter";
    case OpSpec::Kind::Alltoall: return "all-to-all";
    case OpSpec::Kind::Reduce: return "reduce";
    case OpSpec::Kind::Gather: return "gather";
    case OpSpec::Kind::Scatter: return "scatter";
    case OpSpec::Kind::Barrier: return "barrier";
    case OpSpec::Kind::Send: return "send";
    case OpSpec::Kind::Recv: return "recv";
  }
  return "?";
}

MPI_Op mpi_red_op(RedOp op, DType dtype, const std::string& where) {
  if (op == RedOp::Sum && dtype != DType::Bool) return mpi_sum_op(dtype);  // float16/bfloat16 via float32
  if (dtype == DType::Bool) return (op == RedOp::Sum || op == RedOp::Max) ? MPI_LOR : MPI_LAND;
  DPSGS_CHECK_ARG(dtype != DType::Float16 && dtype != DType::BFloat16, where, ": ", red_op_name(op), " of ",
                  dtype_name(dtype), " is done in float32 by the caller");
  switch (op) {
    case RedOp::Min: return MPI_MIN;
    case RedOp::Max: return MPI_MAX;
    case RedOp::Product: return MPI_PROD;
    case RedOp::Sum: break;
  }
  return MPI_SUM;
}

namespace {

int as_int(size_t n, const std::string& where, const char* what) {
  DPSGS_CHECK_ARG(n <= size_t(INT_MAX), where, ": ", what, " of ", n, " exceeds MPI's int count");
  return int(n);
}

size_t sum_of(const std::vector<int>& v) { return std::accumulate(v.begin(), v.end(), size_t(0)); }

void check_layout(const std::vector<int>& counts, const std::vector<int>& displs, size_t bytes, int size,
                  const std::string& where, const char* side) {
  DPSGS_CHECK_ARG(counts.size() == size_t(size) && displs.size() == size_t(size), where, ": ", side,
                  " needs one count and displacement per rank (", size, "), got ", counts.size(), " and ",
                  displs.size());
  for (int r = 0; r < size; ++r)
    DPSGS_CHECK_ARG(counts[r] >= 0 && displs[r] >= 0 && size_t(displs[r]) + size_t(counts[r]) <= bytes, where,
                    ": ", side, " block for rank ", r, " (", counts[r], " bytes at ", displs[r],
                    ") lies outside its ", bytes, "-byte buffer");
}

void check_root(int root, int size, const std::string& where) {
  DPSGS_CHECK_ARG(root >= 0 && root < size, where, ": root ", root, " is not a rank of ", size);
}

// A rooted gather's output or scatter's input at the root: one block per rank, the root's own
// as large as its other buffer (`own_bytes`).
void check_root_blocks(const std::vector<int>& counts, const std::vector<int>& displs, size_t bytes,
                       size_t own_bytes, int rank, int size, const std::string& where, const char* side) {
  check_layout(counts, displs, bytes, size, where, side);
  DPSGS_CHECK_ARG(size_t(counts[rank]) == own_bytes, where, ": the root's own block of the ", side, " holds ",
                  counts[rank], " bytes, its other buffer ", own_bytes);
}

}  // namespace

void check_op(const OpSpec& s, int rank, int size, const std::string& where) {
  using K = OpSpec::Kind;
  for (const Buffer* b : {&s.send, &s.recv})
    DPSGS_CHECK_ARG(b->device == Device::CPU, where, ": CUDA buffer given to the MPI backend");
  switch (s.kind) {
    case K::Allreduce:
      as_int(s.recv.numel(), where, "element count");
      mpi_red_op(s.red, s.recv.dtype, where);
      break;
    case K::Broadcast:
      check_root(s.peer, size, where);
      as_int(s.recv.bytes, where, "byte count");
      break;
    case K::Allgather:
      check_layout(s.recv_counts, s.recv_displs, s.recv.bytes, size, where, "output");
      DPSGS_CHECK_ARG(size_t(s.recv_counts[rank]) == s.send.bytes, where, ": this rank sends ", s.send.bytes,
                      " bytes but its block of the output holds ", s.recv_counts[rank]);
      break;
    case K::ReduceScatter: {
      DPSGS_CHECK_ARG(s.recv_counts.size() == size_t(size), where, ": one output count per rank (", size,
                      ") needed, got ", s.recv_counts.size());
      DPSGS_CHECK_ARG(s.send.dtype == s.recv.dtype, where, ": input ", dtype_name(s.send.dtype), " and output ",
                      dtype_name(s.recv.dtype), " differ");
      DPSGS_CHECK_ARG(sum_of(s.recv_counts) == s.send.numel() && size_t(s.recv_counts[rank]) == s.recv.numel(),
                      where, ": input of ", s.send.numel(), " elements does not split into the outputs (",
                      sum_of(s.recv_counts), " elements, this rank's ", s.recv_counts[rank], " vs ",
                      s.recv.numel(), ")");
      mpi_red_op(s.red, s.recv.dtype, where);
      break;
    }
    case K::Alltoall:
      check_layout(s.send_counts, s.send_displs, s.send.bytes, size, where, "input");
      check_layout(s.recv_counts, s.recv_displs, s.recv.bytes, size, where, "output");
      break;
    case K::Reduce:
      check_root(s.peer, size, where);
      as_int(s.recv.numel(), where, "element count");
      mpi_red_op(s.red, s.recv.dtype, where);
      break;
    case K::Gather:  // the root's output: one block per rank; the others have none
      check_root(s.peer, size, where);
      as_int(s.send.bytes, where, "byte count");
      if (rank == s.peer)
        check_root_blocks(s.recv_counts, s.recv_displs, s.recv.bytes, s.send.bytes, rank, size, where, "output");
      break;
    case K::Scatter:  // the root's input: one block per rank; the others have none
      check_root(s.peer, size, where);
      as_int(s.recv.bytes, where, "byte count");
      if (rank == s.peer)
        check_root_blocks(s.send_counts, s.send_displs, s.send.bytes, s.recv.bytes, rank, size, where, "input");
      break;
    case K::Send:
    case K::Recv:
      DPSGS_CHECK_ARG(s.peer >= 0 && s.peer < size, where, ": peer ", s.peer, " is not a rank of ", size);
      DPSGS_CHECK_ARG(s.tag >= 0, where, ": tag ", s.tag, " < 0");
      as_int((s.kind == K::Send ? s.send : s.recv).bytes, where, "byte count");
      break;
    case K::Barrier:
      break;
  }
}

Owner unalias(OpSpec& s, int rank, Owner owner) {
  using K = OpSpec::Kind;
  if (s.kind != K::Allgather && s.kind != K::ReduceScatter && s.kind != K::Alltoall && s.kind != K::Gather &&
      s.kind != K::Scatter)
    return owner;
  const auto* in = static_cast<const char*>(s.send.ptr);
  const auto* out = static_cast<const char*>(s.recv.ptr);
  if (s.send.bytes == 0 || s.recv.bytes == 0 || in + s.send.bytes <= out || out + s.recv.bytes <= in)
    return owner;  // disjoint
  if (s.kind == K::Allgather && in == out + s.recv_displs[rank]) {
    s.in_place = true;  // check_op: the block holds exactly send.bytes
    return owner;
  }
  auto copy = std::make_shared<std::vector<char>>(in, in + s.send.bytes);
  s.send.ptr = copy->data();
  return std::make_shared<std::pair<Owner, std::shared_ptr<std::vector<char>>>>(std::move(owner), copy);
}

MPI_Request start_op(const OpSpec& s, MPI_Comm comm, int rank) {
  using K = OpSpec::Kind;
  MPI_Request req = MPI_REQUEST_NULL;
  switch (s.kind) {
    case K::Allreduce:
      DPSGS_CHECK_MPI(MPI_Iallreduce(MPI_IN_PLACE, s.recv.ptr, int(s.recv.numel()), mpi_datatype(s.recv.dtype),
                                     mpi_red_op(s.red, s.recv.dtype, ""), comm, &req), rank, kNoPeer);
      break;
    case K::Broadcast:
      DPSGS_CHECK_MPI(MPI_Ibcast(s.recv.ptr, int(s.recv.bytes), MPI_BYTE, s.peer, comm, &req), rank, s.peer);
      break;
    case K::Allgather:
      DPSGS_CHECK_MPI(MPI_Iallgatherv(s.in_place ? MPI_IN_PLACE : s.send.ptr, int(s.send.bytes), MPI_BYTE, s.recv.ptr,
                                      s.recv_counts.data(), s.recv_displs.data(), MPI_BYTE, comm, &req),
                      rank, kNoPeer);
      break;
    case K::ReduceScatter:
      DPSGS_CHECK_MPI(MPI_Ireduce_scatter(s.send.ptr, s.recv.ptr, s.recv_counts.data(), mpi_datatype(s.recv.dtype),
                                          mpi_red_op(s.red, s.recv.dtype, ""), comm, &req), rank, kNoPeer);
      break;
    case K::Alltoall:
      DPSGS_CHECK_MPI(MPI_Ialltoallv(s.send.ptr, s.send_counts.data(), s.send_displs.data(), MPI_BYTE, s.recv.ptr,
                                     s.recv_counts.data(), s.recv_displs.data(), MPI_BYTE, comm, &req),
                      rank, kNoPeer);
      break;
    case K::Reduce: {  // in place at the root; the others' buffers are only read
      const bool root = rank == s.peer;
      DPSGS_CHECK_MPI(MPI_Ireduce(root ? MPI_IN_PLACE : s.recv.ptr, root ? s.recv.ptr : nullptr,
                                  int(s.recv.numel()), mpi_datatype(s.recv.dtype),
                                  mpi_red_op(s.red, s.recv.dtype, ""), s.peer, comm, &req), rank, s.peer);
      break;
    }
    case K::Gather:
      DPSGS_CHECK_MPI(MPI_Igatherv(s.send.ptr, int(s.send.bytes), MPI_BYTE, s.recv.ptr, s.recv_counts.data(),
                                   s.recv_displs.data(), MPI_BYTE, s.peer, comm, &req), rank, s.peer);
      break;
    case K::Scatter:
      DPSGS_CHECK_MPI(MPI_Iscatterv(s.send.ptr, s.send_counts.data(), s.send_displs.data(), MPI_BYTE, s.recv.ptr,
                                    int(s.recv.bytes), MPI_BYTE, s.peer, comm, &req), rank, s.peer);
      break;
    case K::Barrier:
      DPSGS_CHECK_MPI(MPI_Ibarrier(comm, &req), rank, kNoPeer);
      break;
    case K::Send:
      DPSGS_CHECK_MPI(MPI_Isend(s.send.ptr, int(s.send.bytes), MPI_BYTE, s.peer, s.tag, comm, &req), rank, s.peer);
      break;
    case K::Recv:
      DPSGS_CHECK_MPI(MPI_Irecv(s.recv.ptr, int(s.recv.bytes), MPI_BYTE, s.peer, s.tag, comm, &req), rank, s.peer);
      break;
  }
  return req;
}

}  // namespace dpsgs

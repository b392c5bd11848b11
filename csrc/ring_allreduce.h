// Host all-reduce as a chunked, pipelined ring reduce-scatter + all-gather over MPI point-to-point.
#pragma once

#include <mpi.h>

#include <cstddef>
#include <functional>
#include <string>

#include "common/buffer.h"

namespace dpsgs {

class Communicator;

struct RingOptions {
  size_t chunk_bytes = 512 * 1024;  // pipeline grain: transfer of chunk i+1 overlaps reduction of chunk i
  int window = 4;                   // receives posted ahead (scratch = window * chunk_bytes)
};

// In-place sum over all ranks of `comm` (the caller's Communicator's size/rank), divided by
// `divisor` in the same pass as the last reduction. Every rank must call it with the same
// count, dtype and options, in the same order relative to other operations on `comm`.
// All ranks end with bit-identical results. Polls politely; throws CommTimeout naming the
// neighbour it was waiting for after c.timeout() seconds.
void ring_allreduce(const Communicator& c, MPI_Comm comm, const Buffer& buf, int divisor,
                    const RingOptions& opt, const std::function<std::string()>& what);

}  // namespace dpsgs

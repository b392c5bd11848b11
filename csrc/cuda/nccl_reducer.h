// NcclReducer: ordered, asynchronous in-place all-reduce (ncclAvg / ncclSum) of device buffers.
#pragma once

#include <memory>

#include "common/buffer.h"
#include "cuda/nccl_backend.h"
#include "cuda/nccl_work.h"

namespace dpsgs {

// Each allreduce() records an event on the caller's stream (the gradients are final there),
// queues ncclAllReduce on the communicator's stream via the device's issuing thread, and
// returns a Work. Buckets are therefore issued strictly in call order; the caller (the
// Python reducer) guarantees every rank calls in the same order. average=true uses ncclAvg
// (the mean, computed by NCCL in the buffer's dtype); bool is rejected. On a communicator of
// one rank nothing is issued, and the Work completes with the buffer's producer stream.
class NcclReducer {
 public:
  explicit NcclReducer(std::shared_ptr<NcclCommunicator> comm);
  std::shared_ptr<NcclWork> allreduce(const Buffer& buf, Owner owner, bool average = true);
  uint64_t issued() const { return count_; }

 private:
  std::shared_ptr<NcclCommunicator> comm_;
  uint64_t count_ = 0;
};

}  // namespace dpsgs

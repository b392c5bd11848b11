// NcclReducer: all-reduce queued on the device's issuing thread (see nccl_reducer.h).
#include "cuda/nccl_reducer.h"

#include "cuda/cuda_check.h"

namespace dpsgs {

NcclReducer::NcclReducer(std::shared_ptr<NcclCommunicator> comm) : comm_(std::move(comm)) {
  DPSGS_CHECK_ARG(comm_ != nullptr, "NcclReducer: communicator is None");
  comm_->will_allreduce();  // connect() then warms the all-reduce up (made after it: lazily, on first use)
}

std::shared_ptr<NcclWork> NcclReducer::allreduce(const Buffer& buf, Owner owner, bool average) {
  int rank = comm_->rank(), device = comm_->device();
  DPSGS_CHECK_ARG(buf.device == Device::CUDA && buf.device_index == device, "NcclReducer.allreduce on rank ",
                  rank, ": buffer on ", buf.device == Device::CUDA ? "cuda:" + std::to_string(buf.device_index)
                                                                   : std::string("cpu"),
                  " but the NCCL communicator uses cuda:", device);
  DPSGS_CHECK_ARG(buf.dtype != DType::Bool, "NcclReducer.allreduce on rank ", rank, ": cannot reduce dtype bool");
  DPSGS_CHECK_ARG(comm_->connected(), "NcclReducer.allreduce on rank ", rank,
                  " before NcclCommunicator.connect(); call connect() on every rank first");
  if (comm_->closed()) throw CommError(str_cat("NcclReducer.allreduce on rank ", rank, " after its NcclCommunicator was closed"));
  uint64_t seq = count_++;
  auto work = std::make_shared<NcclWork>(str_cat(comm_->label(rank), ": NcclReducer allreduce #", seq, " (",
                                                 buf.bytes, " bytes over ", comm_->size(), " ranks)"),
                                         comm_->handle(), device, kNoPeer, std::move(owner));
  if (buf.bytes == 0) {
    work->mark_trivial();
    return work;
  }
  if (comm_->size() == 1) {
    // The mean over one rank is the buffer itself, ready when its producer is: the Work
    // completes with the producer's stream (a host or another stream reading it waits for that).
    DeviceGuard guard(device);
    work->done_event().record(reinterpret_cast<cudaStream_t>(buf.stream), rank, kNoPeer);
    work->mark_issued();
    return work;
  }
  auto ready = std::make_shared<CudaEvent>(device, rank);
  {
    DeviceGuard guard(device);
    ready->record(reinterpret_cast<cudaStream_t>(buf.stream), rank, kNoPeer);
  }
  ncclDataType_t type = nccl_dtype(buf.dtype);
  ncclRedOp_t op = average ? ncclAvg : ncclSum;
  void* ptr = buf.ptr;
  size_t count = buf.numel();
  cudaStream_t stream = comm_->stream();
  comm_->issuer().submit([handle = comm_->handle(), comm = comm_, work, ready, ptr, count, type, op, stream, rank] {
    try {
      DPSGS_CHECK_CUDA(cudaStreamWaitEvent(stream, ready->get(), 0), rank, kNoPeer);
      {
        auto guard = handle->lock("ncclAllReduce", kNoPeer);
        DPSGS_CHECK_NCCL(ncclAllReduce(ptr, ptr, count, type, op, handle->get(), stream), handle->get(), rank,
                         kNoPeer);
      }
      handle->settle("ncclAllReduce", kNoPeer);
      work->done_event().record(stream, rank, kNoPeer);
      work->mark_issued();
    } catch (...) {
      work->set_error(std::current_exception());
    }
  });
  return work;
}

}  // namespace dpsgs

// DeviceIssuer: the ONE thread that issues every NCCL call for a device, in submission order.
#pragma once

#include <condition_variable>
#include <deque>
#include <functional>
#include <memory>
#include <mutex>
#include <thread>

namespace dpsgs {

// Why one thread: NCCL kernels of different communicators on one GPU (pipeline p2p and the
// stage all-reduce) may not run concurrently, so every rank must launch them in the same
// order or the job can deadlock; and NCCL is not thread-safe per communicator. Funnelling
// every NCCL call of a device through one FIFO thread makes the launch order equal to the
// order the program called the backend, which the schedule keeps identical on every rank.
//
// Contract: tasks run one at a time in FIFO order with the device current; a task reports its
// own errors (it owns the Work it completes) and must not block on another rank except
// through a bounded wait. Shared by every NcclCommunicator on the device (for_device()).
class DeviceIssuer {
 public:
  explicit DeviceIssuer(int device);
  // Never blocks: the thread finishes the tasks already queued (each is bounded), then exits.
  // Not joining matters: a task may drop the last reference to a Python object and need the
  // GIL, which the destroying thread may hold.
  ~DeviceIssuer();
  DeviceIssuer(const DeviceIssuer&) = delete;
  DeviceIssuer& operator=(const DeviceIssuer&) = delete;

  // The process-wide issuer of `device`, created on first use, alive while anyone holds it.
  static std::shared_ptr<DeviceIssuer> for_device(int device);

  int device() const { return state_->device; }
  // Queues `task`; returns at once.
  void submit(std::function<void()> task);
  // Runs `task` on the issuing thread and waits for it (rethrows its exception). For short,
  // bounded NCCL calls (init, split, connect) that must keep the issue order too. Callers
  // must not hold the GIL (a queued task may need it).
  void run(const std::function<void()>& task);

 private:
  // Shared with the thread, so the thread may outlive this object (and may destroy it).
  struct State {
    int device;
    std::mutex mu;
    std::condition_variable cv;
    std::deque<std::function<void()>> tasks;
    bool stop = false;
    std::thread::id thread_id;
  };
  static void loop(std::shared_ptr<State> state);

  std::shared_ptr<State> state_;
};

}  // namespace dpsgs

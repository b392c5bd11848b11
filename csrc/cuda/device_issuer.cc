// DeviceIssuer: one FIFO issuing thread per CUDA device (see device_issuer.h).
#include "cuda/device_issuer.h"

#include <cuda_runtime.h>

#include <cstdio>
#include <exception>
#include <future>
#include <map>

namespace dpsgs {

DeviceIssuer::DeviceIssuer(int device) : state_(std::make_shared<State>()) {
  state_->device = device;
  std::thread thread(&DeviceIssuer::loop, state_);
  state_->thread_id = thread.get_id();
  thread.detach();  // lifetime is State's, see ~DeviceIssuer
}

DeviceIssuer::~DeviceIssuer() {
  {
    std::lock_guard<std::mutex> lock(state_->mu);
    state_->stop = true;
  }
  state_->cv.notify_all();
}

std::shared_ptr<DeviceIssuer> DeviceIssuer::for_device(int device) {
  static std::mutex registry_mu;
  static std::map<int, std::weak_ptr<DeviceIssuer>> registry;
  std::lock_guard<std::mutex> lock(registry_mu);
  auto issuer = registry[device].lock();
  if (!issuer) {
    issuer = std::make_shared<DeviceIssuer>(device);
    registry[device] = issuer;
  }
  return issuer;
}

void DeviceIssuer::submit(std::function<void()> task) {
  {
    std::lock_guard<std::mutex> lock(state_->mu);
    state_->tasks.push_back(std::move(task));
  }
  state_->cv.notify_one();
}

void DeviceIssuer::run(const std::function<void()>& task) {
  if (std::this_thread::get_id() == state_->thread_id) {  // already on the issuer: no self-wait
    task();
    return;
  }
  auto done = std::make_shared<std::promise<void>>();
  std::future<void> result = done->get_future();
  submit([&task, done] {
    try {
      task();
      done->set_value();
    } catch (...) {
      done->set_exception(std::current_exception());
    }
  });
  result.get();  // the task itself is bounded (it settles NCCL calls against a deadline)
}

void DeviceIssuer::loop(std::shared_ptr<State> state) {
  // Every task runs with this device current; a failure here surfaces in each task's own
  // CUDA/NCCL checks, which name the call.
  cudaError_t rc = cudaSetDevice(state->device);
  if (rc != cudaSuccess)
    std::fprintf(stderr, "[dpsgs] DeviceIssuer: cudaSetDevice(%d) failed: %s\n", state->device,
                 cudaGetErrorString(rc));
  for (;;) {
    std::function<void()> task;
    {
      std::unique_lock<std::mutex> lock(state->mu);
      state->cv.wait(lock, [&] { return state->stop || !state->tasks.empty(); });
      if (state->tasks.empty()) return;  // stopped and drained
      task = std::move(state->tasks.front());
      state->tasks.pop_front();
    }
    try {
      task();
    } catch (const std::exception& e) {  // tasks own their errors; this is a bug net only
      std::fprintf(stderr, "[dpsgs] DeviceIssuer(cuda:%d): task escaped with: %s\n", state->device, e.what());
    } catch (...) {
      std::fprintf(stderr, "[dpsgs] DeviceIssuer(cuda:%d): task escaped with an unknown error\n", state->device);
    }
  }
}

}  // namespace dpsgs

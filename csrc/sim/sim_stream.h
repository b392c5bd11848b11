// Simulated CUDA streams and events: a stream is a worker thread running its queue in
// order; an event is a position in a stream.
#pragma once

#include <atomic>
#include <chrono>
#include <condition_variable>
#include <cstdint>
#include <deque>
#include <functional>
#include <memory>
#include <mutex>
#include <string>

#include "sim/sim_settings.h"

namespace dpsgs::sim {

using Clock = std::chrono::steady_clock;

// What an event records: its generation count (one per cudaEventRecord) and, per
// generation, when it completed on its stream. An event never recorded is complete.
class EventState {
 public:
  explicit EventState(bool timing) : timing_(timing) {}
  uint64_t record();                      // a new generation; returns it
  void complete(uint64_t generation);     // the stream reached it
  bool done(uint64_t generation) const;
  bool done_all() const;                  // the last recorded generation is done
  // Blocks until `generation` is done or stop() returns true (checked every millisecond).
  void wait(uint64_t generation, const std::function<bool()>& stop);
  uint64_t last() const;
  bool timing() const { return timing_; }
  // Completion time of the last generation; false if it has not completed.
  bool completed_at(Clock::time_point* at) const;

 private:
  const bool timing_;
  mutable std::mutex mu_;
  std::condition_variable cv_;
  uint64_t recorded_ = 0, completed_ = 0;
  Clock::time_point at_{};
};

// One queued piece of work. `run` executes on the stream's worker thread; `delay` makes it
// start after the stream's next seeded random delay (a "kernel"), else at once (markers,
// waits).
struct StreamOp {
  std::string what;
  bool delay = true;
  std::function<void()> run;
};

class Stream : public std::enable_shared_from_this<Stream> {
 public:
  Stream(int device, uint64_t id);
  void start();  // starts the worker (after construction: it holds a shared_ptr)
  // Queues `op`; returns its position (1-based count of ops ever queued).
  uint64_t enqueue(StreamOp op);
  uint64_t enqueued() const;
  bool idle() const;  // everything queued so far has run
  void synchronize();
  // After cudaStreamDestroy: the worker drains the queue, then exits.
  void retire();
  int device() const { return device_; }
  uint64_t id() const { return id_; }
  // Name for messages: "sim stream 3 (cuda:0)".
  std::string name() const;
  // The op running now, for a stall's message ("" when idle).
  std::string running() const;

 private:
  static void loop(std::shared_ptr<Stream> self);

  const int device_;
  const uint64_t id_;
  Rng rng_;
  mutable std::mutex mu_;
  std::condition_variable cv_;       // work queued / retired
  std::condition_variable done_cv_;  // an op finished
  std::deque<StreamOp> queue_;
  uint64_t enqueued_ = 0, completed_ = 0;
  std::string running_;
  bool retired_ = false;
};

// Handle <-> object maps. Handles are never reused, so a destroyed or made-up handle is
// reported (cudaErrorInvalidResourceHandle) instead of touching freed memory.
// nullptr / cudaStreamLegacy / cudaStreamPerThread map to the current device's default
// stream (a worker like any other; the legacy stream's implicit synchronisation with
// blocking streams is not simulated).
std::shared_ptr<Stream> find_stream(const void* handle);
void* new_stream(int device);
bool destroy_stream(const void* handle);
void for_each_stream(int device, const std::function<void(Stream&)>& fn);

std::shared_ptr<EventState> find_event(const void* handle);
void* new_event(bool timing);
bool destroy_event(const void* handle);

// The calling thread's current device (0 until cudaSetDevice).
int current_device();
void set_current_device(int device);

}  // namespace dpsgs::sim

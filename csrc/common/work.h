// Async handle for one communication operation: is_completed(), wait(timeout).
#pragma once

#include <atomic>
#include <functional>
#include <condition_variable>
#include <exception>
#include <mutex>
#include <string>

#include "common/buffer.h"

namespace dpsgs {

// Contract: is_completed() never blocks; wait() blocks with polite backoff (never burns a core)
// until completion or its deadline, then throws CommTimeout naming describe(). A failed
// operation rethrows its error from both. Callers release the GIL around wait() (bindings do).
class Work {
 public:
  Work(double timeout_s, double warn_after_s) : timeout_s_(timeout_s), warn_after_s_(warn_after_s) {}
  virtual ~Work() = default;
  Work(const Work&) = delete;
  Work& operator=(const Work&) = delete;

  virtual bool is_completed() = 0;
  // Names the operation, this rank and the peer(s), e.g. "rank 0: Channel 'act' send #3 to rank 1".
  virtual std::string describe() const = 0;
  // timeout_s < 0: the communicator's timeout. 0: no deadline.
  virtual void wait(double timeout_s = -1.0);

  double timeout() const { return timeout_s_; }

 protected:
  double timeout_s_;
  double warn_after_s_;
};

// Work completed by another thread (the progress thread, an issuing thread): it calls
// set_done() or set_error() exactly once.
class StateWork : public Work {
 public:
  StateWork(std::string what, double timeout_s, double warn_after_s)
      : Work(timeout_s, warn_after_s), what_(std::move(what)) {}
  bool is_completed() override;
  std::string describe() const override { return what_; }
  // Blocks on a condition variable after a short spin: the waiter leaves the core to the
  // thread that completes the work.
  void wait(double timeout_s = -1.0) override;
  void set_done();
  void set_error(std::exception_ptr e);

 private:
  std::string what_;
  std::atomic<bool> done_{false};
  std::atomic<bool> failed_{false};
  std::mutex mu_;
  std::condition_variable cv_;
  std::exception_ptr error_;
};

// Already complete (zero-size transfers, world size 1, blocking small all-reduces).
// The description is formatted only if asked for.
class CompletedWork : public Work {
 public:
  explicit CompletedWork(std::string what) : Work(0, 0), what_([w = std::move(what)] { return w; }) {}
  explicit CompletedWork(std::function<std::string()> what) : Work(0, 0), what_(std::move(what)) {}
  bool is_completed() override { return true; }
  std::string describe() const override { return what_(); }

 private:
  std::function<std::string()> what_;
};

}  // namespace dpsgs

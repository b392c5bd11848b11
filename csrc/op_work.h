// OpWork: the Work of one OpEngine operation, with a completion callback run on a CompletionThread.
#pragma once

#include <atomic>
#include <condition_variable>
#include <deque>
#include <exception>
#include <functional>
#include <memory>
#include <mutex>
#include <string>
#include <thread>

#include "common/work.h"

namespace dpsgs {

class CompletionThread;
class OpEngine;

// The Work of one engine operation. Besides wait()/is_completed() (StateWork), a caller may
// register one callback, run once when the operation ends (nullptr: success, else its error)
// on the engine's completion thread, never on the thread that moves data: a callback may
// block (the Python bindings' takes the GIL to complete a torch Future) without delaying
// any transfer. Registered after the end, it runs at once on the registering thread.
class OpWork : public StateWork {
 public:
  using Callback = std::function<void(std::exception_ptr)>;
  OpWork(std::string what, double timeout_s, double warn_after_s, std::shared_ptr<CompletionThread> completions,
         std::weak_ptr<OpEngine> engine)
      : StateWork(std::move(what), timeout_s, warn_after_s), completions_(std::move(completions)),
        engine_(std::move(engine)) {}
  void on_complete(Callback cb);
  // The waiting thread drives the engine itself (OpEngine::drive) until the operation ends:
  // no hand-off to the engine thread, which costs a wake-up and a time slice on a full machine.
  void wait(double timeout_s = -1.0) override;
  // The engine ends the operation exactly once (error: nullptr for success).
  void finish(std::exception_ptr error);
  bool ended() const { return ended_flag_.load(std::memory_order_acquire); }

 private:
  std::mutex cb_mu_;
  bool ended_ = false;
  std::exception_ptr error_;
  Callback callback_;
  std::shared_ptr<CompletionThread> completions_;
  std::weak_ptr<OpEngine> engine_;
  std::atomic<bool> ended_flag_{false};
};

// One thread per engine that runs OpWork callbacks in completion order; started on first use.
class CompletionThread {
 public:
  ~CompletionThread() { stop(); }
  void post(std::function<void()> fn);
  void stop() noexcept;  // runs nothing more; joins the thread

 private:
  void loop();
  std::mutex mu_;
  std::condition_variable cv_;
  std::deque<std::function<void()>> queue_;
  bool stop_ = false;
  std::thread thread_;
};

}  // namespace dpsgs

// OpWork's completion callback and the CompletionThread that runs it.
#include "op_work.h"

#include <cstdio>

namespace dpsgs {

void OpWork::on_complete(Callback cb) {
  std::exception_ptr error;
  {
    std::lock_guard<std::mutex> lock(cb_mu_);
    if (!ended_) {
      callback_ = std::move(cb);
      return;
    }
    error = error_;
  }
  cb(error);  // already over: run here (the caller may hold the GIL; the callback takes it again)
}

void OpWork::finish(std::exception_ptr error) {
  if (error) set_error(error);
  else set_done();
  ended_flag_.store(true, std::memory_order_release);
  Callback cb;
  {
    std::lock_guard<std::mutex> lock(cb_mu_);
    ended_ = true;
    error_ = error;
    cb = std::move(callback_);
    callback_ = nullptr;
  }
  if (cb) completions_->post([cb = std::move(cb), error]() mutable {
    cb(error);
    cb = nullptr;  // drop what it holds here, on the thread that may take the GIL
  });
}

void CompletionThread::post(std::function<void()> fn) {
  {
    std::lock_guard<std::mutex> lock(mu_);
    if (stop_) return;  // shut down: nobody waits for callbacks any more
    queue_.push_back(std::move(fn));
    if (!thread_.joinable()) thread_ = std::thread([this] { loop(); });
  }
  cv_.notify_one();
}

void CompletionThread::loop() {
  for (;;) {
    std::function<void()> fn;
    {
      std::unique_lock<std::mutex> lock(mu_);
      cv_.wait(lock, [this] { return stop_ || !queue_.empty(); });
      if (stop_) return;
      fn = std::move(queue_.front());
      queue_.pop_front();
    }
    try {
      fn();
    } catch (const std::exception& e) {
      std::fprintf(stderr, "[dpsgs] completion callback failed: %s\n", e.what());
    } catch (...) {
      std::fprintf(stderr, "[dpsgs] completion callback failed (unknown error)\n");
    }
  }
}

void CompletionThread::stop() noexcept {
  std::deque<std::function<void()>> dropped;
  {
    std::lock_guard<std::mutex> lock(mu_);
    stop_ = true;
    dropped.swap(queue_);  // destroyed below, outside the lock
  }
  cv_.notify_all();
  if (thread_.joinable()) {
    if (thread_.get_id() == std::this_thread::get_id()) thread_.detach();
    else thread_.join();
  }
}

}  // namespace dpsgs

// Work: generic polite wait with deadline; StateWork completed by another thread.
#include "common/work.h"

#include <cstdio>

#include "common/backoff.h"

namespace dpsgs {


void Work::wait(double timeout_s) {
  double t = timeout_s < 0 ? timeout_s_ : timeout_s;
  poll_until([this] { return is_completed(); }, t, warn_after_s_, [this] { return describe(); });
}

bool StateWork::is_completed() {
  if (failed_.load(std::memory_order_acquire)) {
    std::lock_guard<std::mutex> lock(mu_);
    std::rethrow_exception(error_);
  }
  return done_.load(std::memory_order_acquire);
}

void StateWork::set_done() {
  {
    std::lock_guard<std::mutex> lock(mu_);
    done_.store(true, std::memory_order_release);
  }
  cv_.notify_all();
}

void StateWork::set_error(std::exception_ptr e) {
  {
    std::lock_guard<std::mutex> lock(mu_);
    error_ = std::move(e);
    failed_.store(true, std::memory_order_release);
  }
  cv_.notify_all();
}

void StateWork::wait(double timeout_s) {
  // Default deadline: a little after the completing thread's own (same timeout), so its
  // error — which names the exact peer it waited for — is the one the caller sees.
  double t = timeout_s < 0 ? (timeout_s_ > 0 ? timeout_s_ * 1.05 + 0.5 : 0.0) : timeout_s;
  auto finished = [this] { return done_.load(std::memory_order_acquire) || failed_.load(std::memory_order_acquire); };
  Backoff spin;
  while (!finished() && spin.elapsed() < 10e-6) {
  }
  if (!finished()) {
    auto start = Clock::now();
    auto at = [&](double s) { return start + std::chrono::duration_cast<Clock::duration>(std::chrono::duration<double>(s)); };
    bool warn = warn_after_s_ > 0 && (t <= 0 || warn_after_s_ < t);
    std::unique_lock<std::mutex> lock(mu_);
    // in slices: between them the waiter checks for an interrupt (outside the lock)
    for (double next = kInterruptCheckSeconds; !cv_.wait_until(lock, at(next), finished);
         next += kInterruptCheckSeconds) {
      double now = std::chrono::duration<double>(Clock::now() - start).count();
      if (warn && now >= warn_after_s_) {
        warn = false;
        std::fprintf(stderr, "[dpsgs] STALL: %s: still waiting after %.1f s\n", what_.c_str(), warn_after_s_);
        std::fflush(stderr);
      }
      if (t > 0 && now >= t) throw CommTimeout(timeout_message(what_, t));
      lock.unlock();
      check_interrupt();
      lock.lock();
    }
  }
  is_completed();  // rethrows a failure
}

}  // namespace dpsgs

// Polite polling: spin briefly, then yield, then sleep in growing steps; deadline + one stall warning.
#pragma once

#include <chrono>
#include <functional>
#include <string>

namespace dpsgs {

using Clock = std::chrono::steady_clock;

// One waiter's pause schedule. A wait that is answered within microseconds pays no sleep;
// a long wait costs a core nothing (4 ranks share 2 cores on small machines).
class Backoff {
 public:
  // yield_s: how long to stay runnable (sched_yield) before sleeping. Longer for waits that
  // need this thread's MPI progress to move data already in flight (large payloads).
  // spin_s: how long to re-test at full speed first.
  explicit Backoff(double yield_s = kDefaultYieldSeconds, double spin_s = kDefaultSpinSeconds)
      : start_(Clock::now()), yield_s_(yield_s), spin_s_(spin_s) {}
  static constexpr double kDefaultYieldSeconds = 1e-3;
  static constexpr double kDefaultSpinSeconds = 20e-6;
  // For a collective in progress on the progress thread: its MPI_Test calls move the data,
  // so re-test at full speed while chunks flow, then yield; a late peer gets sleeps.
  static constexpr double kTransferSpinSeconds = 200e-6;
  static constexpr double kTransferYieldSeconds = 2e-3;
  void pause();
  double elapsed() const { return std::chrono::duration<double>(Clock::now() - start_).count(); }

 private:
  Clock::time_point start_;
  double yield_s_, spin_s_;
  long sleep_ns_ = 1000;
  unsigned spins_ = 0;
};

// Calls done() until it returns true. After warn_after_s seconds prints one stall warning
// naming what(); after timeout_s throws CommTimeout("<what()> ... did not complete within T s").
// timeout_s <= 0 means no deadline. what() is only evaluated on the slow paths.
void poll_until(const std::function<bool()>& done, double timeout_s, double warn_after_s,
                const std::function<std::string()>& what, double yield_s = Backoff::kDefaultYieldSeconds,
                double spin_s = Backoff::kDefaultSpinSeconds);

// Waits that can last call check_interrupt() on the waiting thread every
// kInterruptCheckSeconds. The bindings install a check that raises Python's pending Ctrl-C
// (KeyboardInterrupt) on the main thread, so a job is interrupted in a wait instead of
// sitting in it until the deadline while its peers, already interrupted, end the job.
constexpr double kInterruptCheckSeconds = 0.1;
void set_interrupt_check(void (*check)());
void check_interrupt();

// Message text used for every timeout so they read alike.
std::string timeout_message(const std::string& what, double timeout_s);

}  // namespace dpsgs

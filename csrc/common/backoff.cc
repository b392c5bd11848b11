// Polite polling with deadline and stall warning (see backoff.h).
#include "common/backoff.h"

#include <sched.h>
#include <sys/prctl.h>
#include <time.h>

#include <atomic>
#include <cstdio>
#include <sstream>

#include "common/error.h"

namespace dpsgs {

namespace {
constexpr long kMaxSleepNs = 64000;      // then sleep, doubling up to 64 us
std::atomic<void (*)()> interrupt_check{nullptr};

// Default timer slack (50 us) would turn every short sleep into >= 50 us.
void tighten_timer_slack() {
  thread_local bool done = false;
  if (!done) {
    prctl(PR_SET_TIMERSLACK, 1000UL, 0, 0, 0);
    done = true;
  }
}
}  // namespace

void Backoff::pause() {
  ++spins_;
  if (spins_ < 64) return;  // cheap re-test without reading the clock
  double t = elapsed();
  if (t < spin_s_) return;  // answers within the spin time are caught at full speed
  if (t < yield_s_) {  // give the core away but stay runnable
    sched_yield();
    return;
  }
  tighten_timer_slack();
  timespec ts{0, sleep_ns_};
  nanosleep(&ts, nullptr);
  if (sleep_ns_ < kMaxSleepNs) sleep_ns_ *= 2;
}

void set_interrupt_check(void (*check)()) { interrupt_check.store(check); }

void check_interrupt() {
  if (auto check = interrupt_check.load()) check();
}

std::string timeout_message(const std::string& what, double timeout_s) {
  std::ostringstream os;
  os << what << " did not complete within " << timeout_s
     << " s (the peer may have died, be stuck, or not have issued the matching operation)";
  return os.str();
}

void poll_until(const std::function<bool()>& done, double timeout_s, double warn_after_s,
                const std::function<std::string()>& what, double yield_s, double spin_s) {
  if (done()) return;
  Backoff backoff(yield_s, spin_s);
  bool warned = false;
  unsigned n = 0;
  double next_check = kInterruptCheckSeconds;
  while (!done()) {
    backoff.pause();
    if ((++n & 63) != 0) continue;  // the clock only every 64 polls
    double t = backoff.elapsed();
    if (t >= next_check) {
      check_interrupt();
      next_check = t + kInterruptCheckSeconds;
    }
    if (!warned && warn_after_s > 0 && t >= warn_after_s) {
      warned = true;
      std::fprintf(stderr, "[dpsgs] STALL: %s: still waiting after %.1f s\n", what().c_str(), t);
      std::fflush(stderr);
    }
    if (timeout_s > 0 && t >= timeout_s) throw CommTimeout(timeout_message(what(), timeout_s));
  }
}

}  // namespace dpsgs

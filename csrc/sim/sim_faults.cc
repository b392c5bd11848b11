// Fault hooks (see sim_faults.h).
#include "sim/sim_faults.h"

#include <cstdlib>
#include <mutex>
#include <stdexcept>

namespace dpsgs::sim {

namespace {
struct Plan {
  std::mutex mu;
  Fault fault = Fault::None;
  int countdown = 0;  // events of its kind until it fires
  bool from_env_read = false;
};

Plan& plan() {
  static auto* p = new Plan();
  return *p;
}

void parse(const std::string& t, Fault* fault, int* nth) {
  size_t colon = t.find(':');
  std::string kind = t.substr(0, colon);
  *nth = colon == std::string::npos ? 1 : std::atoi(t.c_str() + colon + 1);
  if (*nth < 1) throw std::invalid_argument("sim fault '" + t + "': the count must be >= 1");
  if (kind == "stall") *fault = Fault::Stall;
  else if (kind == "async_error") *fault = Fault::AsyncError;
  else if (kind == "init_hang") *fault = Fault::InitHang;
  else throw std::invalid_argument("sim fault '" + t + "': expected stall:N, async_error:N or init_hang:N");
}

void read_env_locked(Plan& p) {
  if (p.from_env_read) return;
  p.from_env_read = true;
  const char* text = std::getenv("DPSGS_SIM_FAULT");
  if (text != nullptr && *text != '\0') parse(text, &p.fault, &p.countdown);
}

bool fire(Plan& p, bool init) {
  if (p.fault == Fault::None || (p.fault == Fault::InitHang) != init) return false;
  if (--p.countdown > 0) return false;
  return true;
}
}  // namespace

void set_fault(Fault fault, int nth) {
  auto& p = plan();
  std::lock_guard<std::mutex> lock(p.mu);
  p.from_env_read = true;
  p.fault = fault;
  p.countdown = nth;
}

void set_fault_from_text(const std::string& text) {
  Fault fault;
  int nth;
  parse(text, &fault, &nth);
  set_fault(fault, nth);
}

Fault next_op_fault() {
  auto& p = plan();
  std::lock_guard<std::mutex> lock(p.mu);
  read_env_locked(p);
  if (!fire(p, false)) return Fault::None;
  Fault f = p.fault;
  p.fault = Fault::None;
  return f;
}

bool next_init_hangs() {
  auto& p = plan();
  std::lock_guard<std::mutex> lock(p.mu);
  read_env_locked(p);
  if (!fire(p, true)) return false;
  p.fault = Fault::None;
  return true;
}

}  // namespace dpsgs::sim

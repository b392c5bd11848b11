// Simulator settings and seeded randomness (see sim_settings.h).
#include "sim/sim_settings.h"

#include <mpi.h>

#include <chrono>
#include <cstdlib>
#include <string>
#include <thread>

namespace dpsgs::sim {

namespace {
double env_double(const char* name, double fallback) {
  const char* v = std::getenv(name);
  return v && *v ? std::atof(v) : fallback;
}

Settings read_settings() {
  Settings s;
  s.seed = static_cast<uint64_t>(env_double("DPSGS_SIM_SEED", 0));
  s.max_delay_s = env_double("DPSGS_SIM_DELAY_US", 200) * 1e-6;
  s.check_sends = env_double("DPSGS_SIM_CHECK_SENDS", 1) != 0;
  s.max_progress_polls = std::max(1, static_cast<int>(env_double("DPSGS_SIM_PROGRESS_POLLS", 3)));
  s.devices = std::max(0, static_cast<int>(env_double("DPSGS_SIM_DEVICES", 8)));
  if (const char* cvd = std::getenv("CUDA_VISIBLE_DEVICES")) {
    // As CUDA: the entries before the first invalid one; "" hides every device.
    std::string list(cvd);
    int n = 0;
    size_t start = 0;
    while (start <= list.size() && !list.empty()) {
      size_t end = list.find(',', start);
      std::string item = list.substr(start, end == std::string::npos ? std::string::npos : end - start);
      if (item.empty() || item[0] == '-') break;
      ++n;
      if (end == std::string::npos) break;
      start = end + 1;
    }
    s.devices = n;
  }
  return s;
}
}  // namespace

const Settings& settings() {
  static const Settings* s = new Settings(read_settings());
  return *s;
}

Rng::Rng(uint64_t salt) {
  std::seed_seq seq{settings().seed, static_cast<uint64_t>(world_rank() + 1), salt};
  gen_.seed(seq);
}

double Rng::delay_s() {
  return std::uniform_real_distribution<double>(0.0, settings().max_delay_s)(gen_);
}

int Rng::progress_polls() { return std::uniform_int_distribution<int>(1, settings().max_progress_polls)(gen_); }

void sleep_for(double seconds) {
  if (seconds > 0) std::this_thread::sleep_for(std::chrono::duration<double>(seconds));
}

int world_rank() {
  int initialized = 0, finalized = 0;
  MPI_Initialized(&initialized);
  MPI_Finalized(&finalized);
  if (!initialized || finalized) return -1;
  int r = 0;
  MPI_Comm_rank(MPI_COMM_WORLD, &r);
  return r;
}

}  // namespace dpsgs::sim

// The simulator's settings (read once from the environment) and its seeded randomness.
#pragma once

#include <cstdint>
#include <random>

namespace dpsgs::sim {

struct Settings {
  uint64_t seed = 0;               // DPSGS_SIM_SEED
  double max_delay_s = 200e-6;     // DPSGS_SIM_DELAY_US
  bool check_sends = true;         // DPSGS_SIM_CHECK_SENDS
  int devices = 8;                 // CUDA_VISIBLE_DEVICES entries, else DPSGS_SIM_DEVICES
  int max_progress_polls = 3;      // DPSGS_SIM_PROGRESS_POLLS
  unsigned char poison = 0xFF;     // what unwritten received bytes and freed memory hold
};

const Settings& settings();

// A seeded generator per user (a stream, a communicator): same seed, rank and creation
// order give the same delays, so a failure can be replayed.
class Rng {
 public:
  explicit Rng(uint64_t salt);
  // Uniform in [0, settings().max_delay_s].
  double delay_s();
  // Uniform in [1, settings().max_progress_polls].
  int progress_polls();

 private:
  std::mt19937_64 gen_;
};

// Sleeps `seconds` (no-op for <= 0).
void sleep_for(double seconds);

// This process's rank in MPI_COMM_WORLD (-1 before MPI is initialised), for seeds and names.
int world_rank();

}  // namespace dpsgs::sim

// mpi_alive and the output drain before an abort (see mpi_lifecycle.h).
#include "common/mpi_lifecycle.h"

#include <mpi.h>
#include <sys/ioctl.h>
#include <sys/stat.h>

#include <chrono>
#include <cstdio>
#include <thread>

namespace dpsgs {

namespace {
constexpr auto kForwardGrace = std::chrono::milliseconds(200);  // proxy read -> mpirun wrote it

// Bytes in pipe fd not yet read by its reader; 0 when fd is not a pipe.
int unread_bytes(int fd) {
  struct stat st;
  if (fstat(fd, &st) != 0 || !S_ISFIFO(st.st_mode)) return 0;
  int n = 0;
  return ioctl(fd, FIONREAD, &n) == 0 ? n : 0;
}
}  // namespace

bool mpi_alive() {
  int init = 0, fin = 0;
  MPI_Initialized(&init);
  MPI_Finalized(&fin);
  return init && !fin;
}

#ifdef DPSGS_COVERAGE
extern "C" void __gcov_dump(void);
#endif

void wait_for_output_drain(double drain_s) {
#ifdef DPSGS_COVERAGE
  __gcov_dump();  // scripts/sim-checks.sh coverage: the MPI_Abort that follows skips the exit handlers
#endif
  std::fflush(stdout);
  std::fflush(stderr);
  const auto deadline = std::chrono::steady_clock::now() + std::chrono::duration<double>(drain_s);
  while ((unread_bytes(1) > 0 || unread_bytes(2) > 0) && std::chrono::steady_clock::now() < deadline)
    std::this_thread::sleep_for(std::chrono::milliseconds(10));
  std::this_thread::sleep_for(kForwardGrace);
}

void finalize_mpi() {
  if (!mpi_alive()) return;
  MPI_Finalize();  // errors: nothing is left to report them to; the process ends next
}

}  // namespace dpsgs

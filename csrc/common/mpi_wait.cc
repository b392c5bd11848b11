// wait_mpi_request: MPI_Test polling with backoff and a deadline (see mpi_wait.h).
#include "common/mpi_wait.h"

#include "common/error.h"

namespace dpsgs {

void wait_mpi_request(MPI_Request* req, int rank, int peer, double timeout_s, double warn_after_s,
                      const std::function<std::string()>& what, double yield_s, double spin_s) {
  poll_until(
      [&] {
        int flag = 0;
        DPSGS_CHECK_MPI(MPI_Test(req, &flag, MPI_STATUS_IGNORE), rank, peer);
        return flag != 0;
      },
      timeout_s, warn_after_s, what, yield_s, spin_s);
}

}  // namespace dpsgs

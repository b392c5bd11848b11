// Polite wait for one MPI request, with a deadline: the one implementation both backends use.
#pragma once

#include <mpi.h>

#include <functional>
#include <string>

#include "common/backoff.h"

namespace dpsgs {

// Tests `req` until it completes (backoff polling, see backoff.h); after warn_after_s prints
// one stall line naming what(); after timeout_s throws CommTimeout naming it. `rank`/`peer`
// name the sides in an MPI error. Cancels nothing on timeout.
void wait_mpi_request(MPI_Request* req, int rank, int peer, double timeout_s, double warn_after_s,
                      const std::function<std::string()>& what, double yield_s = Backoff::kDefaultYieldSeconds,
                      double spin_s = Backoff::kDefaultSpinSeconds);

}  // namespace dpsgs

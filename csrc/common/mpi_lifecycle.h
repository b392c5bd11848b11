// The process around MPI: is MPI usable, and ending the job without losing this rank's output.
#pragma once

namespace dpsgs {

// True between MPI_Init and MPI_Finalize: destructors that free MPI handles check it, since
// Python may tear objects down after mpi4py has finalized.
bool mpi_alive();

// Flushes stdio, then waits (at most drain_s) until mpirun's proxy has read everything this
// rank wrote to its stdout/stderr pipes. MPI_Abort kills the job at once, and a message still
// in the pipe (the one naming the dead peer) would be lost.
void wait_for_output_drain(double drain_s = 2.0);

// MPI_Finalize unless MPI is down already. Its caller releases the GIL first: MPI_Finalize
// waits for every rank (a PMI barrier), and a stopped peer would otherwise hold the Python
// thread that is meant to end this rank after a deadline (mpi4py's Finalize keeps the GIL).
void finalize_mpi();

}  // namespace dpsgs

// Seam to the simulator's Python face (csrc/bindings/sim_bindings.cc, compiled with -DDPSGS_CUDA_SIM).
#pragma once

#include <pybind11/pybind11.h>

namespace dpsgs {

#ifdef DPSGS_CUDA_SIM
// Adds the submodule `sim`: streams, events, copies and memory of the simulated device, and
// the fault hooks, for dpsgs.comm's simulated accelerator and the tests.
void bind_sim(pybind11::module_& m);
#endif

}  // namespace dpsgs

// pybind11 bindings of the MPI core classes (Communicator, Work, Channel, Reducer).
#pragma once

#include <pybind11/pybind11.h>

namespace dpsgs {

void bind_core(pybind11::module_& m);

}  // namespace dpsgs

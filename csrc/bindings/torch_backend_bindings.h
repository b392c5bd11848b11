// pybind11 bindings of what the torch.distributed backend uses: OpEngine, OpWork, MpiStore.
#pragma once

#include <pybind11/pybind11.h>

namespace dpsgs {

// Needs bind_core first (OpWork derives from the bound Work, the engine takes a Communicator).
void bind_torch_backend(pybind11::module_& m);

}  // namespace dpsgs

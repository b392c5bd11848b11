// Seam to the NCCL backend's bindings (csrc/bindings/nccl_bindings.cc, compiled with -DDPSGS_WITH_NCCL).
#pragma once

#include <pybind11/pybind11.h>

#include <string>

namespace dpsgs {

#ifdef DPSGS_WITH_NCCL
// Adds the NCCL classes/functions to the _C module. Defined in nccl_bindings.cc.
void bind_nccl(pybind11::module_& m);
// Version strings for build_info(), e.g. "2.27.3" and "13.0" (what the build compiled against).
std::string nccl_version();
std::string cuda_version();
#endif

}  // namespace dpsgs

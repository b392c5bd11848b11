// The dpsgs._C module: exceptions, build info, the MPI-library check, and the core classes.
#include <mpi.h>
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <string>

#include "bindings/core_bindings.h"
#include "bindings/nccl_bindings.h"
#include "bindings/sim_bindings.h"
#include "bindings/torch_backend_bindings.h"
#include "common/backoff.h"
#include "common/buffer.h"
#include "common/error.h"
#include "common/mpi_lifecycle.h"
#include "communicator.h"

namespace py = pybind11;

namespace dpsgs {

namespace {

std::string strip(std::string s) {
  while (!s.empty() && (s.back() == '\n' || s.back() == ' ' || s.back() == '\0' || s.back() == '\t')) s.pop_back();
  return s;
}

// The libmpi this extension linked; compared against mpi4py's at import.
std::string our_library_version() {
  char text[MPI_MAX_LIBRARY_VERSION_STRING + 1] = {0};
  int len = 0;
  MPI_Get_library_version(text, &len);
  return strip(std::string(text, size_t(len)));
}

void check_same_mpi() {
  std::string theirs = strip(py::module_::import("mpi4py.MPI").attr("Get_library_version")().cast<std::string>());
  std::string ours = our_library_version();
  if (theirs != ours) {
    throw py::import_error(
        "dpsgs._C was built against a different MPI library than the one mpi4py loaded; rebuild dpsgs "
        "(python setup.py build_ext --inplace) in this environment.\n--- dpsgs._C links:\n" + ours +
        "\n--- mpi4py uses:\n" + theirs);
  }
}

// The Python side's table of wire codes (dpsgs.comm.dtypes) must be this enum's.
void check_dtype_table() {
  py::dict python = py::module_::import("dpsgs.comm.dtypes").attr("WIRE_CODES");
  bool same = python.size() == size_t(kNumDTypes);
  for (int c = 0; same && c < kNumDTypes; ++c) {
    const char* name = dtype_name(static_cast<DType>(c));
    same = python.contains(name) && python[name].cast<int>() == c;
  }
  if (!same)
    throw py::import_error(str_cat("dpsgs._C: the dtype codes of dpsgs.comm.dtypes.WIRE_CODES differ from "
                                   "csrc/common/buffer.h's; rebuild dpsgs from one checkout"));
}

py::dict build_info() {
  py::dict d;
  std::string lib = our_library_version();
  d["mpi_library"] = lib.substr(0, lib.find('\n'));
  int major = 0, minor = 0;
  MPI_Get_version(&major, &minor);
  d["mpi_version"] = std::to_string(major) + "." + std::to_string(minor);
#ifdef DPSGS_CUDA_SIM
  d["cuda_simulated"] = true;  // the NCCL backend runs on the CPU stand-ins of csrc/sim/
#else
  d["cuda_simulated"] = false;
#endif
#ifdef DPSGS_WITH_NCCL
  d["nccl"] = true;
  d["nccl_version"] = nccl_version();
  d["cuda_version"] = cuda_version();
#else
  d["nccl"] = false;
  d["nccl_version"] = py::none();
  d["cuda_version"] = py::none();
#endif
  return d;
}

// The interrupt check of long waits (common/backoff.h): on Python's main thread, raise a
// pending Ctrl-C as KeyboardInterrupt out of the wait. Other threads never take the GIL here.
unsigned long python_main_thread = 0;

void raise_pending_signals() {
  if (PyThread_get_thread_ident() != python_main_thread || !Py_IsInitialized()) return;
  py::gil_scoped_acquire gil;
  if (PyErr_CheckSignals() != 0) throw py::error_already_set();
}

}  // namespace

}  // namespace dpsgs

PYBIND11_MODULE(_C, m) {
  using namespace dpsgs;
  m.doc() = "dpsgs communication core: Communicator, Channel, Reducer over MPI (and NCCL when built)";
  check_same_mpi();
  python_main_thread = py::module_::import("threading").attr("main_thread")().attr("ident").cast<unsigned long>();
  set_interrupt_check(&raise_pending_signals);

  // The error classes are Python's (dpsgs.comm.errors), so every backend raises the same ones.
  py::module_ errors = py::module_::import("dpsgs.comm.errors");
  static py::handle comm_error = py::object(errors.attr("CommError")).release();
  static py::handle comm_timeout = py::object(errors.attr("CommTimeout")).release();
  static py::handle header_mismatch = py::object(errors.attr("HeaderMismatch")).release();
  m.attr("CommError") = comm_error;
  m.attr("CommTimeout") = comm_timeout;
  m.attr("HeaderMismatch") = header_mismatch;
  py::register_exception_translator([](std::exception_ptr p) {
    try {
      if (p) std::rethrow_exception(p);
    } catch (const CommTimeout& e) {
      PyErr_SetString(comm_timeout.ptr(), e.what());
    } catch (const CommError& e) {
      PyErr_SetString(comm_error.ptr(), e.what());
    } catch (const HeaderMismatch& e) {
      PyErr_SetString(header_mismatch.ptr(), e.what());
    } catch (const ValueError& e) {
      PyErr_SetString(PyExc_ValueError, e.what());
    }
  });

  check_dtype_table();
  py::dict codes;  // this enum's codes, by name (dpsgs.comm.dtypes holds the same)
  for (int c = 0; c < kNumDTypes; ++c) codes[dtype_name(static_cast<DType>(c))] = c;
  m.attr("DTYPE_CODES") = codes;
  m.def("build_info", &build_info, "MPI library/version, whether NCCL is compiled in, NCCL/CUDA versions");
  m.def("mpi_library_version", &our_library_version, "MPI_Get_library_version of the libmpi this extension links");
  m.def("wait_for_output_drain", [](double drain_s) {
          py::gil_scoped_release nogil;
          wait_for_output_drain(drain_s);
        }, py::arg("drain_s") = 2.0,
        "flush stdio, then wait (bounded) until mpirun's proxy has read this rank's stdout/stderr pipes");
  m.def("finalize_mpi", [] {
          py::gil_scoped_release nogil;
          finalize_mpi();
        },
        "MPI_Finalize (unless MPI is down) with the GIL released, so a Python watchdog still runs");
  bind_core(m);
  bind_torch_backend(m);
#ifdef DPSGS_WITH_NCCL
  bind_nccl(m);
#endif
#ifdef DPSGS_CUDA_SIM
  bind_sim(m);
#endif
  // Stop progress threads before mpi4py finalizes MPI (atexit runs last-registered first).
  m.def("_shutdown", &shutdown_all_communicators, "stop every communicator's progress thread (atexit)");
  py::module_::import("atexit").attr("register")(m.attr("_shutdown"));
}

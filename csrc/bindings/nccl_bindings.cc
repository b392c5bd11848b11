// Bindings of the NCCL backend: NcclCommunicator, NcclChannel, NcclReducer, NcclWork.
// Compiled only with -DDPSGS_WITH_NCCL (setup.py adds it when CUDA and NCCL are found); this
// file is always in the source list, so everything is inside the guard.
#ifdef DPSGS_WITH_NCCL

#include "bindings/nccl_bindings.h"

#include <cuda_runtime.h>
#include <mpi.h>
#include <mpi4py/mpi4py.h>
#include <pybind11/stl.h>

#include <optional>
#include <tuple>
#include <vector>

#include "bindings/py_buffer.h"
#include "common/error.h"
#include "communicator.h"
#include "cuda/cuda_check.h"
#include "cuda/nccl_backend.h"
#include "cuda/nccl_channel.h"
#include "cuda/nccl_reducer.h"
#include "cuda/nccl_work.h"

namespace py = pybind11;

namespace dpsgs {

std::string nccl_version() { return nccl_version_string(); }
std::string cuda_version() { return cuda_runtime_version_string(); }

namespace {

// (ptr, nbytes, dtype_code, shape, device, stream): what dpsgs.nccl.describe() builds from a
// torch CUDA tensor or a CuPy array (device -1: locate the pointer). Contiguity was checked
// there; sizes, memory kind and device are checked here.
using Descriptor = std::tuple<uintptr_t, size_t, int, std::vector<int64_t>, int, uintptr_t>;

Buffer to_device_buffer(const Descriptor& d, const char* where) {
  Buffer b;
  b.ptr = reinterpret_cast<void*>(std::get<0>(d));
  b.bytes = std::get<1>(d);
  b.dtype = dtype_from_code(std::get<2>(d));
  b.shape = std::get<3>(d);
  b.device = Device::CUDA;
  b.device_index = std::get<4>(d);
  b.stream = std::get<5>(d);
  size_t numel = 1;
  for (int64_t s : b.shape) {
    DPSGS_CHECK_ARG(s >= 0, where, ": negative dimension in shape ", b.shape_string());
    numel *= size_t(s);
  }
  DPSGS_CHECK_ARG(numel * dtype_size(b.dtype) == b.bytes, where, ": descriptor says ", b.bytes, " bytes but shape ",
                  b.shape_string(), " of ", dtype_name(b.dtype), " needs ", numel * dtype_size(b.dtype));
  DPSGS_CHECK_ARG(b.bytes == 0 || b.ptr != nullptr, where, ": null pointer for ", b.bytes, " bytes");
  if (b.bytes > 0) {
    // Host memory handed to NCCL would fault on the GPU: say so here instead.
    cudaPointerAttributes attr{};
    DPSGS_CHECK_CUDA(cudaPointerGetAttributes(&attr, b.ptr), kNoPeer, kNoPeer);
    DPSGS_CHECK_ARG(attr.type == cudaMemoryTypeDevice || attr.type == cudaMemoryTypeManaged, where,
                    ": the pointer is not device memory (use the MPI Channel/Reducer for host arrays)");
    if (b.device_index < 0) b.device_index = attr.device;  // device -1: "where the memory is"
    DPSGS_CHECK_ARG(attr.device == b.device_index, where, ": the memory is on cuda:", attr.device,
                    " but the descriptor says cuda:", b.device_index);
  } else if (b.device_index < 0) {
    DPSGS_CHECK_CUDA(cudaGetDevice(&b.device_index), kNoPeer, kNoPeer);  // nothing to locate: current device
  }
  return b;
}

std::shared_ptr<NcclCommunicator> make_nccl_communicator(py::object comm, int device, std::optional<double> timeout,
                                                         double warn_after) {
  MPI_Comm raw = MPI_COMM_NULL;
  double t = timeout.value_or(300.0);
  if (py::isinstance<Communicator>(comm)) {
    auto core = comm.cast<std::shared_ptr<Communicator>>();
    raw = core->p2p();  // only read here: the NCCL backend makes its own duplicate
    if (!timeout) t = core->timeout();
  } else {
    MPI_Comm* c = PyMPIComm_Get(comm.ptr());
    if (c == nullptr) throw py::error_already_set();
    raw = *c;
  }
  DPSGS_CHECK_ARG(t >= 0, "NcclCommunicator: timeout must be >= 0 (0 = none), got ", t);
  py::gil_scoped_release nogil;  // construction waits (bounded) for every rank
  return NcclCommunicator::create(raw, device, t, warn_after);
}

}  // namespace

void bind_nccl(py::module_& m) {
  // mpi4py's C API table is per translation unit.
  if (import_mpi4py() < 0) throw py::error_already_set();

  m.def("cuda_device_count", &cuda_device_count, "CUDA devices visible to this process (0 without GPU/driver)");
  m.def("nccl_version", &nccl_version_string, "version of the libnccl loaded at run time");
  m.def("nccl_header_version", &nccl_header_version_string, "NCCL version the extension was compiled against");
  m.def("nccl_close_all", &close_all_nccl, py::call_guard<py::gil_scoped_release>(),
        "Close every live NcclCommunicator, newest first (run at interpreter exit, before CUDA's teardown)");
  // Python's atexit handlers run before the interpreter is torn down and before the C++/CUDA
  // runtime's own exit handlers: communicators then die while CUDA is alive.
  py::module_::import("atexit").attr("register")(m.attr("nccl_close_all"));

  py::class_<NcclWork, Work, std::shared_ptr<NcclWork>>(m, "NcclWork",
      "Handle of one NCCL operation; wait() blocks the host, wait_stream() only orders a CUDA stream.")
      .def("wait_stream", [](NcclWork& w, uintptr_t stream, std::optional<double> timeout) {
             py::gil_scoped_release nogil;
             w.wait_stream(stream, timeout ? *timeout : -1.0);
           }, py::arg("stream"), py::arg("timeout") = py::none(),
           "Make CUDA stream `stream` wait for this operation (the host waits only until it is issued).");

  py::class_<NcclCommunicator, std::shared_ptr<NcclCommunicator>>(m, "NcclCommunicator",
      "NCCL communicator over an mpi4py communicator or a dpsgs._C.Communicator, one GPU per rank "
      "(collective to create; the unique id travels over MPI).")
      .def(py::init(&make_nccl_communicator), py::arg("comm"), py::arg("device"), py::arg("timeout") = py::none(),
           py::arg("warn_after") = 60.0)
      .def_property_readonly("rank", &NcclCommunicator::rank)
      .def_property_readonly("size", &NcclCommunicator::size)
      .def_property_readonly("device", &NcclCommunicator::device)
      .def_property_readonly("timeout", &NcclCommunicator::timeout)
      .def_property_readonly("connected", &NcclCommunicator::connected)
      .def_property_readonly("stream", [](const NcclCommunicator& c) { return reinterpret_cast<uintptr_t>(c.stream()); },
                             "the collectives' CUDA stream (cudaStream_t as int)")
      .def("set_labels", &NcclCommunicator::set_labels, py::arg("labels"),
           "How messages name each rank of this communicator (one label per rank)")
      .def("label", &NcclCommunicator::label, py::arg("rank"))
      .def("split", &NcclCommunicator::split, py::arg("color"), py::arg("key"),
           py::call_guard<py::gil_scoped_release>(),
           "Collective: ncclCommSplit + MPI_Comm_split; None for color < 0.")
      .def("connect", &NcclCommunicator::connect, py::call_guard<py::gil_scoped_release>(),
           "Collective: warm up the all-reduce and every channel created on this communicator, in one NCCL group.")
      .def("synchronize", &NcclCommunicator::synchronize, py::call_guard<py::gil_scoped_release>())
      .def("close", &NcclCommunicator::close, py::call_guard<py::gil_scoped_release>(),
           "Collective: finalize and destroy this communicator and its channels' (bounded); idempotent")
      .def_property_readonly("closed", &NcclCommunicator::closed)
      .def("abort", [](NcclCommunicator& c, const std::string& why) {
             py::gil_scoped_release nogil;
             c.abort(why);
           }, py::arg("message"), "ncclCommAbort (bounded) this communicator; it is unusable afterwards")
      .def("__repr__", [](const NcclCommunicator& c) {
        return str_cat("<dpsgs._C.NcclCommunicator rank ", c.rank(), "/", c.size(), " cuda:", c.device(), ">");
      });

  py::class_<NcclChannel, std::shared_ptr<NcclChannel>>(m, "NcclChannel",
      "Directed, ordered channel of device arrays (ncclSend/ncclRecv; header over MPI).")
      .def(py::init([](std::shared_ptr<NcclCommunicator> comm, int peer, int tag, bool is_sender, std::string name) {
             py::gil_scoped_release nogil;  // the receiver waits (bounded) for the sender's unique id
             return std::make_shared<NcclChannel>(std::move(comm), peer, tag, is_sender, std::move(name));
           }),
           py::arg("comm"), py::arg("peer"), py::arg("tag"), py::arg("is_sender"), py::arg("name") = "")
      .def("send", [](NcclChannel& ch, const std::vector<Descriptor>& descs, py::object owner) {
             std::vector<Buffer> bufs;
             for (const Descriptor& d : descs) bufs.push_back(to_device_buffer(d, "NcclChannel.send"));
             Owner o = make_owner(std::move(owner));
             py::gil_scoped_release nogil;
             return ch.send(bufs, std::move(o));
           }, py::arg("descs"), py::arg("owner"),
           "Queue the message's ncclSends: descs, a list of (ptr, nbytes, dtype_code, shape, device, stream), "
           "one per array (1..MAX_MESSAGE_TENSORS, one stream); owner is kept alive until they complete.")
      .def("recv_into", [](NcclChannel& ch, const std::vector<Descriptor>& descs, py::object owner) {
             std::vector<Buffer> bufs;
             for (const Descriptor& d : descs) bufs.push_back(to_device_buffer(d, "NcclChannel.recv_into"));
             Owner o = make_owner(std::move(owner));
             py::gil_scoped_release nogil;
             return ch.recv_into(bufs, std::move(o));
           }, py::arg("descs"), py::arg("owner"),
           "Wait for the next header, check its count and each array against descs, queue the ncclRecvs.")
      .def_property_readonly("in_flight", [](NcclChannel& ch) {
             py::gil_scoped_release nogil;
             return ch.in_flight();
           })
      .def_property_readonly("sent", &NcclChannel::sent)
      .def_property_readonly("received", &NcclChannel::received)
      .def_property_readonly("peer", &NcclChannel::peer)
      .def_property_readonly("tag", &NcclChannel::tag)
      .def_property_readonly("name", &NcclChannel::name)
      .def_property_readonly("is_sender", &NcclChannel::is_sender)
      .def_property_readonly("stream", &NcclChannel::stream)
      .def("__repr__", [](const NcclChannel& ch) { return "<dpsgs._C." + ch.describe_end() + ">"; });

  py::class_<NcclReducer, std::shared_ptr<NcclReducer>>(m, "NcclReducer",
      "Ordered asynchronous in-place all-reduce of device arrays (ncclAvg), issued in call order.")
      .def(py::init([](std::shared_ptr<NcclCommunicator> comm) { return std::make_shared<NcclReducer>(std::move(comm)); }),
           py::arg("comm"))
      .def("allreduce", [](NcclReducer& r, const Descriptor& d, py::object owner, bool average) {
             Buffer b = to_device_buffer(d, "NcclReducer.allreduce");
             Owner o = make_owner(std::move(owner));
             py::gil_scoped_release nogil;
             return r.allreduce(b, std::move(o), average);
           }, py::arg("desc"), py::arg("owner"), py::arg("average") = true)
      .def_property_readonly("issued", &NcclReducer::issued);
}

}  // namespace dpsgs

#endif  // DPSGS_WITH_NCCL

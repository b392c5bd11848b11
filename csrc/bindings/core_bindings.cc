// Bindings of Communicator, Work, Channel, Reducer. Every blocking call releases the GIL.
#include "bindings/core_bindings.h"

#include <mpi.h>
#include <mpi4py/mpi4py.h>
#include <pybind11/stl.h>

#include <optional>
#include <vector>

#include "bindings/py_buffer.h"
#include "channel.h"
#include "common/message.h"
#include "common/error.h"
#include "communicator.h"
#include "reducer.h"
#include "common/work.h"

namespace py = pybind11;

namespace dpsgs {

namespace {

// The arrays of a message: a list or tuple (never a lone array, whose rows would iterate).
py::sequence message_items(py::handle message, const char* where, const Channel& ch) {
  DPSGS_CHECK_ARG(PyList_Check(message.ptr()) || PyTuple_Check(message.ptr()), ch.describe_end(), ": ", where,
                  ": a message is a list or tuple of arrays, got ",
                  std::string(py::str(py::type::of(message).attr("__name__"))));
  auto items = py::reinterpret_borrow<py::sequence>(message);
  check_message_length(items.size(), "got", [&] { return ch.describe_end(); });
  return items;
}

std::shared_ptr<Communicator> make_communicator(py::object comm, double timeout, double warn_after) {
  MPI_Comm* c = PyMPIComm_Get(comm.ptr());
  if (c == nullptr) throw py::error_already_set();
  int init = 0, fin = 0;
  MPI_Initialized(&init);
  MPI_Finalized(&fin);
  DPSGS_CHECK_ARG(init && !fin, "Communicator: MPI is not initialised (or already finalized)");
  DPSGS_CHECK_ARG(timeout >= 0, "Communicator: timeout must be >= 0 (0 = none), got ", timeout);
  MPI_Comm raw = *c;
  py::gil_scoped_release nogil;  // construction waits (bounded) for every rank
  return std::make_shared<Communicator>(raw, timeout, warn_after);
}

}  // namespace

void bind_core(py::module_& m) {
  m.attr("MAX_MESSAGE_TENSORS") = kMaxMessageTensors;
  // mpi4py's C API table is per translation unit: import it here, where PyMPIComm_Get is used.
  if (import_mpi4py() < 0) throw py::error_already_set();
  py::class_<Communicator, std::shared_ptr<Communicator>>(m, "Communicator",
      "Duplicate of an mpi4py communicator with a progress thread for collectives (collective to create).")
      .def(py::init(&make_communicator), py::arg("comm"), py::arg("timeout") = 300.0, py::arg("warn_after") = 60.0)
      .def_property_readonly("rank", &Communicator::rank)
      .def_property_readonly("size", &Communicator::size)
      .def_property("timeout", &Communicator::timeout, &Communicator::set_timeout)
      .def_property_readonly("warn_after", &Communicator::warn_after)
      .def("set_labels", &Communicator::set_labels, py::arg("labels"),
           "How messages name each rank of this communicator (one label per rank)")
      .def("label", &Communicator::label, py::arg("rank"))
      .def("split", &Communicator::split, py::arg("color"), py::arg("key"),
           py::call_guard<py::gil_scoped_release>(),
           "Collective: sub-communicator of the ranks with the same color (None for color < 0).")
      .def("barrier", &Communicator::barrier, py::call_guard<py::gil_scoped_release>())
      .def("abort", &Communicator::abort, py::arg("code"), py::arg("message"),
           "Print message on stderr and MPI_Abort the whole job.")
      .def("queued", &Communicator::queued, "collectives queued or running on the progress thread")
      .def("shutdown", &Communicator::shutdown, py::call_guard<py::gil_scoped_release>())
      .def("__repr__", [](const Communicator& c) {
        return str_cat("<dpsgs._C.Communicator rank ", c.rank(), "/", c.size(), " timeout ", c.timeout(), "s>");
      });

  py::class_<Work, std::shared_ptr<Work>>(m, "Work", "Handle of one asynchronous operation.")
      .def("is_completed", &Work::is_completed, py::call_guard<py::gil_scoped_release>())
      .def("wait", [](Work& w, std::optional<double> timeout) {
             if (w.is_completed()) return;  // cheap test first: no GIL round trip for finished work
             py::gil_scoped_release nogil;
             w.wait(timeout ? *timeout : -1.0);
           }, py::arg("timeout") = py::none(),
           "Wait (GIL released) until complete; CommTimeout names the operation and peer after the deadline.")
      .def_property_readonly("description", &Work::describe)
      .def("__repr__", [](Work& w) { return "<dpsgs._C.Work " + w.describe() + ">"; });

  py::class_<Channel, std::shared_ptr<Channel>>(m, "Channel",
      "Directed, ordered, double-buffered point-to-point queue between two ranks.")
      .def(py::init([](std::shared_ptr<Communicator> comm, int peer, int tag, bool is_sender, std::string name,
                       size_t capacity) {
             return std::make_shared<Channel>(std::move(comm), peer, tag, is_sender, std::move(name), capacity);
           }),
           py::arg("comm"), py::arg("peer"), py::arg("tag"), py::arg("is_sender"), py::arg("name") = "",
           py::arg("capacity") = kDefaultSlotCapacity)
      .def("send", [](Channel& ch, py::object message, std::optional<std::vector<std::optional<int>>> dtype_codes) {
             auto items = message_items(message, "Channel.send", ch);
             DPSGS_CHECK_ARG(!dtype_codes || dtype_codes->size() == items.size(), ch.describe_end(),
                             ": send: ", dtype_codes ? dtype_codes->size() : 0, " dtype codes for ", items.size(),
                             " arrays");
             std::vector<Buffer> bufs;
             std::vector<Owner> owners;
             bufs.reserve(items.size());
             owners.reserve(items.size());
             for (size_t i = 0; i < items.size(); ++i) {
               BufferRequest req;
               if (dtype_codes) req.dtype_code = (*dtype_codes)[i];
               req.allow_copy = true;  // non-contiguous: sent from a contiguous copy
               req.where = "Channel.send";
               auto [buf, owner] = to_buffer(items[i], req);
               bufs.push_back(std::move(buf));
               owners.push_back(std::move(owner));
             }
             py::gil_scoped_release nogil;
             return ch.send(bufs, std::move(owners));
           }, py::arg("message"), py::arg("dtype_codes") = py::none(),
           "Send a message: a list or tuple of 1..MAX_MESSAGE_TENSORS arrays (zero-copy above the inline "
           "size; non-contiguous input is copied); dtype_codes, one per array, override element types "
           "(bfloat16 as uint16). Blocks while 2 messages are in flight.")
      .def("recv", [](Channel& ch, std::optional<std::vector<std::pair<int, std::vector<int64_t>>>> specs) {
             std::optional<std::vector<TensorSpec>> expect;
             if (specs) {
               expect.emplace();
               for (auto& [code, shape] : *specs) expect->push_back({dtype_from_code(code), shape});
             }
             std::vector<Channel::Received> got;
             {
               py::gil_scoped_release nogil;
               got = ch.recv(expect);
             }
             py::list out;
             for (auto& r : got) out.append(numpy_view(r.ptr, r.dtype, r.shape, std::move(r.storage)));
             return out;
           }, py::arg("specs") = py::none(),
           "The next message as a list of writable NumPy views of the slot, valid until the next recv(); "
           "specs, a list of (dtype code, shape), is checked against it (HeaderMismatch).")
      .def_property_readonly("in_flight", [](Channel& ch) {
             py::gil_scoped_release nogil;
             return ch.in_flight();
           })
      .def_property_readonly("sent", &Channel::sent)
      .def_property_readonly("received", &Channel::received)
      .def_property_readonly("peer", &Channel::peer)
      .def_property_readonly("tag", &Channel::tag)
      .def_property_readonly("name", &Channel::name)
      .def_property_readonly("is_sender", &Channel::is_sender)
      .def("__repr__", [](const Channel& ch) { return "<dpsgs._C." + ch.describe_end() + ">"; });

  py::class_<Reducer, std::shared_ptr<Reducer>>(m, "Reducer",
      "Ordered asynchronous averaging all-reduce of host buffers (issued FIFO by the progress thread).")
      .def(py::init([](std::shared_ptr<Communicator> comm, const std::string& algorithm, size_t chunk_bytes,
                       size_t mpi_below_bytes, size_t caller_thread_below_bytes, size_t blocking_below_bytes) {
             ReducerOptions o;
             o.algorithm = parse_algorithm(algorithm);
             o.ring.chunk_bytes = chunk_bytes;
             o.mpi_below_bytes = mpi_below_bytes;
             o.caller_thread_below_bytes = caller_thread_below_bytes;
             o.blocking_below_bytes = blocking_below_bytes;
             return std::make_shared<Reducer>(std::move(comm), o);
           }),
           py::arg("comm"), py::arg("algorithm") = "auto", py::arg("chunk_bytes") = RingOptions().chunk_bytes,
           py::arg("mpi_below_bytes") = ReducerOptions().mpi_below_bytes,
           py::arg("caller_thread_below_bytes") = ReducerOptions().caller_thread_below_bytes,
           py::arg("blocking_below_bytes") = ReducerOptions().blocking_below_bytes)
      .def("allreduce", [](Reducer& r, py::object array, bool average, std::optional<int> dtype_code) {
             BufferRequest req;
             req.dtype_code = dtype_code;
             req.writable = true;
             req.where = "Reducer.allreduce";
             auto [buf, owner] = to_buffer(array, req);
             if (r.blocks(buf)) {
               py::gil_scoped_release nogil;  // a blocking MPI_Allreduce: let Python threads run
               return r.allreduce(buf, nullptr, average);
             }
             return r.allreduce(buf, std::move(owner), average);
           }, py::arg("array"), py::arg("average") = true, py::arg("dtype_code") = py::none(),
           "Queue an in-place all-reduce (mean when average) of a contiguous array; returns its Work.")
      .def("algorithm_for", [](Reducer& r, size_t nbytes) {
             Buffer b;
             b.bytes = nbytes;
             return std::string(algorithm_name(r.choose(b)));
           }, py::arg("nbytes"), "the algorithm 'auto' picks for a buffer of nbytes")
      .def("blocks_for", [](Reducer& r, size_t nbytes) {
             Buffer b;
             b.bytes = nbytes;
             return r.blocks(b);
           }, py::arg("nbytes"), "True when an all-reduce of nbytes runs as a blocking MPI_Allreduce "
           "(returns complete; the communicator's watchdog enforces the deadline)")
      .def_property_readonly("issued", &Reducer::issued)
      .def_property_readonly("algorithm", [](Reducer& r) { return std::string(algorithm_name(r.options().algorithm)); });
}

}  // namespace dpsgs

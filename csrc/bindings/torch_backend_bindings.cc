// Bindings of OpEngine (the torch backend's operations), OpWork (+ its completion callback)
// and MpiStore. Calls that wait release the GIL; callbacks take it on the completion thread.
#include "bindings/torch_backend_bindings.h"

#include <mpi.h>
#include <mpi4py/mpi4py.h>
#include <pybind11/stl.h>

#include <optional>
#include <string>
#include <vector>

#include "bindings/py_buffer.h"
#include "common/error.h"
#include "mpi_store.h"
#include "op_engine.h"

namespace py = pybind11;

namespace dpsgs {

namespace {

std::pair<Buffer, Owner> buffer_of(py::handle array, bool writable, std::optional<int> dtype_code,
                                   const char* where) {
  BufferRequest req;
  req.dtype_code = dtype_code;
  req.writable = writable;
  req.where = where;
  auto out = to_buffer(array, req);
  DPSGS_CHECK_ARG(out.first.device == Device::CPU, where, ": CUDA memory given to the MPI engine");
  return out;
}

// A rooted operation's buffer that only the root has (None elsewhere: no buffer, no owner).
std::pair<Buffer, Owner> root_buffer_of(py::handle array, bool writable, const char* where) {
  if (array.is_none()) return {Buffer{}, nullptr};
  return buffer_of(array, writable, std::nullopt, where);
}

// Both buffers must stay alive: one Owner holding the two.
Owner pair_owner(Owner a, Owner b) {
  return std::shared_ptr<void>(new std::pair<Owner, Owner>(std::move(a), std::move(b)),
                               [](void* p) { delete static_cast<std::pair<Owner, Owner>*>(p); });
}

// The Python exception an ended operation raised, as an instance (dpsgs.comm.errors' classes).
py::object python_error(std::exception_ptr e) {
  py::module_ errors = py::module_::import("dpsgs.comm.errors");
  try {
    std::rethrow_exception(e);
  } catch (const CommTimeout& x) {
    return errors.attr("CommTimeout")(x.what());
  } catch (const CommError& x) {
    return errors.attr("CommError")(x.what());
  } catch (const HeaderMismatch& x) {
    return errors.attr("HeaderMismatch")(x.what());
  } catch (const ValueError& x) {
    return py::module_::import("builtins").attr("ValueError")(x.what());
  } catch (const std::exception& x) {
    return py::module_::import("builtins").attr("RuntimeError")(x.what());
  }
}

OpWork::Callback python_callback(py::function fn) {
  Owner held = make_owner(std::move(fn));  // dropped under the GIL wherever the last copy goes
  return [held](std::exception_ptr e) {
    if (!Py_IsInitialized()) return;
    py::gil_scoped_acquire gil;
    try {
      py::object f = *static_cast<py::object*>(held.get());
      f(e ? python_error(e) : py::none());
    } catch (py::error_already_set& err) {
      err.discard_as_unraisable("dpsgs OpWork completion callback");
    }
  };
}

// Keeps the GIL: submit() never blocks, and it drops the owners of ended operations here.
std::shared_ptr<OpWork> submit(OpEngine& eng, OpSpec spec, Owner owner, bool wake) {
  return eng.submit(std::move(spec), std::move(owner), wake);
}

std::shared_ptr<MpiStore> make_store(py::object comm, double timeout) {
  MPI_Comm* c = PyMPIComm_Get(comm.ptr());
  if (c == nullptr) throw py::error_already_set();
  DPSGS_CHECK_ARG(timeout >= 0, "MpiStore: timeout must be >= 0 (0 = none), got ", timeout);
  MPI_Comm raw = *c;
  py::gil_scoped_release nogil;
  return std::make_shared<MpiStore>(raw, timeout);
}

}  // namespace

void bind_torch_backend(py::module_& m) {
  if (import_mpi4py() < 0) throw py::error_already_set();  // the C API table is per translation unit

  py::class_<OpWork, Work, std::shared_ptr<OpWork>>(m, "OpWork",
      "Work of one OpEngine operation; on_complete(fn) calls fn(None | error) once when it ends.")
      .def("on_complete", [](OpWork& w, py::function fn) { w.on_complete(python_callback(std::move(fn))); },
           py::arg("fn"),
           "Run fn(error or None) once when the operation ends, on the engine's completion thread "
           "(at once, here, if it has ended already).");

  py::class_<OpEngine, std::shared_ptr<OpEngine>>(m, "OpEngine",
      "Ordered non-blocking collectives and tagged send/recv over a Communicator (collective to create).")
      .def(py::init([](std::shared_ptr<Communicator> comm, size_t ring_from_bytes, size_t chunk_bytes, double probe_s) {
             EngineOptions o;
             o.ring_from_bytes = ring_from_bytes;
             o.ring.chunk_bytes = chunk_bytes;
             o.probe_s = probe_s;
             py::gil_scoped_release nogil;
             return std::make_shared<OpEngine>(std::move(comm), o);
           }),
           py::arg("comm"), py::arg("ring_from_bytes") = EngineOptions().ring_from_bytes,
           py::arg("chunk_bytes") = RingOptions().chunk_bytes, py::arg("probe_s") = EngineOptions().probe_s)
      .def("allreduce", [](OpEngine& e, py::object a, const std::string& op, std::optional<int> code, bool wake) {
             OpSpec s;
             s.kind = OpSpec::Kind::Allreduce;
             s.red = parse_red_op(op);
             auto [buf, owner] = buffer_of(a, true, code, "OpEngine.allreduce");
             s.recv = buf;
             return submit(e, std::move(s), std::move(owner), wake);
           }, py::arg("array"), py::arg("op") = "sum", py::arg("dtype_code") = py::none(), py::arg("wake") = true)
      .def("broadcast", [](OpEngine& e, py::object a, int root, bool wake) {
             OpSpec s;
             s.kind = OpSpec::Kind::Broadcast;
             s.peer = root;
             auto [buf, owner] = buffer_of(a, true, std::nullopt, "OpEngine.broadcast");
             s.recv = buf;
             return submit(e, std::move(s), std::move(owner), wake);
           }, py::arg("array"), py::arg("root"), py::arg("wake") = true)
      .def("allgather", [](OpEngine& e, py::object in, py::object out, std::vector<int> counts,
                           std::vector<int> displs, bool wake) {
             OpSpec s;
             s.kind = OpSpec::Kind::Allgather;
             auto [sb, so] = buffer_of(in, false, std::nullopt, "OpEngine.allgather");
             auto [rb, ro] = buffer_of(out, true, std::nullopt, "OpEngine.allgather");
             s.send = sb;
             s.recv = rb;
             s.recv_counts = std::move(counts);
             s.recv_displs = std::move(displs);
             return submit(e, std::move(s), pair_owner(std::move(so), std::move(ro)), wake);
           }, py::arg("input"), py::arg("output"), py::arg("counts"), py::arg("displs"), py::arg("wake") = true,
           "Gather every rank's input bytes into output at displs (bytes, one per rank).")
      .def("reduce_scatter", [](OpEngine& e, py::object in, py::object out, const std::string& op,
                                std::vector<int> counts, std::optional<int> code, bool wake) {
             OpSpec s;
             s.kind = OpSpec::Kind::ReduceScatter;
             s.red = parse_red_op(op);
             auto [sb, so] = buffer_of(in, false, code, "OpEngine.reduce_scatter");
             auto [rb, ro] = buffer_of(out, true, code, "OpEngine.reduce_scatter");
             s.send = sb;
             s.recv = rb;
             s.recv_counts = std::move(counts);
             return submit(e, std::move(s), pair_owner(std::move(so), std::move(ro)), wake);
           }, py::arg("input"), py::arg("output"), py::arg("op"), py::arg("counts"), py::arg("dtype_code") = py::none(),
           py::arg("wake") = true,
           "Reduce input over the ranks; rank r keeps counts[r] elements (in rank order) in output.")
      .def("alltoall", [](OpEngine& e, py::object in, py::object out, std::vector<int> send_counts,
                          std::vector<int> send_displs, std::vector<int> recv_counts, std::vector<int> recv_displs, bool wake) {
             OpSpec s;
             s.kind = OpSpec::Kind::Alltoall;
             auto [sb, so] = buffer_of(in, false, std::nullopt, "OpEngine.alltoall");
             auto [rb, ro] = buffer_of(out, true, std::nullopt, "OpEngine.alltoall");
             s.send = sb;
             s.recv = rb;
             s.send_counts = std::move(send_counts);
             s.send_displs = std::move(send_displs);
             s.recv_counts = std::move(recv_counts);
             s.recv_displs = std::move(recv_displs);
             return submit(e, std::move(s), pair_owner(std::move(so), std::move(ro)), wake);
           }, py::arg("input"), py::arg("output"), py::arg("send_counts"), py::arg("send_displs"),
           py::arg("recv_counts"), py::arg("recv_displs"), py::arg("wake") = true, "All-to-all of byte blocks (counts, displacements in bytes).")
      .def("reduce", [](OpEngine& e, py::object a, int root, const std::string& op, std::optional<int> code,
                        bool wake) {
             OpSpec s;
             s.kind = OpSpec::Kind::Reduce;
             s.red = parse_red_op(op);
             s.peer = root;
             auto [buf, owner] = buffer_of(a, true, code, "OpEngine.reduce");
             s.recv = buf;
             return submit(e, std::move(s), std::move(owner), wake);
           }, py::arg("array"), py::arg("root"), py::arg("op") = "sum", py::arg("dtype_code") = py::none(),
           py::arg("wake") = true, "Reduce array over the ranks into the root's array (in place there).")
      .def("gather", [](OpEngine& e, py::object in, py::object out, int root, std::vector<int> counts,
                        std::vector<int> displs, bool wake) {
             OpSpec s;
             s.kind = OpSpec::Kind::Gather;
             s.peer = root;
             auto [sb, so] = buffer_of(in, false, std::nullopt, "OpEngine.gather");
             auto [rb, ro] = root_buffer_of(out, true, "OpEngine.gather");
             s.send = sb;
             s.recv = rb;
             s.recv_counts = std::move(counts);
             s.recv_displs = std::move(displs);
             return submit(e, std::move(s), pair_owner(std::move(so), std::move(ro)), wake);
           }, py::arg("input"), py::arg("output"), py::arg("root"), py::arg("counts"), py::arg("displs"),
           py::arg("wake") = true,
           "Gather every rank's input bytes into the root's output at displs (output, counts, displs: "
           "the root's; None and [] elsewhere).")
      .def("scatter", [](OpEngine& e, py::object in, py::object out, int root, std::vector<int> counts,
                         std::vector<int> displs, bool wake) {
             OpSpec s;
             s.kind = OpSpec::Kind::Scatter;
             s.peer = root;
             auto [sb, so] = root_buffer_of(in, false, "OpEngine.scatter");
             auto [rb, ro] = buffer_of(out, true, std::nullopt, "OpEngine.scatter");
             s.send = sb;
             s.recv = rb;
             s.send_counts = std::move(counts);
             s.send_displs = std::move(displs);
             return submit(e, std::move(s), pair_owner(std::move(so), std::move(ro)), wake);
           }, py::arg("input"), py::arg("output"), py::arg("root"), py::arg("counts"), py::arg("displs"),
           py::arg("wake") = true,
           "Send block r of the root's input (counts, displs in bytes: the root's; None and [] elsewhere) "
           "to rank r's output.")
      .def("barrier", [](OpEngine& e, bool wake) {
             OpSpec s;
             s.kind = OpSpec::Kind::Barrier;
             return submit(e, std::move(s), nullptr, wake);
           }, py::arg("wake") = true)
      .def("send", [](OpEngine& e, py::object a, int peer, int tag, bool wake) {
             OpSpec s;
             s.kind = OpSpec::Kind::Send;
             s.peer = peer;
             s.tag = tag;
             auto [buf, owner] = buffer_of(a, false, std::nullopt, "OpEngine.send");
             s.send = buf;
             return submit(e, std::move(s), std::move(owner), wake);
           }, py::arg("array"), py::arg("peer"), py::arg("tag"), py::arg("wake") = true)
      .def("recv", [](OpEngine& e, py::object a, int peer, int tag, bool wake) {
             OpSpec s;
             s.kind = OpSpec::Kind::Recv;
             s.peer = peer;
             s.tag = tag;
             auto [buf, owner] = buffer_of(a, true, std::nullopt, "OpEngine.recv");
             s.recv = buf;
             return submit(e, std::move(s), std::move(owner), wake);
           }, py::arg("array"), py::arg("peer"), py::arg("tag"), py::arg("wake") = true)
      .def_property_readonly("rank", &OpEngine::rank)
      .def_property_readonly("size", &OpEngine::size)
      .def_property_readonly("comm", &OpEngine::comm)
      .def_property_readonly("issued", &OpEngine::issued)
      .def_property_readonly("tag_upper_bound", &OpEngine::tag_upper_bound)
      .def("shutdown", &OpEngine::shutdown)
      .def("__repr__", [](const OpEngine& e) {
        return str_cat("<dpsgs._C.OpEngine rank ", e.rank(), "/", e.size(), ">");
      });

  py::class_<MpiStore, std::shared_ptr<MpiStore>>(m, "MpiStore",
      "Key-value store over an mpi4py communicator; rank 0 serves it (collective to create).")
      .def(py::init(&make_store), py::arg("comm"), py::arg("timeout") = 300.0)
      .def_property_readonly("rank", &MpiStore::rank)
      .def_property_readonly("size", &MpiStore::size)
      .def_property("timeout", &MpiStore::timeout, &MpiStore::set_timeout)
      .def("set", [](MpiStore& s, const std::string& k, py::bytes v) {
             std::string value = v;
             py::gil_scoped_release nogil;
             s.set(k, value);
           }, py::arg("key"), py::arg("value"))
      .def("get", [](MpiStore& s, const std::string& k, double timeout) {
             std::string v;
             {
               py::gil_scoped_release nogil;
               v = s.get(k, timeout);
             }
             return py::bytes(v);
           }, py::arg("key"), py::arg("timeout"))
      .def("add", &MpiStore::add, py::arg("key"), py::arg("delta"), py::call_guard<py::gil_scoped_release>())
      .def("compare_set", [](MpiStore& s, const std::string& k, py::bytes expected, py::bytes desired) {
             std::string e = expected, d = desired, v;
             {
               py::gil_scoped_release nogil;
               v = s.compare_set(k, e, d);
             }
             return py::bytes(v);
           }, py::arg("key"), py::arg("expected"), py::arg("desired"))
      .def("check", &MpiStore::check, py::arg("keys"), py::call_guard<py::gil_scoped_release>())
      .def("wait", &MpiStore::wait, py::arg("keys"), py::arg("timeout"), py::call_guard<py::gil_scoped_release>())
      .def("delete_key", &MpiStore::delete_key, py::arg("key"), py::call_guard<py::gil_scoped_release>())
      .def("num_keys", &MpiStore::num_keys, py::call_guard<py::gil_scoped_release>())
      .def("append", [](MpiStore& s, const std::string& k, py::bytes v) {
             std::string value = v;
             py::gil_scoped_release nogil;
             s.append(k, value);
           }, py::arg("key"), py::arg("value"))
      .def("shutdown", &MpiStore::shutdown, py::call_guard<py::gil_scoped_release>());

  // Engines and store servers stop before mpi4py finalizes MPI (atexit: last registered runs first).
  m.def("_shutdown_torch_backend", [] {
    py::gil_scoped_release nogil;
    shutdown_all_engines();
    shutdown_all_stores();
  }, "stop every OpEngine and MpiStore server (atexit)");
  py::module_::import("atexit").attr("register")(m.attr("_shutdown_torch_backend"));
}

}  // namespace dpsgs

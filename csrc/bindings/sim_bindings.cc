// Bindings of the simulated CUDA device (dpsgs._C.sim): what the simulated accelerator of
// dpsgs.comm needs from the device (streams, timed events, stream-ordered copies, memory)
// and the simulator's fault hooks. Every call goes through the stand-in CUDA runtime API, so
// it has the same semantics as the calls csrc/cuda/ makes. Compiled only with DPSGS_CUDA_SIM.
#ifdef DPSGS_CUDA_SIM

#include "bindings/sim_bindings.h"

#include <cuda_runtime.h>
#include <pybind11/stl.h>

#include <stdexcept>
#include <string>

#include "common/error.h"
#include "sim/sim_faults.h"
#include "sim/sim_group.h"
#include "sim/sim_memory.h"
#include "sim/sim_settings.h"

namespace py = pybind11;

namespace dpsgs {

namespace {

void check(cudaError_t rc, const char* call) {
  if (rc != cudaSuccess)
    throw CommError(str_cat("CUDA (simulated) call `", call, "` failed: ", cudaGetErrorName(rc), ": ",
                            cudaGetErrorString(rc)));
}

template <typename T>
T* handle(uintptr_t h) {
  return reinterpret_cast<T*>(h);
}

// Memory of the simulated device (or pinned host memory) that Python can view through the
// buffer protocol: torch.frombuffer / numpy.frombuffer keep it alive. Freed device memory is
// poisoned in the order of `stream`, the stream it was allocated on (cudaFreeAsync), as
// torch's caching allocator hands a block to that stream's next tensor at once: work queued
// there before the free still sees the block, any other stream's gets poison. Without a
// stream (0), or once that stream is gone, it is poisoned at once.
class SimBuffer {
 public:
  SimBuffer(size_t nbytes, int device, bool pinned, uintptr_t stream)
      : nbytes_(nbytes), device_(device), pinned_(pinned), stream_(stream) {
    if (pinned) {
      check(cudaMallocHost(&ptr_, nbytes), "cudaMallocHost");
    } else {
      int previous = 0;
      check(cudaGetDevice(&previous), "cudaGetDevice");
      check(cudaSetDevice(device), "cudaSetDevice");
      cudaError_t rc = cudaMalloc(&ptr_, nbytes);
      cudaSetDevice(previous);
      check(rc, "cudaMalloc");
    }
  }
  ~SimBuffer() {
    if (pinned_) {
      sim::host_free(ptr_);
    } else if (stream_ == 0 || cudaFreeAsync(ptr_, handle<CUstream_st>(stream_)) != cudaSuccess) {
      cudaGetLastError();       // a stream destroyed since: not an error of the caller's
      sim::device_free(ptr_);   // no device-wide wait: see the class comment
    }
  }
  SimBuffer(const SimBuffer&) = delete;
  SimBuffer& operator=(const SimBuffer&) = delete;
  uintptr_t ptr() const { return reinterpret_cast<uintptr_t>(ptr_); }
  size_t nbytes() const { return nbytes_; }
  int device() const { return device_; }
  bool pinned() const { return pinned_; }
  void* data() const { return ptr_; }

 private:
  void* ptr_ = nullptr;
  size_t nbytes_;
  int device_;
  bool pinned_;
  uintptr_t stream_;
};

}  // namespace

void bind_sim(py::module_& m) {
  py::module_ s = m.def_submodule("sim", "The simulated CUDA device of a DPSGS_CUDA=sim build (csrc/sim/sim.h)");

  s.def("settings", [] {
    const auto& st = sim::settings();
    py::dict d;
    d["seed"] = st.seed;
    d["max_delay_us"] = st.max_delay_s * 1e6;
    d["check_sends"] = st.check_sends;
    d["devices"] = st.devices;
    d["max_progress_polls"] = st.max_progress_polls;
    d["poison"] = int(st.poison);
    return d;
  }, "the simulator's settings (DPSGS_SIM_* environment, read once)");
  s.def("set_fault", [](const std::string& text) {
    try {
      sim::set_fault_from_text(text);
    } catch (const std::invalid_argument& e) {
      throw ValueError(e.what());
    }
  }, py::arg("fault"), "arm a fault hook of this process: 'stall:N', 'async_error:N' or 'init_hang:N'");
  s.def("clear_fault", [] { sim::set_fault(sim::Fault::None, 0); });
  s.def("submitted", &sim::submitted,
        "NCCL operations submitted so far in this process, per communicator name and kind");

  s.def("set_device", [](int device) { check(cudaSetDevice(device), "cudaSetDevice"); }, py::arg("device"));
  s.def("current_device", [] {
    int d = 0;
    check(cudaGetDevice(&d), "cudaGetDevice");
    return d;
  });
  s.def("stream_create", [](int device) {
    int previous = 0;
    check(cudaGetDevice(&previous), "cudaGetDevice");
    check(cudaSetDevice(device), "cudaSetDevice");
    cudaStream_t st = nullptr;
    cudaError_t rc = cudaStreamCreateWithFlags(&st, cudaStreamNonBlocking);
    cudaSetDevice(previous);
    check(rc, "cudaStreamCreateWithFlags");
    return reinterpret_cast<uintptr_t>(st);
  }, py::arg("device"), "a new non-blocking stream on `device` (cudaStream_t as int)");
  s.def("stream_destroy", [](uintptr_t st) { check(cudaStreamDestroy(handle<CUstream_st>(st)), "cudaStreamDestroy"); });
  s.def("stream_query", [](uintptr_t st) {
    cudaError_t rc = cudaStreamQuery(handle<CUstream_st>(st));
    if (rc == cudaErrorNotReady) return false;
    check(rc, "cudaStreamQuery");
    return true;
  });
  s.def("stream_synchronize", [](uintptr_t st) {
    cudaError_t rc;
    {
      py::gil_scoped_release nogil;
      rc = cudaStreamSynchronize(handle<CUstream_st>(st));
    }
    check(rc, "cudaStreamSynchronize");
  });
  s.def("stream_wait_event", [](uintptr_t st, uintptr_t ev) {
    check(cudaStreamWaitEvent(handle<CUstream_st>(st), handle<CUevent_st>(ev), 0), "cudaStreamWaitEvent");
  }, py::arg("stream"), py::arg("event"));

  s.def("event_create", [](bool timing) {
    cudaEvent_t ev = nullptr;
    check(cudaEventCreateWithFlags(&ev, timing ? cudaEventDefault : cudaEventDisableTiming), "cudaEventCreateWithFlags");
    return reinterpret_cast<uintptr_t>(ev);
  }, py::arg("timing") = false);
  s.def("event_destroy", [](uintptr_t ev) { check(cudaEventDestroy(handle<CUevent_st>(ev)), "cudaEventDestroy"); });
  s.def("event_record", [](uintptr_t ev, uintptr_t st) {
    check(cudaEventRecord(handle<CUevent_st>(ev), handle<CUstream_st>(st)), "cudaEventRecord");
  }, py::arg("event"), py::arg("stream"));
  s.def("event_query", [](uintptr_t ev) {
    cudaError_t rc = cudaEventQuery(handle<CUevent_st>(ev));
    if (rc == cudaErrorNotReady) return false;
    check(rc, "cudaEventQuery");
    return true;
  });
  s.def("event_synchronize", [](uintptr_t ev) {
    cudaError_t rc;
    {
      py::gil_scoped_release nogil;
      rc = cudaEventSynchronize(handle<CUevent_st>(ev));
    }
    check(rc, "cudaEventSynchronize");
  });
  s.def("event_elapsed_ms", [](uintptr_t start, uintptr_t end) {
    float ms = 0;
    check(cudaEventElapsedTime(&ms, handle<CUevent_st>(start), handle<CUevent_st>(end)), "cudaEventElapsedTime");
    return ms;
  }, py::arg("start"), py::arg("end"));

  s.def("memcpy_async", [](uintptr_t dst, uintptr_t src, size_t nbytes, int kind, uintptr_t st) {
    cudaError_t rc;
    {
      py::gil_scoped_release nogil;  // a copy to pageable host memory waits for the stream
      rc = cudaMemcpyAsync(reinterpret_cast<void*>(dst), reinterpret_cast<const void*>(src), nbytes,
                           static_cast<cudaMemcpyKind>(kind), handle<CUstream_st>(st));
    }
    check(rc, "cudaMemcpyAsync");
  }, py::arg("dst"), py::arg("src"), py::arg("nbytes"), py::arg("kind"), py::arg("stream"),
     "cudaMemcpyAsync; kind: 1 host to device, 2 device to host, 3 device to device");
  s.attr("HOST_TO_DEVICE") = int(cudaMemcpyHostToDevice);
  s.attr("DEVICE_TO_HOST") = int(cudaMemcpyDeviceToHost);
  s.attr("DEVICE_TO_DEVICE") = int(cudaMemcpyDeviceToDevice);
  s.def("memory_type", [](uintptr_t ptr) {
    cudaPointerAttributes a{};
    check(cudaPointerGetAttributes(&a, reinterpret_cast<void*>(ptr)), "cudaPointerGetAttributes");
    return a.type == cudaMemoryTypeHost ? "host" : a.type == cudaMemoryTypeDevice ? "device" : "other";
  });

  py::class_<SimBuffer, std::shared_ptr<SimBuffer>>(s, "Buffer", py::buffer_protocol(),
      "Memory of the simulated device (pinned=False, poison-filled) or pinned host memory; view it with "
      "torch.frombuffer / numpy.frombuffer, which keep it alive")
      .def(py::init<size_t, int, bool, uintptr_t>(), py::arg("nbytes"), py::arg("device") = 0,
           py::arg("pinned") = false, py::arg("stream") = 0)
      .def_property_readonly("ptr", &SimBuffer::ptr)
      .def_property_readonly("nbytes", &SimBuffer::nbytes)
      .def_property_readonly("device", &SimBuffer::device)
      .def_property_readonly("pinned", &SimBuffer::pinned)
      .def_buffer([](SimBuffer& b) {
        return py::buffer_info(b.data(), 1, py::format_descriptor<unsigned char>::format(), 1,
                               {static_cast<py::ssize_t>(b.nbytes())}, {1});
      });
}

}  // namespace dpsgs

#endif  // DPSGS_CUDA_SIM

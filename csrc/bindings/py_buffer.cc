// Buffer conversions between Python array objects and the core's type-erased Buffer.
#include "bindings/py_buffer.h"

#include "common/error.h"

namespace py = pybind11;

namespace dpsgs {

namespace {

// Buffer-protocol / array-interface type string -> DType (ignoring byte-order prefixes).
std::optional<DType> dtype_from_format(std::string fmt, size_t itemsize) {
  while (!fmt.empty() && (fmt[0] == '<' || fmt[0] == '=' || fmt[0] == '@' || fmt[0] == '|' || fmt[0] == '!'))
    fmt.erase(0, 1);
  if (fmt.size() != 1) {
    // array-interface style: "f4", "i8", "u1", "b1"
    if (fmt.size() >= 2) {
      char k = fmt[0];
      if (k == 'f' && itemsize == 2) return DType::Float16;
      if (k == 'f' && itemsize == 4) return DType::Float32;
      if (k == 'f' && itemsize == 8) return DType::Float64;
      if (k == 'i' && itemsize == 1) return DType::Int8;
      if (k == 'i' && itemsize == 4) return DType::Int32;
      if (k == 'i' && itemsize == 8) return DType::Int64;
      if (k == 'u' && itemsize == 1) return DType::UInt8;
      if (k == 'b' && itemsize == 1) return DType::Bool;
    }
    return std::nullopt;
  }
  switch (fmt[0]) {
    case 'e': return DType::Float16;
    case 'f': return DType::Float32;
    case 'd': return DType::Float64;
    case 'b': return DType::Int8;
    case 'B': return DType::UInt8;
    case '?': return DType::Bool;
    case 'i': case 'l': case 'q':
      if (itemsize == 4) return DType::Int32;
      if (itemsize == 8) return DType::Int64;
      return std::nullopt;
    default: return std::nullopt;
  }
}

bool c_contiguous(const std::vector<py::ssize_t>& shape, const std::vector<py::ssize_t>& strides, size_t itemsize) {
  py::ssize_t expect = py::ssize_t(itemsize);
  for (size_t i = shape.size(); i-- > 0;) {
    if (shape[i] == 0) return true;
    if (shape[i] != 1 && strides[i] != expect) return false;
    expect *= shape[i];
  }
  return true;
}

DType resolve(const std::optional<DType>& native, const std::string& fmt, size_t itemsize, const BufferRequest& req) {
  if (req.dtype_code) {
    DType d = dtype_from_code(*req.dtype_code);
    DPSGS_CHECK_ARG(dtype_size(d) == itemsize, req.where, ": dtype_code ", *req.dtype_code, " (", dtype_name(d),
                    ", ", dtype_size(d), " bytes) does not match the array's ", itemsize, "-byte elements (format '",
                    fmt, "')");
    return d;
  }
  DPSGS_CHECK_ARG(native.has_value(), req.where, ": unsupported element type (format '", fmt, "', ", itemsize,
                  " bytes); supported: float16, bfloat16 (as uint16 + dtype_code 1), float32, float64, int32, "
                  "int64, uint8, int8, bool");
  return *native;
}

std::pair<Buffer, Owner> from_cuda_interface(py::handle obj, const BufferRequest& req) {
  py::dict cai = obj.attr("__cuda_array_interface__");
  py::tuple data = cai["data"];
  std::string typestr = py::str(cai["typestr"]);
  py::tuple shape_t = cai["shape"];
  Buffer b;
  b.device = Device::CUDA;
  b.ptr = reinterpret_cast<void*>(data[0].cast<uintptr_t>());
  DPSGS_CHECK_ARG(!(req.writable && data[1].cast<bool>()), req.where, ": the CUDA array is read-only");
  size_t itemsize = std::stoul(typestr.substr(2));
  b.dtype = resolve(dtype_from_format(typestr, itemsize), typestr, itemsize, req);
  size_t numel = 1;
  for (auto s : shape_t) {
    b.shape.push_back(s.cast<int64_t>());
    numel *= size_t(b.shape.back());
  }
  if (cai.contains("strides") && !cai["strides"].is_none()) {
    std::vector<py::ssize_t> shp(b.shape.begin(), b.shape.end()), st;
    for (auto s : cai["strides"].cast<py::tuple>()) st.push_back(s.cast<py::ssize_t>());
    DPSGS_CHECK_ARG(c_contiguous(shp, st, itemsize), req.where, ": non-contiguous CUDA array; make it contiguous first");
  }
  if (cai.contains("stream") && !cai["stream"].is_none()) b.stream = cai["stream"].cast<uintptr_t>();
  b.bytes = numel * itemsize;
  return {b, make_owner(py::reinterpret_borrow<py::object>(obj))};
}

}  // namespace

namespace {
int drop_reference(void* p) {  // a pending call: runs on the main thread, with the GIL
  delete static_cast<py::object*>(p);
  return 0;
}
}  // namespace

Owner make_owner(py::object obj) {
  auto* held = new py::object(std::move(obj));
  return Owner(held, [](void* p) {
    auto* o = static_cast<py::object*>(p);
    if (!Py_IsInitialized()) return;  // interpreter gone: leak rather than crash
    // Off the Python threads (a device's NCCL issuer, the MPI progress thread) the reference
    // is handed to the main thread, which drops it at its next chance: taking the GIL here
    // would hold every transfer queued behind this one until the running Python code lets
    // go of it (up to the 5 ms switch interval). A full queue of pending calls falls back.
    if (!PyGILState_Check() && Py_AddPendingCall(&drop_reference, o) == 0) return;
    py::gil_scoped_acquire gil;
    delete o;
  });
}

std::pair<Buffer, Owner> to_buffer(py::handle obj, const BufferRequest& req) {
  if (!PyObject_CheckBuffer(obj.ptr()) && py::hasattr(obj, "__cuda_array_interface__"))
    return from_cuda_interface(obj, req);
  DPSGS_CHECK_ARG(PyObject_CheckBuffer(obj.ptr()), req.where, ": expected an array supporting the buffer protocol "
                  "(NumPy) or __cuda_array_interface__, got ", std::string(py::str(py::type::of(obj).attr("__name__"))),
                  " (torch tensors: use dpsgs.comm.as_buffer)");
  py::object holder = py::reinterpret_borrow<py::object>(obj);
  py::buffer_info info;
  {
    auto* view = new Py_buffer();  // buffer_info releases and deletes it
    int flags = PyBUF_STRIDES | PyBUF_FORMAT | (req.writable ? PyBUF_WRITABLE : 0);
    if (PyObject_GetBuffer(obj.ptr(), view, flags) != 0) {
      delete view;
      PyErr_Clear();
      DPSGS_CHECK_ARG(!req.writable, req.where, ": the array is read-only but the operation writes in place");
      throw ValueError(std::string(req.where) + ": cannot get a buffer from the object");
    }
    info = py::buffer_info(view, true);
  }
  size_t itemsize = size_t(info.itemsize);
  if (!c_contiguous(info.shape, info.strides, itemsize)) {
    DPSGS_CHECK_ARG(req.allow_copy, req.where, ": non-contiguous array (shape ", py::str(py::cast(info.shape)).cast<std::string>(),
                    ", strides ", py::str(py::cast(info.strides)).cast<std::string>(), "); the in-place operation "
                    "needs a contiguous one (numpy.ascontiguousarray / tensor.contiguous())");
    holder = py::module_::import("numpy").attr("ascontiguousarray")(obj);
    return to_buffer(holder, req);
  }
  Buffer b;
  b.ptr = info.ptr;
  b.dtype = resolve(dtype_from_format(info.format, itemsize), info.format, itemsize, req);
  size_t numel = 1;
  for (auto s : info.shape) {
    b.shape.push_back(int64_t(s));
    numel *= size_t(s);
  }
  b.bytes = numel * itemsize;
  return {b, make_owner(holder)};
}

py::dtype numpy_dtype(DType dtype) {
  switch (dtype) {
    case DType::Float16: return py::dtype("float16");
    case DType::BFloat16: return py::dtype("uint16");
    case DType::Float32: return py::dtype("float32");
    case DType::Float64: return py::dtype("float64");
    case DType::Int32: return py::dtype("int32");
    case DType::Int64: return py::dtype("int64");
    case DType::UInt8: return py::dtype("uint8");
    case DType::Int8: return py::dtype("int8");
    case DType::Bool: return py::dtype("bool");
  }
  return py::dtype("uint8");
}

py::array numpy_view(void* ptr, DType dtype, const std::vector<int64_t>& shape, std::shared_ptr<void> storage) {
  auto* keep = new std::shared_ptr<void>(std::move(storage));
  py::capsule base(keep, [](void* p) { delete static_cast<std::shared_ptr<void>*>(p); });
  std::vector<py::ssize_t> shp(shape.begin(), shape.end());
  return py::array(numpy_dtype(dtype), shp, ptr, base);
}

}  // namespace dpsgs

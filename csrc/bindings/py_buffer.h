// Python objects -> Buffer (+ Owner that keeps them alive) and slot memory -> NumPy views.
#pragma once

#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>

#include <optional>
#include <string>
#include <utility>

#include "common/buffer.h"

namespace dpsgs {

struct BufferRequest {
  std::optional<int> dtype_code;  // overrides the element type of the same size (bfloat16 as uint16)
  bool writable = false;          // in-place operations need a writable buffer
  bool allow_copy = false;        // non-contiguous input: copy to contiguous (else ValueError)
  const char* where = "buffer";   // names the operation in error messages
};

// Accepts the buffer protocol (NumPy, array.array, memoryview) and __cuda_array_interface__
// (CuPy, torch CUDA: Device::CUDA). The Owner holds a reference to the object (or its copy);
// its deleter takes the GIL, so it may be dropped on any thread.
std::pair<Buffer, Owner> to_buffer(pybind11::handle obj, const BufferRequest& req);

// A writable NumPy array over `ptr` whose base keeps `storage` alive.
pybind11::array numpy_view(void* ptr, DType dtype, const std::vector<int64_t>& shape, std::shared_ptr<void> storage);

// NumPy dtype carrying a DType (bfloat16 -> uint16).
pybind11::dtype numpy_dtype(DType dtype);

// An Owner for a Python object: holds a strong reference, released under the GIL.
Owner make_owner(pybind11::object obj);

}  // namespace dpsgs

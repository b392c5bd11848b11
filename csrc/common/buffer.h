// Type-erased view of caller memory: pointer, bytes, dtype, device, shape (no torch types).
#pragma once

#include <cstddef>
#include <cstdint>
#include <memory>
#include <string>
#include <vector>

#include "common/error.h"

namespace dpsgs {

// Stable codes carried in channel headers (docs/api.md); never renumber.
enum class DType : int32_t {
  Float16 = 0,
  BFloat16 = 1,
  Float32 = 2,
  Float64 = 3,
  Int32 = 4,
  Int64 = 5,
  UInt8 = 6,
  Int8 = 7,
  Bool = 8,
};
constexpr int kNumDTypes = 9;

enum class Device : int32_t { CPU = 0, CUDA = 1 };

inline bool valid_dtype_code(int code) { return code >= 0 && code < kNumDTypes; }

inline size_t dtype_size(DType t) {
  switch (t) {
    case DType::Float16:
    case DType::BFloat16: return 2;
    case DType::Float32:
    case DType::Int32: return 4;
    case DType::Float64:
    case DType::Int64: return 8;
    case DType::UInt8:
    case DType::Int8:
    case DType::Bool: return 1;
  }
  return 0;
}

inline const char* dtype_name(DType t) {
  switch (t) {
    case DType::Float16: return "float16";
    case DType::BFloat16: return "bfloat16";
    case DType::Float32: return "float32";
    case DType::Float64: return "float64";
    case DType::Int32: return "int32";
    case DType::Int64: return "int64";
    case DType::UInt8: return "uint8";
    case DType::Int8: return "int8";
    case DType::Bool: return "bool";
  }
  return "unknown";
}

inline DType dtype_from_code(int code) {
  DPSGS_CHECK_ARG(valid_dtype_code(code), "unknown dtype code ", code, " (valid: 0..", kNumDTypes - 1, ")");
  return static_cast<DType>(code);
}

// Keeps the caller's object (e.g. a Python array) alive while an operation uses its memory.
// The deleter may run on any thread; the Python bindings' deleter takes the GIL itself.
using Owner = std::shared_ptr<void>;

struct Buffer {
  void* ptr = nullptr;
  size_t bytes = 0;
  DType dtype = DType::UInt8;
  Device device = Device::CPU;
  int device_index = 0;              // CUDA ordinal for Device::CUDA
  uintptr_t stream = 0;              // CUDA stream the producer used (0 = default / none)
  std::vector<int64_t> shape;        // C-contiguous; empty = scalar

  size_t numel() const { return bytes / dtype_size(dtype); }
  std::string shape_string() const {
    std::string s = "(";
    for (size_t i = 0; i < shape.size(); ++i) s += (i ? ", " : "") + std::to_string(shape[i]);
    return s + (shape.size() == 1 ? ",)" : ")");
  }
};

}  // namespace dpsgs

// Reductions of the simulated all-reduce (see sim_reduce.h).
#include "sim/sim_reduce.h"

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <type_traits>

namespace dpsgs::sim {

float half_to_float(unsigned short h) {
  uint32_t sign = uint32_t(h & 0x8000) << 16, exp = (h >> 10) & 0x1f, mant = h & 0x3ff, bits;
  if (exp == 0) {
    if (mant == 0) {
      bits = sign;
    } else {  // subnormal: normalise
      exp = 127 - 15 + 1;
      while ((mant & 0x400) == 0) {
        mant <<= 1;
        --exp;
      }
      bits = sign | (exp << 23) | ((mant & 0x3ff) << 13);
    }
  } else if (exp == 0x1f) {
    bits = sign | 0x7f800000 | (mant << 13);
  } else {
    bits = sign | ((exp - 15 + 127) << 23) | (mant << 13);
  }
  float f;
  std::memcpy(&f, &bits, 4);
  return f;
}

unsigned short float_to_half(float f) {
  uint32_t x;
  std::memcpy(&x, &f, 4);
  uint32_t sign = (x >> 16) & 0x8000;
  uint32_t abs = x & 0x7fffffff;
  if (abs > 0x7f800000) return static_cast<unsigned short>(sign | 0x7e00);  // NaN
  if (abs >= 0x477ff000) return static_cast<unsigned short>(sign | 0x7c00);  // overflow -> inf
  if (abs < 0x38800000) {  // a subnormal half (or zero): units of 2^-24, rounded to even
    float scaled = std::fabs(f) * 16777216.0f;  // exact: a power-of-two scale, no overflow
    return static_cast<unsigned short>(sign | static_cast<uint32_t>(std::nearbyint(scaled)));
  }
  uint32_t r = ((abs >> 13) - ((127 - 15) << 10));
  uint32_t rest = abs & 0x1fff;
  if (rest > 0x1000 || (rest == 0x1000 && (r & 1))) ++r;
  return static_cast<unsigned short>(sign | r);
}

float bf16_to_float(unsigned short b) {
  uint32_t bits = uint32_t(b) << 16;
  float f;
  std::memcpy(&f, &bits, 4);
  return f;
}

unsigned short float_to_bf16(float f) {
  uint32_t x;
  std::memcpy(&x, &f, 4);
  if ((x & 0x7fffffff) > 0x7f800000) return static_cast<unsigned short>((x >> 16) | 0x40);  // quiet NaN
  uint32_t rounding = 0x7fff + ((x >> 16) & 1);
  return static_cast<unsigned short>((x + rounding) >> 16);
}

namespace {

template <typename T, typename Acc>
void fold(const std::vector<const void*>& in, T* out, size_t count, ncclRedOp_t op, Acc (*load)(T), T (*store)(Acc)) {
  const size_t m = in.size();
  const bool floating = std::is_floating_point<Acc>::value;
  const Acc scale = floating ? Acc(1) / Acc(m) : Acc(1);
  for (size_t i = 0; i < count; ++i) {
    Acc first = load(static_cast<const T*>(in[0])[i]);
    Acc acc = (op == ncclAvg && floating) ? first * scale : first;
    for (size_t r = 1; r < m; ++r) {
      Acc x = load(static_cast<const T*>(in[r])[i]);
      switch (op) {
        case ncclSum: acc = acc + x; break;
        case ncclProd: acc = acc * x; break;
        case ncclMax: acc = std::max(acc, x); break;
        case ncclMin: acc = std::min(acc, x); break;
        case ncclAvg: acc = floating ? acc + x * scale : acc + x; break;
        default: break;
      }
    }
    if (op == ncclAvg && !floating) acc = acc / Acc(m);
    out[i] = store(acc);
  }
}

template <typename T>
T same(T x) {
  return x;
}

float load_half(uint16_t h) { return half_to_float(h); }
uint16_t store_half(float f) { return float_to_half(f); }
float load_bf16(uint16_t h) { return bf16_to_float(h); }
uint16_t store_bf16(float f) { return float_to_bf16(f); }

}  // namespace

void reduce(const std::vector<const void*>& in, void* out, size_t count, ncclDataType_t type, ncclRedOp_t op) {
  switch (type) {
    case ncclInt8: fold<int8_t, int8_t>(in, static_cast<int8_t*>(out), count, op, same, same); break;
    case ncclUint8: fold<uint8_t, uint8_t>(in, static_cast<uint8_t*>(out), count, op, same, same); break;
    case ncclInt32: fold<int32_t, int32_t>(in, static_cast<int32_t*>(out), count, op, same, same); break;
    case ncclUint32: fold<uint32_t, uint32_t>(in, static_cast<uint32_t*>(out), count, op, same, same); break;
    case ncclInt64: fold<int64_t, int64_t>(in, static_cast<int64_t*>(out), count, op, same, same); break;
    case ncclUint64: fold<uint64_t, uint64_t>(in, static_cast<uint64_t*>(out), count, op, same, same); break;
    case ncclFloat32: fold<float, float>(in, static_cast<float*>(out), count, op, same, same); break;
    case ncclFloat64: fold<double, double>(in, static_cast<double*>(out), count, op, same, same); break;
    case ncclFloat16: fold<uint16_t, float>(in, static_cast<uint16_t*>(out), count, op, load_half, store_half); break;
    case ncclBfloat16: fold<uint16_t, float>(in, static_cast<uint16_t*>(out), count, op, load_bf16, store_bf16); break;
    default: break;
  }
}

}  // namespace dpsgs::sim

// Reduction kernels: plain loops the compiler vectorises; F16C for float16 when the CPU has it.
#include "reduce_kernels.h"

#include <immintrin.h>

#include <cstdint>
#include <cstring>

namespace dpsgs {

namespace {

template <typename T>
void add_t(T* __restrict d, const T* __restrict s, size_t n) {
  for (size_t i = 0; i < n; ++i) d[i] = T(d[i] + s[i]);
}

template <typename T>
void add_mul_t(T* __restrict d, const T* __restrict s, size_t n, T f) {
  for (size_t i = 0; i < n; ++i) d[i] = (d[i] + s[i]) * f;
}

template <typename T>
void add_div_int(T* __restrict d, const T* __restrict s, size_t n, T div) {
  for (size_t i = 0; i < n; ++i) d[i] = T(T(d[i] + s[i]) / div);
}

// ---- bfloat16: float bits >> 16, round to nearest even, NaN kept quiet.
inline float bf16_to_f(uint16_t h) {
  uint32_t u = uint32_t(h) << 16;
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}
inline uint16_t f_to_bf16(float f) {
  uint32_t u;
  std::memcpy(&u, &f, 4);
  if ((u & 0x7fffffffu) > 0x7f800000u) return uint16_t((u >> 16) | 0x40);
  u += 0x7fffu + ((u >> 16) & 1u);
  return uint16_t(u >> 16);
}
void add_bf16_scalar(uint16_t* d, const uint16_t* s, size_t n, float f) {
  for (size_t i = 0; i < n; ++i) d[i] = f_to_bf16((bf16_to_f(d[i]) + bf16_to_f(s[i])) * f);
}

// SSE4.1 (x86-64-v2 baseline): 8 values per step, rounding and NaN handling as f_to_bf16.
__m128i bf16x4_round(__m128 z) {
  __m128i u = _mm_castps_si128(z);
  __m128i lsb = _mm_and_si128(_mm_srli_epi32(u, 16), _mm_set1_epi32(1));
  __m128i r = _mm_srli_epi32(_mm_add_epi32(_mm_add_epi32(u, _mm_set1_epi32(0x7fff)), lsb), 16);
  __m128i quiet = _mm_or_si128(_mm_srli_epi32(u, 16), _mm_set1_epi32(0x40));
  __m128i nan = _mm_castps_si128(_mm_cmpunord_ps(z, z));
  return _mm_blendv_epi8(r, quiet, nan);
}

void add_bf16(uint16_t* __restrict d, const uint16_t* __restrict s, size_t n, float f) {
  const __m128i zero = _mm_setzero_si128();
  const __m128 vf = _mm_set1_ps(f);
  size_t i = 0;
  for (; i + 8 <= n; i += 8) {
    __m128i a = _mm_loadu_si128(reinterpret_cast<const __m128i*>(d + i));
    __m128i b = _mm_loadu_si128(reinterpret_cast<const __m128i*>(s + i));
    __m128 lo = _mm_mul_ps(_mm_add_ps(_mm_castsi128_ps(_mm_unpacklo_epi16(zero, a)),
                                      _mm_castsi128_ps(_mm_unpacklo_epi16(zero, b))), vf);
    __m128 hi = _mm_mul_ps(_mm_add_ps(_mm_castsi128_ps(_mm_unpackhi_epi16(zero, a)),
                                      _mm_castsi128_ps(_mm_unpackhi_epi16(zero, b))), vf);
    _mm_storeu_si128(reinterpret_cast<__m128i*>(d + i), _mm_packus_epi32(bf16x4_round(lo), bf16x4_round(hi)));
  }
  add_bf16_scalar(d + i, s + i, n - i, f);
}

// ---- float16: portable conversion (IEEE half <-> float), used when F16C is absent.
inline float h_to_f(uint16_t h) {
  uint32_t sign = uint32_t(h & 0x8000) << 16, exp = (h >> 10) & 0x1f, man = h & 0x3ff, u;
  if (exp == 0) {
    if (man == 0) {
      u = sign;
    } else {  // subnormal: normalise
      exp = 127 - 15 + 1;
      while (!(man & 0x400)) { man <<= 1; --exp; }
      u = sign | (exp << 23) | ((man & 0x3ff) << 13);
    }
  } else if (exp == 31) {
    u = sign | 0x7f800000u | (man << 13);
  } else {
    u = sign | ((exp + 127 - 15) << 23) | (man << 13);
  }
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}
inline uint16_t f_to_h(float f) {
  uint32_t u;
  std::memcpy(&u, &f, 4);
  uint32_t sign = (u >> 16) & 0x8000, a = u & 0x7fffffffu;
  if (a > 0x7f800000u) return uint16_t(sign | 0x7e00);            // NaN
  if (a >= 0x477ff000u) return uint16_t(sign | 0x7c00);           // overflow -> inf (RNE boundary)
  if (a < 0x38800000u) {                                          // subnormal or zero
    if (a < 0x33000000u) return uint16_t(sign);
    uint32_t e = a >> 23, man = (a & 0x7fffff) | 0x800000;
    uint32_t shift = 126 - e;                                     // 14..24
    uint32_t half = man >> shift, rem = man & ((1u << shift) - 1), mid = 1u << (shift - 1);
    if (rem > mid || (rem == mid && (half & 1))) ++half;
    return uint16_t(sign | half);
  }
  uint32_t r = a + 0xfffu + ((a >> 13) & 1u) - 0x38000000u;       // rebias 127 -> 15, RNE
  return uint16_t(sign | (r >> 13));
}
void add_f16_portable(uint16_t* d, const uint16_t* s, size_t n, float f) {
  for (size_t i = 0; i < n; ++i) d[i] = f_to_h((h_to_f(d[i]) + h_to_f(s[i])) * f);
}

__attribute__((target("avx,f16c"))) void add_f16_f16c(uint16_t* d, const uint16_t* s, size_t n, float f) {
  size_t i = 0;
  __m256 vf = _mm256_set1_ps(f);
  for (; i + 8 <= n; i += 8) {
    __m256 a = _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(d + i)));
    __m256 b = _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(s + i)));
    __m256 r = _mm256_mul_ps(_mm256_add_ps(a, b), vf);
    _mm_storeu_si128(reinterpret_cast<__m128i*>(d + i), _mm256_cvtps_ph(r, _MM_FROUND_TO_NEAREST_INT));
  }
  add_f16_portable(d + i, s + i, n - i, f);
}

void add_f16(uint16_t* d, const uint16_t* s, size_t n, float f) {
  static const bool f16c = __builtin_cpu_supports("f16c") && __builtin_cpu_supports("avx");
  if (f16c) add_f16_f16c(d, s, n, f);
  else add_f16_portable(d, s, n, f);
}

template <typename T>
void int_op(void* dst, const void* src, size_t n, int divisor) {
  if (src == nullptr) {
    T* d = static_cast<T*>(dst);
    for (size_t i = 0; i < n; ++i) d[i] = T(d[i] / T(divisor));
  } else if (divisor > 1) {
    add_div_int(static_cast<T*>(dst), static_cast<const T*>(src), n, T(divisor));
  } else {
    add_t(static_cast<T*>(dst), static_cast<const T*>(src), n);
  }
}

template <typename T>
void float_op(void* dst, const void* src, size_t n, int divisor) {
  T f = T(1) / T(divisor);
  T* d = static_cast<T*>(dst);
  if (src == nullptr) {
    for (size_t i = 0; i < n; ++i) d[i] *= f;
  } else if (divisor > 1) {
    add_mul_t(d, static_cast<const T*>(src), n, f);
  } else {
    add_t(d, static_cast<const T*>(src), n);
  }
}

// src == nullptr: scale only.
void apply(DType dtype, void* dst, const void* src, size_t n, int divisor) {
  if (divisor < 1) divisor = 1;
  switch (dtype) {
    case DType::Float32: return float_op<float>(dst, src, n, divisor);
    case DType::Float64: return float_op<double>(dst, src, n, divisor);
    case DType::Int32: return int_op<int32_t>(dst, src, n, divisor);
    case DType::Int64: return int_op<int64_t>(dst, src, n, divisor);
    case DType::UInt8: return int_op<uint8_t>(dst, src, n, divisor);
    case DType::Int8: return int_op<int8_t>(dst, src, n, divisor);
    case DType::Float16: {
      static const uint16_t zeros[1] = {0};
      (void)zeros;
      auto* d = static_cast<uint16_t*>(dst);
      if (src == nullptr) {
        for (size_t i = 0; i < n; ++i) d[i] = f_to_h(h_to_f(d[i]) / float(divisor));
      } else {
        add_f16(d, static_cast<const uint16_t*>(src), n, 1.0f / float(divisor));
      }
      return;
    }
    case DType::BFloat16: {
      auto* d = static_cast<uint16_t*>(dst);
      if (src == nullptr) {
        for (size_t i = 0; i < n; ++i) d[i] = f_to_bf16(bf16_to_f(d[i]) / float(divisor));
      } else {
        add_bf16(d, static_cast<const uint16_t*>(src), n, 1.0f / float(divisor));
      }
      return;
    }
    case DType::Bool: break;
  }
  throw ValueError(str_cat("reduce: dtype ", dtype_name(dtype), " cannot be summed"));
}

}  // namespace

bool reducible(DType dtype) { return dtype != DType::Bool; }

void reduce_add(DType dtype, void* dst, const void* src, size_t count, int divisor) {
  if (count) apply(dtype, dst, src, count, divisor);
}

void scale_div(DType dtype, void* ptr, size_t count, int divisor) {
  if (count && divisor > 1) apply(dtype, ptr, nullptr, count, divisor);
}

}  // namespace dpsgs

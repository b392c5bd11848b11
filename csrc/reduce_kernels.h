// Vectorised element-wise reductions per dtype: dst += src, optionally fused with the averaging scale.
#pragma once

#include <cstddef>

#include "common/buffer.h"

namespace dpsgs {

// dst[i] = dst[i] + src[i]; when divisor > 1 the result is divided by it in the same pass
// (floats: multiplied by 1/divisor; integers: C++ division, truncating toward zero).
// float16/bfloat16 are added in float32 and rounded to nearest even. uint8/int wrap on overflow.
void reduce_add(DType dtype, void* dst, const void* src, size_t count, int divisor);

// ptr[i] /= divisor in place (same rules as reduce_add's fused division).
void scale_div(DType dtype, void* ptr, size_t count, int divisor);

// True for the dtypes the reducer can sum (all but bool).
bool reducible(DType dtype);

}  // namespace dpsgs

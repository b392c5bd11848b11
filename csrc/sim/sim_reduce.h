// Element-wise reductions of the simulated ncclAllReduce, every NCCL type used.
#pragma once

#include <nccl.h>

#include <cstddef>
#include <vector>

namespace dpsgs::sim {

// out[i] = op over inputs[0..m-1][i], folded in rank order, so every rank gets the same
// bits. ncclAvg as NCCL documents it: floating types multiply each contribution by 1/m
// and sum (float16/bfloat16 in float, rounded once); integers sum, then divide.
void reduce(const std::vector<const void*>& inputs, void* out, size_t count, ncclDataType_t type, ncclRedOp_t op);

float half_to_float(unsigned short h);
unsigned short float_to_half(float f);  // round to nearest even
float bf16_to_float(unsigned short b);
unsigned short float_to_bf16(float f);  // round to nearest even

}  // namespace dpsgs::sim

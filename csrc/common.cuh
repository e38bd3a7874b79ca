// Device helpers shared by the kernels: element conversion, deterministic warp / block sums, the dtype dispatch.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include "rankgrpo_cuda.h"

namespace rankgrpo {

constexpr int kWarpSize = 32;
constexpr unsigned kFullMask = 0xffffffffu;

__device__ __forceinline__ float to_float(float x) { return x; }
__device__ __forceinline__ float to_float(__nv_bfloat16 x) { return __bfloat162float(x); }
__device__ __forceinline__ float to_float(__half x) { return __half2float(x); }

template <typename T>
__device__ __forceinline__ T from_float(float x);
template <>
__device__ __forceinline__ float from_float<float>(float x) { return x; }
template <>
__device__ __forceinline__ __nv_bfloat16 from_float<__nv_bfloat16>(float x) { return __float2bfloat16(x); }
template <>
__device__ __forceinline__ __half from_float<__half>(float x) { return __float2half(x); }

// Butterfly sum: every lane ends with the same value, added in a fixed order (deterministic).
__device__ __forceinline__ float warp_sum(float x) {
  for (int offset = kWarpSize / 2; offset > 0; offset >>= 1) x += __shfl_xor_sync(kFullMask, x, offset);
  return x;
}

// Sum over a block of kThreads threads, returned to every thread; `shared` holds kThreads / 32 floats.
template <int kThreads>
__device__ __forceinline__ float block_sum(float x, float* shared) {
  x = warp_sum(x);
  __syncthreads();  // the previous call's readers are done with `shared`
  if (threadIdx.x % kWarpSize == 0) shared[threadIdx.x / kWarpSize] = x;
  __syncthreads();
  float total = 0.0f;
  for (int w = 0; w < kThreads / kWarpSize; ++w) total += shared[w];
  return total;
}

// Calls f(T{}) with T the C++ element type of `dtype`.
template <typename F>
inline void dispatch_dtype(DType dtype, F&& f) {
  switch (dtype) {
    case DType::kBFloat16: f(__nv_bfloat16{}); break;
    case DType::kFloat16: f(__half{}); break;
    default: f(float{}); break;
  }
}

inline int launch_status() { return static_cast<int>(cudaGetLastError()); }

}  // namespace rankgrpo

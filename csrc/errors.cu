// The message of a cudaError_t returned by an entry point, for the binding (which has no CUDA headers).
#include "common.cuh"

namespace rankgrpo {

const char* error_string(int code) { return cudaGetErrorString(static_cast<cudaError_t>(code)); }

}  // namespace rankgrpo

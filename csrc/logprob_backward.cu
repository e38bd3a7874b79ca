// Log-prob backward epilogue. For each (active-token chunk x vocabulary slab) the host computes the fp32 slab
// acc = h W[v0:v1]^T with cuBLAS (torch.mm, out_dtype=float32); this kernel turns it in one pass into
//
//   dZ[r, c] = coef[r] * (onehot(y_r)[v0 + c] - exp(z[r, c] - lse[r])),   z = (acc + b) / T,   coef = g / T
//
// written in the GEMM operand dtype, and the column sums of dZ per block of 32 rows in fp32 (d_bias partials,
// reduced in a fixed order by the host: deterministic). The host then forms d_hidden += dZ W[v0:v1] and
// d_weight[v0:v1] += dZ^T h with cuBLAS, accumulating in fp32.
//
// Equivalent PyTorch:
//   p = ((h @ W[v0:v1].T).float() + b[v0:v1]).div(T).sub(lse[:, None]).exp()
//   dz = coef[:, None] * (F.one_hot(y - v0, v1 - v0) - p);  d_bias[v0:v1] += dz.sum(0)
//
// Threads own columns (coalesced rows), blocks own 32 rows; each thread keeps its column sum in a register.
#include "common.cuh"

namespace rankgrpo {
namespace {

constexpr int kThreads = 256;
constexpr int kRows = kBackwardRowsPerBlock;

template <typename T>
__global__ void __launch_bounds__(kThreads)
    slab_backward_kernel(const float* __restrict__ logits, int64_t rows, int64_t cols, const T* __restrict__ bias,
                         int64_t vocab_start, const int64_t* __restrict__ targets, const float* __restrict__ lse,
                         const float* __restrict__ coef, float inv_temperature, T* __restrict__ d_logits,
                         float* __restrict__ bias_partials) {
  __shared__ float row_lse[kRows];
  __shared__ float row_coef[kRows];
  __shared__ int64_t row_target[kRows];
  const int64_t row0 = static_cast<int64_t>(blockIdx.y) * kRows;
  const int row_count = static_cast<int>(rows - row0 < kRows ? rows - row0 : kRows);
  if (static_cast<int>(threadIdx.x) < row_count) {
    row_lse[threadIdx.x] = lse[row0 + threadIdx.x];
    row_coef[threadIdx.x] = coef[row0 + threadIdx.x];
    row_target[threadIdx.x] = targets[row0 + threadIdx.x] - vocab_start;
  }
  __syncthreads();
  const int64_t c = static_cast<int64_t>(blockIdx.x) * kThreads + threadIdx.x;
  if (c >= cols) return;
  const float b = bias != nullptr ? to_float(bias[c]) : 0.0f;
  float column_sum = 0.0f;
  for (int i = 0; i < row_count; ++i) {
    const int64_t at = (row0 + i) * cols + c;
    const float z = (logits[at] + b) * inv_temperature;
    const float onehot = row_target[i] == c ? 1.0f : 0.0f;
    const float d = row_coef[i] * (onehot - expf(z - row_lse[i]));
    column_sum += d;
    d_logits[at] = from_float<T>(d);
  }
  if (bias_partials != nullptr) bias_partials[static_cast<int64_t>(blockIdx.y) * cols + c] = column_sum;
}

}  // namespace

int logprob_slab_backward(const float* logits, int64_t rows, int64_t cols, const void* bias, DType dtype,
                          int64_t vocab_start, const int64_t* targets, const float* lse, const float* coef,
                          float inv_temperature, void* d_logits, float* bias_partials, cudaStream_t stream) {
  if (rows == 0 || cols == 0) return 0;
  const dim3 grid(static_cast<unsigned>((cols + kThreads - 1) / kThreads),
                  static_cast<unsigned>((rows + kRows - 1) / kRows));
  dispatch_dtype(dtype, [&](auto zero) {
    using T = decltype(zero);
    slab_backward_kernel<T><<<grid, kThreads, 0, stream>>>(logits, rows, cols, static_cast<const T*>(bias),
                                                           vocab_start, targets, lse, coef, inv_temperature,
                                                           static_cast<T*>(d_logits), bias_partials);
  });
  return launch_status();
}

}  // namespace rankgrpo

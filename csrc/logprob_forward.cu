// Log-prob forward epilogues. The host (cuda_backend.py) walks (token chunk x vocabulary slab) tiles, computes each
// slab acc = h W[v0:v1]^T with one cuBLAS GEMM in fp32 (torch.mm, out_dtype=float32), and calls
// logprob_slab_forward on it, which merges the slab into per-token fp32 running statistics:
//
//   z = (acc + b[v0:v1]) / T
//   m' = max(m, max_v z),  s' = s e^(m - m') + sum_v e^(z - m'),  u' = u e^(m - m') + sum_v e^(z - m') z
//   z_y = z[y - v0]                      (only in the slab that holds the target)
//
// and logprob_finish turns them into lse = m + log s, logp = z_y - lse, entropy = lse - u / s.
// Slabs are merged in vocabulary order on one stream, so the result is deterministic.
//
// Equivalent PyTorch:
//   z = (hidden.float() @ weight.float().T + bias) / T
//   lse = z.logsumexp(-1); logp = z.gather(-1, y[:, None])[:, 0] - lse; entropy = lse - (z.softmax(-1) * z).sum(-1)
#include <math_constants.h>

#include "common.cuh"

namespace rankgrpo {
namespace {

constexpr int kWarpsPerBlock = 8;  // one warp per token row

// Merge (m2, s2, u2) into (m, s, u); an empty side has m = -inf and s = u = 0.
__device__ __forceinline__ void merge(float& m, float& s, float& u, float m2, float s2, float u2) {
  const float mx = fmaxf(m, m2);
  if (mx == -CUDART_INF_F) return;
  const float a = expf(m - mx), b = expf(m2 - mx);
  s = s * a + s2 * b;
  u = u * a + u2 * b;
  m = mx;
}

template <typename BiasT, bool kEntropy>
__global__ void __launch_bounds__(kWarpsPerBlock * kWarpSize)
    slab_forward_kernel(const float* __restrict__ logits, int64_t rows, int64_t cols, const BiasT* __restrict__ bias,
                        int64_t vocab_start, const int64_t* __restrict__ targets, float inv_temperature,
                        float* __restrict__ running_max, float* __restrict__ running_sum,
                        float* __restrict__ running_sum_z, float* __restrict__ target_logit) {
  const int64_t row = static_cast<int64_t>(blockIdx.x) * kWarpsPerBlock + threadIdx.x / kWarpSize;
  const int lane = threadIdx.x % kWarpSize;
  if (row >= rows) return;
  const float* z_row = logits + row * cols;
  float m = -CUDART_INF_F, s = 0.0f, u = 0.0f;
  for (int64_t c = lane; c < cols; c += kWarpSize) {
    const float z = (z_row[c] + (bias != nullptr ? to_float(bias[c]) : 0.0f)) * inv_temperature;
    if (z == -CUDART_INF_F) continue;  // a masked-out vocabulary entry takes no probability
    if (z > m) {  // new running max: rescale what was summed so far
      const float a = expf(m - z);
      s = s * a + 1.0f;
      if (kEntropy) u = u * a + z;
      m = z;
    } else {
      const float e = expf(z - m);
      s += e;
      if (kEntropy) u += e * z;
    }
  }
  for (int offset = kWarpSize / 2; offset > 0; offset >>= 1) {
    const float m2 = __shfl_xor_sync(kFullMask, m, offset);
    const float s2 = __shfl_xor_sync(kFullMask, s, offset);
    const float u2 = __shfl_xor_sync(kFullMask, u, offset);
    merge(m, s, u, m2, s2, u2);
  }
  if (lane != 0) return;
  float run_m = running_max[row], run_s = running_sum[row];
  float run_u = kEntropy ? running_sum_z[row] : 0.0f;
  merge(run_m, run_s, run_u, m, s, u);
  running_max[row] = run_m;
  running_sum[row] = run_s;
  if (kEntropy) running_sum_z[row] = run_u;
  const int64_t y = targets[row] - vocab_start;
  if (y >= 0 && y < cols) {
    target_logit[row] = (z_row[y] + (bias != nullptr ? to_float(bias[y]) : 0.0f)) * inv_temperature;
  }
}

__global__ void finish_kernel(int64_t rows, const float* __restrict__ running_max,
                              const float* __restrict__ running_sum, const float* __restrict__ running_sum_z,
                              const float* __restrict__ target_logit, float* __restrict__ logp,
                              float* __restrict__ lse, float* __restrict__ entropy) {
  const int64_t row = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (row >= rows) return;
  const float s = running_sum[row];
  const float l = running_max[row] + logf(s);
  lse[row] = l;
  logp[row] = target_logit[row] - l;
  if (entropy != nullptr) entropy[row] = l - running_sum_z[row] / s;
}

}  // namespace

int logprob_slab_forward(const float* logits, int64_t rows, int64_t cols, const void* bias, DType bias_dtype,
                         int64_t vocab_start, const int64_t* targets, float inv_temperature, float* running_max,
                         float* running_sum, float* running_sum_z, float* target_logit, cudaStream_t stream) {
  if (rows == 0) return 0;
  const dim3 grid(static_cast<unsigned>((rows + kWarpsPerBlock - 1) / kWarpsPerBlock));
  const dim3 block(kWarpsPerBlock * kWarpSize);
  dispatch_dtype(bias_dtype, [&](auto zero) {
    using BiasT = decltype(zero);
    const auto* b = static_cast<const BiasT*>(bias);
    if (running_sum_z != nullptr) {
      slab_forward_kernel<BiasT, true><<<grid, block, 0, stream>>>(logits, rows, cols, b, vocab_start, targets,
                                                                     inv_temperature, running_max, running_sum,
                                                                     running_sum_z, target_logit);
    } else {
      slab_forward_kernel<BiasT, false><<<grid, block, 0, stream>>>(logits, rows, cols, b, vocab_start, targets,
                                                                      inv_temperature, running_max, running_sum,
                                                                      running_sum_z, target_logit);
    }
  });
  return launch_status();
}

int logprob_finish(int64_t rows, const float* running_max, const float* running_sum, const float* running_sum_z,
                   const float* target_logit, float* logp, float* lse, float* entropy, cudaStream_t stream) {
  if (rows == 0) return 0;
  constexpr int kThreads = 256;
  finish_kernel<<<static_cast<unsigned>((rows + kThreads - 1) / kThreads), kThreads, 0, stream>>>(
      rows, running_max, running_sum, running_sum_z, target_logit, logp, lse, entropy);
  return launch_status();
}

}  // namespace rankgrpo

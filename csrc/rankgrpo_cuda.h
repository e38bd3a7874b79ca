// Entry points of the CUDA kernels: raw device pointers, sizes and a stream, no torch types, so that the .cu files
// compile with plain nvcc and the binding with the CPU torch headers (no CUDA headers needed here).
// Every entry point launches asynchronously on `stream` and returns the cudaError_t of the launch as an int
// (0 = success); error_string(code) names it.
#pragma once

#include <cstdint>

typedef struct CUstream_st* cudaStream_t;  // the very typedef of <driver_types.h>

namespace rankgrpo {

// Element type of the GEMM operands (hidden, weight, bias, dZ).
enum class DType : int { kFloat32 = 0, kBFloat16 = 1, kFloat16 = 2 };

const char* error_string(int code);

// Forward epilogue of one (rows x cols) fp32 slab acc = h W[v0:v0+cols]^T of a token chunk (row-major, ld = cols):
// z = (acc + bias) * inv_temperature merged into the per-token running max / sum exp(z - max) / sum exp(z - max) z
// (running_sum_z may be null), and target_logit[r] = z[r, targets[r] - vocab_start] when that column is in the slab.
int logprob_slab_forward(const float* logits, int64_t rows, int64_t cols, const void* bias, DType bias_dtype,
                         int64_t vocab_start, const int64_t* targets, float inv_temperature, float* running_max,
                         float* running_sum, float* running_sum_z, float* target_logit, cudaStream_t stream);

// lse = max + log(sum), logp = target_logit - lse, entropy = lse - sum_z / sum (entropy and sum_z may be null).
int logprob_finish(int64_t rows, const float* running_max, const float* running_sum, const float* running_sum_z,
                   const float* target_logit, float* logp, float* lse, float* entropy, cudaStream_t stream);

// Backward epilogue of one slab: d_logits[r, c] = coef[r] * (onehot - exp(z[r, c] - lse[r])) in `dtype`
// (coef = dL/dlogp / T), with z as in the forward; bias_partials (ceil(rows / 32), cols) fp32 gets the column sums
// of each block of 32 rows (null: not formed). bias may be null.
int logprob_slab_backward(const float* logits, int64_t rows, int64_t cols, const void* bias, DType dtype,
                          int64_t vocab_start, const int64_t* targets, const float* lse, const float* coef,
                          float inv_temperature, void* d_logits, float* bias_partials, cudaStream_t stream);

constexpr int kBackwardRowsPerBlock = 32;
constexpr int kRowSums = 5;  // loss, clipped low, clipped high, ratio, KL

// Segment loss of B rows of T tokens (see segment_loss.cu). old_logps / ref_logps may be null; group holds
// row-relative item ids (-1 outside the loss); scratch is 3 * B * T floats; outputs grad (B, T) and
// row_sums (B, kRowSums). weighting: 0 grpo, 1 bnpo / dr_grpo / dapo, 2 rank.
int segment_loss(const float* logps, const float* old_logps, const float* ref_logps, const float* advantages,
                 const int32_t* group, const int32_t* num_bins, const float* normaliser, const float* tokens,
                 float* scratch, float* grad, float* row_sums, int64_t B, int64_t T, float beta, float lo, float hi,
                 float delta, bool has_delta, int weighting, float log_ratio_limit, cudaStream_t stream);

}  // namespace rankgrpo

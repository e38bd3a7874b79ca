// Entry points of the CUDA kernels: raw device pointers, sizes and a stream, no torch types, so that the .cu files
// compile with plain nvcc and the binding with the CPU torch headers (no CUDA headers needed here).
// Every entry point launches asynchronously on `stream` and returns the cudaError_t of the launch as an int
// (0 = success; read right after the launch); error_string(code) names it. The row and gradient passes also set
// *kernel to the name of the kernel they launched (when kernel is not null), for the error message.
#pragma once

#include <cstdint>

typedef struct CUstream_st* cudaStream_t;  // the very typedef of <driver_types.h>

namespace rankgrpo {

// Element type of the GEMM operands (hidden, weight, bias, D = onehot - softmax).
enum class DType : int { kFloat32 = 0, kBFloat16 = 1, kFloat16 = 2 };

const char* error_string(int code);

constexpr int kRowSums = 6;  // loss, clipped low, clipped high, ratio, KL, phi (the REINFORCE terms' weight)

// The policy term of the segment loss (contract.POLICY) and its settings: SAPO's temperatures, VESPO's gamma
// weight (its lambdas already at least 1e-4) and lower clamp of log W.
enum PolicyKind : int { kPpo = 0, kGmpo = 1, kSapo = 2, kCispo = 3, kVespo = 4 };
struct PolicyTerm {
  int kind;
  float tau_pos, tau_neg, k_pos, lambda_pos, k_neg, lambda_neg, log_w_min;
};

// Segment loss of B rows of T tokens (see segment_loss.cu). old_logps / ref_logps / policy_weights may be null;
// group holds row-relative item ids (-1 outside the loss); scratch is 3 * B * T floats; outputs grad (B, T) and
// row_sums (B, kRowSums). weighting: 0 grpo / sapo, 1 a token sum over the normaliser, 2 rank. kl_corrected: the KL
// weighted by the item ratio (ref_logps given).
int segment_loss(const float* logps, const float* old_logps, const float* ref_logps, const float* advantages,
                 const float* policy_weights, const int32_t* group, const int32_t* num_bins, const float* normaliser,
                 const float* tokens, float* scratch, float* grad, float* row_sums, int64_t B, int64_t T, float beta,
                 float lo, float hi, float delta, bool has_delta, int weighting, float log_ratio_limit,
                 const PolicyTerm& policy, bool kl_corrected, cudaStream_t stream);

// Row pass over a chunk of fp32 logits (rows x cols, row stride row_stride >= cols elements; see row_pass.cu):
// z = S(logit_scale (logits + bias)) * inv_temperature with S(u) = softcap tanh(u / softcap) when softcap > 0 (else
// S(u) = u: pass 0 for none); logp = z_y - lse, lse = logsumexp(z) (or lse_in when given: then lse is not written
// and may be null), entropy = -sum p (z - lse) with p = exp(z - lse) (null: not formed), and, when grad is given,
// D = (onehot(y) - p) S'(u) grad_scale (+- a power of two) in grad_dtype at grad (row stride grad_row_stride elements):
// in place over the logits (grad == logits, grad_row_stride = 4 row_stride / itemsize) or into a buffer that does not
// overlap them.
// targets (rows,) int64, or int32 when targets_int32; a target outside [0, cols) has z_y = 0 and no one-hot term.
// bias may be null (bias_dtype then ignored).
int row_pass(const float* logits, int64_t rows, int64_t cols, int64_t row_stride, const void* bias, DType bias_dtype,
             const void* targets, bool targets_int32, double inv_temperature, double logit_scale, double softcap,
             const float* lse_in, float* logp, float* lse, float* entropy, void* grad, DType grad_dtype,
             int64_t grad_row_stride, double grad_scale, cudaStream_t stream, const char** kernel = nullptr);

// Gradient pass over the same logits (untouched since a statistics-only row pass), with per-row lse, entropy H,
// g = dL/dlogp and e = dL/dH (rows,) fp32, none null: D' = [g (onehot(y) - p) - e p (z - lse + H)] S'(u) at grad,
// as the row pass writes D (in place, or into a buffer that does not overlap the logits).
int grad_pass(const float* logits, int64_t rows, int64_t cols, int64_t row_stride, const void* bias, DType bias_dtype,
              const void* targets, bool targets_int32, double inv_temperature, double logit_scale, double softcap,
              const float* lse, const float* entropy, const float* g, const float* e, void* grad, DType grad_dtype,
              int64_t grad_row_stride, cudaStream_t stream, const char** kernel = nullptr);

}  // namespace rankgrpo

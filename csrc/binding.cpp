// Python binding of the CUDA entry points (pybind11 through torch/extension.h): checks the tensors, passes their
// data pointers and sizes, and the stream that Python hands over as an integer
// (torch.cuda.current_stream().cuda_stream), so this file needs neither CUDA nor ATen CUDA headers.
#include <torch/extension.h>

#include <optional>

#include "rankgrpo_cuda.h"

namespace {

using at::Tensor;
using OptTensor = std::optional<Tensor>;

cudaStream_t as_stream(int64_t handle) { return reinterpret_cast<cudaStream_t>(static_cast<intptr_t>(handle)); }

void check_launch(int code, const char* what) {
  TORCH_CHECK(code == 0, "rankgrpo CUDA kernel ", what, " failed: ", rankgrpo::error_string(code));
}

void check_tensor(const Tensor& t, const char* name, at::ScalarType dtype) {
  TORCH_CHECK(t.is_cuda(), name, " must be a CUDA tensor");
  TORCH_CHECK(t.is_contiguous(), name, " must be contiguous");
  TORCH_CHECK(t.scalar_type() == dtype, name, " must be ", dtype, ", got ", t.scalar_type());
}

rankgrpo::DType operand_dtype(at::ScalarType dtype) {
  switch (dtype) {
    case at::kFloat: return rankgrpo::DType::kFloat32;
    case at::kBFloat16: return rankgrpo::DType::kBFloat16;
    case at::kHalf: return rankgrpo::DType::kFloat16;
    default: TORCH_CHECK(false, "backend='cuda' takes float32, bfloat16 or float16 operands, got ", dtype);
  }
}

template <typename T>
T* data_or_null(const OptTensor& t, const char* name, at::ScalarType dtype) {
  if (!t.has_value()) return nullptr;
  check_tensor(*t, name, dtype);
  return static_cast<T*>(t->data_ptr());
}

float* f32(const Tensor& t, const char* name) {
  check_tensor(t, name, at::kFloat);
  return t.data_ptr<float>();
}

// logits (rows, cols) fp32 = h W[v0:v0+cols]^T; bias[v0:v0+cols]; targets, running_*, target_logit (rows,).
void logprob_slab_forward(const Tensor& logits, const OptTensor& bias, int64_t vocab_start, const Tensor& targets,
                          double inv_temperature, const Tensor& running_max, const Tensor& running_sum,
                          const OptTensor& running_sum_z, const Tensor& target_logit, int64_t stream) {
  const int64_t rows = logits.size(0), cols = logits.size(1);
  check_tensor(targets, "targets", at::kLong);
  TORCH_CHECK(targets.numel() == rows && running_max.numel() == rows && running_sum.numel() == rows &&
                  target_logit.numel() == rows, "per-token tensors must have one entry per logits row");
  TORCH_CHECK(!bias.has_value() || bias->numel() == cols, "bias slab must have one entry per logits column");
  const auto bias_dtype = bias.has_value() ? bias->scalar_type() : at::kFloat;
  check_launch(rankgrpo::logprob_slab_forward(
                   f32(logits, "logits"), rows, cols, data_or_null<const void>(bias, "bias", bias_dtype),
                   operand_dtype(bias_dtype), vocab_start, targets.data_ptr<int64_t>(),
                   static_cast<float>(inv_temperature), f32(running_max, "running_max"),
                   f32(running_sum, "running_sum"), data_or_null<float>(running_sum_z, "running_sum_z", at::kFloat),
                   f32(target_logit, "target_logit"), as_stream(stream)),
               "logprob_slab_forward");
}

void logprob_finish(const Tensor& running_max, const Tensor& running_sum, const OptTensor& running_sum_z,
                    const Tensor& target_logit, const Tensor& logp, const Tensor& lse, const OptTensor& entropy,
                    int64_t stream) {
  TORCH_CHECK(running_sum_z.has_value() == entropy.has_value(), "running_sum_z and entropy come together");
  check_launch(rankgrpo::logprob_finish(
                   running_max.numel(), f32(running_max, "running_max"), f32(running_sum, "running_sum"),
                   data_or_null<const float>(running_sum_z, "running_sum_z", at::kFloat),
                   f32(target_logit, "target_logit"), f32(logp, "logp"), f32(lse, "lse"),
                   data_or_null<float>(entropy, "entropy", at::kFloat), as_stream(stream)),
               "logprob_finish");
}

// d_logits (rows, cols) in the operand dtype; bias_partials (ceil(rows / 32), cols) fp32 or None.
void logprob_slab_backward(const Tensor& logits, const OptTensor& bias, int64_t vocab_start, const Tensor& targets,
                           const Tensor& lse, const Tensor& coef, double inv_temperature, const Tensor& d_logits,
                           const OptTensor& bias_partials, int64_t stream) {
  const int64_t rows = logits.size(0), cols = logits.size(1);
  const auto dtype = d_logits.scalar_type();
  check_tensor(d_logits, "d_logits", dtype);
  check_tensor(targets, "targets", at::kLong);
  TORCH_CHECK(d_logits.sizes() == logits.sizes(), "d_logits must have the shape of logits");
  TORCH_CHECK(targets.numel() == rows && lse.numel() == rows && coef.numel() == rows,
              "per-token tensors must have one entry per logits row");
  TORCH_CHECK(!bias.has_value() || bias->numel() == cols, "bias slab must have one entry per logits column");
  const int64_t blocks = (rows + rankgrpo::kBackwardRowsPerBlock - 1) / rankgrpo::kBackwardRowsPerBlock;
  TORCH_CHECK(!bias_partials.has_value() || bias_partials->numel() == blocks * cols, "bias_partials size");
  check_launch(rankgrpo::logprob_slab_backward(
                   f32(logits, "logits"), rows, cols, data_or_null<const void>(bias, "bias", dtype),
                   operand_dtype(dtype), vocab_start, targets.data_ptr<int64_t>(), f32(lse, "lse"),
                   f32(coef, "coef"), static_cast<float>(inv_temperature), d_logits.data_ptr(),
                   data_or_null<float>(bias_partials, "bias_partials", at::kFloat), as_stream(stream)),
               "logprob_slab_backward");
}

// (B, T) fp32 token tensors, group (B, T) int32, num_bins (B,) int32, normaliser and tokens (1,) fp32,
// scratch (3, B, T) fp32; writes grad (B, T) and row_sums (B, 5).
void segment_loss(const Tensor& logps, const OptTensor& old_logps, const OptTensor& ref_logps,
                  const Tensor& advantages, const Tensor& group, const Tensor& num_bins, const Tensor& normaliser,
                  const Tensor& tokens, const Tensor& scratch, const Tensor& grad, const Tensor& row_sums,
                  double beta, double lo, double hi, std::optional<double> delta, int64_t weighting,
                  double log_ratio_limit, int64_t stream) {
  TORCH_CHECK(logps.dim() == 2, "logps must be (B, T)");
  const int64_t B = logps.size(0), T = logps.size(1);
  check_tensor(group, "group", at::kInt);
  check_tensor(num_bins, "num_bins", at::kInt);
  for (const Tensor* t : {&advantages, &group, &grad}) TORCH_CHECK(t->sizes() == logps.sizes(), "(B, T) shapes");
  TORCH_CHECK(num_bins.numel() == B && scratch.numel() == 3 * B * T && row_sums.numel() == B * rankgrpo::kRowSums,
              "num_bins (B,), scratch (3, B, T), row_sums (B, 5)");
  TORCH_CHECK(weighting >= 0 && weighting <= 2, "weighting must be 0 (grpo), 1 (token mean) or 2 (rank)");
  check_launch(rankgrpo::segment_loss(
                   f32(logps, "logps"), data_or_null<const float>(old_logps, "old_logps", at::kFloat),
                   data_or_null<const float>(ref_logps, "ref_logps", at::kFloat), f32(advantages, "advantages"),
                   group.data_ptr<int32_t>(), num_bins.data_ptr<int32_t>(), f32(normaliser, "normaliser"),
                   f32(tokens, "tokens"), f32(scratch, "scratch"), f32(grad, "grad"), f32(row_sums, "row_sums"), B, T,
                   static_cast<float>(beta), static_cast<float>(lo), static_cast<float>(hi),
                   static_cast<float>(delta.value_or(0.0)), delta.has_value(), static_cast<int>(weighting),
                   static_cast<float>(log_ratio_limit), as_stream(stream)),
               "segment_loss");
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "rankgrpo_kernels CUDA kernels (csrc/): log-prob epilogues and the segment loss";
  m.def("logprob_slab_forward", &logprob_slab_forward);
  m.def("logprob_finish", &logprob_finish);
  m.def("logprob_slab_backward", &logprob_slab_backward);
  m.def("segment_loss", &segment_loss);
}

// Python binding of the CUDA entry points (pybind11 through torch/extension.h): checks the tensors, passes their
// data pointers and sizes, and the stream that Python hands over as an integer
// (torch.cuda.current_stream().cuda_stream), so this file needs neither CUDA nor ATen CUDA headers.
#include <torch/extension.h>

#include <optional>
#include <utility>

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

// (B, T) fp32 token tensors (policy_weights optional), group (B, T) int32, num_bins (B,) int32, normaliser and
// tokens (1,) fp32, scratch (3, B, T) fp32; writes grad (B, T) and row_sums (B, 5).
void segment_loss(const Tensor& logps, const OptTensor& old_logps, const OptTensor& ref_logps,
                  const Tensor& advantages, const OptTensor& policy_weights, const Tensor& group,
                  const Tensor& num_bins, const Tensor& normaliser, const Tensor& tokens, const Tensor& scratch,
                  const Tensor& grad, const Tensor& row_sums,
                  double beta, double lo, double hi, std::optional<double> delta, int64_t weighting,
                  double log_ratio_limit, int64_t stream) {
  TORCH_CHECK(logps.dim() == 2, "logps must be (B, T)");
  const int64_t B = logps.size(0), T = logps.size(1);
  check_tensor(group, "group", at::kInt);
  check_tensor(num_bins, "num_bins", at::kInt);
  for (const Tensor* t : {&advantages, &group, &grad}) TORCH_CHECK(t->sizes() == logps.sizes(), "(B, T) shapes");
  TORCH_CHECK(!policy_weights.has_value() || policy_weights->sizes() == logps.sizes(), "(B, T) policy_weights");
  TORCH_CHECK(num_bins.numel() == B && scratch.numel() == 3 * B * T && row_sums.numel() == B * rankgrpo::kRowSums,
              "num_bins (B,), scratch (3, B, T), row_sums (B, 5)");
  TORCH_CHECK(weighting >= 0 && weighting <= 2, "weighting must be 0 (grpo), 1 (token mean) or 2 (rank)");
  check_launch(rankgrpo::segment_loss(
                   f32(logps, "logps"), data_or_null<const float>(old_logps, "old_logps", at::kFloat),
                   data_or_null<const float>(ref_logps, "ref_logps", at::kFloat), f32(advantages, "advantages"),
                   data_or_null<const float>(policy_weights, "policy_weights", at::kFloat), group.data_ptr<int32_t>(),
                   num_bins.data_ptr<int32_t>(), f32(normaliser, "normaliser"), f32(tokens, "tokens"),
                   f32(scratch, "scratch"), f32(grad, "grad"), f32(row_sums, "row_sums"), B, T,
                   static_cast<float>(beta), static_cast<float>(lo), static_cast<float>(hi),
                   static_cast<float>(delta.value_or(0.0)), delta.has_value(), static_cast<int>(weighting),
                   static_cast<float>(log_ratio_limit), as_stream(stream)),
               "segment_loss");
}

// Bytes [first, last) that a (rows, cols) matrix with unit column stride and the given row stride spans.
std::pair<uintptr_t, uintptr_t> byte_span(const Tensor& t, int64_t row_stride) {
  const auto first = reinterpret_cast<uintptr_t>(t.data_ptr());
  const int64_t elements = (t.size(0) - 1) * row_stride + t.size(1);
  return {first, first + static_cast<uintptr_t>(elements * static_cast<int64_t>(t.element_size()))};
}

// Row pass over logits (C, V) fp32 with unit column stride and row stride S >= V (the GEMM output, possibly columns
// of a wider buffer). bias (V,) fp32/bf16/fp16 or None; targets (C,) int64 or int32; row_mask (C,) bool or None;
// lse_in (C,) fp32 or None (then lse is not written: pass lse_in itself); logp, lse, entropy (C,) fp32;
// grad_out None or (C, V) fp32/bf16/fp16 with unit column stride: the in-place view of the logits' bytes (row r
// where logits row r starts: row stride 4 S / itemsize) or a buffer that does not overlap them.
void row_pass(const Tensor& logits, const OptTensor& bias, const Tensor& targets, const OptTensor& row_mask,
              double inv_temperature, const OptTensor& lse_in, const Tensor& logp, const Tensor& lse,
              const OptTensor& entropy, const OptTensor& grad_out, int64_t stream) {
  TORCH_CHECK(logits.is_cuda() && logits.dim() == 2 && logits.scalar_type() == at::kFloat,
              "logits must be a (C, V) float32 CUDA tensor");
  const int64_t rows = logits.size(0), cols = logits.size(1);
  TORCH_CHECK(cols >= 1, "logits need at least one column");
  TORCH_CHECK(cols == 1 || logits.stride(1) == 1, "logits must have unit column stride");
  const int64_t row_stride = rows > 1 ? logits.stride(0) : 0;  // unused with a single row
  TORCH_CHECK(rows <= 1 || row_stride >= cols, "logits row stride must be at least V");
  check_tensor(targets, "targets", targets.scalar_type() == at::kInt ? at::kInt : at::kLong);
  TORCH_CHECK(targets.numel() == rows && logp.numel() == rows && lse.numel() == rows,
              "targets, logp and lse must have one entry per logits row");
  TORCH_CHECK(!row_mask.has_value() || row_mask->numel() == rows, "row_mask must have one entry per row");
  TORCH_CHECK(!lse_in.has_value() || lse_in->numel() == rows, "lse_in must have one entry per row");
  TORCH_CHECK(!entropy.has_value() || entropy->numel() == rows, "entropy must have one entry per row");
  TORCH_CHECK(!bias.has_value() || bias->numel() == cols, "bias must have one entry per logits column");
  const auto bias_dtype = bias.has_value() ? bias->scalar_type() : at::kFloat;
  void* grad = nullptr;
  int64_t grad_row_stride = 0;
  auto grad_dtype = at::kFloat;
  if (grad_out.has_value()) {
    const Tensor& g = *grad_out;
    grad_dtype = g.scalar_type();
    TORCH_CHECK(g.is_cuda() && g.sizes() == logits.sizes(), "grad_out must be a CUDA tensor shaped like logits");
    TORCH_CHECK(cols == 1 || g.stride(1) == 1, "grad_out must have unit column stride");
    grad_row_stride = rows > 1 ? g.stride(0) : 0;
    TORCH_CHECK(rows <= 1 || grad_row_stride >= cols, "grad_out row stride must be at least V");
    const auto [lo, hi] = byte_span(logits, row_stride);
    const auto [g_lo, g_hi] = byte_span(g, grad_row_stride);
    const bool in_place = g_lo == lo && grad_row_stride * g.element_size() == row_stride * 4;
    TORCH_CHECK(in_place || g_hi <= lo || hi <= g_lo,
                "grad_out must be the in-place view of the logits (row r where logits row r starts) or not overlap "
                "them");
    grad = g.data_ptr();
  }
  check_launch(rankgrpo::row_pass(
                   logits.data_ptr<float>(), rows, cols, row_stride,
                   data_or_null<const void>(bias, "bias", bias_dtype), operand_dtype(bias_dtype),
                   targets.data_ptr(), targets.scalar_type() == at::kInt,
                   data_or_null<const bool>(row_mask, "row_mask", at::kBool), static_cast<float>(inv_temperature),
                   data_or_null<const float>(lse_in, "lse_in", at::kFloat), f32(logp, "logp"),
                   lse_in.has_value() ? nullptr : f32(lse, "lse"),
                   data_or_null<float>(entropy, "entropy", at::kFloat), grad, operand_dtype(grad_dtype),
                   grad_row_stride, as_stream(stream)),
               "row_pass");
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "rankgrpo_kernels CUDA kernels (csrc/): the row pass and the segment loss";
  m.def("segment_loss", &segment_loss);
  m.def("row_pass", &row_pass);
}

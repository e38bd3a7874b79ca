// Python binding of the CUDA entry points (pybind11 through torch/extension.h): checks the tensors, passes their
// data pointers and sizes, and the stream that Python hands over as an integer
// (torch.cuda.current_stream().cuda_stream), so this file needs neither CUDA nor ATen CUDA headers. Each entry point
// runs under a device guard on its first tensor's device (at::OptionalDeviceGuard: the device-generic guard, which
// dispatches to CUDA's at run time; c10/cuda/CUDAGuard.h needs CUDA's generated headers, absent from the CPU wheel
// that compiles this file in CI), and a failed launch names its kernel.
#include <ATen/DeviceGuard.h>
#include <torch/extension.h>

#include <cmath>
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

// An entry point run with its first tensor's device current, whatever device the caller left current.
template <typename... Rest>
auto on_device(void (*entry)(const Tensor&, Rest...)) {
  return [entry](const Tensor& first, Rest... rest) {
    const at::OptionalDeviceGuard guard(at::device_of(first));
    entry(first, std::forward<Rest>(rest)...);
  };
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
// tokens (1,) fp32, scratch (3, B, T) fp32; writes grad (B, T) and row_sums (B, 6). policy: contract.POLICY with
// its settings (PolicyTerm).
void segment_loss(const Tensor& logps, const OptTensor& old_logps, const OptTensor& ref_logps,
                  const Tensor& advantages, const OptTensor& policy_weights, const Tensor& group,
                  const Tensor& num_bins, const Tensor& normaliser, const Tensor& tokens, const Tensor& scratch,
                  const Tensor& grad, const Tensor& row_sums,
                  double beta, double lo, double hi, std::optional<double> delta, int64_t weighting,
                  double log_ratio_limit, int64_t policy, double tau_pos, double tau_neg, double k_pos,
                  double lambda_pos, double k_neg, double lambda_neg, double log_w_min, bool kl_corrected,
                  int64_t stream) {
  TORCH_CHECK(logps.dim() == 2, "logps must be (B, T)");
  const int64_t B = logps.size(0), T = logps.size(1);
  check_tensor(group, "group", at::kInt);
  check_tensor(num_bins, "num_bins", at::kInt);
  for (const Tensor* t : {&advantages, &group, &grad}) TORCH_CHECK(t->sizes() == logps.sizes(), "(B, T) shapes");
  TORCH_CHECK(!policy_weights.has_value() || policy_weights->sizes() == logps.sizes(), "(B, T) policy_weights");
  TORCH_CHECK(num_bins.numel() == B && scratch.numel() == 3 * B * T && row_sums.numel() == B * rankgrpo::kRowSums,
              "num_bins (B,), scratch (3, B, T), row_sums (B, 6)");
  TORCH_CHECK(weighting >= 0 && weighting <= 2, "weighting must be 0 (grpo), 1 (token mean) or 2 (rank)");
  TORCH_CHECK(policy >= rankgrpo::kPpo && policy <= rankgrpo::kVespo, "policy must be 0 (PPO), 1 (GMPO), 2 (SAPO), "
              "3 (CISPO) or 4 (VESPO)");
  const rankgrpo::PolicyTerm term{static_cast<int>(policy), static_cast<float>(tau_pos), static_cast<float>(tau_neg),
                                  static_cast<float>(k_pos), static_cast<float>(lambda_pos),
                                  static_cast<float>(k_neg), static_cast<float>(lambda_neg),
                                  static_cast<float>(log_w_min)};
  check_launch(rankgrpo::segment_loss(
                   f32(logps, "logps"), data_or_null<const float>(old_logps, "old_logps", at::kFloat),
                   data_or_null<const float>(ref_logps, "ref_logps", at::kFloat), f32(advantages, "advantages"),
                   data_or_null<const float>(policy_weights, "policy_weights", at::kFloat), group.data_ptr<int32_t>(),
                   num_bins.data_ptr<int32_t>(), f32(normaliser, "normaliser"), f32(tokens, "tokens"),
                   f32(scratch, "scratch"), f32(grad, "grad"), f32(row_sums, "row_sums"), B, T,
                   static_cast<float>(beta), static_cast<float>(lo), static_cast<float>(hi),
                   static_cast<float>(delta.value_or(0.0)), delta.has_value(), static_cast<int>(weighting),
                   static_cast<float>(log_ratio_limit), term, kl_corrected && ref_logps.has_value(),
                   as_stream(stream)),
               "segment_loss");
}

// Bytes [first, last) that a (rows, cols) matrix with unit column stride and the given row stride spans.
std::pair<uintptr_t, uintptr_t> byte_span(const Tensor& t, int64_t row_stride) {
  const auto first = reinterpret_cast<uintptr_t>(t.data_ptr());
  const int64_t elements = (t.size(0) - 1) * row_stride + t.size(1);
  return {first, first + static_cast<uintptr_t>(elements * static_cast<int64_t>(t.element_size()))};
}

// The grad view of a (C, V) pass: grad_out None or (C, V) fp32/bf16/fp16 with unit column stride, the in-place view
// of the logits' bytes (row r where logits row r starts: row stride 4 S / itemsize) or a buffer that does not
// overlap them.
struct GradOut {
  void* data = nullptr;
  int64_t row_stride = 0;
  at::ScalarType dtype = at::kFloat;
};

GradOut check_grad_out(const Tensor& logits, int64_t row_stride, const OptTensor& grad_out) {
  GradOut out;
  if (!grad_out.has_value()) return out;
  const Tensor& g = *grad_out;
  const int64_t rows = logits.size(0), cols = logits.size(1);
  out.dtype = g.scalar_type();
  TORCH_CHECK(g.is_cuda() && g.sizes() == logits.sizes(), "grad_out must be a CUDA tensor shaped like logits");
  TORCH_CHECK(cols == 1 || g.stride(1) == 1, "grad_out must have unit column stride");
  out.row_stride = rows > 1 ? g.stride(0) : 0;
  TORCH_CHECK(rows <= 1 || out.row_stride >= cols, "grad_out row stride must be at least V");
  const auto [lo, hi] = byte_span(logits, row_stride);
  const auto [g_lo, g_hi] = byte_span(g, out.row_stride);
  const bool in_place = g_lo == lo && out.row_stride * g.element_size() == row_stride * 4;
  TORCH_CHECK(in_place || g_hi <= lo || hi <= g_lo,
              "grad_out must be the in-place view of the logits (row r where logits row r starts) or not overlap them");
  out.data = g.data_ptr();
  return out;
}

// Checks logits (C, V) fp32 with unit column stride and row stride S >= V (the GEMM output, possibly columns of a
// wider buffer), targets (C,) int64 or int32, bias (V,) or None and the transform; returns the row stride.
int64_t check_logits(const Tensor& logits, const Tensor& targets, const OptTensor& bias, double logit_scale,
                     const std::optional<double>& softcap) {
  TORCH_CHECK(logits.is_cuda() && logits.dim() == 2 && logits.scalar_type() == at::kFloat,
              "logits must be a (C, V) float32 CUDA tensor");
  const int64_t rows = logits.size(0), cols = logits.size(1);
  TORCH_CHECK(cols >= 1, "logits need at least one column");
  TORCH_CHECK(cols == 1 || logits.stride(1) == 1, "logits must have unit column stride");
  const int64_t row_stride = rows > 1 ? logits.stride(0) : 0;  // unused with a single row
  TORCH_CHECK(rows <= 1 || row_stride >= cols, "logits row stride must be at least V");
  check_tensor(targets, "targets", targets.scalar_type() == at::kInt ? at::kInt : at::kLong);
  TORCH_CHECK(targets.numel() == rows, "targets must have one entry per logits row");
  TORCH_CHECK(!bias.has_value() || bias->numel() == cols, "bias must have one entry per logits column");
  TORCH_CHECK(std::isfinite(logit_scale), "logit_scale must be finite");
  TORCH_CHECK(!softcap.has_value() || (std::isfinite(*softcap) && *softcap > 0), "softcap must be > 0 or None");
  return row_stride;
}

// Row pass (row_pass.cu). bias (V,) fp32/bf16/fp16 or None; lse_in (C,) fp32 or None (then lse is not written: pass
// lse_in itself); logp, lse, entropy (C,) fp32; softcap None or > 0; grad_out as in check_grad_out, D written times
// grad_scale (+- a power of two).
void row_pass(const Tensor& logits, const OptTensor& bias, const Tensor& targets, double inv_temperature,
              double logit_scale, std::optional<double> softcap, const OptTensor& lse_in, const Tensor& logp,
              const Tensor& lse, const OptTensor& entropy, const OptTensor& grad_out, double grad_scale,
              int64_t stream) {
  const int64_t row_stride = check_logits(logits, targets, bias, logit_scale, softcap);
  const int64_t rows = logits.size(0), cols = logits.size(1);
  TORCH_CHECK(logp.numel() == rows && lse.numel() == rows, "logp and lse must have one entry per logits row");
  TORCH_CHECK(!lse_in.has_value() || lse_in->numel() == rows, "lse_in must have one entry per row");
  TORCH_CHECK(!entropy.has_value() || entropy->numel() == rows, "entropy must have one entry per row");
  const auto bias_dtype = bias.has_value() ? bias->scalar_type() : at::kFloat;
  const GradOut grad = check_grad_out(logits, row_stride, grad_out);
  const char* kernel = "row_pass";
  check_launch(rankgrpo::row_pass(
                   logits.data_ptr<float>(), rows, cols, row_stride,
                   data_or_null<const void>(bias, "bias", bias_dtype), operand_dtype(bias_dtype),
                   targets.data_ptr(), targets.scalar_type() == at::kInt, inv_temperature, logit_scale,
                   softcap.value_or(0.0), data_or_null<const float>(lse_in, "lse_in", at::kFloat), f32(logp, "logp"),
                   lse_in.has_value() ? nullptr : f32(lse, "lse"),
                   data_or_null<float>(entropy, "entropy", at::kFloat), grad.data, operand_dtype(grad.dtype),
                   grad.row_stride, grad_scale, as_stream(stream), &kernel),
               kernel);
}

// Gradient pass (row_pass.cu) over logits as the row pass takes them: lse, entropy, g, e (C,) fp32; grad_out (C, V)
// as in check_grad_out.
void grad_pass(const Tensor& logits, const OptTensor& bias, const Tensor& targets, double inv_temperature,
               double logit_scale, std::optional<double> softcap, const Tensor& lse, const Tensor& entropy,
               const Tensor& g, const Tensor& e, const Tensor& grad_out, int64_t stream) {
  const int64_t row_stride = check_logits(logits, targets, bias, logit_scale, softcap);
  const int64_t rows = logits.size(0), cols = logits.size(1);
  for (const Tensor* t : {&lse, &entropy, &g, &e}) TORCH_CHECK(t->numel() == rows, "lse, entropy, g, e: (C,) each");
  const auto bias_dtype = bias.has_value() ? bias->scalar_type() : at::kFloat;
  const GradOut grad = check_grad_out(logits, row_stride, grad_out);
  const char* kernel = "grad_pass";
  check_launch(rankgrpo::grad_pass(
                   logits.data_ptr<float>(), rows, cols, row_stride,
                   data_or_null<const void>(bias, "bias", bias_dtype), operand_dtype(bias_dtype),
                   targets.data_ptr(), targets.scalar_type() == at::kInt, inv_temperature, logit_scale,
                   softcap.value_or(0.0), f32(lse, "lse"), f32(entropy, "entropy"), f32(g, "g"), f32(e, "e"),
                   grad.data, operand_dtype(grad.dtype), grad.row_stride, as_stream(stream), &kernel),
               kernel);
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "rankgrpo_kernels CUDA kernels (csrc/): the row and gradient passes and the segment loss";
  m.def("segment_loss", on_device(&segment_loss));
  m.def("row_pass", on_device(&row_pass));
  m.def("grad_pass", on_device(&grad_pass));
}

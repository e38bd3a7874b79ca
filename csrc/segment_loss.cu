// The O(N) Rank-GRPO segment loss with its analytic gradient g_t = dL/dl_t, one block per row, no atomics.
// Mirrors rankgrpo_kernels/segment_loss.py exactly (ties, delta, the LOG_RATIO_LIMIT clamp, loss types, KL).
//
// Row i has T tokens; group[t] is the token's row-relative item id in [0, num_bins) or -1 outside the loss.
// With c_t the loss type's weight (grpo 1/(B M_i); bnpo, dr_grpo, dapo 1/normaliser; rank 1/(normaliser n_k)):
//
//   pass 1 (warp per item):  n_k = |S_k|,  log w_k = mean_{t in S_k} (l_t - o_t)          (0 on-policy)
//   pass 2 (warp per item):  D_k = sum_{t in S_k} c_t (-a_t act_t)                          (dL/dw_k)
//   pass 3 (thread per token):
//     w = exp(min(log w_k, LIMIT)),  v1 = min(w, delta) a,  v2 = clip(w, 1 - eps_low, 1 + eps_high) a
//     act = d min(v1, v2)/dw / a: the taken branch's derivative, the mean of both on ties (as torch.min)
//     L += -c_t min(v1, v2) + beta kw_t (e^(r-l) - (r - l) - 1)   (r - l clamped at LIMIT; kw = c, rank: 1/tokens)
//     g_t = D_k w_k [log w_k <= LIMIT] / n_k + beta kw_t (1 - e^(r-l)) [r - l <= LIMIT]
//   and the row's sums (loss, clipped low, clipped high, ratio, KL) in fixed-order block reductions.
//
// Per item the work is (tokens x items) comparisons spread over 8 warps, fine for the ~20 items of a ranked list.
//
// Equivalent PyTorch: rankgrpo_kernels.segment_loss.segment_loss(batch, cfg).
#include "common.cuh"

namespace rankgrpo {
namespace {

constexpr int kThreads = 256;
constexpr int kWarps = kThreads / kWarpSize;

struct Params {
  const float* logps;
  const float* old_logps;  // null: on-policy, every ratio is 1
  const float* ref_logps;  // null: no KL
  const float* advantages;
  const int32_t* group;
  const int32_t* num_bins;
  const float* normaliser;
  const float* tokens;
  float* bin_count;
  float* bin_log_w;
  float* bin_dloss;
  float* grad;
  float* row_sums;
  int64_t B, T;
  float beta, lo, hi, delta, log_ratio_limit;
  bool has_delta;
  int weighting;
};

struct ItemTerms {
  float w, w_unclipped, branch_min, act;
};

// The ratio, its delta-bounded form, min(v1, v2) and d min(v1, v2)/dw / a of a token with advantage a.
__device__ __forceinline__ ItemTerms item_terms(const Params& p, float log_w, float a) {
  const float w = expf(fminf(log_w, p.log_ratio_limit));
  const float w_clipped = fminf(fmaxf(w, p.lo), p.hi);
  const float w_unclipped = p.has_delta ? fminf(w, p.delta) : w;
  const float grad_unclipped = p.has_delta ? (w <= p.delta ? 1.0f : 0.0f) : 1.0f;
  const float grad_clipped = (w >= p.lo && w <= p.hi) ? 1.0f : 0.0f;
  const float v1 = w_unclipped * a, v2 = w_clipped * a;
  const float act = v1 < v2 ? grad_unclipped : (v1 > v2 ? grad_clipped : 0.5f * (grad_unclipped + grad_clipped));
  return {w, w_unclipped, fminf(v1, v2), act};
}

// The loss type's weight c_t of a token in the loss whose item has n_k tokens.
__device__ __forceinline__ float policy_weight(const Params& p, float row_weight, float n_k) {
  return p.weighting == 2 ? 1.0f / (*p.normaliser * fmaxf(n_k, 1.0f)) : row_weight;
}

__global__ void __launch_bounds__(kThreads) segment_loss_kernel(Params p) {
  __shared__ float partial[kWarps];
  const int64_t base = static_cast<int64_t>(blockIdx.x) * p.T;
  const int num_bins = p.num_bins[blockIdx.x];
  const int warp = threadIdx.x / kWarpSize, lane = threadIdx.x % kWarpSize;

  // Pass 1: n_k and log w_k.
  for (int k = warp; k < num_bins; k += kWarps) {
    float count = 0.0f, log_ratio_sum = 0.0f;
    for (int64_t t = lane; t < p.T; t += kWarpSize) {
      if (p.group[base + t] != k) continue;
      count += 1.0f;
      if (p.old_logps != nullptr) log_ratio_sum += p.logps[base + t] - p.old_logps[base + t];
    }
    count = warp_sum(count);
    log_ratio_sum = warp_sum(log_ratio_sum);
    if (lane == 0) {
      p.bin_count[base + k] = count;
      p.bin_log_w[base + k] = log_ratio_sum / fmaxf(count, 1.0f);
    }
  }
  float in_loss_count = 0.0f;
  for (int64_t t = threadIdx.x; t < p.T; t += kThreads) in_loss_count += p.group[base + t] >= 0 ? 1.0f : 0.0f;
  const float row_tokens = block_sum<kThreads>(in_loss_count, partial);  // also orders pass 1 before pass 2
  const float row_weight = p.weighting == 0 ? 1.0f / (static_cast<float>(p.B) * fmaxf(row_tokens, 1.0f))
                                            : 1.0f / *p.normaliser;

  // Pass 2: D_k = sum_{t in k} c_t (-a_t act_t).
  for (int k = warp; k < num_bins; k += kWarps) {
    const float log_w = p.bin_log_w[base + k], n_k = p.bin_count[base + k];
    const float c = policy_weight(p, row_weight, n_k);
    float dloss = 0.0f;
    for (int64_t t = lane; t < p.T; t += kWarpSize) {
      if (p.group[base + t] != k) continue;
      const float a = p.advantages[base + t];
      dloss += -c * a * item_terms(p, log_w, a).act;
    }
    dloss = warp_sum(dloss);
    if (lane == 0) p.bin_dloss[base + k] = dloss;
  }
  __syncthreads();

  // Pass 3: g_t, the row's loss and statistics.
  float loss = 0.0f, low = 0.0f, high = 0.0f, ratio = 0.0f, kl_sum = 0.0f;
  const float inv_tokens = 1.0f / *p.tokens;
  for (int64_t t = threadIdx.x; t < p.T; t += kThreads) {
    const int k = p.group[base + t];
    float g = 0.0f;
    if (k >= 0) {
      const float a = p.advantages[base + t];
      const float log_w = p.bin_log_w[base + k], n_k = p.bin_count[base + k];
      const float c = policy_weight(p, row_weight, n_k);
      const ItemTerms it = item_terms(p, log_w, a);
      const float unsaturated = log_w <= p.log_ratio_limit ? 1.0f : 0.0f;
      g = p.bin_dloss[base + k] * it.w * unsaturated / fmaxf(n_k, 1.0f);
      loss += -c * it.branch_min;
      low += (it.w_unclipped < p.lo && a < 0.0f) ? 1.0f : 0.0f;
      high += (it.w_unclipped > p.hi && a > 0.0f) ? 1.0f : 0.0f;
      ratio += it.w;
      if (p.ref_logps != nullptr) {
        const float ref_minus_l = p.ref_logps[base + t] - p.logps[base + t];
        const float log_ref_ratio = fminf(ref_minus_l, p.log_ratio_limit);
        const float ref_ratio = expf(log_ref_ratio);
        const float kl = ref_ratio - log_ref_ratio - 1.0f;
        const float kl_weight = p.weighting == 2 ? inv_tokens : c;
        kl_sum += kl;
        if (p.beta != 0.0f) {  // as the reference: no KL term at all (not 0 * inf) when beta is 0
          loss += p.beta * kl_weight * kl;
          if (ref_minus_l <= p.log_ratio_limit) g += p.beta * kl_weight * (1.0f - ref_ratio);
        }
      }
    }
    p.grad[base + t] = g;
  }
  loss = block_sum<kThreads>(loss, partial);
  low = block_sum<kThreads>(low, partial);
  high = block_sum<kThreads>(high, partial);
  ratio = block_sum<kThreads>(ratio, partial);
  kl_sum = block_sum<kThreads>(kl_sum, partial);
  if (threadIdx.x == 0) {
    float* out = p.row_sums + static_cast<int64_t>(blockIdx.x) * kRowSums;
    out[0] = loss;
    out[1] = low;
    out[2] = high;
    out[3] = ratio;
    out[4] = kl_sum;
  }
}

}  // namespace

int segment_loss(const float* logps, const float* old_logps, const float* ref_logps, const float* advantages,
                 const int32_t* group, const int32_t* num_bins, const float* normaliser, const float* tokens,
                 float* scratch, float* grad, float* row_sums, int64_t B, int64_t T, float beta, float lo, float hi,
                 float delta, bool has_delta, int weighting, float log_ratio_limit, cudaStream_t stream) {
  if (B == 0) return 0;
  const Params p{logps, old_logps, ref_logps, advantages, group, num_bins, normaliser, tokens,
                 scratch, scratch + B * T, scratch + 2 * B * T, grad, row_sums,
                 B, T, beta, lo, hi, delta, log_ratio_limit, has_delta, weighting};
  segment_loss_kernel<<<static_cast<unsigned>(B), kThreads, 0, stream>>>(p);
  return launch_status();
}

}  // namespace rankgrpo

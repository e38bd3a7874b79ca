// The Rank-GRPO segment loss with its analytic gradient g_t = dL/dl_t: one block per row, O(T) per row of T tokens
// (plus O(items)), every sum in a fixed order (deterministic, no atomics, no host sync).
// Mirrors rankgrpo_kernels/backends/triton/segment_loss_kernel.py (ties, delta, the LOG_RATIO_LIMIT clamp, loss
// types, KL).
//
// Row i has T tokens; group[t] is the token's row-relative item id in [0, num_bins) or -1 outside the loss.
// With c_t the loss type's weight (grpo 1/(normaliser M_i), M_i the row's loss tokens; bnpo, dr_grpo, dapo
// 1/normaliser; rank 1/(normaliser n_k)) and pw_t the policy weights (1 when null; the policy term only):
//
//   pass 1:  n_k = |S_k|,  log w_k = mean_{t in S_k} (l_t - o_t)                           (0 on-policy)
//   pass 2:  D_k = sum_{t in S_k} c_t pw_t (-a_t act_t)                                      (dL/dw_k)
//   pass 3 (thread per token):
//     w = exp(min(log w_k, LIMIT)),  v1 = min(w, delta) a,  v2 = clip(w, 1 - eps_low, 1 + eps_high) a
//     act = d min(v1, v2)/dw / a: the taken branch's derivative, the mean of both on ties (as torch.min)
//     L += -c_t pw_t min(v1, v2) + beta kw_t (e^(r-l) - (r - l) - 1)  (r - l clamped at LIMIT; kw = c, rank: 1/tokens)
//     g_t = D_k w_k [log w_k <= LIMIT] / n_k + beta kw_t (1 - e^(r-l)) [r - l <= LIMIT]
//   and the row's sums (loss, clipped low, clipped high, ratio, KL) in fixed-order block reductions.
//
// Passes 1 and 2 walk the row in chunks of kThreads tokens, a token per thread, and add per-item sums into the
// row's bins (the scratch): in each warp the lanes holding one item (__match_any_sync) sum their values in lane
// order, then the lowest of them adds the sum into the item's bin, the warps taking turns (warp 0 first) between
// block barriers. Each bin is thus summed chunk by chunk, warp by warp, lane by lane: a fixed order. Per chunk the
// work is a load per token, at most 32 shared-memory adds per lane and kWarps barriers: O(T) per row.
//
// Equivalent PyTorch: rankgrpo_kernels.backends.torch.segment_loss(batch, spec=spec).
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
  const float* policy_weights;  // null: 1
  const int32_t* group;
  const int32_t* num_bins;
  const float* normaliser;
  const float* tokens;
  float* bin_count;
  float* bin_log_w;
  float* bin_dloss;
  float* grad;
  float* row_sums;
  int64_t T;
  float beta, lo, hi, delta, log_ratio_limit;
  bool has_delta;
  int weighting;
};

struct ItemTerms {
  float w, w_unclipped, branch_min, act;
};

// min/max that keep a NaN (fminf/fmaxf drop it): a non-finite log-prob must make the loss NaN, as torch does.
__device__ __forceinline__ float min_nan(float a, float b) { return (a < b || isnan(a)) ? a : b; }
__device__ __forceinline__ float max_nan(float a, float b) { return (a > b || isnan(a)) ? a : b; }

// The ratio, its delta-bounded form, min(v1, v2) and d min(v1, v2)/dw / a of a token with advantage a.
__device__ __forceinline__ ItemTerms item_terms(const Params& p, float log_w, float a) {
  const float w = expf(min_nan(log_w, p.log_ratio_limit));
  const float w_clipped = min_nan(max_nan(w, p.lo), p.hi);
  const float w_unclipped = p.has_delta ? min_nan(w, p.delta) : w;
  const float grad_unclipped = p.has_delta ? (w <= p.delta ? 1.0f : 0.0f) : 1.0f;
  const float grad_clipped = (w >= p.lo && w <= p.hi) ? 1.0f : 0.0f;
  const float v1 = w_unclipped * a, v2 = w_clipped * a;
  const float act = v1 < v2 ? grad_unclipped : (v1 > v2 ? grad_clipped : 0.5f * (grad_unclipped + grad_clipped));
  return {w, w_unclipped, min_nan(v1, v2), act};
}

// The policy weight pw_t of token i (flat index), 1 without policy weights.
__device__ __forceinline__ float token_policy_weight(const Params& p, int64_t i) {
  return p.policy_weights == nullptr ? 1.0f : p.policy_weights[i];
}

// The loss type's weight c_t of a token in the loss whose item has n_k tokens.
__device__ __forceinline__ float policy_weight(const Params& p, float row_weight, float n_k) {
  return p.weighting == 2 ? 1.0f / (*p.normaliser * fmaxf(n_k, 1.0f)) : row_weight;
}

// The sum of `value` over this lane's peers (the lanes of its warp with the same key: `peers`, from
// __match_any_sync), added in lane order, so that all of them get the same bits. `stage` holds the warp's 32 floats.
__device__ __forceinline__ float peer_sum(unsigned peers, float value, float* stage) {
  stage[threadIdx.x % kWarpSize] = value;
  __syncwarp();
  float sum = 0.0f;
  for (unsigned rest = peers; rest != 0u; rest &= rest - 1u) sum += stage[__ffs(static_cast<int>(rest)) - 1];
  __syncwarp();  // every lane has read `stage` before it is written again
  return sum;
}

// Whether this lane is the lowest of its peers and holds an item: the one lane that adds their sum to the bin.
__device__ __forceinline__ bool adds_to_bin(unsigned peers, int key) {
  return key >= 0 && __ffs(static_cast<int>(peers)) - 1 == static_cast<int>(threadIdx.x % kWarpSize);
}

// Runs `add` on the threads where `adds` holds, one warp after another (warp 0 first), with a block barrier after
// each warp: the warps' additions into one bin happen in a fixed order. Every thread of the block calls it.
template <typename Add>
__device__ __forceinline__ void in_warp_order(bool adds, Add&& add) {
  for (int w = 0; w < kWarps; ++w) {
    if (static_cast<int>(threadIdx.x) / kWarpSize == w && adds) add();
    __syncthreads();
  }
}

__global__ void __launch_bounds__(kThreads) segment_loss_kernel(Params p) {
  __shared__ float partial[kWarps];
  __shared__ float stage[kThreads];
  const int64_t base = static_cast<int64_t>(blockIdx.x) * p.T;
  const int num_bins = p.num_bins[blockIdx.x];
  float* const warp_stage = stage + threadIdx.x / kWarpSize * kWarpSize;

  for (int k = threadIdx.x; k < num_bins; k += kThreads) {
    p.bin_count[base + k] = 0.0f;
    p.bin_log_w[base + k] = 0.0f;
    p.bin_dloss[base + k] = 0.0f;
  }
  __syncthreads();

  // Pass 1: n_k and sum_{t in k} (l_t - o_t), then log w_k.
  float in_loss_count = 0.0f;
  for (int64_t t0 = 0; t0 < p.T; t0 += kThreads) {
    const int64_t t = t0 + threadIdx.x;
    const int k = t < p.T ? p.group[base + t] : -1;
    float diff = 0.0f;
    if (k >= 0) {
      in_loss_count += 1.0f;
      // On-policy (no old_logps) o = l: a ratio of exactly 1 that still turns a non-finite l into a NaN loss.
      diff = p.logps[base + t] - (p.old_logps != nullptr ? p.old_logps[base + t] : p.logps[base + t]);
    }
    const unsigned peers = __match_any_sync(kFullMask, k);
    const float diff_sum = peer_sum(peers, diff, warp_stage);
    in_warp_order(adds_to_bin(peers, k), [&] {
      p.bin_count[base + k] += static_cast<float>(__popc(peers));
      p.bin_log_w[base + k] += diff_sum;
    });
  }
  for (int k = threadIdx.x; k < num_bins; k += kThreads) p.bin_log_w[base + k] /= fmaxf(p.bin_count[base + k], 1.0f);
  const float row_tokens = block_sum<kThreads>(in_loss_count, partial);  // also orders pass 1 before pass 2
  const float row_weight = p.weighting == 0 ? 1.0f / (*p.normaliser * fmaxf(row_tokens, 1.0f)) : 1.0f / *p.normaliser;

  // Pass 2: D_k = sum_{t in k} c_t (-a_t act_t); the last barrier of in_warp_order orders it before pass 3.
  for (int64_t t0 = 0; t0 < p.T; t0 += kThreads) {
    const int64_t t = t0 + threadIdx.x;
    const int k = t < p.T ? p.group[base + t] : -1;
    float term = 0.0f;
    if (k >= 0) {
      const float a = p.advantages[base + t];
      const float c = policy_weight(p, row_weight, p.bin_count[base + k]) * token_policy_weight(p, base + t);
      term = -c * a * item_terms(p, p.bin_log_w[base + k], a).act;
    }
    const unsigned peers = __match_any_sync(kFullMask, k);
    const float term_sum = peer_sum(peers, term, warp_stage);
    in_warp_order(adds_to_bin(peers, k), [&] { p.bin_dloss[base + k] += term_sum; });
  }

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
      loss += -c * token_policy_weight(p, base + t) * it.branch_min;
      low += (it.w_unclipped < p.lo && a < 0.0f) ? 1.0f : 0.0f;
      high += (it.w_unclipped > p.hi && a > 0.0f) ? 1.0f : 0.0f;
      ratio += it.w;
      if (p.ref_logps != nullptr) {
        const float ref_minus_l = p.ref_logps[base + t] - p.logps[base + t];
        const float log_ref_ratio = min_nan(ref_minus_l, p.log_ratio_limit);
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
                 const float* policy_weights, const int32_t* group, const int32_t* num_bins, const float* normaliser,
                 const float* tokens, float* scratch, float* grad, float* row_sums, int64_t B, int64_t T, float beta,
                 float lo, float hi, float delta, bool has_delta, int weighting, float log_ratio_limit,
                 cudaStream_t stream) {
  if (B == 0) return 0;
  const Params p{logps, old_logps, ref_logps, advantages, policy_weights, group, num_bins, normaliser, tokens,
                 scratch, scratch + B * T, scratch + 2 * B * T, grad, row_sums,
                 T, beta, lo, hi, delta, log_ratio_limit, has_delta, weighting};
  segment_loss_kernel<<<static_cast<unsigned>(B), kThreads, 0, stream>>>(p);
  return launch_status();
}

}  // namespace rankgrpo

// The Rank-GRPO segment loss with its analytic gradient g_t = dL/dl_t: one block per row, O(T) per row of T tokens
// (plus O(items)), every sum in a fixed order (deterministic, no atomics, no host sync).
// Mirrors rankgrpo_kernels/backends/triton/segment_loss_kernel.py (ties, delta, the LOG_RATIO_LIMIT clamp, loss
// types, policy terms, KL).
//
// Row i has T tokens; group[t] is the token's row-relative item id in [0, num_bins) or -1 outside the loss.
// With c_t the loss type's weight (grpo 1/(normaliser M_i), M_i the row's loss tokens; bnpo, dr_grpo, dapo
// 1/normaliser; rank 1/(normaliser n_k)) and pw_t the policy weights (1 when null; the policy term only):
//
//   pass 1:  n_k = |S_k|,  log w_k = mean_{t in S_k} x_t,  x = l - o                       (0 on-policy)
//   pass 2:  D_k = sum_{t in S_k} c_t pw_t (-a_t act_t)     (dL/dw_k; REINFORCE terms: only the corrected KL's)
//   pass 3 (thread per token): w = exp(min(log w_k, LIMIT)) and the policy term -f (contract.POLICY):
//     PPO:   f = min(v1, v2), v1 = min(w, delta) a, v2 = clip(w, lo, hi) a; act = d f/dw / a: the taken branch's
//            derivative, the mean of both on ties (as torch.min)
//     GMPO:  pass 1 sums x = l - o clipped, min(x, hi) where a > 0, else max(x, lo) (log-space bounds); f = w a,
//            act = 1; a clipped token gets no gradient through w, and the clip counts are of x
//     SAPO:  f = (4 / tau) s a, s = sigmoid(tau (w - 1)), tau = tau_pos if a > 0 else tau_neg; act = 4 s (1 - s)
//     CISPO: f = phi a l, phi = min(w, hi);  VESPO: f = phi a l, phi = e^(lam + k log W - lam W) (0 if not
//            finite), log W = clamp(n_k log w_k, log_w_min, LIMIT), (k, lam) by a >= 0      (phi detached)
//     L += -c_t pw_t f + beta kw_t (e^(r-l) - (r - l) - 1)  (r - l clamped at LIMIT; kw = c, rank: 1/tokens)
//     g_t = D_k w_k [log w_k <= LIMIT] / n_k  (PPO, GMPO, SAPO)  or  -c_t pw_t phi a  (CISPO, VESPO)
//           + beta kw_t (1 - e^(r-l)) [r - l <= LIMIT]
//   kl_corrected (TRL's use_bias_correction_kl): every KL above becomes w_k KL, and beta kw_t KL_t joins D_k (also
//   for CISPO and VESPO, whose D_k is then that alone).
//   and the row's sums (loss, clipped low, clipped high, ratio, KL, phi) in fixed-order block reductions.
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
  int policy;  // PolicyKind
  bool kl_corrected;  // the KL weighted by the item ratio (needs ref_logps)
  float tau_pos, tau_neg, k_pos, lambda_pos, k_neg, lambda_neg, log_w_min;
};

struct ItemTerms {
  float w, w_unclipped, f, act, phi;  // f: the REINFORCE terms' f / l
};

// min/max that keep a NaN (fminf/fmaxf drop it): a non-finite log-prob must make the loss NaN, as torch does.
__device__ __forceinline__ float min_nan(float a, float b) { return (a < b || isnan(a)) ? a : b; }
__device__ __forceinline__ float max_nan(float a, float b) { return (a > b || isnan(a)) ? a : b; }

// The ratio, its delta-bounded form, f (f / l for the REINFORCE terms), d f/dw / a and phi of a token with
// advantage a whose item has n_k tokens and mean log-ratio log_w.
__device__ __forceinline__ ItemTerms item_terms(const Params& p, float log_w, float n_k, float a) {
  const float w = expf(min_nan(log_w, p.log_ratio_limit));
  ItemTerms it{w, p.has_delta ? min_nan(w, p.delta) : w, 0.0f, 0.0f, 0.0f};
  if (p.policy == kPpo) {
    const float w_clipped = min_nan(max_nan(w, p.lo), p.hi);
    const float grad_unclipped = p.has_delta ? (w <= p.delta ? 1.0f : 0.0f) : 1.0f;
    const float grad_clipped = (w >= p.lo && w <= p.hi) ? 1.0f : 0.0f;
    const float v1 = it.w_unclipped * a, v2 = w_clipped * a;
    it.act = v1 < v2 ? grad_unclipped : (v1 > v2 ? grad_clipped : 0.5f * (grad_unclipped + grad_clipped));
    it.f = min_nan(v1, v2);
  } else if (p.policy == kGmpo) {
    it.f = w * a;
    it.act = 1.0f;
  } else if (p.policy == kSapo) {
    const float tau = a > 0.0f ? p.tau_pos : p.tau_neg;
    // __fdividef (2 ulp, no IEEE slow-path call): the calls' saved registers spilled 4 bytes on sm_90a and sm_100a
    const float gate = __fdividef(1.0f, 1.0f + expf(-tau * (w - 1.0f)));
    it.f = __fdividef(4.0f, tau) * gate * a;
    it.act = 4.0f * gate * (1.0f - gate);
  } else {
    if (p.policy == kCispo) {
      it.phi = min_nan(w, p.hi);
    } else {
      const float log_big_w = min_nan(max_nan(log_w * n_k, p.log_w_min), p.log_ratio_limit);
      const bool nonneg = a >= 0.0f;
      const float lambda = nonneg ? p.lambda_pos : p.lambda_neg;
      const float phi = expf(lambda + (nonneg ? p.k_pos : p.k_neg) * log_big_w - lambda * expf(log_big_w));
      it.phi = isfinite(phi) ? phi : 0.0f;  // TRL's nan_to_num(0)
    }
    it.f = it.phi * a;
  }
  return it;
}

// Whether the policy term is a REINFORCE term (no gradient through the ratio), whether the corrected KL term adds
// to D_k, and whether anything does (pass 2 runs). Functions of the parameters, not values kept across the passes.
__device__ __forceinline__ bool reinforce(const Params& p) { return p.policy >= kCispo; }

// GMPO's clip of a token's log-ratio x: min(x, hi) where a > 0, else max(x, lo) (NaN kept).
__device__ __forceinline__ float gmpo_clip(const Params& p, float x, float a) {
  return a > 0.0f ? min_nan(x, p.hi) : max_nan(x, p.lo);
}
__device__ __forceinline__ bool corrected_kl_term(const Params& p) { return p.kl_corrected && p.beta != 0.0f; }
__device__ __forceinline__ bool through_ratio(const Params& p) { return !reinforce(p) || corrected_kl_term(p); }

// The k3 KL e^x - x - 1 of x = min(r - l, LIMIT) at token i, e^x, and whether r - l is below the limit.
struct K3 {
  float kl, ref_ratio;
  bool below_limit;
};
__device__ __forceinline__ K3 k3(const Params& p, int64_t i) {
  const float ref_minus_l = p.ref_logps[i] - p.logps[i];
  const float log_ref_ratio = min_nan(ref_minus_l, p.log_ratio_limit);
  const float ref_ratio = expf(log_ref_ratio);
  return {ref_ratio - log_ref_ratio - 1.0f, ref_ratio, ref_minus_l <= p.log_ratio_limit};
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

  // Pass 1: n_k and sum_{t in k} x_t (x = l - o, GMPO's clipped), then log w_k.
  float in_loss_count = 0.0f;
  for (int64_t t0 = 0; t0 < p.T; t0 += kThreads) {
    const int64_t t = t0 + threadIdx.x;
    const int k = t < p.T ? p.group[base + t] : -1;
    float diff = 0.0f;
    if (k >= 0) {
      in_loss_count += 1.0f;
      // On-policy (no old_logps) o = l: a ratio of exactly 1 that still turns a non-finite l into a NaN loss.
      diff = p.logps[base + t] - (p.old_logps != nullptr ? p.old_logps[base + t] : p.logps[base + t]);
      if (p.policy == kGmpo) diff = gmpo_clip(p, diff, p.advantages[base + t]);
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

  // Pass 2: D_k = sum_{t in k} dL/dw_k: c_t pw_t (-a_t act_t) unless a REINFORCE term (no gradient through the
  // ratio), plus beta kw_t KL_t when the KL is corrected; the last barrier of in_warp_order orders it before pass 3.
  // Skipped when nothing reaches the ratio (uniform over the block, so are the barriers).
  const int64_t pass2_end = through_ratio(p) ? p.T : 0;
  for (int64_t t0 = 0; t0 < pass2_end; t0 += kThreads) {
    const int64_t t = t0 + threadIdx.x;
    const int k = t < p.T ? p.group[base + t] : -1;
    float term = 0.0f;
    if (k >= 0) {
      const float a = p.advantages[base + t];
      const float c = policy_weight(p, row_weight, p.bin_count[base + k]);
      if (!reinforce(p)) {
        term = -c * token_policy_weight(p, base + t) * a *
               item_terms(p, p.bin_log_w[base + k], p.bin_count[base + k], a).act;
      }
      if (corrected_kl_term(p)) term += p.beta * (p.weighting == 2 ? 1.0f / *p.tokens : c) * k3(p, base + t).kl;
    }
    const unsigned peers = __match_any_sync(kFullMask, k);
    const float term_sum = peer_sum(peers, term, warp_stage);
    in_warp_order(adds_to_bin(peers, k), [&] { p.bin_dloss[base + k] += term_sum; });
  }

  // Pass 3: g_t, the row's loss and statistics.
  float loss = 0.0f, low = 0.0f, high = 0.0f, ratio = 0.0f, kl_sum = 0.0f, phi_sum = 0.0f;
  const float inv_tokens = 1.0f / *p.tokens;
  for (int64_t t = threadIdx.x; t < p.T; t += kThreads) {
    const int k = p.group[base + t];
    float g = 0.0f;
    if (k >= 0) {
      const float a = p.advantages[base + t];
      const float log_w = p.bin_log_w[base + k], n_k = p.bin_count[base + k];
      const float c = policy_weight(p, row_weight, n_k);
      const float cp = c * token_policy_weight(p, base + t);
      const ItemTerms it = item_terms(p, log_w, n_k, a);
      if (reinforce(p)) {
        g = -cp * it.f;
        loss += -cp * it.f * p.logps[base + t];
        phi_sum += it.phi;
      } else {
        loss += -cp * it.f;
      }
      // What the clip counts compare with lo and hi: GMPO's token log-ratio, whose clipping also stops its gradient.
      float clipped_by = it.w_unclipped;
      bool kept = true;
      if (p.policy == kGmpo) {
        clipped_by = p.logps[base + t] - (p.old_logps != nullptr ? p.old_logps[base + t] : p.logps[base + t]);
        kept = gmpo_clip(p, clipped_by, a) == clipped_by;
      }
      if (through_ratio(p) && kept && log_w <= p.log_ratio_limit) {
        g += p.bin_dloss[base + k] * it.w / fmaxf(n_k, 1.0f);
      }
      low += (clipped_by < p.lo && a < 0.0f) ? 1.0f : 0.0f;
      high += (clipped_by > p.hi && a > 0.0f) ? 1.0f : 0.0f;
      ratio += it.w;
      if (p.ref_logps != nullptr) {
        const K3 kl = k3(p, base + t);
        const float kl_ratio = p.kl_corrected ? it.w : 1.0f;
        const float kl_weight = p.weighting == 2 ? inv_tokens : c;
        kl_sum += kl.kl * kl_ratio;
        if (p.beta != 0.0f) {  // as the reference: no KL term at all (not 0 * inf) when beta is 0
          loss += p.beta * kl_weight * kl.kl * kl_ratio;
          if (kl.below_limit) g += p.beta * kl_weight * kl_ratio * (1.0f - kl.ref_ratio);
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
  phi_sum = block_sum<kThreads>(phi_sum, partial);
  if (threadIdx.x == 0) {
    float* out = p.row_sums + static_cast<int64_t>(blockIdx.x) * kRowSums;
    out[0] = loss;
    out[1] = low;
    out[2] = high;
    out[3] = ratio;
    out[4] = kl_sum;
    out[5] = phi_sum;
  }
}

}  // namespace

int segment_loss(const float* logps, const float* old_logps, const float* ref_logps, const float* advantages,
                 const float* policy_weights, const int32_t* group, const int32_t* num_bins, const float* normaliser,
                 const float* tokens, float* scratch, float* grad, float* row_sums, int64_t B, int64_t T, float beta,
                 float lo, float hi, float delta, bool has_delta, int weighting, float log_ratio_limit,
                 const PolicyTerm& policy, bool kl_corrected, cudaStream_t stream) {
  if (B == 0) return 0;
  const Params p{logps, old_logps, ref_logps, advantages, policy_weights, group, num_bins, normaliser, tokens,
                 scratch, scratch + B * T, scratch + 2 * B * T, grad, row_sums,
                 T, beta, lo, hi, delta, log_ratio_limit, has_delta, weighting, policy.kind, kl_corrected,
                 policy.tau_pos, policy.tau_neg, policy.k_pos, policy.lambda_pos, policy.k_neg, policy.lambda_neg,
                 policy.log_w_min};
  segment_loss_kernel<<<static_cast<unsigned>(B), kThreads, 0, stream>>>(p);
  return launch_status();
}

}  // namespace rankgrpo

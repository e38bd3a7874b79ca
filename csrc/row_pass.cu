// Row pass and gradient pass over a chunk of fp32 logits acc = h_c W^T (cuBLAS output, row stride S >= V) giving,
// per row r (a token with target y, bias b, logit scale s, softcap c, temperature T), in fp32:
//
//   u       = s (logits[r] + b)
//   z       = S(u) / T,  S(u) = c tanh(u / c) with a softcap, else u     (scale, softcap, temperature: TRL's order)
//   lse     = log sum_v exp(z_v)                     or lse_in[r] (a recomputed or vocabulary-sharded forward's)
//   logp    = z_y - lse                              z_y := 0 when y is outside [0, V) (another shard, padding)
//   entropy = -sum_v p_v (z_v - lse), p = exp(z - lse)      (= lse - sum_v softmax(z)_v z_v; with a shard's
//                                                            lse_in, that shard's term of the global entropy)
//   D       = (onehot(y) - p) S'(u)                  written over the logits in the grad dtype (not scaled by
//                                                    g s / T); S'(u) = 1 - tanh(u / c)^2, or 1 without a softcap
//
// The gradient pass (given lse, entropy H, g = dL/dlogp and e = dL/dH per row) is the write pass of the streaming
// kernel with D' = [g (onehot(y) - p) - e p (z - lse + H)] S'(u) (the caller scales rows by s / T); the row pass's
// write is its case g = 1, e = 0. Without a softcap z = (logits + b) (s / T): one multiply, as with s = 1 before.
// tanhf gives S, and S' = 4 q / (1 + q)^2 with q = exp(-2 |u / c|) (no cancellation of 1 - tanh^2 near |tanh| = 1).
// A NaN or +inf logit makes the row's lse, logp and D NaN (or inf).
// Mirrors rankgrpo_kernels/backends/triton/row_pass_kernel.py.
//
// One block per row; every sum runs in a fixed order (thread-strided partials, warp butterflies, warps in order
// through shared memory): deterministic, no atomics. Bytes moved per logit (g = grad itemsize, 0 without D; the
// bias, shared by all rows, stays in L2):
//
//   cached kernel (V <= kCachedColumns, 8192 with a softcap: S' is held too; 16-byte aligned rows, no lse_in):
//                                    4 + g, the row is held in registers
//   streaming kernel, no lse_in:     4 + 4 + g (online max / sum / entropy, then the write); 4 without D
//   streaming kernel, lse_in given:  4 + g (the write pass; 4 with only the entropy, 0 with neither)
//   gradient pass:                   4 + g (the streaming kernel's write pass)
//
// In place without races: D's row r starts at logits' row r (grad row stride 4 S / g elements), so the store of
// column c lands in fp32 column floor(c g / 4) <= c. Each block walks its row in tiles of increasing columns and
// separates a tile's loads (all threads) from its stores by __syncthreads(): every fp32 column a store overwrites
// lies in this tile or an earlier one, already loaded by every thread and never read again. The target logit is
// loaded before the first barrier. logits and grad alias, so neither is __restrict__.
//
// Equivalent PyTorch:
//   u = s * (logits.double() + bias);  t = torch.tanh(u / c);  z = c * t / T  (or u / T);  slope = 1 - t ** 2 (or 1)
//   lse = z.logsumexp(-1);  p = (z - lse[:, None]).exp()
//   logp = z.gather(-1, y[:, None])[:, 0] - lse;  entropy = -(p * (z - lse[:, None])).sum(-1)
//   D = (F.one_hot(y, V) - p) * slope
//   D_ = (g[:, None] * (F.one_hot(y, V) - p) - e[:, None] * p * (z - lse[:, None] + H[:, None])) * slope
#include <math_constants.h>

#include "common.cuh"

namespace rankgrpo {
namespace {

constexpr float kNegInf = -__builtin_huge_valf();
constexpr int kStreamThreads = 256;
// Vectors per thread per tile of the streaming walk: loads in flight between barriers. Two for fp32 rows with an
// fp32 bias and fp32 D (32 bytes a vector, the most live values): at four sm_120's ptxas spilled 36 bytes. The
// per-thread order of the columns does not depend on it (column t, t + 256, ...): the same sums, bit for bit.
template <typename GradT, typename BiasT, int kVec>
constexpr int kStreamUnroll = sizeof(GradT) == 4 && sizeof(BiasT) == 4 && kVec == 4 ? 2 : 4;
constexpr int kCachedThreads = 1024;
constexpr int kCachedItems = 4;  // float4 per thread held in registers (<= 64 registers at 1024 threads)
constexpr int64_t kCachedColumns = int64_t{kCachedThreads} * kCachedItems * 4;  // 16384 (8192 with a softcap)

struct Args {
  const float* logits;  // aliases grad: not __restrict__
  int64_t cols, row_stride;
  const void* bias;  // null: none
  const void* targets;
  bool targets_int32;
  float in_scale;   // x = (logits + bias) in_scale: s / T without a softcap, s / c with one
  float out_scale;  // z = tanh(x) out_scale with a softcap (c / T)
  bool softcap;
  const float* lse_in;  // null: reduce (the gradient pass's lse)
  float* logp;  // null: not written (the gradient pass)
  float* lse;
  float* entropy;  // null: not wanted
  const float* g;  // the gradient pass's per-row g = dL/dlogp, e = dL/dH and H; null: the row pass
  const float* e;
  const float* h;
  void* grad;  // null: no D
  int64_t grad_row_stride;
};

template <typename T, int kVec>
struct alignas(sizeof(T) * kVec) Pack {
  T v[kVec];
};

// x = (logits[c .. c + kVec) + bias) * in_scale; c is a multiple of kVec.
template <typename BiasT, int kVec>
__device__ __forceinline__ void load_scaled(const Args& a, const float* row, int64_t c, float (&x)[kVec]) {
  const Pack<float, kVec> v = *reinterpret_cast<const Pack<float, kVec>*>(row + c);
  if (a.bias != nullptr) {
    const Pack<BiasT, kVec> b = *reinterpret_cast<const Pack<BiasT, kVec>*>(static_cast<const BiasT*>(a.bias) + c);
#pragma unroll
    for (int j = 0; j < kVec; ++j) x[j] = (v.v[j] + to_float(b.v[j])) * a.in_scale;
  } else {
#pragma unroll
    for (int j = 0; j < kVec; ++j) x[j] = v.v[j] * a.in_scale;
  }
}

// z from x, and S'(u) in slope: tanh(x) out_scale and 4 q / (1 + q)^2 (q = exp(-2 |x|)) with a softcap, else x and 1.
template <bool kSoftcap>
__device__ __forceinline__ float transform(float x, float out_scale, float& slope) {
  if constexpr (kSoftcap) {
    const float q = expf(-2.0f * fabsf(x));
    slope = 4.0f * q / ((1.0f + q) * (1.0f + q));
    return tanhf(x) * out_scale;
  } else {
    slope = 1.0f;
    return x;
  }
}

__device__ __forceinline__ float transform(const Args& a, float x, float& slope) {
  return a.softcap ? transform<true>(x, a.out_scale, slope) : transform<false>(x, a.out_scale, slope);
}

// The gradient pass's g, e, H of a row; the row pass is g = 1, e = 0 (pass false).
struct RowGrad {
  bool pass;
  float g, e, h;
};

// One logit's gradient: D = onehot - p (row pass), D' = g (onehot - p) - e p (log p + H) (gradient pass; a -inf
// logit has p = 0 and adds nothing), times S'(u) (1 without a softcap: exact).
__device__ __forceinline__ float gradient(const RowGrad& r, bool hot, float p, float log_p, float slope) {
  float d = (hot ? 1.0f : 0.0f) - p;
  if (r.pass) d = r.g * d - r.e * (log_p != kNegInf ? p * (log_p + r.h) : 0.0f);
  return d * slope;
}

template <typename GradT, int kVec>
__device__ __forceinline__ void store_grad(GradT* row, int64_t c, const float (&d)[kVec]) {
  Pack<GradT, kVec> out;
#pragma unroll
  for (int j = 0; j < kVec; ++j) out.v[j] = from_float<GradT>(d[j]);
  *reinterpret_cast<Pack<GradT, kVec>*>(row + c) = out;
}

// Running max m, s = sum exp(z - m), w = sum exp(z - m) (z - m) of one thread's logits: one exp per logit.
// Plain data (it lives in shared memory too); the empty state is {-inf, 0, 0}.
struct Online {
  float m, s, w;
};

__device__ __forceinline__ void online_add(Online& o, float z) {
  if (z > o.m) {  // new max: rescale; an empty state (m = -inf) has s = w = 0
    const float e = expf(o.m - z);
    o.w = o.m == kNegInf ? 0.0f : e * (o.w + o.s * (o.m - z));
    o.s = o.s * e + 1.0f;
    o.m = z;
  } else if (z != kNegInf) {  // a -inf logit adds nothing; a NaN one turns s and w into NaN
    const float e = expf(z - o.m);
    o.s += e;
    o.w += e * (z - o.m);
  }
}

// w of a state re-expressed relative to the max M >= m.
__device__ __forceinline__ float shifted_w(const Online& o, float M, float scale) {
  return o.m == kNegInf ? 0.0f : scale * (o.w + o.s * (o.m - M));
}

__device__ __forceinline__ Online merge(const Online& x, const Online& y) {
  const float M = fmaxf(x.m, y.m);
  if (M == kNegInf) return Online{M, x.s + y.s, x.w + y.w};  // empty (0), or NaN from a NaN logit: keep it
  const float a = expf(x.m - M), b = expf(y.m - M);
  return Online{M, x.s * a + y.s * b, shifted_w(x, M, a) + shifted_w(y, M, b)};
}

// Merge over a block of kThreads threads, the warps in order; `shared` holds kThreads / 32 states.
template <int kThreads>
__device__ __forceinline__ Online block_merge(Online o, Online* shared) {
  for (int offset = kWarpSize / 2; offset > 0; offset >>= 1) {
    const Online other{__shfl_xor_sync(kFullMask, o.m, offset), __shfl_xor_sync(kFullMask, o.s, offset),
                       __shfl_xor_sync(kFullMask, o.w, offset)};
    o = merge(o, other);
  }
  __syncthreads();  // a previous reader of `shared` is done
  if (threadIdx.x % kWarpSize == 0) shared[threadIdx.x / kWarpSize] = o;
  __syncthreads();
  Online total = shared[0];
  for (int i = 1; i < kThreads / kWarpSize; ++i) total = merge(total, shared[i]);
  return total;
}

template <int kThreads>
__device__ __forceinline__ float block_max(float x, float* shared) {
  for (int offset = kWarpSize / 2; offset > 0; offset >>= 1) x = fmaxf(x, __shfl_xor_sync(kFullMask, x, offset));
  __syncthreads();
  if (threadIdx.x % kWarpSize == 0) shared[threadIdx.x / kWarpSize] = x;
  __syncthreads();
  float total = shared[0];
  for (int i = 1; i < kThreads / kWarpSize; ++i) total = fmaxf(total, shared[i]);
  return total;
}

struct RowStart {
  int64_t y;  // -1 when outside [0, V)
  float z_y;  // 0 then
};

// Every thread reads the row's target and (before any barrier; only when logp is written) target logit.
template <typename BiasT>
__device__ __forceinline__ RowStart row_start(const Args& a, int64_t row, const float* logits_row) {
  RowStart r;
  const int64_t y = a.targets_int32 ? static_cast<const int32_t*>(a.targets)[row]
                                    : static_cast<const int64_t*>(a.targets)[row];
  const bool hit = y >= 0 && y < a.cols;
  r.y = hit ? y : -1;
  r.z_y = 0.0f;
  if (hit && a.logp != nullptr) {
    const float b = a.bias != nullptr ? to_float(static_cast<const BiasT*>(a.bias)[y]) : 0.0f;
    float slope;
    r.z_y = transform(a, (logits_row[y] + b) * a.in_scale, slope);
  }
  return r;
}

__device__ __forceinline__ void write_outputs(const Args& a, int64_t row, float z_y, float lse, float entropy) {
  if (a.logp == nullptr) return;  // the gradient pass
  a.logp[row] = z_y - lse;
  if (a.lse_in == nullptr) a.lse[row] = lse;
  if (a.entropy != nullptr) a.entropy[row] = entropy;
}

// One tile of the streaming walk: kUnroll vectors of kVec scaled logits x a thread (bias added, times in_scale;
// not yet transformed), 0 past the last vector (the callers make those -inf).
template <typename BiasT, int kUnroll, int kVec>
__device__ __forceinline__ void load_tile(const Args& a, const float* row, int64_t base, int64_t vectors,
                                          float (&x)[kUnroll][kVec]) {
#pragma unroll
  for (int k = 0; k < kUnroll; ++k) {
    const int64_t i = base + k * kStreamThreads + threadIdx.x;
    if (i < vectors) {
      load_scaled<BiasT, kVec>(a, row, i * kVec, x[k]);
    } else {
#pragma unroll
      for (int j = 0; j < kVec; ++j) x[k][j] = 0.0f;
    }
  }
}

// Rows of any width: kVec-wide loads (4 when rows, bias and grad are 16-byte aligned), tiles of
// kStreamThreads * kStreamUnroll vectors, a scalar tail of V % kVec columns. Also the gradient pass (a.g given).
template <typename GradT, typename BiasT, int kVec>
__global__ void __launch_bounds__(kStreamThreads) row_pass_stream_kernel(Args a) {
  __shared__ Online merged[kStreamThreads / kWarpSize];
  __shared__ float sums[kStreamThreads / kWarpSize];
  const int64_t row = blockIdx.x;
  const float* logits_row = a.logits + row * a.row_stride;
  const RowStart start = row_start<BiasT>(a, row, logits_row);
  const int64_t vectors = a.cols / kVec, tail = vectors * kVec;
  constexpr int kUnroll = kStreamUnroll<GradT, BiasT, kVec>;
  constexpr int64_t kTile = int64_t{kStreamThreads} * kUnroll;
  const int t = threadIdx.x;
  float lse, entropy = 0.0f;
  float slope = 1.0f;  // S'(u) of the logit at hand (kept from the last one past the row's end: not stored)
  if (a.lse_in == nullptr) {  // pass 1: online statistics
    Online o{kNegInf, 0.0f, 0.0f};
    for (int64_t base = 0; base < vectors; base += kTile) {
      float x[kUnroll][kVec];
      load_tile<BiasT, kUnroll, kVec>(a, logits_row, base, vectors, x);
#pragma unroll
      for (int k = 0; k < kUnroll; ++k) {
        const bool valid = base + k * kStreamThreads + t < vectors;
#pragma unroll
        for (int j = 0; j < kVec; ++j) online_add(o, valid ? transform(a, x[k][j], slope) : kNegInf);
      }
    }
    if (tail + t < a.cols) {
      float x[1];
      load_scaled<BiasT, 1>(a, logits_row, tail + t, x);
      online_add(o, transform(a, x[0], slope));
    }
    const Online total = block_merge<kStreamThreads>(o, merged);
    const float log_s = logf(total.s);
    lse = total.m + log_s;
    entropy = log_s - total.w / total.s;
  } else {
    lse = a.lse_in[row];
  }
  const bool want_sum = a.lse_in != nullptr && a.entropy != nullptr;
  if (a.grad != nullptr || want_sum) {  // pass 2, the write pass: p = exp(z - lse), D over the logits
    const RowGrad r = a.g != nullptr ? RowGrad{true, a.g[row], a.e[row], a.h[row]} : RowGrad{false, 1.0f, 0.0f, 0.0f};
    GradT* grad_row = a.grad != nullptr ? static_cast<GradT*>(a.grad) + row * a.grad_row_stride : nullptr;
    float neg_plogp = 0.0f;
    for (int64_t base = 0; base < vectors; base += kTile) {
      float x[kUnroll][kVec];
      load_tile<BiasT, kUnroll, kVec>(a, logits_row, base, vectors, x);
#pragma unroll
      for (int k = 0; k < kUnroll; ++k) {
        const int64_t c0 = (base + k * kStreamThreads + t) * kVec;
        const bool valid = c0 < tail;
#pragma unroll
        for (int j = 0; j < kVec; ++j) {
          const float z = valid ? transform(a, x[k][j], slope) : kNegInf;
          const float log_p = z - lse;
          const float p = expf(log_p);
          if (want_sum && z != kNegInf) neg_plogp -= p * log_p;
          x[k][j] = gradient(r, c0 + j == start.y, p, log_p, slope);
        }
      }
      if (a.grad != nullptr) {
        __syncthreads();  // every thread has loaded this tile before any thread overwrites it
#pragma unroll
        for (int k = 0; k < kUnroll; ++k) {
          const int64_t i = base + k * kStreamThreads + t;
          if (i < vectors) store_grad<GradT, kVec>(grad_row, i * kVec, x[k]);
        }
      }
    }
    const int64_t c = tail + t;
    float x[1] = {0.0f};
    if (c < a.cols) load_scaled<BiasT, 1>(a, logits_row, c, x);
    const float z = c < a.cols ? transform(a, x[0], slope) : kNegInf;
    const float log_p = z - lse;
    const float p = expf(log_p);
    if (want_sum && z != kNegInf) neg_plogp -= p * log_p;
    const float d[1] = {gradient(r, c == start.y, p, log_p, slope)};
    if (a.grad != nullptr) {
      __syncthreads();
      if (c < a.cols) store_grad<GradT, 1>(grad_row, c, d);
    }
    if (want_sum) entropy = block_sum<kStreamThreads>(neg_plogp, sums);
  }
  if (t == 0) write_outputs(a, row, start.z_y, lse, entropy);
}

// Rows of up to kItems * 4 * kCachedThreads columns (16384; 8192 with a softcap, whose S' is held next to p),
// 16-byte aligned, no lse_in: each thread holds kItems float4 (and one tail column) in registers; max, then
// sum exp(z - max) and sum exp(z - max)(z - max), then D: one read.
template <typename GradT, typename BiasT, bool kSoftcap>
__global__ void __launch_bounds__(kCachedThreads) row_pass_cached_kernel(Args a) {
  constexpr int kItems = kSoftcap ? kCachedItems / 2 : kCachedItems;
  __shared__ float maxima[kCachedThreads / kWarpSize];
  __shared__ float sums[kCachedThreads / kWarpSize];
  const int64_t row = blockIdx.x;
  const float* logits_row = a.logits + row * a.row_stride;
  const RowStart start = row_start<BiasT>(a, row, logits_row);
  const int t = threadIdx.x;
  const int64_t vectors = a.cols / 4, tail_col = vectors * 4 + t;
  float z[kItems][4], slope[kItems][4];  // slope: S'(u), held only with a softcap (1 otherwise: optimised away)
  float zt[1] = {kNegInf}, slope_t = 1.0f;
#pragma unroll
  for (int k = 0; k < kItems; ++k) {
    const int64_t i = int64_t{k} * kCachedThreads + t;
    if (i < vectors) {
      load_scaled<BiasT, 4>(a, logits_row, i * 4, z[k]);
#pragma unroll
      for (int j = 0; j < 4; ++j) z[k][j] = transform<kSoftcap>(z[k][j], a.out_scale, slope[k][j]);
    } else {
#pragma unroll
      for (int j = 0; j < 4; ++j) z[k][j] = kNegInf, slope[k][j] = 1.0f;
    }
  }
  if (tail_col < a.cols) {
    load_scaled<BiasT, 1>(a, logits_row, tail_col, zt);
    zt[0] = transform<kSoftcap>(zt[0], a.out_scale, slope_t);
  }
  float m = zt[0];
#pragma unroll
  for (int k = 0; k < kItems; ++k) {
#pragma unroll
    for (int j = 0; j < 4; ++j) m = fmaxf(m, z[k][j]);
  }
  const float top = block_max<kCachedThreads>(m, maxima);  // NaN-blind; a NaN logit's p is NaN below
  const float base = top == kNegInf ? 0.0f : top;
  float s = 0.0f, w = 0.0f;
#pragma unroll
  for (int k = 0; k < kItems; ++k) {
#pragma unroll
    for (int j = 0; j < 4; ++j) {
      const float p = expf(z[k][j] - base);
      s += p;
      if (z[k][j] != kNegInf) w += p * (z[k][j] - base);
      z[k][j] = p;
    }
  }
  {
    const float p = expf(zt[0] - base);
    s += p;
    if (zt[0] != kNegInf) w += p * (zt[0] - base);
    zt[0] = p;
  }
  const float total_s = block_sum<kCachedThreads>(s, sums);
  const float total_w = a.entropy != nullptr ? block_sum<kCachedThreads>(w, sums) : 0.0f;
  const float log_s = logf(total_s);
  if (a.grad != nullptr) {
    GradT* grad_row = static_cast<GradT*>(a.grad) + row * a.grad_row_stride;
    const float inv_s = 1.0f / total_s;
    const RowGrad r{false, 1.0f, 0.0f, 0.0f};
    __syncthreads();  // implied by the block sums above (they follow every load); kept for the in-place argument
#pragma unroll
    for (int k = 0; k < kItems; ++k) {
      const int64_t i = int64_t{k} * kCachedThreads + t;
      float d[4];
#pragma unroll
      for (int j = 0; j < 4; ++j) d[j] = gradient(r, i * 4 + j == start.y, z[k][j] * inv_s, 0.0f, slope[k][j]);
      if (i < vectors) store_grad<GradT, 4>(grad_row, i * 4, d);
    }
    const float d[1] = {gradient(r, tail_col == start.y, zt[0] * inv_s, 0.0f, slope_t)};
    if (tail_col < a.cols) store_grad<GradT, 1>(grad_row, tail_col, d);
  }
  if (t == 0) write_outputs(a, row, start.z_y, top + log_s, log_s - total_w / total_s);
}

bool aligned(const void* p, int64_t bytes) { return reinterpret_cast<uintptr_t>(p) % bytes == 0; }

// (in_scale, out_scale, softcap?) of the transform (see Args).
void scales(Args& a, double inv_temperature, double logit_scale, double softcap) {
  a.softcap = softcap > 0.0;
  a.in_scale = static_cast<float>(a.softcap ? logit_scale / softcap : logit_scale * inv_temperature);
  a.out_scale = static_cast<float>(a.softcap ? softcap * inv_temperature : 1.0);
}

int launch(const Args& args, int64_t rows, DType bias_dtype, DType grad_dtype, cudaStream_t stream) {
  if (rows == 0) return 0;
  if (rows > 0x7fffffff || args.cols < 1) return static_cast<int>(cudaErrorInvalidValue);
  const int bias_size = bias_dtype == DType::kFloat32 ? 4 : 2;
  const int grad_size = grad_dtype == DType::kFloat32 ? 4 : 2;
  const bool vec4 = aligned(args.logits, 16) && args.row_stride % 4 == 0 &&
                    (args.bias == nullptr || aligned(args.bias, 4 * bias_size)) &&
                    (args.grad == nullptr || (aligned(args.grad, 4 * grad_size) && args.grad_row_stride % 4 == 0));
  const int64_t cached_columns = args.softcap ? kCachedColumns / 2 : kCachedColumns;
  const bool cached = vec4 && args.lse_in == nullptr && args.cols <= cached_columns;
  const dim3 grid(static_cast<unsigned>(rows));
  dispatch_dtype(grad_dtype, [&](auto grad_zero) {
    using GradT = decltype(grad_zero);
    dispatch_dtype(bias_dtype, [&](auto bias_zero) {
      using BiasT = decltype(bias_zero);
      if (cached && args.softcap) {
        row_pass_cached_kernel<GradT, BiasT, true><<<grid, kCachedThreads, 0, stream>>>(args);
      } else if (cached) {
        row_pass_cached_kernel<GradT, BiasT, false><<<grid, kCachedThreads, 0, stream>>>(args);
      } else if (vec4) {
        row_pass_stream_kernel<GradT, BiasT, 4><<<grid, kStreamThreads, 0, stream>>>(args);
      } else {
        row_pass_stream_kernel<GradT, BiasT, 1><<<grid, kStreamThreads, 0, stream>>>(args);
      }
    });
  });
  return launch_status();
}

}  // namespace

int row_pass(const float* logits, int64_t rows, int64_t cols, int64_t row_stride, const void* bias, DType bias_dtype,
             const void* targets, bool targets_int32, double inv_temperature, double logit_scale, double softcap,
             const float* lse_in, float* logp, float* lse, float* entropy, void* grad, DType grad_dtype,
             int64_t grad_row_stride, cudaStream_t stream) {
  Args args{logits, cols, row_stride, bias, targets, targets_int32, 0.0f, 0.0f, false, lse_in, logp, lse, entropy,
            nullptr, nullptr, nullptr, grad, grad_row_stride};
  scales(args, inv_temperature, logit_scale, softcap);
  return launch(args, rows, bias_dtype, grad_dtype, stream);
}

int grad_pass(const float* logits, int64_t rows, int64_t cols, int64_t row_stride, const void* bias, DType bias_dtype,
              const void* targets, bool targets_int32, double inv_temperature, double logit_scale, double softcap,
              const float* lse, const float* entropy, const float* g, const float* e, void* grad, DType grad_dtype,
              int64_t grad_row_stride, cudaStream_t stream) {
  if (grad == nullptr || lse == nullptr || entropy == nullptr || g == nullptr || e == nullptr) {
    return static_cast<int>(cudaErrorInvalidValue);
  }
  Args args{logits, cols, row_stride, bias, targets, targets_int32, 0.0f, 0.0f, false, lse, nullptr, nullptr,
            nullptr, g, e, entropy, grad, grad_row_stride};
  scales(args, inv_temperature, logit_scale, softcap);
  return launch(args, rows, bias_dtype, grad_dtype, stream);
}

}  // namespace rankgrpo

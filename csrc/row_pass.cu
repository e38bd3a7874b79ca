// Row pass and gradient pass over a chunk of fp32 logits acc = h_c W^T (cuBLAS output, row stride S >= V) giving,
// per row r (a token with target y, bias b, logit scale s, softcap c, temperature T), in fp32:
//
//   u       = s (logits[r] + b)
//   z       = S(u) / T,  S(u) = c tanh(u / c) with a softcap, else u     (scale, softcap, temperature: TRL's order)
//   lse     = log sum_v exp(z_v)                     or lse_in[r] (a recomputed or vocabulary-sharded forward's)
//   logp    = z_y - lse                              z_y := 0 when y is outside [0, V) (another shard, padding)
//   entropy = -sum_v p_v (z_v - lse), p = exp(z - lse)      (= lse - sum_v softmax(z)_v z_v; with a shard's
//                                                            lse_in, that shard's term of the global entropy)
//   D       = (onehot(y) - p) S'(u) k                written over the logits in the grad dtype (not scaled by
//                                                    g s / T); S'(u) = 1 - tanh(u / c)^2, or 1 without a softcap;
//                                                    k = grad_scale, +- a power of two (fp16's D is written scaled, so
//                                                    that probabilities below 6e-5 stay normal)
//
// The gradient pass (given lse, entropy H, g = dL/dlogp and e = dL/dH per row) is the write pass of the streaming
// kernel with D' = [g (onehot(y) - p) - e p (z - lse + H)] S'(u) (the caller scales rows by s / T); the row pass's
// write is its case g = k, e = 0. The kernels work in base 2, z2 = z / ln 2 (the scales carry 1 / ln 2): exp2 of
// z2 - lse2 without a multiply, ex2.approx.ftz without denormal fix-ups (a p below 2^-126 is 0). S and S' share one
// reciprocal: q = exp(-2 |u / c|), r = 1 / (1 + q), |tanh| = (1 - q) r, S' = 4 q r^2 (no cancellation of
// 1 - tanh^2 near |tanh| = 1); below |u / c| = 1/4, where 1 - q cancels, |tanh| is a minimax odd polynomial (as
// row_pass_kernel._tanh_and_slope). A NaN or +inf logit makes the row's lse, logp and D NaN (or inf).
// Mirrors rankgrpo_kernels/backends/triton/row_pass_kernel.py.
//
// One block per row; every sum runs in a fixed order (thread-strided partials, warp butterflies, warps in order
// through shared memory): deterministic, no atomics. Bytes moved per logit (g = grad itemsize, 0 without D; the
// bias, shared by all rows, stays in L2):
//
//   cached kernel (V <= kCachedColumns, 8192 with a softcap: S' is held too; 16-byte aligned rows, no lse_in):
//                                    4 + g, the row is held in registers
//   streaming kernel, no lse_in:     4 + 4 + g (online max / sum / entropy, then the write); 4 without D
//   streaming kernel, lse_in given:  4 + g (the write pass; 4 with only the entropy, from the statistics pass;
//                                    4 + 4 + g with both; 0 with neither)
//   gradient pass:                   4 + g (the streaming kernel's write pass)
//
// In place without races: D's row r starts at logits' row r (grad row stride 4 S / g elements), so the store of
// column c lands in fp32 column floor(c g / 4) <= c. Each block walks its row in tiles of increasing columns and
// separates a tile's loads (all threads) from its stores by __syncthreads(): every fp32 column a store overwrites
// lies in this tile or an earlier one, already loaded by every thread and never read again. The tiles write D
// without its one-hot term (no per-logit compare); after a last __syncthreads() (every thread's stores done) one
// thread rewrites the target's D with it, from the target logit loaded before the first barrier. logits and grad
// alias, so neither is __restrict__.
//
// Equivalent PyTorch:
//   u = s * (logits.double() + bias);  t = torch.tanh(u / c);  z = c * t / T  (or u / T);  slope = 1 - t ** 2 (or 1)
//   lse = z.logsumexp(-1);  p = (z - lse[:, None]).exp()
//   logp = z.gather(-1, y[:, None])[:, 0] - lse;  entropy = -(p * (z - lse[:, None])).sum(-1)
//   D = (F.one_hot(y, V) - p) * slope * grad_scale
//   D_ = (g[:, None] * (F.one_hot(y, V) - p) - e[:, None] * p * (z - lse[:, None] + H[:, None])) * slope
#include <math_constants.h>

#include "common.cuh"

namespace rankgrpo {
namespace {

constexpr float kNegInf = -__builtin_huge_valf();
constexpr float kLn2 = 0.693147180559945309f;
constexpr double kLog2e = 1.442695040888963407;
// A floor for log2 p in a product with p: p = 2^(log2 p) is already 0 below -126, and the floor keeps 0 * -inf (a -inf
// logit) out of the sums without a compare and select.
constexpr float kLog2Floor = -1000.0f;
constexpr int kStreamThreads = 256;
// Vectors per thread per tile of the streaming walk: loads in flight between barriers. Two for fp32 rows with an
// fp32 bias and fp32 D (32 bytes a vector, the most live values): at four sm_120's ptxas spilled 36 bytes. The
// per-thread order of the columns does not depend on it (column t, t + 256, ...), but the statistics rescale once a
// tile, so the sums' rounding does.
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
  float in_scale;   // x = (logits + bias) in_scale: s / (T ln 2) without a softcap, s / c with one
  float out_scale;  // z2 = tanh(x) out_scale with a softcap (c / (T ln 2))
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
  float grad_scale;  // the row pass's D scale k
};

template <typename T, int kVec>
struct alignas(sizeof(T) * kVec) Pack {
  T v[kVec];
};

// 2^x with results below 2^-126 flushed to 0: no denormal fix-up around the SFU's exp2.
__device__ __forceinline__ float exp2_ftz(float x) {
  float y;
  asm("ex2.approx.ftz.f32 %0, %1;" : "=f"(y) : "f"(x));
  return y;
}

// 1 / x within 1 ulp for x in [1, 2] (the SFU's reciprocal, without the fix-ups of a full-range division).
__device__ __forceinline__ float rcp_approx(float x) {
  float y;
  asm("rcp.approx.ftz.f32 %0, %1;" : "=f"(y) : "f"(x));
  return y;
}

// tanh(x), and S' = 1 - tanh(x)^2 in slope: q = exp(-2 |x|) in [0, 1], one reciprocal r = 1 / (1 + q),
// |tanh| = (1 - q) r and S' = 4 q r^2; below |x| = 1/4 |tanh| = a + a^3 P(a^2) (minimax, < 3e-9 relative).
// inf: +-1 and 0; NaN: NaN.
__device__ __forceinline__ float tanh_and_slope(float x, float& slope) {
  const float a = fabsf(x);
  const float q = exp2_ftz(-2.88539008177792681f * a);
  const float r = rcp_approx(1.0f + q);
  const float u = a * a;
  const float series = fmaf(a * u, fmaf(u, fmaf(u, -0.051430037207871725f, 0.13324236695155903f),
                                        -0.33333240089291255f), a);
  slope = 4.0f * q * r * r;
  return copysignf(a < 0.25f ? series : (1.0f - q) * r, x);  // a NaN fails a < 0.25: NaN
}

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

// z2 from x, and S'(u) in slope: tanh(x) out_scale and 4 q r^2 with a softcap, else x and 1.
template <bool kSoftcap>
__device__ __forceinline__ float transform(float x, float out_scale, float& slope) {
  if constexpr (kSoftcap) {
    return tanh_and_slope(x, slope) * out_scale;
  } else {
    slope = 1.0f;
    return x;
  }
}

// The gradient pass's g, e ln 2 and g + e H of a row; the row pass's g is k (e unused).
struct RowGrad {
  float g, e_ln2, g_eh;
};

// A row's RowGrad. Read again where needed (the target's write, after the barriers) rather than held across the walk.
template <bool kGradPass>
__device__ __forceinline__ RowGrad row_grad(const Args& a, int64_t row) {
  return kGradPass ? RowGrad{a.g[row], a.e[row] * kLn2, a.g[row] + a.e[row] * a.h[row]}
                   : RowGrad{a.grad_scale, 0.0f, 0.0f};
}

// One logit's gradient without its one-hot term: D = -k p (row pass), D' = -p (g + e H + e ln 2 log2 p)
// (kGradPass; a -inf logit has p = 0 and adds nothing), times S'(u) (1 without a softcap: exact); hot adds g.
template <bool kGradPass>
__device__ __forceinline__ float gradient(const RowGrad& r, float p, float log2_p, float slope, bool hot = false) {
  float d = kGradPass ? -p * fmaf(r.e_ln2, fmaxf(log2_p, kLog2Floor), r.g_eh) : -p * r.g;
  if (hot) d += r.g;
  return d * slope;
}

template <typename GradT, int kVec>
__device__ __forceinline__ void store_grad(GradT* row, int64_t c, const float (&d)[kVec]) {
  Pack<GradT, kVec> out;
#pragma unroll
  for (int j = 0; j < kVec; ++j) out.v[j] = from_float<GradT>(d[j]);
  *reinterpret_cast<Pack<GradT, kVec>*>(row + c) = out;
}

// Running max m, s = sum 2^(z2 - m), w = sum 2^(z2 - m) (z2 - m) of one thread's logits (base 2). Plain data (it
// lives in shared memory too); the empty state is {-inf, 0, 0}.
struct Online {
  float m, s, w;
};

// Adds n logits: rescales once to their max (one exp2 for the n), then one exp2 each. A NaN logit turns s and w
// into NaN; a -inf one adds nothing (2^-inf = 0, and the floor keeps 0 * -inf out).
template <int kN>
__device__ __forceinline__ void online_add(Online& o, const float (&z)[kN]) {
  float top = o.m;
#pragma unroll
  for (int i = 0; i < kN; ++i) top = fmaxf(top, z[i]);
  const float base = top == kNegInf ? 0.0f : top;  // an empty state stays empty: 2^(-inf - 0) = 0
  const float rescale = exp2_ftz(o.m - base);
  o.w = rescale * fmaf(o.s, fmaxf(o.m - base, kLog2Floor), o.w);
  o.s *= rescale;
#pragma unroll
  for (int i = 0; i < kN; ++i) {
    const float d = z[i] - base;
    const float e = exp2_ftz(d);
    o.s += e;
    o.w = fmaf(e, fmaxf(d, kLog2Floor), o.w);
  }
  o.m = top;
}

// w of a state re-expressed relative to the max M >= m.
__device__ __forceinline__ float shifted_w(const Online& o, float M, float scale) {
  return o.m == kNegInf ? 0.0f : scale * (o.w + o.s * (o.m - M));
}

__device__ __forceinline__ Online merge(const Online& x, const Online& y) {
  const float M = fmaxf(x.m, y.m);
  if (M == kNegInf) return Online{M, x.s + y.s, x.w + y.w};  // empty (0), or NaN from a NaN logit: keep it
  const float a = exp2_ftz(x.m - M), b = exp2_ftz(y.m - M);
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
  float z_y;  // z2 of the target, 0 then
  float slope_y;  // its S'(u)
};

// Every thread reads the row's target and, before any barrier, its logit: logp and the target's D need them.
template <typename BiasT, bool kSoftcap>
__device__ __forceinline__ RowStart row_start(const Args& a, int64_t row, const float* logits_row) {
  RowStart r{-1, 0.0f, 1.0f};
  const int64_t y = a.targets_int32 ? static_cast<const int32_t*>(a.targets)[row]
                                    : static_cast<const int64_t*>(a.targets)[row];
  if (y >= 0 && y < a.cols) {
    const float b = a.bias != nullptr ? to_float(static_cast<const BiasT*>(a.bias)[y]) : 0.0f;
    r.y = y;
    r.z_y = transform<kSoftcap>((logits_row[y] + b) * a.in_scale, a.out_scale, r.slope_y);
  }
  return r;
}

// The target's D with its one-hot term, over the value its tile wrote without it: after every thread's stores.
template <bool kGradPass, typename GradT>
__device__ __forceinline__ void write_target(const Args& a, int64_t row, const RowStart& start, float lse2,
                                             GradT* grad_row) {
  __syncthreads();
  if (threadIdx.x == 0 && start.y >= 0) {
    const float d[1] = {gradient<kGradPass>(row_grad<kGradPass>(a, row), exp2_ftz(start.z_y - lse2),
                                            start.z_y - lse2, start.slope_y, true)};
    store_grad<GradT, 1>(grad_row, start.y, d);
  }
}

__device__ __forceinline__ void write_outputs(const Args& a, int64_t row, float z_y, float lse2, float entropy) {
  if (a.logp == nullptr) return;  // the gradient pass
  a.logp[row] = (z_y - lse2) * kLn2;
  if (a.lse_in == nullptr) a.lse[row] = lse2 * kLn2;
  if (a.entropy != nullptr) a.entropy[row] = entropy;
}

// One tile of the streaming walk: kUnroll vectors of kVec scaled logits x a thread (bias added, times in_scale;
// not yet transformed). kChecked (the row's last, partial tile): valid says which vectors lie in the row, and the
// others read the row's first vector instead (straight-line code, no branch per vector; their values are never
// used, so reading bytes the write pass has overwritten already is harmless); the full tiles before it check
// nothing. Columns within a row are int: V < 2^31.
template <typename BiasT, int kUnroll, int kVec, bool kChecked>
__device__ __forceinline__ void load_tile(const Args& a, const float* row, int base, int vectors,
                                          float (&x)[kUnroll][kVec], bool (&valid)[kUnroll]) {
#pragma unroll
  for (int k = 0; k < kUnroll; ++k) {
    const int i = base + k * kStreamThreads + static_cast<int>(threadIdx.x);
    valid[k] = !kChecked || i < vectors;
    load_scaled<BiasT, kVec>(a, row, valid[k] ? i * kVec : 0, x[k]);
  }
}

// Pass 1 over one tile: its logits into the thread's online statistics (-inf past the row's end).
template <typename BiasT, int kUnroll, int kVec, bool kSoftcap, bool kChecked>
__device__ __forceinline__ void stats_tile(const Args& a, const float* row, int base, int vectors, Online& o) {
  float x[kUnroll][kVec], z[kUnroll * kVec], slope;
  bool valid[kUnroll];
  load_tile<BiasT, kUnroll, kVec, kChecked>(a, row, base, vectors, x, valid);
#pragma unroll
  for (int k = 0; k < kUnroll; ++k) {
#pragma unroll
    for (int j = 0; j < kVec; ++j) {
      z[k * kVec + j] = valid[k] ? transform<kSoftcap>(x[k][j], a.out_scale, slope) : kNegInf;
    }
  }
  online_add(o, z);
}

// Pass 2 over one tile: p = 2^(z2 - lse2) and D without its one-hot term, stored after a barrier.
template <typename GradT, typename BiasT, int kUnroll, int kVec, bool kSoftcap, bool kGradPass, bool kChecked>
__device__ __forceinline__ void write_tile(const Args& a, const float* row, int base, int vectors, const RowGrad& r,
                                           float lse2, GradT* grad_row) {
  float x[kUnroll][kVec], slope;
  bool valid[kUnroll];
  load_tile<BiasT, kUnroll, kVec, kChecked>(a, row, base, vectors, x, valid);
#pragma unroll
  for (int k = 0; k < kUnroll; ++k) {
#pragma unroll
    for (int j = 0; j < kVec; ++j) {
      const float log2_p = transform<kSoftcap>(x[k][j], a.out_scale, slope) - lse2;
      x[k][j] = gradient<kGradPass>(r, exp2_ftz(log2_p), log2_p, slope);
    }
  }
  __syncthreads();  // every thread has loaded this tile before any thread overwrites it
#pragma unroll
  for (int k = 0; k < kUnroll; ++k) {
    if (valid[k]) store_grad<GradT, kVec>(grad_row, (base + k * kStreamThreads + threadIdx.x) * kVec, x[k]);
  }
}

// Rows of any width: kVec-wide loads (4 when rows, bias and grad are 16-byte aligned), tiles of
// kStreamThreads * kStreamUnroll vectors, a scalar tail of V % kVec columns. Pass 1 (online statistics) without
// lse_in, or with lse_in and the entropy (that shard's part, from the same sums); pass 2 (the write) with D.
// kGradPass: the gradient pass (a.g given: the write pass of D' only).
template <typename GradT, typename BiasT, int kVec, bool kSoftcap, bool kGradPass>
__global__ void __launch_bounds__(kStreamThreads) row_pass_stream_kernel(Args a) {
  __shared__ Online merged[kStreamThreads / kWarpSize];
  const int64_t row = blockIdx.x;
  const float* logits_row = a.logits + row * a.row_stride;
  const RowStart start = row_start<BiasT, kSoftcap>(a, row, logits_row);
  const int cols = static_cast<int>(a.cols), vectors = cols / kVec, tail = vectors * kVec;
  constexpr int kUnroll = kStreamUnroll<GradT, BiasT, kVec>;
  constexpr int kTile = kStreamThreads * kUnroll;
  const int full = vectors / kTile * kTile;  // vectors in full tiles
  const int c = tail + static_cast<int>(threadIdx.x);  // this thread's column of the scalar tail
  const float lse_in2 = a.lse_in != nullptr ? a.lse_in[row] * static_cast<float>(kLog2e) : 0.0f;
  float lse2 = lse_in2, entropy = 0.0f, slope;
  if (!kGradPass && (a.lse_in == nullptr || a.entropy != nullptr)) {  // pass 1: online statistics
    Online o{kNegInf, 0.0f, 0.0f};
    for (int base = 0; base < full; base += kTile) {
      stats_tile<BiasT, kUnroll, kVec, kSoftcap, false>(a, logits_row, base, vectors, o);
    }
    if (full < vectors) stats_tile<BiasT, kUnroll, kVec, kSoftcap, true>(a, logits_row, full, vectors, o);
    if (c < cols) {
      float x[1];
      load_scaled<BiasT, 1>(a, logits_row, c, x);
      const float z[1] = {transform<kSoftcap>(x[0], a.out_scale, slope)};
      online_add(o, z);
    }
    const Online total = block_merge<kStreamThreads>(o, merged);
    const float log2_s = log2f(total.s);
    if (a.lse_in == nullptr) {
      lse2 = total.m + log2_s;
      entropy = kLn2 * (log2_s - __fdividef(total.w, total.s));  // s >= 1: the fast division's range
    } else if (total.m != kNegInf) {  // -sum p log p, p = 2^(z2 - lse_in2): 2^(m - lse_in2) (w + s (m - lse_in2))
      entropy = -kLn2 * exp2_ftz(total.m - lse_in2) * fmaf(total.s, total.m - lse_in2, total.w);
    }
  }
  if (a.grad != nullptr) {  // pass 2, the write pass: p = 2^(z2 - lse2), D over the logits
    const RowGrad r = row_grad<kGradPass>(a, row);
    GradT* grad_row = static_cast<GradT*>(a.grad) + row * a.grad_row_stride;
    for (int base = 0; base < full; base += kTile) {
      write_tile<GradT, BiasT, kUnroll, kVec, kSoftcap, kGradPass, false>(a, logits_row, base, vectors, r, lse2,
                                                                          grad_row);
    }
    if (full < vectors) {
      write_tile<GradT, BiasT, kUnroll, kVec, kSoftcap, kGradPass, true>(a, logits_row, full, vectors, r, lse2,
                                                                         grad_row);
    }
    float x[1] = {0.0f};
    if (c < cols) load_scaled<BiasT, 1>(a, logits_row, c, x);
    const float log2_p = transform<kSoftcap>(x[0], a.out_scale, slope) - lse2;
    const float d[1] = {gradient<kGradPass>(r, exp2_ftz(log2_p), log2_p, slope)};
    __syncthreads();
    if (c < cols) store_grad<GradT, 1>(grad_row, c, d);
    write_target<kGradPass>(a, row, start, lse2, grad_row);
  }
  if (threadIdx.x == 0) write_outputs(a, row, start.z_y, lse2, entropy);
}

// Rows of up to kItems * 4 * kCachedThreads columns (16384; 8192 with a softcap, whose S' is held next to p),
// 16-byte aligned, no lse_in: each thread holds kItems float4 (and one tail column) in registers; max, then
// sum 2^(z2 - max) and sum 2^(z2 - max)(z2 - max), then D: one read.
template <typename GradT, typename BiasT, bool kSoftcap>
__global__ void __launch_bounds__(kCachedThreads) row_pass_cached_kernel(Args a) {
  constexpr int kItems = kSoftcap ? kCachedItems / 2 : kCachedItems;
  __shared__ float maxima[kCachedThreads / kWarpSize];
  __shared__ float sums[kCachedThreads / kWarpSize];
  const int64_t row = blockIdx.x;
  const float* logits_row = a.logits + row * a.row_stride;
  const RowStart start = row_start<BiasT, kSoftcap>(a, row, logits_row);
  const int t = threadIdx.x;
  const int cols = static_cast<int>(a.cols), vectors = cols / 4, tail_col = vectors * 4 + t;  // V < 2^31
  float z[kItems][4], slope[kItems][4];  // slope: S'(u), held only with a softcap (1 otherwise: optimised away)
  float zt[1] = {kNegInf}, slope_t = 1.0f;
#pragma unroll
  for (int k = 0; k < kItems; ++k) {
    const int i = k * kCachedThreads + t;
    if (i < vectors) {
      load_scaled<BiasT, 4>(a, logits_row, i * 4, z[k]);
#pragma unroll
      for (int j = 0; j < 4; ++j) z[k][j] = transform<kSoftcap>(z[k][j], a.out_scale, slope[k][j]);
    } else {
#pragma unroll
      for (int j = 0; j < 4; ++j) z[k][j] = kNegInf, slope[k][j] = 1.0f;
    }
  }
  if (tail_col < cols) {
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
      const float d = z[k][j] - base;
      const float p = exp2_ftz(d);
      s += p;
      w = fmaf(p, fmaxf(d, kLog2Floor), w);
      z[k][j] = p;
    }
  }
  {
    const float d = zt[0] - base;
    const float p = exp2_ftz(d);
    s += p;
    w = fmaf(p, fmaxf(d, kLog2Floor), w);
    zt[0] = p;
  }
  const float total_s = block_sum<kCachedThreads>(s, sums);
  const float total_w = a.entropy != nullptr ? block_sum<kCachedThreads>(w, sums) : 0.0f;
  const float log2_s = log2f(total_s);
  if (a.grad != nullptr) {
    GradT* grad_row = static_cast<GradT*>(a.grad) + row * a.grad_row_stride;
    const RowGrad scaled{a.grad_scale / total_s, 0.0f, 0.0f};  // p = 2^(z2 - max) / s
    __syncthreads();  // implied by the block sums above (they follow every load); kept for the in-place argument
#pragma unroll
    for (int k = 0; k < kItems; ++k) {
      const int i = k * kCachedThreads + t;
      float d[4];
#pragma unroll
      for (int j = 0; j < 4; ++j) d[j] = gradient<false>(scaled, z[k][j], 0.0f, slope[k][j]);
      if (i < vectors) store_grad<GradT, 4>(grad_row, i * 4, d);
    }
    const float d[1] = {gradient<false>(scaled, zt[0], 0.0f, slope_t)};
    if (tail_col < cols) store_grad<GradT, 1>(grad_row, tail_col, d);
    write_target<false>(a, row, start, top + log2_s, grad_row);
  }
  if (t == 0) write_outputs(a, row, start.z_y, top + log2_s, kLn2 * (log2_s - __fdividef(total_w, total_s)));
}

bool aligned(const void* p, int64_t bytes) { return reinterpret_cast<uintptr_t>(p) % bytes == 0; }

// (in_scale, out_scale, softcap?) of the transform (see Args), in base 2.
void scales(Args& a, double inv_temperature, double logit_scale, double softcap) {
  a.softcap = softcap > 0.0;
  a.in_scale = static_cast<float>(a.softcap ? logit_scale / softcap : logit_scale * inv_temperature * kLog2e);
  a.out_scale = static_cast<float>(a.softcap ? softcap * inv_temperature * kLog2e : 1.0);
}

// Launches the kernel for these arguments; returns its name (for the error message of a failed launch).
template <typename GradT, typename BiasT, bool kSoftcap>
const char* launch_kernel(const Args& args, bool cached, bool vec4, dim3 grid, cudaStream_t stream) {
  if (args.g != nullptr && vec4) {
    row_pass_stream_kernel<GradT, BiasT, 4, kSoftcap, true><<<grid, kStreamThreads, 0, stream>>>(args);
    return kSoftcap ? "row_pass_stream_kernel<4-wide, softcap, gradient pass>"
                    : "row_pass_stream_kernel<4-wide, gradient pass>";
  } else if (args.g != nullptr) {
    row_pass_stream_kernel<GradT, BiasT, 1, kSoftcap, true><<<grid, kStreamThreads, 0, stream>>>(args);
    return kSoftcap ? "row_pass_stream_kernel<scalar, softcap, gradient pass>"
                    : "row_pass_stream_kernel<scalar, gradient pass>";
  } else if (cached) {
    row_pass_cached_kernel<GradT, BiasT, kSoftcap><<<grid, kCachedThreads, 0, stream>>>(args);
    return kSoftcap ? "row_pass_cached_kernel<softcap>" : "row_pass_cached_kernel";
  } else if (vec4) {
    row_pass_stream_kernel<GradT, BiasT, 4, kSoftcap, false><<<grid, kStreamThreads, 0, stream>>>(args);
    return kSoftcap ? "row_pass_stream_kernel<4-wide, softcap>" : "row_pass_stream_kernel<4-wide>";
  } else {
    row_pass_stream_kernel<GradT, BiasT, 1, kSoftcap, false><<<grid, kStreamThreads, 0, stream>>>(args);
    return kSoftcap ? "row_pass_stream_kernel<scalar, softcap>" : "row_pass_stream_kernel<scalar>";
  }
}

// Picks and launches the kernel (*kernel: its name); the status read right after the launch.
int launch(const Args& args, int64_t rows, DType bias_dtype, DType grad_dtype, cudaStream_t stream,
           const char** kernel) {
  if (rows == 0) return 0;
  if (rows > 0x7fffffff || args.cols < 1 || args.cols > 0x7fffffff) return static_cast<int>(cudaErrorInvalidValue);
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
      const char* name = args.softcap ? launch_kernel<GradT, BiasT, true>(args, cached, vec4, grid, stream)
                                      : launch_kernel<GradT, BiasT, false>(args, cached, vec4, grid, stream);
      if (kernel != nullptr) *kernel = name;
    });
  });
  return launch_status();
}

}  // namespace

int row_pass(const float* logits, int64_t rows, int64_t cols, int64_t row_stride, const void* bias, DType bias_dtype,
             const void* targets, bool targets_int32, double inv_temperature, double logit_scale, double softcap,
             const float* lse_in, float* logp, float* lse, float* entropy, void* grad, DType grad_dtype,
             int64_t grad_row_stride, double grad_scale, cudaStream_t stream, const char** kernel) {
  Args args{logits, cols, row_stride, bias, targets, targets_int32, 0.0f, 0.0f, false, lse_in, logp, lse, entropy,
            nullptr, nullptr, nullptr, grad, grad_row_stride, static_cast<float>(grad_scale)};
  scales(args, inv_temperature, logit_scale, softcap);
  return launch(args, rows, bias_dtype, grad_dtype, stream, kernel);
}

int grad_pass(const float* logits, int64_t rows, int64_t cols, int64_t row_stride, const void* bias, DType bias_dtype,
              const void* targets, bool targets_int32, double inv_temperature, double logit_scale, double softcap,
              const float* lse, const float* entropy, const float* g, const float* e, void* grad, DType grad_dtype,
              int64_t grad_row_stride, cudaStream_t stream, const char** kernel) {
  if (grad == nullptr || lse == nullptr || entropy == nullptr || g == nullptr || e == nullptr) {
    return static_cast<int>(cudaErrorInvalidValue);
  }
  Args args{logits, cols, row_stride, bias, targets, targets_int32, 0.0f, 0.0f, false, lse, nullptr, nullptr,
            nullptr, g, e, entropy, grad, grad_row_stride, 1.0f};
  scales(args, inv_temperature, logit_scale, softcap);
  return launch(args, rows, bias_dtype, grad_dtype, stream, kernel);
}

}  // namespace rankgrpo

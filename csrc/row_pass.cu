// Row pass: one fused pass over a chunk of fp32 logits z = h_c W^T (cuBLAS output, row stride S >= V) giving, per
// row r (a token with target y, bias b, temperature T), in fp32:
//
//   z       = (logits[r] + b) / T
//   lse     = log sum_v exp(z_v)                     or lse_in[r] (a recomputed or vocabulary-sharded forward's)
//   logp    = z_y - lse                              z_y := 0 when y is outside [0, V) (another shard, padding)
//   entropy = -sum_v p_v (z_v - lse), p = exp(z - lse)      (= lse - sum_v softmax(z)_v z_v; with a shard's
//                                                            lse_in, that shard's term of the global entropy)
//   D       = onehot(y) - p                          written over the logits in the grad dtype (not scaled by g/T)
//
// Rows with row_mask false are not read: logp = lse = entropy = 0 and a zero row of D. A NaN or +inf logit makes
// the row's lse, logp and D NaN (or inf). Mirrors rankgrpo_kernels/kernels/row_pass.py.
//
// One block per row; every sum runs in a fixed order (thread-strided partials, warp butterflies, warps in order
// through shared memory): deterministic, no atomics. Bytes moved per logit (g = grad itemsize, 0 without D; the
// bias, shared by all rows, stays in L2):
//
//   cached kernel (V <= kCachedColumns, 16-byte aligned rows, no lse_in): 4 + g, the row is held in registers
//   streaming kernel, no lse_in: 4 + 4 + g (online max / sum / entropy, then the write); 4 without D
//   streaming kernel, lse_in given: 4 + g (the write pass; 4 with only the entropy, 0 with neither)
//
// In place without races: D's row r starts at logits' row r (grad row stride 4 S / g elements), so the store of
// column c lands in fp32 column floor(c g / 4) <= c. Each block walks its row in tiles of increasing columns and
// separates a tile's loads (all threads) from its stores by __syncthreads(): every fp32 column a store overwrites
// lies in this tile or an earlier one, already loaded by every thread and never read again. The target logit is
// loaded before the first barrier. logits and grad alias, so neither is __restrict__.
//
// Equivalent PyTorch:
//   z = (logits.double() + bias) / T;  lse = z.logsumexp(-1);  p = (z - lse[:, None]).exp()
//   logp = z.gather(-1, y[:, None])[:, 0] - lse;  entropy = -(p * (z - lse[:, None])).sum(-1)
//   D = F.one_hot(y, V) - p
#include <math_constants.h>

#include "common.cuh"

namespace rankgrpo {
namespace {

constexpr float kNegInf = -__builtin_huge_valf();
constexpr int kStreamThreads = 256;
constexpr int kStreamUnroll = 4;  // vectors per thread per tile: loads in flight between barriers
constexpr int kCachedThreads = 1024;
constexpr int kCachedItems = 4;  // float4 per thread held in registers (<= 64 registers at 1024 threads)
constexpr int64_t kCachedColumns = int64_t{kCachedThreads} * kCachedItems * 4;  // 16384

struct Args {
  const float* logits;  // aliases grad: not __restrict__
  int64_t cols, row_stride;
  const void* bias;  // null: none
  const void* targets;
  bool targets_int32;
  const bool* row_mask;  // null: every row
  float inv_temperature;
  const float* lse_in;  // null: reduce
  float* logp;
  float* lse;
  float* entropy;  // null: not wanted
  void* grad;  // null: no D
  int64_t grad_row_stride;
};

template <typename T, int kVec>
struct alignas(sizeof(T) * kVec) Pack {
  T v[kVec];
};

// z = (logits[c .. c + kVec) + bias) * inv_temperature; c is a multiple of kVec.
template <typename BiasT, int kVec>
__device__ __forceinline__ void load_scaled(const Args& a, const float* row, int64_t c, float (&z)[kVec]) {
  const Pack<float, kVec> x = *reinterpret_cast<const Pack<float, kVec>*>(row + c);
  if (a.bias != nullptr) {
    const Pack<BiasT, kVec> b = *reinterpret_cast<const Pack<BiasT, kVec>*>(static_cast<const BiasT*>(a.bias) + c);
#pragma unroll
    for (int j = 0; j < kVec; ++j) z[j] = (x.v[j] + to_float(b.v[j])) * a.inv_temperature;
  } else {
#pragma unroll
    for (int j = 0; j < kVec; ++j) z[j] = x.v[j] * a.inv_temperature;
  }
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
  bool active;
  int64_t y;  // -1 when outside [0, V) or the row is inactive
  float z_y;  // 0 then
};

// Every thread reads the row's mask, target and (before any barrier) target logit.
template <typename BiasT>
__device__ __forceinline__ RowStart row_start(const Args& a, int64_t row, const float* logits_row) {
  RowStart r;
  r.active = a.row_mask == nullptr || a.row_mask[row];
  const int64_t y = a.targets_int32 ? static_cast<const int32_t*>(a.targets)[row]
                                    : static_cast<const int64_t*>(a.targets)[row];
  const bool hit = r.active && y >= 0 && y < a.cols;
  r.y = hit ? y : -1;
  r.z_y = 0.0f;
  if (hit) {
    const float b = a.bias != nullptr ? to_float(static_cast<const BiasT*>(a.bias)[y]) : 0.0f;
    r.z_y = (logits_row[y] + b) * a.inv_temperature;
  }
  return r;
}

// Zeros for an inactive row: its D row (no read) and its outputs.
template <typename GradT, int kThreads>
__device__ void finish_inactive(const Args& a, int64_t row) {
  if (a.grad != nullptr) {
    GradT* g = static_cast<GradT*>(a.grad) + row * a.grad_row_stride;
    for (int64_t c = threadIdx.x; c < a.cols; c += kThreads) g[c] = from_float<GradT>(0.0f);
  }
  if (threadIdx.x == 0) {
    a.logp[row] = 0.0f;
    if (a.lse_in == nullptr) a.lse[row] = 0.0f;
    if (a.entropy != nullptr) a.entropy[row] = 0.0f;
  }
}

__device__ __forceinline__ void write_outputs(const Args& a, int64_t row, float z_y, float lse, float entropy) {
  a.logp[row] = z_y - lse;
  if (a.lse_in == nullptr) a.lse[row] = lse;
  if (a.entropy != nullptr) a.entropy[row] = entropy;
}

// One tile of the streaming walk: kStreamUnroll vectors of kVec scaled logits a thread, -inf past the last vector.
template <typename BiasT, int kVec>
__device__ __forceinline__ void load_tile(const Args& a, const float* row, int64_t base, int64_t vectors,
                                          float (&z)[kStreamUnroll][kVec]) {
#pragma unroll
  for (int k = 0; k < kStreamUnroll; ++k) {
    const int64_t i = base + k * kStreamThreads + threadIdx.x;
    if (i < vectors) {
      load_scaled<BiasT, kVec>(a, row, i * kVec, z[k]);
    } else {
#pragma unroll
      for (int j = 0; j < kVec; ++j) z[k][j] = kNegInf;
    }
  }
}

// Rows of any width: kVec-wide loads (4 when rows, bias and grad are 16-byte aligned), tiles of
// kStreamThreads * kStreamUnroll vectors, a scalar tail of V % kVec columns.
template <typename GradT, typename BiasT, int kVec>
__global__ void __launch_bounds__(kStreamThreads) row_pass_stream_kernel(Args a) {
  __shared__ Online merged[kStreamThreads / kWarpSize];
  __shared__ float sums[kStreamThreads / kWarpSize];
  const int64_t row = blockIdx.x;
  const float* logits_row = a.logits + row * a.row_stride;
  const RowStart start = row_start<BiasT>(a, row, logits_row);
  if (!start.active) {  // uniform over the block
    finish_inactive<GradT, kStreamThreads>(a, row);
    return;
  }
  const int64_t vectors = a.cols / kVec, tail = vectors * kVec;
  constexpr int64_t kTile = int64_t{kStreamThreads} * kStreamUnroll;
  const int t = threadIdx.x;
  float lse, entropy = 0.0f;
  if (a.lse_in == nullptr) {  // pass 1: online statistics
    Online o{kNegInf, 0.0f, 0.0f};
    for (int64_t base = 0; base < vectors; base += kTile) {
      float z[kStreamUnroll][kVec];
      load_tile<BiasT, kVec>(a, logits_row, base, vectors, z);
#pragma unroll
      for (int k = 0; k < kStreamUnroll; ++k) {
#pragma unroll
        for (int j = 0; j < kVec; ++j) online_add(o, z[k][j]);
      }
    }
    if (tail + t < a.cols) {
      float z[1];
      load_scaled<BiasT, 1>(a, logits_row, tail + t, z);
      online_add(o, z[0]);
    }
    const Online total = block_merge<kStreamThreads>(o, merged);
    const float log_s = logf(total.s);
    lse = total.m + log_s;
    entropy = log_s - total.w / total.s;
  } else {
    lse = a.lse_in[row];
  }
  const bool want_sum = a.lse_in != nullptr && a.entropy != nullptr;
  if (a.grad != nullptr || want_sum) {  // pass 2: p = exp(z - lse), D over the logits
    GradT* grad_row = a.grad != nullptr ? static_cast<GradT*>(a.grad) + row * a.grad_row_stride : nullptr;
    float neg_plogp = 0.0f;
    for (int64_t base = 0; base < vectors; base += kTile) {
      float z[kStreamUnroll][kVec];
      load_tile<BiasT, kVec>(a, logits_row, base, vectors, z);
#pragma unroll
      for (int k = 0; k < kStreamUnroll; ++k) {
        const int64_t c0 = (base + k * kStreamThreads + t) * kVec;
#pragma unroll
        for (int j = 0; j < kVec; ++j) {
          const float p = expf(z[k][j] - lse);
          if (want_sum && z[k][j] != kNegInf) neg_plogp -= p * (z[k][j] - lse);
          z[k][j] = (c0 + j == start.y ? 1.0f : 0.0f) - p;
        }
      }
      if (a.grad != nullptr) {
        __syncthreads();  // every thread has loaded this tile before any thread overwrites it
#pragma unroll
        for (int k = 0; k < kStreamUnroll; ++k) {
          const int64_t i = base + k * kStreamThreads + t;
          if (i < vectors) store_grad<GradT, kVec>(grad_row, i * kVec, z[k]);
        }
      }
    }
    float z[1] = {kNegInf};
    const int64_t c = tail + t;
    if (c < a.cols) load_scaled<BiasT, 1>(a, logits_row, c, z);
    const float p = expf(z[0] - lse);
    if (want_sum && z[0] != kNegInf) neg_plogp -= p * (z[0] - lse);
    const float d[1] = {(c == start.y ? 1.0f : 0.0f) - p};
    if (a.grad != nullptr) {
      __syncthreads();
      if (c < a.cols) store_grad<GradT, 1>(grad_row, c, d);
    }
    if (want_sum) entropy = block_sum<kStreamThreads>(neg_plogp, sums);
  }
  if (t == 0) write_outputs(a, row, start.z_y, lse, entropy);
}

// Rows of up to kCachedColumns columns, 16-byte aligned, no lse_in: each thread holds kCachedItems float4 (and one
// tail column) in registers; max, then sum exp(z - max) and sum exp(z - max)(z - max), then D: one read.
template <typename GradT, typename BiasT>
__global__ void __launch_bounds__(kCachedThreads) row_pass_cached_kernel(Args a) {
  __shared__ float maxima[kCachedThreads / kWarpSize];
  __shared__ float sums[kCachedThreads / kWarpSize];
  const int64_t row = blockIdx.x;
  const float* logits_row = a.logits + row * a.row_stride;
  const RowStart start = row_start<BiasT>(a, row, logits_row);
  if (!start.active) {
    finish_inactive<GradT, kCachedThreads>(a, row);
    return;
  }
  const int t = threadIdx.x;
  const int64_t vectors = a.cols / 4, tail_col = vectors * 4 + t;
  float z[kCachedItems][4];
  float zt[1] = {kNegInf};
#pragma unroll
  for (int k = 0; k < kCachedItems; ++k) {
    const int64_t i = int64_t{k} * kCachedThreads + t;
    if (i < vectors) {
      load_scaled<BiasT, 4>(a, logits_row, i * 4, z[k]);
    } else {
#pragma unroll
      for (int j = 0; j < 4; ++j) z[k][j] = kNegInf;
    }
  }
  if (tail_col < a.cols) load_scaled<BiasT, 1>(a, logits_row, tail_col, zt);
  float m = zt[0];
#pragma unroll
  for (int k = 0; k < kCachedItems; ++k) {
#pragma unroll
    for (int j = 0; j < 4; ++j) m = fmaxf(m, z[k][j]);
  }
  const float top = block_max<kCachedThreads>(m, maxima);  // NaN-blind; a NaN logit's p is NaN below
  const float base = top == kNegInf ? 0.0f : top;
  float s = 0.0f, w = 0.0f;
#pragma unroll
  for (int k = 0; k < kCachedItems; ++k) {
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
    __syncthreads();  // implied by the block sums above (they follow every load); kept for the in-place argument
#pragma unroll
    for (int k = 0; k < kCachedItems; ++k) {
      const int64_t i = int64_t{k} * kCachedThreads + t;
      float d[4];
#pragma unroll
      for (int j = 0; j < 4; ++j) d[j] = (i * 4 + j == start.y ? 1.0f : 0.0f) - z[k][j] * inv_s;
      if (i < vectors) store_grad<GradT, 4>(grad_row, i * 4, d);
    }
    const float d[1] = {(tail_col == start.y ? 1.0f : 0.0f) - zt[0] * inv_s};
    if (tail_col < a.cols) store_grad<GradT, 1>(grad_row, tail_col, d);
  }
  if (t == 0) write_outputs(a, row, start.z_y, top + log_s, log_s - total_w / total_s);
}

bool aligned(const void* p, int64_t bytes) { return reinterpret_cast<uintptr_t>(p) % bytes == 0; }

}  // namespace

int row_pass(const float* logits, int64_t rows, int64_t cols, int64_t row_stride, const void* bias, DType bias_dtype,
             const void* targets, bool targets_int32, const bool* row_mask, float inv_temperature,
             const float* lse_in, float* logp, float* lse, float* entropy, void* grad, DType grad_dtype,
             int64_t grad_row_stride, cudaStream_t stream) {
  if (rows == 0) return 0;
  if (rows > 0x7fffffff || cols < 1) return static_cast<int>(cudaErrorInvalidValue);
  const Args args{logits, cols, row_stride, bias, targets, targets_int32, row_mask, inv_temperature, lse_in,
                  logp, lse, entropy, grad, grad_row_stride};
  const int bias_size = bias_dtype == DType::kFloat32 ? 4 : 2;
  const int grad_size = grad_dtype == DType::kFloat32 ? 4 : 2;
  const bool vec4 = aligned(logits, 16) && row_stride % 4 == 0 && (bias == nullptr || aligned(bias, 4 * bias_size)) &&
                    (grad == nullptr || (aligned(grad, 4 * grad_size) && grad_row_stride % 4 == 0));
  const bool cached = vec4 && lse_in == nullptr && cols <= kCachedColumns;
  const dim3 grid(static_cast<unsigned>(rows));
  dispatch_dtype(grad_dtype, [&](auto grad_zero) {
    using GradT = decltype(grad_zero);
    dispatch_dtype(bias_dtype, [&](auto bias_zero) {
      using BiasT = decltype(bias_zero);
      if (cached) {
        row_pass_cached_kernel<GradT, BiasT><<<grid, kCachedThreads, 0, stream>>>(args);
      } else if (vec4) {
        row_pass_stream_kernel<GradT, BiasT, 4><<<grid, kStreamThreads, 0, stream>>>(args);
      } else {
        row_pass_stream_kernel<GradT, BiasT, 1><<<grid, kStreamThreads, 0, stream>>>(args);
      }
    });
  });
  return launch_status();
}

}  // namespace rankgrpo

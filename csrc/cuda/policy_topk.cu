// CUDA fused policy scoring, stage 1: for each (group of kUsers users, split of the items)
// an online log-sum-exp and a block-wide top-kb of packed (score, id) keys, with the
// candidate / exclusion masks and, for sampling, the Gumbel noise of the counter-based
// hash of recmeta_sdk/reference.py (hash_uniform: lowbias32 on uint32), so the CPU, Triton
// and CUDA backends perturb with the same uniforms. Stage 2 (a torch.topk over the small
// (B, splits, kb) buffer and the log-sum-exp merge) runs in recmeta_sdk.kernels._common.
//
// Per round each of the kThreads threads scores one item for the block's kUsers users
// (user vectors in shared memory). A round whose keys all fall below each user's current
// kb-th best (the common case once the list fills) costs one __syncthreads_or; otherwise
// the round's keys join the running top-kb in shared memory and a bitonic sort keeps the
// best kb.
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>
#include <limits>

#include "launch.cuh"
#include "recmeta/cuda_ops.h"

namespace recmeta {
namespace cuda {
namespace {

constexpr int kThreads = 128;  // items scored per round (one per thread)
constexpr int kUsers = 4;      // users per block
constexpr int64_t kSentinel = std::numeric_limits<int64_t>::min();  // key of an ineligible slot

__device__ __forceinline__ uint32_t mix32(uint32_t x) {
  x ^= x >> 16;
  x *= 0x7FEB352Du;
  x ^= x >> 15;
  x *= 0x846CA68Bu;
  x ^= x >> 16;
  return x;
}

/// u = hash_uniform(seed, row, item) of the reference, bit for bit (integer hashing and an
/// exact conversion: 23 bits + 0.5, times 2^-23, so 0 < u < 1).
__device__ __forceinline__ float hash_uniform(uint32_t seed_key, uint32_t hi_mix, int64_t row, int64_t item) {
  uint32_t h = mix32(seed_key ^ mix32(static_cast<uint32_t>(row) + 0x85EBCA6Bu));
  h = mix32(h ^ static_cast<uint32_t>(item));
  h = mix32(h ^ hi_mix);
  return (static_cast<float>(h >> 9) + 0.5f) * 1.1920928955078125e-07f;
}

/// Gumbel noise -log(-log(u)) with u from hash_uniform.
__device__ __forceinline__ float gumbel(uint32_t seed_key, uint32_t hi_mix, int64_t row, int64_t item) {
  const float u = hash_uniform(seed_key, hi_mix, row, item);
  return -logf(-logf(u));
}

/// out[r * num_items + i] = hash_uniform(seed, r, i) for r < rows, i < num_items.
__global__ void hash_uniform_kernel(float* __restrict__ out, int64_t rows, int64_t num_items, uint32_t seed_key,
                                    uint32_t hi_mix) {
  const int64_t total = rows * num_items;
  for (int64_t t = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; t < total;
       t += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    out[t] = hash_uniform(seed_key, hi_mix, t / num_items, t % num_items);
  }
}

/// ordered(float bits) * 2^32 + (2^32 - 1 - item): larger key = larger value, then smaller id.
__device__ __forceinline__ int64_t pack_key(float v, int64_t item) {
  const int32_t bits = __float_as_int(v);
  const int32_t ordered = bits ^ ((bits >> 31) & 0x7FFFFFFF);
  return static_cast<int64_t>(ordered) * 4294967296LL +
         static_cast<int64_t>(0xFFFFFFFFu - static_cast<uint32_t>(item));
}

/// First position in keys[lo, hi) with keys[pos] >= target.
__device__ __forceinline__ int64_t lower_bound(const int64_t* keys, int64_t lo, int64_t hi, int64_t target) {
  while (lo < hi) {
    const int64_t mid = lo + (hi - lo) / 2;
    if (keys[mid] < target) lo = mid + 1; else hi = mid;
  }
  return lo;
}

__device__ __forceinline__ bool contains(const int64_t* keys, int64_t lo, int64_t hi, int64_t target) {
  const int64_t p = lower_bound(keys, lo, hi, target);
  return p < hi && keys[p] == target;
}

template <TableType TT>
__device__ __forceinline__ float load_item(const TableView& t, int64_t row, int64_t col) {
  const int64_t i = row * t.row_stride + col;
  if constexpr (TT == TableType::F32) {
    return __ldg(static_cast<const float*>(t.data) + i);
  } else if constexpr (TT == TableType::F16) {
    return __half2float(static_cast<const __half*>(t.data)[i]);
  } else {
    return static_cast<float>(static_cast<const uint8_t*>(t.data)[i]) * __ldg(t.row_scale + row) +
           __ldg(t.row_min + row);
  }
}

/// Elements of one 16-byte load per table format.
template <TableType TT>
struct VecWidth;
template <>
struct VecWidth<TableType::F32> {
  static constexpr int n = 4;
};
template <>
struct VecWidth<TableType::F16> {
  static constexpr int n = 8;
};
template <>
struct VecWidth<TableType::I8Rowwise> {
  static constexpr int n = 16;
};

/// Elements [col, col + VecWidth) of a row as float32, with one 16-byte load (the caller
/// guarantees 16-byte alignment: data, row_stride and col multiples of the width).
template <TableType TT>
__device__ __forceinline__ void load_item_vec(const TableView& t, int64_t row, int64_t col,
                                              float (&out)[VecWidth<TT>::n]) {
  const int64_t i = row * t.row_stride + col;
  if constexpr (TT == TableType::F32) {
    const float4 v = __ldg(reinterpret_cast<const float4*>(static_cast<const float*>(t.data) + i));
    out[0] = v.x;
    out[1] = v.y;
    out[2] = v.z;
    out[3] = v.w;
  } else if constexpr (TT == TableType::F16) {
    const uint4 raw = __ldg(reinterpret_cast<const uint4*>(static_cast<const __half*>(t.data) + i));
    const __half2* h = reinterpret_cast<const __half2*>(&raw);
#pragma unroll
    for (int k = 0; k < 4; ++k) {
      const float2 f = __half22float2(h[k]);
      out[2 * k] = f.x;
      out[2 * k + 1] = f.y;
    }
  } else {
    const uint4 raw = __ldg(reinterpret_cast<const uint4*>(static_cast<const uint8_t*>(t.data) + i));
    const uint8_t* q = reinterpret_cast<const uint8_t*>(&raw);
    const float sc = __ldg(t.row_scale + row), mn = __ldg(t.row_min + row);
#pragma unroll
    for (int k = 0; k < 16; ++k) out[k] = static_cast<float>(q[k]) * sc + mn;
  }
}

/// Grid (ceil(batch / kUsers), splits), kThreads threads. Shared memory (dynamic):
/// kUsers * p int64 sort buffers, kUsers * dim float user vectors, 2 * kThreads floats.
/// p: power of two >= kb + kThreads.
/// VEC: rows read with 16-byte loads (see load_item_vec), else one element at a time.
template <TableType TT, bool VEC>
__global__ void __launch_bounds__(kThreads) policy_stage1_kernel(PolicyStage1Args a, int p) {
  extern __shared__ __align__(16) unsigned char smem[];
  int64_t* buf = reinterpret_cast<int64_t*>(smem);
  float* u_sh = reinterpret_cast<float*>(buf + static_cast<int64_t>(kUsers) * p);
  float* red_m = u_sh + static_cast<int64_t>(kUsers) * a.dim;
  float* red_l = red_m + kThreads;

  const int64_t N = a.items.rows;
  const int64_t b0 = static_cast<int64_t>(blockIdx.x) * kUsers;
  const int64_t split = blockIdx.y;
  const int64_t n_begin = split * a.items_per_split;
  const int64_t n_end = n_begin + a.items_per_split < N ? n_begin + a.items_per_split : N;
  const int kb = a.kb;

  for (int64_t i = threadIdx.x; i < static_cast<int64_t>(kUsers) * p; i += kThreads) buf[i] = kSentinel;
  for (int64_t i = threadIdx.x; i < static_cast<int64_t>(kUsers) * a.dim; i += kThreads) {
    const int64_t j = i / a.dim, c = i % a.dim;
    u_sh[i] = (b0 + j < a.batch) ? a.users[(b0 + j) * a.user_stride + c] : 0.f;
  }
  // Each user's slice of the sorted mask keys that falls in this split.
  int64_t elo[kUsers], ehi[kUsers], clo[kUsers], chi[kUsers];
#pragma unroll
  for (int j = 0; j < kUsers; ++j) {
    const int64_t base = (b0 + j) * N;
    elo[j] = ehi[j] = clo[j] = chi[j] = 0;
    if (a.excl_keys) {
      elo[j] = lower_bound(a.excl_keys, 0, a.n_excl, base + n_begin);
      ehi[j] = lower_bound(a.excl_keys, elo[j], a.n_excl, base + n_end);
    }
    if (a.cand_keys) {
      clo[j] = lower_bound(a.cand_keys, 0, a.n_cand, base + n_begin);
      chi[j] = lower_bound(a.cand_keys, clo[j], a.n_cand, base + n_end);
    }
  }
  float m[kUsers], l[kUsers];
  int64_t thr[kUsers];
  bool nonfinite[kUsers];  // this thread read a non-finite score of user j
#pragma unroll
  for (int j = 0; j < kUsers; ++j) {
    m[j] = -INFINITY;
    l[j] = 0.f;
    thr[j] = kSentinel;
    nonfinite[j] = false;
  }
  __syncthreads();

  for (int64_t base = n_begin; base < n_end; base += kThreads) {
    const int64_t n = base + threadIdx.x;
    const bool in = n < n_end;
    float s[kUsers];
#pragma unroll
    for (int j = 0; j < kUsers; ++j) s[j] = 0.f;
    if (in) {
      if constexpr (VEC) {
        constexpr int V = VecWidth<TT>::n;
        for (int64_t c = 0; c < a.dim; c += V) {
          float x[V];
          load_item_vec<TT>(a.items, n, c, x);
#pragma unroll
          for (int e = 0; e < V; ++e) {
#pragma unroll
            for (int j = 0; j < kUsers; ++j) s[j] += u_sh[j * a.dim + c + e] * x[e];
          }
        }
      } else {
        for (int64_t c = 0; c < a.dim; ++c) {
          const float x = load_item<TT>(a.items, n, c);
#pragma unroll
          for (int j = 0; j < kUsers; ++j) s[j] += u_sh[j * a.dim + c] * x;
        }
      }
    }
    int64_t key[kUsers];
    bool need = false;
#pragma unroll
    for (int j = 0; j < kUsers; ++j) {
      const int64_t row = b0 + j;
      const bool read = in && row < a.batch;
      bool ok = read;
      key[j] = kSentinel;
      if (ok && a.cand_keys) ok = contains(a.cand_keys, clo[j], chi[j], row * N + n);
      if (ok && a.excl_keys) ok = !contains(a.excl_keys, elo[j], ehi[j], row * N + n);
      float sv = 0.f;
      if (read) {
        const float bv = a.bias ? a.bias[n] : 0.f;
        sv = (s[j] + bv) / a.temperature;
        // A NaN / +-inf score (NaN / inf item values or int8 scale / min, or a float32
        // overflow) of a row the op reads (every row; with candidates, the eligible ones),
        // other than -inf from a -inf bias (a mask), marks the user (see the merge below).
        if (!isfinite(sv) && !(sv == -INFINITY && bv == -INFINITY) && (ok || !a.cand_keys)) nonfinite[j] = true;
      }
      if (ok) {
        // online log-sum-exp
        if (sv > m[j]) {
          l[j] = (m[j] == -INFINITY ? 0.f : l[j] * expf(m[j] - sv)) + 1.f;
          m[j] = sv;
        } else {
          l[j] += expf(sv - m[j]);
        }
        const float v = a.sample ? sv + gumbel(a.seed_key, a.hi_mix, row, n) : sv;
        key[j] = pack_key(v, n);
      }
      need = need || key[j] > thr[j];
    }
    if (__syncthreads_or(need)) {
#pragma unroll
      for (int j = 0; j < kUsers; ++j) buf[static_cast<int64_t>(j) * p + kb + threadIdx.x] = key[j];
      __syncthreads();
      const int half = p / 2;
      for (int size = 2; size <= p; size <<= 1) {
        for (int stride = size >> 1; stride > 0; stride >>= 1) {
          for (int t = threadIdx.x; t < kUsers * half; t += kThreads) {
            const int j = t / half, i = t % half;
            const int lo = 2 * i - (i & (stride - 1));
            const int hi = lo + stride;
            int64_t* bb = buf + static_cast<int64_t>(j) * p;
            const bool desc = (lo & size) == 0;
            const int64_t x = bb[lo], y = bb[hi];
            if (desc ? (x < y) : (x > y)) {
              bb[lo] = y;
              bb[hi] = x;
            }
          }
          __syncthreads();
        }
      }
      // Slots past the round's keys go back to the sentinel (the top kb stay in front).
      for (int t = threadIdx.x; t < kUsers * p; t += kThreads) {
        if (t % p >= kb + kThreads) buf[t] = kSentinel;
      }
#pragma unroll
      for (int j = 0; j < kUsers; ++j) thr[j] = buf[static_cast<int64_t>(j) * p + kb - 1];
      __syncthreads();
    }
  }

  // Block-wide merge of the per-thread log-sum-exp, in thread order (deterministic).
#pragma unroll
  for (int j = 0; j < kUsers; ++j) {
    red_m[threadIdx.x] = m[j];
    red_l[threadIdx.x] = nonfinite[j] ? NAN : l[j];
    __syncthreads();
    if (threadIdx.x == 0 && b0 + j < a.batch) {
      float mm = -INFINITY;
      bool marked = false;
      for (int t = 0; t < kThreads; ++t) {
        mm = fmaxf(mm, red_m[t]);
        marked = marked || isnan(red_l[t]);
      }
      float ll = 0.f;
      if (mm != -INFINITY) {
        for (int t = 0; t < kThreads; ++t) {
          if (red_m[t] != -INFINITY) ll += red_l[t] * expf(red_m[t] - mm);
        }
      }
      a.max_out[(b0 + j) * a.splits + split] = mm;
      // NaN marks a user that read a non-finite score: merge_lse (recmeta_sdk.kernels._common)
      // makes its log-normaliser NaN, and recmeta_sdk._gpu's screen raises the ValueError
      // naming the row
      a.sum_out[(b0 + j) * a.splits + split] = marked ? NAN : ll;
    }
    __syncthreads();
  }
  for (int t = threadIdx.x; t < kUsers * kb; t += kThreads) {
    const int j = t / kb, i = t % kb;
    if (b0 + j < a.batch) a.keys_out[((b0 + j) * a.splits + split) * kb + i] = buf[static_cast<int64_t>(j) * p + i];
  }
}

}  // namespace

void hash_uniform(float* out, int64_t rows, int64_t num_items, uint32_t seed_key, uint32_t hi_mix, void* stream) {
  RECMETA_CHECK(rows >= 0 && num_items >= 0 && num_items < (int64_t{1} << 32), "hash_uniform: bad shape (", rows,
                ", ", num_items, ")");
  if (rows == 0 || num_items == 0) return;
  int64_t blocks = detail::ceil_div(rows * num_items, 256);
  if (blocks > 65535) blocks = 65535;
  RECMETA_LAUNCH(hash_uniform_kernel, dim3(static_cast<unsigned>(blocks)), 256, 0, stream, out, rows, num_items,
                 seed_key, hi_mix);
}

void policy_topk_stage1(const PolicyStage1Args& a, void* stream) {
  RECMETA_CHECK(a.kb >= 2 && a.kb <= 256 && (a.kb & (a.kb - 1)) == 0,
                "policy_topk_stage1: kb must be a power of two in [2, 256], got ", a.kb);
  RECMETA_CHECK(a.batch >= 0 && a.dim >= 0 && a.items.dim == a.dim, "policy_topk_stage1: dims disagree (users ",
                a.dim, ", items ", a.items.dim, ")");
  RECMETA_CHECK(a.user_stride >= a.dim && a.items.row_stride >= a.dim, "policy_topk_stage1: bad strides");
  RECMETA_CHECK(a.items.rows < (int64_t{1} << 31), "policy_topk_stage1: at most 2^31-1 items, got ", a.items.rows);
  RECMETA_CHECK(a.splits >= 1 && a.splits <= detail::kMaxGridYZ, "policy_topk_stage1: splits out of range: ",
                a.splits);
  RECMETA_CHECK(a.items.rows == 0 || a.items_per_split * a.splits >= a.items.rows,
                "policy_topk_stage1: splits do not cover the items");
  RECMETA_CHECK(a.temperature > 0.f, "policy_topk_stage1: temperature must be > 0");
  RECMETA_CHECK(a.items.type != TableType::I8Rowwise || (a.items.row_scale && a.items.row_min),
                "policy_topk_stage1: int8 table without row_scale/row_min");
  RECMETA_CHECK(a.keys_out && a.max_out && a.sum_out, "policy_topk_stage1: null output");
  if (a.batch == 0) return;
  int p = 1;
  while (p < a.kb + kThreads) p <<= 1;
  const size_t smem = static_cast<size_t>(kUsers) * p * sizeof(int64_t) +
                      static_cast<size_t>(kUsers) * a.dim * sizeof(float) + 2 * kThreads * sizeof(float);
  RECMETA_CHECK(smem <= 48 * 1024, "policy_topk_stage1: dim ", a.dim, " with kb ", a.kb,
                " needs more than 48 KiB of shared memory");
  const int64_t gx = detail::ceil_div(a.batch, kUsers);
  RECMETA_CHECK(gx <= detail::kMaxGridX, "policy_topk_stage1: batch too large: ", a.batch);
  const dim3 grid(static_cast<unsigned>(gx), static_cast<unsigned>(a.splits));
  const int width = a.items.type == TableType::F32 ? 4 : (a.items.type == TableType::F16 ? 8 : 16);
  const bool vec = a.dim % width == 0 && a.items.row_stride % width == 0 &&
                   reinterpret_cast<std::uintptr_t>(a.items.data) % 16 == 0;
  switch (a.items.type) {
    case TableType::F32:
      if (vec) RECMETA_LAUNCH((policy_stage1_kernel<TableType::F32, true>), grid, kThreads, smem, stream, a, p);
      else RECMETA_LAUNCH((policy_stage1_kernel<TableType::F32, false>), grid, kThreads, smem, stream, a, p);
      break;
    case TableType::F16:
      if (vec) RECMETA_LAUNCH((policy_stage1_kernel<TableType::F16, true>), grid, kThreads, smem, stream, a, p);
      else RECMETA_LAUNCH((policy_stage1_kernel<TableType::F16, false>), grid, kThreads, smem, stream, a, p);
      break;
    case TableType::I8Rowwise:
      if (vec) RECMETA_LAUNCH((policy_stage1_kernel<TableType::I8Rowwise, true>), grid, kThreads, smem, stream, a, p);
      else RECMETA_LAUNCH((policy_stage1_kernel<TableType::I8Rowwise, false>), grid, kThreads, smem, stream, a, p);
      break;
  }
}

}  // namespace cuda
}  // namespace recmeta

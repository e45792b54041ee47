// CUDA embedding bag: forward (float32 / float16 / row-wise int8 tables, sum / mean,
// per-index weights, empty bags) and backward fused with SGD / row-wise Adagrad, in a
// deterministic (sorted, no float atomics) and an atomic variant.
// Semantics: recmeta_sdk/reference.py (embedding_bag, embedding_bag_backward).
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>

#include "launch.cuh"
#include "recmeta/cuda_ops.h"

namespace recmeta {
namespace cuda {
namespace {

constexpr int kReduceThreads = 128;  // block size of the per-row kernels (a power of two)

/// Value of element (row, col) of a table in format TT as float32.
template <TableType TT>
__device__ __forceinline__ float load_elem(const void* data, int64_t row, int64_t stride, int64_t col,
                                           const float* scale, const float* rmin) {
  const int64_t i = row * stride + col;
  if constexpr (TT == TableType::F32) {
    return __ldg(static_cast<const float*>(data) + i);
  } else if constexpr (TT == TableType::F16) {
    return __half2float(static_cast<const __half*>(data)[i]);
  } else {
    return static_cast<float>(static_cast<const uint8_t*>(data)[i]) * __ldg(scale + row) + __ldg(rmin + row);
  }
}

/// One thread per (bag, column): threadIdx.y picks the bag within the block, x the column.
/// data: rows x stride elements; indices: nnz ids; offsets: num_bags + 1; psw: nnz or null;
/// out: num_bags rows of out_stride floats.
template <TableType TT, typename IdxT, typename OffT>
__global__ void embedding_bag_fwd_kernel(const void* __restrict__ data, const float* __restrict__ scale,
                                         const float* __restrict__ rmin, int64_t stride, int64_t dim,
                                         const IdxT* __restrict__ indices, const OffT* __restrict__ offsets,
                                         int64_t num_bags, const float* __restrict__ psw, bool mean,
                                         float* __restrict__ out, int64_t out_stride) {
  const int64_t b = static_cast<int64_t>(blockIdx.x) * blockDim.y + threadIdx.y;
  const int64_t c = static_cast<int64_t>(blockIdx.y) * blockDim.x + threadIdx.x;
  if (b >= num_bags || c >= dim) return;
  const int64_t start = static_cast<int64_t>(offsets[b]);
  const int64_t end = static_cast<int64_t>(offsets[b + 1]);
  float acc = 0.f;
  int64_t p = start;
  // Four independent row loads in flight per step.
  for (; p + 4 <= end; p += 4) {
    float v[4];
#pragma unroll
    for (int j = 0; j < 4; ++j) {
      const int64_t r = static_cast<int64_t>(indices[p + j]);
      v[j] = load_elem<TT>(data, r, stride, c, scale, rmin);
    }
#pragma unroll
    for (int j = 0; j < 4; ++j) acc += psw ? v[j] * psw[p + j] : v[j];
  }
  for (; p < end; ++p) {
    const float v = load_elem<TT>(data, static_cast<int64_t>(indices[p]), stride, c, scale, rmin);
    acc += psw ? v * psw[p] : v;
  }
  if (mean) acc /= static_cast<float>(end - start > 1 ? end - start : 1);
  out[b * out_stride + c] = acc;
}

/// Sum of `v` over the block (blockDim.x == kReduceThreads) in a fixed tree order; red has
/// kReduceThreads floats of shared memory. Every thread gets the total.
__device__ __forceinline__ float block_sum(float v, float* red) {
  red[threadIdx.x] = v;
  __syncthreads();
  for (int s = kReduceThreads / 2; s > 0; s >>= 1) {
    if (threadIdx.x < s) red[threadIdx.x] += red[threadIdx.x + s];
    __syncthreads();
  }
  const float total = red[0];
  __syncthreads();
  return total;
}

/// Deterministic backward: block u owns unique row uniq[u] and the positions
/// sorted_pos[seg[u]:seg[u+1]] (input order). Shared memory: dim + kReduceThreads floats.
template <typename OffT>
__global__ void embedding_bag_bwd_sorted_kernel(float* __restrict__ weight, int64_t dim, int64_t row_stride,
                                                float* __restrict__ state, const float* __restrict__ grad,
                                                int64_t grad_stride, const int64_t* __restrict__ sorted_pos,
                                                const int64_t* __restrict__ seg, const int64_t* __restrict__ uniq,
                                                const int64_t* __restrict__ bag_of, const OffT* __restrict__ offsets,
                                                const float* __restrict__ psw, bool mean, bool adagrad, float lr,
                                                float eps) {
  extern __shared__ float sh[];
  float* red = sh + dim;
  const int64_t u = blockIdx.x;
  const int64_t lo = seg[u], hi = seg[u + 1], row = uniq[u];
  float sq = 0.f;
  for (int64_t c = threadIdx.x; c < dim; c += blockDim.x) {
    float acc = 0.f;
    for (int64_t j = lo; j < hi; ++j) {
      const int64_t p = sorted_pos[j];
      const int64_t bag = bag_of[p];
      float coef = psw ? psw[p] : 1.f;
      if (mean) {
        const int64_t n = static_cast<int64_t>(offsets[bag + 1]) - static_cast<int64_t>(offsets[bag]);
        coef /= static_cast<float>(n > 1 ? n : 1);
      }
      acc += grad[bag * grad_stride + c] * coef;
    }
    sh[c] = acc;
    sq += acc * acc;
  }
  float* w = weight + row * row_stride;
  if (adagrad) {
    const float total = block_sum(sq, red);  // also orders sh[] writes before the reads below
    const float st = state[row] + total / static_cast<float>(dim);
    if (threadIdx.x == 0) state[row] = st;
    const float denom = sqrtf(st) + eps;
    for (int64_t c = threadIdx.x; c < dim; c += blockDim.x) w[c] -= lr * sh[c] / denom;
  } else {
    for (int64_t c = threadIdx.x; c < dim; c += blockDim.x) w[c] -= lr * sh[c];
  }
}

/// Atomic backward: thread (bag, column) adds scale * coef * grad[bag, c] into target rows.
template <typename IdxT, typename OffT>
__global__ void embedding_bag_bwd_atomic_kernel(float* __restrict__ target, int64_t target_stride, int64_t dim,
                                                const float* __restrict__ grad, int64_t grad_stride,
                                                const IdxT* __restrict__ rows, const OffT* __restrict__ offsets,
                                                int64_t num_bags, const float* __restrict__ psw, bool mean,
                                                float scale) {
  const int64_t b = static_cast<int64_t>(blockIdx.x) * blockDim.y + threadIdx.y;
  const int64_t c = static_cast<int64_t>(blockIdx.y) * blockDim.x + threadIdx.x;
  if (b >= num_bags || c >= dim) return;
  const int64_t start = static_cast<int64_t>(offsets[b]);
  const int64_t end = static_cast<int64_t>(offsets[b + 1]);
  float g = grad[b * grad_stride + c] * scale;
  if (mean) g /= static_cast<float>(end - start > 1 ? end - start : 1);
  for (int64_t p = start; p < end; ++p) {
    const float coef = psw ? psw[p] : 1.f;
    atomicAdd(target + static_cast<int64_t>(rows[p]) * target_stride + c, coef * g);
  }
}

/// Row-wise Adagrad from summed gradients: block u updates row uniq[u].
__global__ void rowwise_adagrad_apply_kernel(float* __restrict__ weight, int64_t row_stride,
                                             float* __restrict__ state, const float* __restrict__ gbuf,
                                             const int64_t* __restrict__ uniq, int64_t dim, float lr, float eps) {
  __shared__ float red[kReduceThreads];
  const int64_t u = blockIdx.x;
  const int64_t row = uniq[u];
  const float* g = gbuf + u * dim;
  float sq = 0.f;
  for (int64_t c = threadIdx.x; c < dim; c += blockDim.x) sq += g[c] * g[c];
  const float total = block_sum(sq, red);
  const float st = state[row] + total / static_cast<float>(dim);
  if (threadIdx.x == 0) state[row] = st;
  const float denom = sqrtf(st) + eps;
  float* w = weight + row * row_stride;
  for (int64_t c = threadIdx.x; c < dim; c += blockDim.x) w[c] -= lr * g[c] / denom;
}

/// Thread block shape of the (bag, column) kernels: x over columns, y over bags.
dim3 bag_block(int64_t dim) {
  int64_t tx = detail::ceil_div(dim < 128 ? dim : 128, 32) * 32;
  if (tx < 32) tx = 32;
  return dim3(static_cast<unsigned>(tx), static_cast<unsigned>(256 / tx), 1);
}

dim3 bag_grid(int64_t num_bags, int64_t dim, dim3 block) {
  const int64_t gx = detail::ceil_div(num_bags, block.y);
  const int64_t gy = detail::ceil_div(dim, block.x);
  RECMETA_CHECK(gx <= detail::kMaxGridX, "embedding bag: too many bags for one launch: ", num_bags);
  RECMETA_CHECK(gy <= detail::kMaxGridYZ, "embedding bag: dim too large: ", dim);
  return dim3(static_cast<unsigned>(gx), static_cast<unsigned>(gy), 1);
}

template <typename F>
void with_index_types(const IndexView& a, const IndexView& b, F&& f) {
  if (a.type == IndexType::I64) {
    if (b.type == IndexType::I64) f(int64_t{}, int64_t{}); else f(int64_t{}, int32_t{});
  } else {
    if (b.type == IndexType::I64) f(int32_t{}, int64_t{}); else f(int32_t{}, int32_t{});
  }
}

}  // namespace

void embedding_bag_forward(const TableView& table, const IndexView& indices, const IndexView& offsets,
                           int64_t num_bags, const float* per_sample_weights, bool mean, float* out,
                           int64_t out_row_stride, void* stream) {
  RECMETA_CHECK(num_bags >= 0 && offsets.size == num_bags + 1, "embedding_bag_forward: expected ",
                num_bags + 1, " offsets, got ", offsets.size);
  RECMETA_CHECK(table.dim >= 0 && table.row_stride >= table.dim, "embedding_bag_forward: bad table stride ",
                table.row_stride, " for dim ", table.dim);
  RECMETA_CHECK(out_row_stride >= table.dim, "embedding_bag_forward: out row stride ", out_row_stride,
                " < dim ", table.dim);
  RECMETA_CHECK(table.type != TableType::I8Rowwise || (table.row_scale && table.row_min),
                "embedding_bag_forward: int8 table without row_scale/row_min");
  if (num_bags == 0 || table.dim == 0) return;
  const dim3 block = bag_block(table.dim);
  const dim3 grid = bag_grid(num_bags, table.dim, block);
  with_index_types(indices, offsets, [&](auto it, auto ot) {
    using IdxT = decltype(it);
    using OffT = decltype(ot);
    const auto* idx = static_cast<const IdxT*>(indices.data);
    const auto* off = static_cast<const OffT*>(offsets.data);
    switch (table.type) {
      case TableType::F32:
        RECMETA_LAUNCH((embedding_bag_fwd_kernel<TableType::F32, IdxT, OffT>), grid, block, 0, stream, table.data,
                       table.row_scale, table.row_min, table.row_stride, table.dim, idx, off, num_bags,
                       per_sample_weights, mean, out, out_row_stride);
        break;
      case TableType::F16:
        RECMETA_LAUNCH((embedding_bag_fwd_kernel<TableType::F16, IdxT, OffT>), grid, block, 0, stream, table.data,
                       table.row_scale, table.row_min, table.row_stride, table.dim, idx, off, num_bags,
                       per_sample_weights, mean, out, out_row_stride);
        break;
      case TableType::I8Rowwise:
        RECMETA_LAUNCH((embedding_bag_fwd_kernel<TableType::I8Rowwise, IdxT, OffT>), grid, block, 0, stream,
                       table.data, table.row_scale, table.row_min, table.row_stride, table.dim, idx, off,
                       num_bags, per_sample_weights, mean, out, out_row_stride);
        break;
    }
  });
}

void embedding_bag_backward_sorted(float* weight, int64_t dim, int64_t row_stride, float* state,
                                   const float* grad, int64_t grad_stride, const int64_t* sorted_pos,
                                   const int64_t* seg, const int64_t* uniq, int64_t num_unique,
                                   const int64_t* bag_of, const IndexView& offsets,
                                   const float* per_sample_weights, bool mean, bool adagrad, float lr,
                                   float eps, void* stream) {
  RECMETA_CHECK(!adagrad || state != nullptr, "embedding_bag_backward_sorted: rowwise_adagrad needs state");
  RECMETA_CHECK(row_stride >= dim && grad_stride >= dim, "embedding_bag_backward_sorted: bad strides");
  RECMETA_CHECK(num_unique <= detail::kMaxGridX, "embedding_bag_backward_sorted: too many rows ", num_unique);
  RECMETA_CHECK(dim <= 8192, "embedding_bag_backward_sorted: dim ", dim, " above 8192 (shared memory)");
  if (num_unique == 0 || dim == 0) return;
  const size_t smem = static_cast<size_t>(dim + kReduceThreads) * sizeof(float);
  const dim3 grid(static_cast<unsigned>(num_unique));
  if (offsets.type == IndexType::I64) {
    RECMETA_LAUNCH(embedding_bag_bwd_sorted_kernel<int64_t>, grid, kReduceThreads, smem, stream, weight, dim,
                   row_stride, state, grad, grad_stride, sorted_pos, seg, uniq, bag_of,
                   static_cast<const int64_t*>(offsets.data), per_sample_weights, mean, adagrad, lr, eps);
  } else {
    RECMETA_LAUNCH(embedding_bag_bwd_sorted_kernel<int32_t>, grid, kReduceThreads, smem, stream, weight, dim,
                   row_stride, state, grad, grad_stride, sorted_pos, seg, uniq, bag_of,
                   static_cast<const int32_t*>(offsets.data), per_sample_weights, mean, adagrad, lr, eps);
  }
}

void embedding_bag_backward_atomic(float* target, int64_t target_stride, int64_t dim, const float* grad,
                                   int64_t grad_stride, const IndexView& rows, const IndexView& offsets,
                                   int64_t num_bags, const float* per_sample_weights, bool mean, float scale,
                                   void* stream) {
  RECMETA_CHECK(offsets.size == num_bags + 1, "embedding_bag_backward_atomic: expected ", num_bags + 1,
                " offsets, got ", offsets.size);
  RECMETA_CHECK(target_stride >= dim && grad_stride >= dim, "embedding_bag_backward_atomic: bad strides");
  if (num_bags == 0 || dim == 0) return;
  const dim3 block = bag_block(dim);
  const dim3 grid = bag_grid(num_bags, dim, block);
  with_index_types(rows, offsets, [&](auto it, auto ot) {
    using IdxT = decltype(it);
    using OffT = decltype(ot);
    RECMETA_LAUNCH((embedding_bag_bwd_atomic_kernel<IdxT, OffT>), grid, block, 0, stream, target, target_stride,
                   dim, grad, grad_stride, static_cast<const IdxT*>(rows.data),
                   static_cast<const OffT*>(offsets.data), num_bags, per_sample_weights, mean, scale);
  });
}

void rowwise_adagrad_apply(float* weight, int64_t row_stride, float* state, const float* gbuf,
                           const int64_t* uniq, int64_t num_unique, int64_t dim, float lr, float eps,
                           void* stream) {
  RECMETA_CHECK(state != nullptr, "rowwise_adagrad_apply: state is null");
  RECMETA_CHECK(row_stride >= dim, "rowwise_adagrad_apply: bad row stride");
  RECMETA_CHECK(num_unique <= detail::kMaxGridX, "rowwise_adagrad_apply: too many rows ", num_unique);
  if (num_unique == 0 || dim == 0) return;
  RECMETA_LAUNCH(rowwise_adagrad_apply_kernel, dim3(static_cast<unsigned>(num_unique)), kReduceThreads, 0,
                 stream, weight, row_stride, state, gbuf, uniq, dim, lr, eps);
}

}  // namespace cuda
}  // namespace recmeta

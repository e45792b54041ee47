#pragma once
// Fused (table-batched) embedding bag on the CPU: forward pooling over float32 / float16 /
// row-wise int8 tables, and the backward pass fused with a sparse optimiser (SGD or
// row-wise Adagrad) applied in place. See recmeta_sdk/reference.py for the specification.
#include <cstdint>

#include "recmeta/common.h"
#include "recmeta/cpu_features.h"

namespace recmeta {

/// Pooling of the rows of one bag.
enum class PoolingMode : int32_t {
  Sum = 0,   ///< (weighted) sum of the rows
  Mean = 1,  ///< (weighted) sum divided by the number of indices in the bag; empty bag -> 0
};

/// Sparse optimiser fused into the backward pass.
enum class SparseOptimizer : int32_t {
  Sgd = 0,             ///< w_r -= lr * g_r
  RowwiseAdagrad = 1,  ///< s_r += mean(g_r^2); w_r -= lr * g_r / (sqrt(s_r) + eps)
};

/// Table-batched embedding-bag forward (FBGEMM's TBE layout); T = 1 is a plain embedding bag.
///
/// Every argument is validated (ids in range, offsets well formed, weights finite) before any
/// row is read; a violation throws InvalidArgument naming the bad value. Table rows are checked
/// as they are read: a row holding NaN or +-inf (for int8 tables: a non-finite row_scale or
/// row_min) that a bag reads throws InvalidArgument naming the table, the row and the position
/// in `indices` (after `out` was written). A finite bag whose pooled value overflows float32
/// stays inf, as in torch.
///
/// @param tables      pointer to `num_tables` TableView; table t has rows_t x dim_t entries.
/// @param num_tables  T >= 1.
/// @param indices     nnz row ids, local to their table, each in [0, rows_t).
/// @param offsets     T*B+1 CSR offsets, table-major: bag t*B+b is sample b of table t and
///                    holds indices[offsets[t*B+b] .. offsets[t*B+b+1]); offsets[0] == 0,
///                    non-decreasing, offsets[T*B] == nnz.
/// @param per_sample_weights nullptr or nnz float32 weights, one per index.
/// @param mode        sum or mean pooling.
/// @param out         B * out_stride float32; row b receives the T pooled vectors of sample b
///                    concatenated in table order (columns [0, sum_t dim_t)). Every one of
///                    those columns is written (an empty bag gives zeros); other columns are
///                    left untouched.
/// @param out_stride  floats between consecutive output rows, >= sum_t dim_t.
void embedding_bag_forward(const TableView* tables, int64_t num_tables, IndexView indices,
                           IndexView offsets, const float* per_sample_weights, PoolingMode mode,
                           float* out, int64_t out_stride);

/// Backward of a single-table embedding bag fused with a sparse optimiser, in place.
///
/// The gradient of row r is the sum, over the positions i with indices[i] == r taken in
/// increasing i, of c_i * grad_output[bag(i)], with c_i = per_sample_weights[i] (1 without
/// weights), divided by the bag's size in mean mode. No dense gradient is formed: the
/// (row, position) pairs are radix-sorted by row, then each thread owns whole rows, so the
/// result is bit-identical for any number of threads. Only rows present in `indices` change.
///
/// @param weight      rows * row_stride float32, updated in place (rows x dim used).
/// @param rows        number of rows N.
/// @param dim         embedding dimension d.
/// @param row_stride  floats between consecutive rows of `weight`, >= dim.
/// @param indices     nnz row ids in [0, N).
/// @param offsets     B+1 CSR offsets (offsets[0] == 0, non-decreasing, offsets[B] == nnz).
/// @param grad_output B * grad_stride float32: the gradient of the (B, d) forward output.
/// @param grad_stride floats between consecutive rows of grad_output, >= dim.
/// @param per_sample_weights nullptr or nnz float32.
/// @param mode        pooling of the forward pass.
/// @param optimizer   SGD or row-wise Adagrad.
/// @param lr          learning rate (finite).
/// @param eps         Adagrad epsilon (finite, >= 0).
/// @param state       rows float32 Adagrad state (updated in place); nullptr for SGD.
void embedding_bag_backward(float* weight, int64_t rows, int64_t dim, int64_t row_stride,
                            IndexView indices, IndexView offsets, const float* grad_output,
                            int64_t grad_stride, const float* per_sample_weights, PoolingMode mode,
                            SparseOptimizer optimizer, float lr, float eps, float* state);

/// One float32 table updated in place by the table-batched backward.
struct MutableTable {
  float* weight = nullptr;  ///< rows * row_stride float32 (rows x dim used), updated in place
  int64_t rows = 0;         ///< N_t
  int64_t dim = 0;          ///< d_t
  int64_t row_stride = 0;   ///< floats between consecutive rows, >= dim
  float* state = nullptr;   ///< rows float32 row-wise Adagrad state (updated in place); nullptr for SGD
};

/// Table-batched backward fused with a sparse optimiser, in place: the backward of
/// embedding_bag_forward over T tables (TBE layout), each table updated as by
/// embedding_bag_backward with its own optimiser state.
///
/// Every argument of every table is validated before any table changes. The tables are then
/// updated one after the other in table order, each deterministically (bit-identical for any
/// number of threads).
///
/// @param tables      pointer to `num_tables` MutableTable (state required for each table with
///                    row-wise Adagrad).
/// @param num_tables  T >= 1.
/// @param indices     nnz row ids, local to their table, each in [0, rows_t).
/// @param offsets     T*B+1 CSR offsets, table-major (bag t*B+b is sample b of table t).
/// @param grad_output B * grad_stride float32: the gradient of the (B, sum_t dim_t) forward
///                    output (table t's columns start at sum_{u<t} dim_u).
/// @param grad_stride floats between consecutive rows of grad_output, >= sum_t dim_t.
/// @param per_sample_weights nullptr or nnz float32.
/// @param mode        pooling of the forward pass.
/// @param optimizer   SGD or row-wise Adagrad.
/// @param lr          learning rate (finite).
/// @param eps         Adagrad epsilon (finite, >= 0).
void embedding_bag_backward_tbe(const MutableTable* tables, int64_t num_tables, IndexView indices,
                                IndexView offsets, const float* grad_output, int64_t grad_stride,
                                const float* per_sample_weights, PoolingMode mode,
                                SparseOptimizer optimizer, float lr, float eps);

namespace cpu {

// ---------------------------------------------------------------------------------------
// Internal: the per-ISA kernels (csrc/cpu/embedding_bag_kernels.cpp). Arguments are
// validated by the entry points above before these are called.
// ---------------------------------------------------------------------------------------

/// Arguments of the forward kernel (all validated).
struct EmbeddingBagForwardArgs {
  const TableView* tables = nullptr;  ///< num_tables views
  int64_t num_tables = 0;
  int64_t batch = 0;                  ///< B
  IndexView indices;                  ///< nnz ids
  IndexView offsets;                  ///< T*B+1 offsets
  const float* per_sample_weights = nullptr;  ///< nullptr or nnz
  PoolingMode mode = PoolingMode::Sum;
  const int64_t* col_offsets = nullptr;  ///< num_tables: first output column of each table
  float* out = nullptr;                  ///< B * out_stride
  int64_t out_stride = 0;
  /// Set (to 1) by the kernel when, in one of its work items (up to 64 bags of one table), the
  /// offsets decrease or leave the table's span or an id is outside [0, rows): each work item
  /// checks its offsets and ids (one pass over them, in cache) before it reads any row, and
  /// skips itself if one is bad, so the kernel never reads outside its buffers; the caller then
  /// names the bad value. The offsets at the tables' boundaries (offsets[t*B], t = 0..T) must be
  /// checked before the call: within [0, nnz], non-decreasing.
  int* bad_input = nullptr;
  /// Set (to 1) by the kernel when a pooled bag of one of its work items holds a non-finite
  /// value: each work item checks its output block (in L1, one pass over it) after pooling, as
  /// a cheap flag reduction instead of a test per row read. The caller then looks for the
  /// non-finite table row that the bags read and names it.
  int* bad_value = nullptr;
};

/// Arguments of the per-row backward update (after the sort).
struct EmbeddingBagBackwardArgs {
  float* weight = nullptr;  ///< rows * row_stride
  int64_t dim = 0;
  int64_t row_stride = 0;
  const float* grad_output = nullptr;  ///< B * grad_stride
  int64_t grad_stride = 0;
  int64_t num_segments = 0;            ///< number of distinct rows touched
  const int64_t* segment_row = nullptr;    ///< num_segments: the row of each segment
  const int64_t* segment_start = nullptr;  ///< num_segments+1: ranges into the sorted arrays
  /// nnz: the occurrences sorted by (row, position), each packed as (bag << 32) | bits of its
  /// float32 coefficient c_i.
  const uint64_t* sorted_payload = nullptr;
  SparseOptimizer optimizer = SparseOptimizer::Sgd;
  float lr = 0.f;
  float eps = 0.f;
  float* state = nullptr;  ///< rows, or nullptr
};

RECMETA_DECLARE_FOR_ISAS(void embedding_bag_forward_kernel(const EmbeddingBagForwardArgs& args))
RECMETA_DECLARE_FOR_ISAS(void embedding_bag_backward_kernel(const EmbeddingBagBackwardArgs& args))
/// Minimum and maximum of n ids (n >= 1) of the given width: out[0] = min, out[1] = max.
RECMETA_DECLARE_FOR_ISAS(void index_min_max(IndexView ids, int64_t begin, int64_t end, int64_t* out))

}  // namespace cpu
}  // namespace recmeta

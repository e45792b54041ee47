#pragma once
// Host entry points of the CUDA kernels (csrc/cuda/*.cu). Plain C++: no CUDA, Python or
// torch headers, so the pybind11 adaptor (bindings/cuda/module_cuda.cpp) compiles with the
// host compiler. Every pointer is a device pointer; `stream` is a cudaStream_t passed as
// void* (nullptr: the legacy default stream). Each function checks its scalar arguments
// (RECMETA_CHECK -> recmeta::InvalidArgument) and the launch (recmeta::CudaError), but not
// the contents of id arrays: callers validate ids and offsets on the host first
// (recmeta_sdk._gpu), so no kernel needs bounds checks on ids.
#include <cstdint>
#include <stdexcept>

#include "recmeta/common.h"

namespace recmeta {

/// A CUDA runtime error (launch failure, bad configuration). Bindings map it to RuntimeError.
class CudaError : public std::runtime_error {
 public:
  using std::runtime_error::runtime_error;
};

namespace cuda {

/// Pooled lookup of B bags of one table: out[b, 0:dim] = sum (or mean) over the bag's
/// positions p of w[p] * row(indices[p]).
/// @param table    device table view (rows x dim, row_stride elements apart, columns contiguous);
///                 I8Rowwise: row_scale / row_min point at `rows` floats each
/// @param indices  device ids, `indices.size` elements (int32 or int64), each in [0, rows)
/// @param offsets  device CSR offsets, B+1 elements (int32 or int64), into `indices`
/// @param per_sample_weights device float32, one per position of `indices`, or nullptr
/// @param out      device float32, B rows `out_row_stride` elements apart, `dim` columns written
void embedding_bag_forward(const TableView& table, const IndexView& indices, const IndexView& offsets,
                           int64_t num_bags, const float* per_sample_weights, bool mean, float* out,
                           int64_t out_row_stride, void* stream);

/// Deterministic backward fused with SGD / row-wise Adagrad: one block per unique row sums
/// its contributions in sorted-position order, then updates the row. No float atomics.
/// @param weight      device float32 (rows x dim), row_stride elements apart, updated in place
/// @param state       device float32 (rows,) Adagrad state, updated in place; nullptr for SGD
/// @param grad        device float32 (B x dim), grad_stride elements apart
/// @param sorted_pos  device int64 (nnz,) positions of indices sorted by row (stable)
/// @param seg         device int64 (num_unique + 1,) run starts in sorted_pos
/// @param uniq        device int64 (num_unique,) the unique rows
/// @param bag_of      device int64 (nnz,) bag of each position
/// @param offsets     device CSR offsets (B+1,), for the bag sizes of mode mean
/// @param per_sample_weights device float32 (nnz,) or nullptr
void embedding_bag_backward_sorted(float* weight, int64_t dim, int64_t row_stride, float* state,
                                   const float* grad, int64_t grad_stride, const int64_t* sorted_pos,
                                   const int64_t* seg, const int64_t* uniq, int64_t num_unique,
                                   const int64_t* bag_of, const IndexView& offsets,
                                   const float* per_sample_weights, bool mean, bool adagrad, float lr,
                                   float eps, void* stream);

/// Atomic backward: target[rows[p], :] += scale * w[p] * grad[bag(p), :] (/ bag size for mean),
/// one block column per bag. With target = the table and scale = -lr this is the SGD step;
/// with target = a zeroed (U x dim) buffer, rows = the unique-row slot of each position and
/// scale = 1 it sums the row gradients for rowwise_adagrad_apply.
/// @param target   device float32, target_stride elements between rows, `dim` columns
/// @param grad     device float32 (B x dim), grad_stride elements apart
/// @param rows     device ids (nnz,) selecting target rows
/// @param offsets  device CSR offsets (B+1,)
/// @param per_sample_weights device float32 (nnz,) or nullptr
void embedding_bag_backward_atomic(float* target, int64_t target_stride, int64_t dim, const float* grad,
                                   int64_t grad_stride, const IndexView& rows, const IndexView& offsets,
                                   int64_t num_bags, const float* per_sample_weights, bool mean,
                                   float scale, void* stream);

/// Row-wise Adagrad step from summed row gradients.
/// @param weight  device float32 (rows x dim), row_stride apart, updated in place
/// @param state   device float32 (rows,), updated in place
/// @param gbuf    device float32 (num_unique x dim), contiguous
/// @param uniq    device int64 (num_unique,) rows of gbuf's rows
void rowwise_adagrad_apply(float* weight, int64_t row_stride, float* state, const float* gbuf,
                           const int64_t* uniq, int64_t num_unique, int64_t dim, float lr, float eps,
                           void* stream);

/// Arguments of the first stage of the fused policy scoring.
struct PolicyStage1Args {
  const float* users = nullptr;  ///< device float32 (batch x dim), user_stride apart, columns contiguous
  int64_t batch = 0;
  int64_t dim = 0;
  int64_t user_stride = 0;
  TableView items;                  ///< device item table (N x dim), columns contiguous
  const float* bias = nullptr;      ///< device float32 (N,) or nullptr
  const int64_t* excl_keys = nullptr;  ///< device int64 (n_excl,) sorted row*N+id, or nullptr
  int64_t n_excl = 0;
  const int64_t* cand_keys = nullptr;  ///< device int64 (n_cand,) sorted row*N+id, or nullptr (all eligible)
  int64_t n_cand = 0;
  float temperature = 1.f;
  bool sample = false;     ///< rank by s + Gumbel(seed_key, row, item)
  uint32_t seed_key = 0;   ///< mix32(seed_lo ^ mix32(seed_hi + 0x9E3779B9))
  uint32_t hi_mix = 0;     ///< mix32(0 + 0xC2B2AE35) (item ids < 2^32)
  int64_t* keys_out = nullptr;  ///< device int64 (batch x splits x kb): packed (score, id), best first
  float* max_out = nullptr;     ///< device float32 (batch x splits): max eligible score (-inf if none)
  float* sum_out = nullptr;     ///< device float32 (batch x splits): sum exp(s - max); NaN marks a user that read a non-finite score
  int64_t splits = 1;
  int64_t items_per_split = 0;
  int32_t kb = 2;  ///< power of two in [2, 256], >= k
};

/// The uniforms of the Gumbel noise: out[r * num_items + i] = hash_uniform(seed, r, i) of
/// recmeta_sdk/reference.py, bit for bit (for tests: the policy kernel uses the same function).
/// @param out  device float32, rows * num_items values
void hash_uniform(float* out, int64_t rows, int64_t num_items, uint32_t seed_key, uint32_t hi_mix, void* stream);

/// Stage 1 of policy top-k / Gumbel-top-k: per (user group, item split) an online
/// log-sum-exp and the top kb packed keys (never the batch x N score matrix).
void policy_topk_stage1(const PolicyStage1Args& args, void* stream);

}  // namespace cuda
}  // namespace recmeta

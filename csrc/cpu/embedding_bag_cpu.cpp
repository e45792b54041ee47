// Entry points of the fused embedding bag on the CPU: validation of every argument before
// any row is read, then dispatch to the kernel variant of the running CPU.
#include <cmath>
#include <cstring>
#include <string>
#include <vector>

#include "recmeta/embedding_bag.h"

#ifdef RECMETA_HAVE_OPENMP
#include <omp.h>
#endif

namespace recmeta {
namespace {

/// offsets[0] == 0, non-decreasing, offsets[last] == nnz.
void check_offsets(IndexView offsets, int64_t nnz) {
  RECMETA_CHECK(offsets.size >= 1, "offsets: expected a 1-D array of B+1 >= 1 offsets, got ",
                offsets.size, " entries");
  RECMETA_CHECK(offsets[0] == 0, "offsets: offsets[0] must be 0, got ", offsets[0]);
  int64_t prev = 0;
  for (int64_t i = 1; i < offsets.size; ++i) {
    const int64_t o = offsets[i];
    RECMETA_CHECK(o >= prev, "offsets: offsets decrease at position ", i, " (", prev, " -> ", o, ")");
    prev = o;
  }
  RECMETA_CHECK(prev == nnz, "offsets: offsets[-1] must equal the number of indices ", nnz,
                ", got ", prev);
}

/// Every id of indices[begin, end) in [0, n); names the first bad one.
void check_ids(IndexView ids, int64_t begin, int64_t end, int64_t n, const char* name) {
  if (end <= begin) return;
  int64_t mm[2];
  RECMETA_DISPATCH_ISA(index_min_max, ids, begin, end, mm);
  if (mm[0] >= 0 && mm[1] < n) return;
  for (int64_t i = begin; i < end; ++i) {
    const int64_t v = ids[i];
    RECMETA_CHECK(v >= 0 && v < n, name, ": id ", v, " at position ", i, " is out of range [0, ", n, ")");
  }
}

/// All of rows x cols floats (row stride `stride`) finite; names the first bad one by its
/// flat (row-major, unstrided) position.
void check_finite(const float* x, int64_t rows, int64_t cols, int64_t stride, const char* name) {
  if (x == nullptr) return;
  bool ok = true;
  for (int64_t r = 0; r < rows; ++r) {
    const float* p = x + r * stride;
    for (int64_t j = 0; j < cols; ++j) ok &= std::isfinite(p[j]);
  }
  if (ok) return;
  for (int64_t r = 0; r < rows; ++r)
    for (int64_t j = 0; j < cols; ++j)
      RECMETA_CHECK(std::isfinite(x[r * stride + j]), name, ": non-finite value ", x[r * stride + j],
                    " at flat position ", r * cols + j);
}

void check_table(const TableView& t, int64_t i) {
  RECMETA_CHECK(t.data != nullptr || t.rows * t.dim == 0, "weight[", i, "]: null data");
  RECMETA_CHECK(t.rows >= 0 && t.dim >= 0, "weight[", i, "]: bad shape (", t.rows, ", ", t.dim, ")");
  RECMETA_CHECK(t.row_stride >= t.dim, "weight[", i, "]: row stride ", t.row_stride, " < dim ", t.dim);
  if (t.type == TableType::I8Rowwise)
    RECMETA_CHECK(t.row_scale != nullptr && t.row_min != nullptr,
                  "weight[", i, "]: int8 tables need row_scale and row_min");
}

/// Stable LSD radix sort of (key, value) pairs by key, keys < 2^bits. Deterministic: the
/// output is the unique stable order, whatever the thread count.
template <typename K>
void radix_sort_pairs(std::vector<K>& keys, std::vector<int64_t>& vals, int bits) {
  const int64_t n = static_cast<int64_t>(keys.size());
  constexpr int kDigit = 11;
  constexpr int64_t kBuckets = int64_t{1} << kDigit;
  std::vector<K> k2(keys.size());
  std::vector<int64_t> v2(vals.size());
  std::vector<int64_t> count(kBuckets);
  for (int shift = 0; shift < bits; shift += kDigit) {
    std::fill(count.begin(), count.end(), 0);
    for (int64_t i = 0; i < n; ++i) ++count[(keys[i] >> shift) & (kBuckets - 1)];
    int64_t sum = 0;
    for (int64_t b = 0; b < kBuckets; ++b) {
      const int64_t c = count[b];
      count[b] = sum;
      sum += c;
    }
    for (int64_t i = 0; i < n; ++i) {
      const int64_t dst = count[(keys[i] >> shift) & (kBuckets - 1)]++;
      k2[dst] = keys[i];
      v2[dst] = vals[i];
    }
    keys.swap(k2);
    vals.swap(v2);
  }
}

template <typename K>
void backward_sorted(cpu::EmbeddingBagBackwardArgs& args, IndexView indices, int64_t rows,
                     const std::vector<int64_t>& bag, const std::vector<float>& coef) {
  const int64_t nnz = indices.size;
  std::vector<K> keys(static_cast<size_t>(nnz));
  std::vector<int64_t> pos(static_cast<size_t>(nnz));
  for (int64_t i = 0; i < nnz; ++i) {
    keys[i] = static_cast<K>(indices[i]);
    pos[i] = i;
  }
  int bits = 0;
  while (bits < 64 && (static_cast<uint64_t>(rows - 1) >> bits) != 0) ++bits;
  radix_sort_pairs<K>(keys, pos, bits);

  std::vector<int64_t> seg_row, seg_start;
  seg_row.reserve(static_cast<size_t>(nnz));
  seg_start.reserve(static_cast<size_t>(nnz) + 1);
  std::vector<int64_t> sbag(static_cast<size_t>(nnz));
  std::vector<float> scoef(static_cast<size_t>(nnz));
  for (int64_t i = 0; i < nnz; ++i) {
    if (i == 0 || keys[i] != keys[i - 1]) {
      seg_row.push_back(static_cast<int64_t>(keys[i]));
      seg_start.push_back(i);
    }
    sbag[i] = bag[pos[i]];
    scoef[i] = coef[pos[i]];
  }
  seg_start.push_back(nnz);
  args.num_segments = static_cast<int64_t>(seg_row.size());
  args.segment_row = seg_row.data();
  args.segment_start = seg_start.data();
  args.sorted_bag = sbag.data();
  args.sorted_coef = scoef.data();
  RECMETA_DISPATCH_ISA(embedding_bag_backward_kernel, args);
}

}  // namespace

void embedding_bag_forward(const TableView* tables, int64_t num_tables, IndexView indices,
                           IndexView offsets, const float* per_sample_weights, PoolingMode mode,
                           float* out, int64_t out_stride) {
  RECMETA_CHECK(num_tables >= 1, "embedding_bag: need at least one table, got ", num_tables);
  RECMETA_CHECK(mode == PoolingMode::Sum || mode == PoolingMode::Mean, "embedding_bag: bad mode ",
                static_cast<int>(mode));
  RECMETA_CHECK(indices.size >= 0 && (indices.data != nullptr || indices.size == 0),
                "indices: null data");
  RECMETA_CHECK(offsets.data != nullptr && offsets.size >= 1,
                "offsets: expected a 1-D array of T*B+1 >= 1 offsets, got ", offsets.size, " entries");
  RECMETA_CHECK((offsets.size - 1) % num_tables == 0, "offsets: ", offsets.size - 1,
                " bags is not a multiple of the ", num_tables, " tables");
  const int64_t B = (offsets.size - 1) / num_tables;
  std::vector<int64_t> col(static_cast<size_t>(num_tables));
  int64_t total = 0;
  for (int64_t t = 0; t < num_tables; ++t) {
    check_table(tables[t], t);
    col[t] = total;
    total += tables[t].dim;
  }
  RECMETA_CHECK(out_stride >= total, "out: row stride ", out_stride, " < total dim ", total);
  RECMETA_CHECK(out != nullptr || B * total == 0, "out: null data");
  check_offsets(offsets, indices.size);
  for (int64_t t = 0; t < num_tables; ++t) {
    const std::string name = num_tables == 1 ? std::string("indices")
                                             : "indices of table " + std::to_string(t);
    check_ids(indices, offsets[t * B], offsets[(t + 1) * B], tables[t].rows, name.c_str());
  }
  check_finite(per_sample_weights, 1, indices.size, indices.size, "per_sample_weights");

  cpu::EmbeddingBagForwardArgs a;
  a.tables = tables;
  a.num_tables = num_tables;
  a.batch = B;
  a.indices = indices;
  a.offsets = offsets;
  a.per_sample_weights = per_sample_weights;
  a.mode = mode;
  a.col_offsets = col.data();
  a.out = out;
  a.out_stride = out_stride;
  RECMETA_DISPATCH_ISA(embedding_bag_forward_kernel, a);
}

void embedding_bag_backward(float* weight, int64_t rows, int64_t dim, int64_t row_stride,
                            IndexView indices, IndexView offsets, const float* grad_output,
                            int64_t grad_stride, const float* per_sample_weights, PoolingMode mode,
                            SparseOptimizer optimizer, float lr, float eps, float* state) {
  RECMETA_CHECK(rows >= 0 && dim >= 0, "weight: bad shape (", rows, ", ", dim, ")");
  RECMETA_CHECK(weight != nullptr || rows * dim == 0, "weight: null data");
  RECMETA_CHECK(row_stride >= dim, "weight: row stride ", row_stride, " < dim ", dim);
  RECMETA_CHECK(mode == PoolingMode::Sum || mode == PoolingMode::Mean,
                "embedding_bag_backward: bad mode ", static_cast<int>(mode));
  RECMETA_CHECK(optimizer == SparseOptimizer::Sgd || optimizer == SparseOptimizer::RowwiseAdagrad,
                "embedding_bag_backward: bad optimizer ", static_cast<int>(optimizer));
  RECMETA_CHECK(std::isfinite(lr), "lr: must be finite, got ", lr);
  RECMETA_CHECK(std::isfinite(eps) && eps >= 0.f, "eps: must be finite and >= 0, got ", eps);
  RECMETA_CHECK(optimizer != SparseOptimizer::RowwiseAdagrad || state != nullptr,
                "state: rowwise_adagrad needs a (N,) float32 state");
  RECMETA_CHECK(indices.size >= 0 && (indices.data != nullptr || indices.size == 0), "indices: null data");
  RECMETA_CHECK(offsets.data != nullptr && offsets.size >= 1,
                "offsets: expected a 1-D array of B+1 >= 1 offsets, got ", offsets.size, " entries");
  const int64_t B = offsets.size - 1;
  RECMETA_CHECK(grad_stride >= dim, "grad_output: row stride ", grad_stride, " < dim ", dim);
  RECMETA_CHECK(grad_output != nullptr || B * dim == 0, "grad_output: null data");
  check_offsets(offsets, indices.size);
  check_ids(indices, 0, indices.size, rows, "indices");
  check_finite(per_sample_weights, 1, indices.size, indices.size, "per_sample_weights");
  check_finite(grad_output, B, dim, grad_stride, "grad_output");
  if (optimizer == SparseOptimizer::RowwiseAdagrad) check_finite(state, 1, rows, rows, "state");
  const int64_t nnz = indices.size;
  if (nnz == 0 || dim == 0) return;

  // Bag and coefficient of every position.
  std::vector<int64_t> bag(static_cast<size_t>(nnz));
  std::vector<float> coef(static_cast<size_t>(nnz));
  for (int64_t b = 0; b < B; ++b) {
    const int64_t lo = offsets[b], hi = offsets[b + 1];
    const float cnt = static_cast<float>(hi - lo);
    for (int64_t i = lo; i < hi; ++i) {
      bag[i] = b;
      float c = per_sample_weights != nullptr ? per_sample_weights[i] : 1.f;
      if (mode == PoolingMode::Mean) c = c / cnt;
      coef[i] = c;
    }
  }
  cpu::EmbeddingBagBackwardArgs a;
  a.weight = weight;
  a.dim = dim;
  a.row_stride = row_stride;
  a.grad_output = grad_output;
  a.grad_stride = grad_stride;
  a.optimizer = optimizer;
  a.lr = lr;
  a.eps = eps;
  a.state = state;
  if (static_cast<uint64_t>(rows) <= (uint64_t{1} << 32))
    backward_sorted<uint32_t>(a, indices, rows, bag, coef);
  else
    backward_sorted<uint64_t>(a, indices, rows, bag, coef);
}

}  // namespace recmeta

// Entry points of the fused embedding bag on the CPU: validation of every argument before
// any row is read, then dispatch to the kernel variant of the running CPU.
#include <algorithm>
#include <cmath>
#include <memory>
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

/// The ids of every table in range: table t's ids are indices[offsets[t*B] .. offsets[(t+1)*B])
/// and must be < tables[t].rows. tables: (num_tables,); offsets: already checked, (num_tables*B+1,).
template <class Table>
void check_table_ids(const Table* tables, int64_t num_tables, IndexView indices, IndexView offsets, int64_t B) {
  for (int64_t t = 0; t < num_tables; ++t) {
    const std::string name = num_tables == 1 ? std::string("indices")
                                             : "indices of table " + std::to_string(t);
    check_ids(indices, offsets[t * B], offsets[(t + 1) * B], tables[t].rows, name.c_str());
  }
}

void check_table(const TableView& t, int64_t i) {
  RECMETA_CHECK(t.data != nullptr || t.rows * t.dim == 0, "weight[", i, "]: null data");
  RECMETA_CHECK(t.rows >= 0 && t.dim >= 0, "weight[", i, "]: bad shape (", t.rows, ", ", t.dim, ")");
  RECMETA_CHECK(t.row_stride >= t.dim, "weight[", i, "]: row stride ", t.row_stride, " < dim ", t.dim);
  if (t.type == TableType::I8Rowwise)
    RECMETA_CHECK(t.row_scale != nullptr && t.row_min != nullptr,
                  "weight[", i, "]: int8 tables need row_scale and row_min");
}

/// The first non-finite value of row r of a table: its column (>= 0), -1 for a non-finite
/// row_scale, -2 for a non-finite row_min (int8 tables), or -3 when the row is finite; the
/// value in *value.
int64_t nonfinite_column(const TableView& t, int64_t r, float* value) {
  switch (t.type) {
    case TableType::F32: {
      const float* p = static_cast<const float*>(t.data) + r * t.row_stride;
      for (int64_t j = 0; j < t.dim; ++j)
        if (!std::isfinite(p[j])) {
          *value = p[j];
          return j;
        }
      return -3;
    }
    case TableType::F16: {
      const uint16_t* p = static_cast<const uint16_t*>(t.data) + r * t.row_stride;
      for (int64_t j = 0; j < t.dim; ++j)
        if ((p[j] & 0x7C00u) == 0x7C00u) {
          *value = (p[j] & 0x3FFu) != 0 ? NAN : ((p[j] & 0x8000u) ? -INFINITY : INFINITY);
          return j;
        }
      return -3;
    }
    case TableType::I8Rowwise:
      if (!std::isfinite(t.row_scale[r])) {
        *value = t.row_scale[r];
        return -1;
      }
      if (!std::isfinite(t.row_min[r])) {
        *value = t.row_min[r];
        return -2;
      }
      return -3;
  }
  return -3;
}

/// After the kernel flagged a non-finite pooled value: throw naming the first table row (in
/// the order of `indices`) that holds a non-finite value; return if there is none (the
/// pooled value of finite rows overflowed float32, which stays inf as in torch).
void name_nonfinite_row(const TableView* tables, int64_t num_tables, IndexView indices, IndexView offsets,
                        int64_t B) {
  for (int64_t t = 0; t < num_tables; ++t) {
    const std::string name = num_tables == 1 ? std::string("weight") : "weight[" + std::to_string(t) + "]";
    for (int64_t i = offsets[t * B]; i < offsets[(t + 1) * B]; ++i) {
      const int64_t r = indices[i];
      float v = 0.f;
      const int64_t c = nonfinite_column(tables[t], r, &v);
      if (c == -3) continue;
      if (c >= 0)
        RECMETA_CHECK(false, name, ": row ", r, " holds a non-finite value (", v, " at column ", c,
                      "), read at position ", i, " of indices");
      RECMETA_CHECK(false, name, ": row ", r, " has a non-finite ", c == -1 ? "row_scale" : "row_min", " (", v,
                    "), read at position ", i, " of indices");
    }
  }
}

template <typename T>
std::unique_ptr<T[]> uninit(int64_t n) {
  return std::unique_ptr<T[]>(new T[static_cast<size_t>(std::max<int64_t>(n, 1))]);
}

/// Stable LSD radix sort of (key, payload) pairs by key, keys < 2^bits. Large inputs are split
/// into one contiguous chunk per thread: each pass counts digits per chunk, then scatters each
/// chunk behind the same digits of the chunks before it, which keeps the sort stable. A stable
/// sort has a unique result, so the output is the same for any thread count. `keys` / `vals`
/// receive the sorted arrays; `ktmp` / `vtmp` are scratch of n entries.
template <typename K>
void radix_sort_pairs(std::unique_ptr<K[]>& keys, std::unique_ptr<uint64_t[]>& vals,
                      std::unique_ptr<K[]>& ktmp, std::unique_ptr<uint64_t[]>& vtmp, int64_t n, int bits) {
  if (bits <= 0 || n <= 1) return;
  const int passes = (bits + 10) / 11;
  const int dbits = (bits + passes - 1) / passes;
  const int64_t nb = int64_t{1} << dbits;
  const K mask = static_cast<K>(nb - 1);
  int64_t nt = 1;
#ifdef RECMETA_HAVE_OPENMP
  if (n >= (int64_t{1} << 16)) nt = std::max(1, omp_get_max_threads());
#endif
  std::vector<int64_t> count(static_cast<size_t>(nt * nb));
  for (int p = 0; p < passes; ++p) {
    const int shift = p * dbits;
    const K* ks = keys.get();
    const uint64_t* vs = vals.get();
    K* kd = ktmp.get();
    uint64_t* vd = vtmp.get();
    int64_t* cnt = count.data();
#ifdef RECMETA_HAVE_OPENMP
#pragma omp parallel for schedule(static, 1) num_threads(static_cast<int>(nt)) if (nt > 1)
#endif
    for (int64_t c = 0; c < nt; ++c) {
      int64_t* h = cnt + c * nb;
      std::fill(h, h + nb, 0);
      const int64_t lo = n * c / nt, hi = n * (c + 1) / nt;
      for (int64_t i = lo; i < hi; ++i) ++h[(ks[i] >> shift) & mask];
    }
    int64_t sum = 0;
    for (int64_t b = 0; b < nb; ++b) {
      for (int64_t c = 0; c < nt; ++c) {
        const int64_t x = cnt[c * nb + b];
        cnt[c * nb + b] = sum;
        sum += x;
      }
    }
#ifdef RECMETA_HAVE_OPENMP
#pragma omp parallel for schedule(static, 1) num_threads(static_cast<int>(nt)) if (nt > 1)
#endif
    for (int64_t c = 0; c < nt; ++c) {
      int64_t* h = cnt + c * nb;
      const int64_t lo = n * c / nt, hi = n * (c + 1) / nt;
      for (int64_t i = lo; i < hi; ++i) {
        const int64_t dst = h[(ks[i] >> shift) & mask]++;
        kd[dst] = ks[i];
        vd[dst] = vs[i];
      }
    }
    keys.swap(ktmp);
    vals.swap(vtmp);
  }
}

/// Keys (rows) and payloads ((bag << 32) | coefficient bits) of every position.
template <typename K, typename IdxT>
void fill_pairs(const IdxT* idx, IndexView offsets, const float* psw, PoolingMode mode, K* keys,
                uint64_t* pay) {
  const int64_t B = offsets.size - 1;
  const bool parallel = offsets[B] >= (int64_t{1} << 16);
  (void)parallel;
#ifdef RECMETA_HAVE_OPENMP
#pragma omp parallel for schedule(static) if (parallel)
#endif
  for (int64_t b = 0; b < B; ++b) {
    const int64_t lo = offsets[b], hi = offsets[b + 1];
    const float cnt = static_cast<float>(hi - lo);
    for (int64_t i = lo; i < hi; ++i) {
      float c = psw != nullptr ? psw[i] : 1.f;
      if (mode == PoolingMode::Mean) c = c / cnt;
      uint32_t cb;
      std::memcpy(&cb, &c, sizeof(cb));
      keys[i] = static_cast<K>(idx[i]);
      pay[i] = (static_cast<uint64_t>(b) << 32) | cb;
    }
  }
}

template <typename K>
void backward_sorted(cpu::EmbeddingBagBackwardArgs& args, IndexView indices, IndexView offsets,
                     const float* psw, PoolingMode mode, int64_t rows) {
  const int64_t nnz = indices.size;
  auto keys = uninit<K>(nnz), ktmp = uninit<K>(nnz);
  auto pay = uninit<uint64_t>(nnz), ptmp = uninit<uint64_t>(nnz);
  if (indices.type == IndexType::I32)
    fill_pairs<K, int32_t>(static_cast<const int32_t*>(indices.data), offsets, psw, mode, keys.get(), pay.get());
  else
    fill_pairs<K, int64_t>(static_cast<const int64_t*>(indices.data), offsets, psw, mode, keys.get(), pay.get());
  int bits = 0;
  while (bits < 64 && (static_cast<uint64_t>(rows - 1) >> bits) != 0) ++bits;
  radix_sort_pairs<K>(keys, pay, ktmp, ptmp, nnz, bits);

  // Segments of equal rows (ktmp's memory is free now: reuse it for nothing; plain arrays).
  auto seg_row = uninit<int64_t>(nnz);
  auto seg_start = uninit<int64_t>(nnz + 1);
  int64_t S = 0;
  const K* k = keys.get();
  for (int64_t i = 0; i < nnz; ++i) {
    if (i == 0 || k[i] != k[i - 1]) {
      seg_row[S] = static_cast<int64_t>(k[i]);
      seg_start[S] = i;
      ++S;
    }
  }
  seg_start[S] = nnz;
  args.num_segments = S;
  args.segment_row = seg_row.get();
  args.segment_start = seg_start.get();
  args.sorted_payload = pay.get();
  RECMETA_DISPATCH_ISA(embedding_bag_backward_kernel, args);
}

/// The sort and the per-row update of one table (arguments validated by the caller).
void run_backward(float* weight, int64_t rows, int64_t dim, int64_t row_stride, IndexView indices,
                  IndexView offsets, const float* grad_output, int64_t grad_stride,
                  const float* per_sample_weights, PoolingMode mode, SparseOptimizer optimizer,
                  float lr, float eps, float* state);

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
  // Before the kernel, only what it relies on: the offsets at the tables' boundaries. The ids
  // and the offsets inside each table are checked by the kernel, work item by work item, just
  // before it reads their rows (no pass over the whole input of their own); on a bad one it
  // sets `bad` and the full checks below name it.
  const int64_t nnz = indices.size;
  bool bounds_ok = offsets[0] == 0 && offsets[offsets.size - 1] == nnz;
  for (int64_t t = 1; t <= num_tables && bounds_ok; ++t) {
    const int64_t o = offsets[t * B];
    bounds_ok = o >= offsets[(t - 1) * B] && o <= nnz;
  }
  if (!bounds_ok) check_offsets(offsets, nnz);  // throws, naming the bad offset
  check_finite(per_sample_weights, 1, indices.size, indices.size, "per_sample_weights");

  int bad = 0, bad_value = 0;
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
  a.bad_input = &bad;
  a.bad_value = &bad_value;
  RECMETA_DISPATCH_ISA(embedding_bag_forward_kernel, a);
  if (bad) {
    check_offsets(offsets, nnz);
    check_table_ids(tables, num_tables, indices, offsets, B);
    RECMETA_CHECK(false, "embedding_bag: the kernel flagged a bad id or offset that the checks did not find");
  }
  if (bad_value) name_nonfinite_row(tables, num_tables, indices, offsets, B);
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
  RECMETA_CHECK(B < (int64_t{1} << 32), "offsets: at most 2^32 - 1 bags, got ", B);
  run_backward(weight, rows, dim, row_stride, indices, offsets, grad_output, grad_stride,
               per_sample_weights, mode, optimizer, lr, eps, state);
}

void embedding_bag_backward_tbe(const MutableTable* tables, int64_t num_tables, IndexView indices,
                                IndexView offsets, const float* grad_output, int64_t grad_stride,
                                const float* per_sample_weights, PoolingMode mode,
                                SparseOptimizer optimizer, float lr, float eps) {
  RECMETA_CHECK(num_tables >= 1, "embedding_bag_backward: need at least one table, got ", num_tables);
  RECMETA_CHECK(tables != nullptr, "embedding_bag_backward: null tables");
  RECMETA_CHECK(mode == PoolingMode::Sum || mode == PoolingMode::Mean,
                "embedding_bag_backward: bad mode ", static_cast<int>(mode));
  RECMETA_CHECK(optimizer == SparseOptimizer::Sgd || optimizer == SparseOptimizer::RowwiseAdagrad,
                "embedding_bag_backward: bad optimizer ", static_cast<int>(optimizer));
  RECMETA_CHECK(std::isfinite(lr), "lr: must be finite, got ", lr);
  RECMETA_CHECK(std::isfinite(eps) && eps >= 0.f, "eps: must be finite and >= 0, got ", eps);
  RECMETA_CHECK(indices.size >= 0 && (indices.data != nullptr || indices.size == 0), "indices: null data");
  RECMETA_CHECK(offsets.data != nullptr && offsets.size >= 1,
                "offsets: expected a 1-D array of T*B+1 >= 1 offsets, got ", offsets.size, " entries");
  RECMETA_CHECK((offsets.size - 1) % num_tables == 0, "offsets: ", offsets.size - 1,
                " bags is not a multiple of the ", num_tables, " tables");
  const int64_t B = (offsets.size - 1) / num_tables;
  RECMETA_CHECK(B < (int64_t{1} << 32), "offsets: at most 2^32 - 1 bags per table, got ", B);
  std::vector<int64_t> col(static_cast<size_t>(num_tables));
  int64_t total = 0;
  for (int64_t t = 0; t < num_tables; ++t) {
    const MutableTable& m = tables[t];
    RECMETA_CHECK(m.rows >= 0 && m.dim >= 0, "weight[", t, "]: bad shape (", m.rows, ", ", m.dim, ")");
    RECMETA_CHECK(m.weight != nullptr || m.rows * m.dim == 0, "weight[", t, "]: null data");
    RECMETA_CHECK(m.row_stride >= m.dim, "weight[", t, "]: row stride ", m.row_stride, " < dim ", m.dim);
    RECMETA_CHECK(optimizer != SparseOptimizer::RowwiseAdagrad || m.state != nullptr || m.rows == 0,
                  "state[", t, "]: rowwise_adagrad needs a (N_t,) float32 state per table");
    col[t] = total;
    total += m.dim;
  }
  RECMETA_CHECK(grad_stride >= total, "grad_output: row stride ", grad_stride, " < total dim ", total);
  RECMETA_CHECK(grad_output != nullptr || B * total == 0, "grad_output: null data");
  check_offsets(offsets, indices.size);
  check_table_ids(tables, num_tables, indices, offsets, B);
  check_finite(per_sample_weights, 1, indices.size, indices.size, "per_sample_weights");
  check_finite(grad_output, B, total, grad_stride, "grad_output");
  if (optimizer == SparseOptimizer::RowwiseAdagrad)
    for (int64_t t = 0; t < num_tables; ++t) {
      const std::string name = "state[" + std::to_string(t) + "]";
      check_finite(tables[t].state, 1, tables[t].rows, tables[t].rows, name.c_str());
    }

  // Table by table: the bags of table t, rebased to start at 0, against its gradient columns.
  std::vector<int64_t> off(static_cast<size_t>(B + 1));
  const int64_t isz = indices.type == IndexType::I32 ? 4 : 8;
  for (int64_t t = 0; t < num_tables; ++t) {
    const MutableTable& m = tables[t];
    const int64_t lo = offsets[t * B];
    for (int64_t b = 0; b <= B; ++b) off[b] = offsets[t * B + b] - lo;
    IndexView sub_idx;
    sub_idx.type = indices.type;
    sub_idx.data = indices.size == 0 ? indices.data : static_cast<const char*>(indices.data) + lo * isz;
    sub_idx.size = off[B];
    IndexView sub_off;
    sub_off.type = IndexType::I64;
    sub_off.data = off.data();
    sub_off.size = B + 1;
    run_backward(m.weight, m.rows, m.dim, m.row_stride, sub_idx, sub_off,
                 grad_output == nullptr ? nullptr : grad_output + col[t], grad_stride,
                 per_sample_weights == nullptr ? nullptr : per_sample_weights + lo, mode, optimizer, lr,
                 eps, m.state);
  }
}

namespace {
void run_backward(float* weight, int64_t rows, int64_t dim, int64_t row_stride, IndexView indices,
                  IndexView offsets, const float* grad_output, int64_t grad_stride,
                  const float* per_sample_weights, PoolingMode mode, SparseOptimizer optimizer,
                  float lr, float eps, float* state) {
  const int64_t nnz = indices.size;
  if (nnz == 0 || dim == 0) return;
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
    backward_sorted<uint32_t>(a, indices, offsets, per_sample_weights, mode, rows);
  else
    backward_sorted<uint64_t>(a, indices, offsets, per_sample_weights, mode, rows);
}
}  // namespace

}  // namespace recmeta

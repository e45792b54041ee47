// Binding of the embedding_bag op: numpy (buffer-protocol) arrays in, views checked here,
// the GIL released around the work. Torch CPU tensors arrive as numpy views (t.numpy()).
#include <cstdint>
#include <string>
#include <vector>

#include "bindings.h"
#include "recmeta/embedding_bag.h"

namespace py = pybind11;

namespace recmeta_bindings {
namespace {

bool is_dtype(const py::array& a, char kind, py::ssize_t itemsize) {
  return a.dtype().kind() == kind && a.itemsize() == itemsize;
}

std::string dtype_str(const py::array& a) { return py::str(a.dtype()).cast<std::string>(); }

/// A 1-D contiguous int32/int64 array as an IndexView.
recmeta::IndexView index_view(const py::array& a, const std::string& name) {
  recmeta::IndexView v;
  if (is_dtype(a, 'i', 4)) v.type = recmeta::IndexType::I32;
  else if (is_dtype(a, 'i', 8)) v.type = recmeta::IndexType::I64;
  else throw py::type_error(name + ": ids must be int32 or int64, got " + dtype_str(a));
  if (a.ndim() != 1)
    throw py::value_error(name + ": expected a 1-D array, got " + std::to_string(a.ndim()) + " dimensions");
  if (a.shape(0) > 1 && a.strides(0) != a.itemsize())
    throw py::value_error(name + ": must be contiguous");
  v.data = a.data();
  v.size = a.shape(0);
  return v;
}

/// A 1-D contiguous float32 array of n entries (or None -> nullptr).
const float* float_vector(const py::object& o, int64_t n, const std::string& name,
                          std::vector<py::array>& keep) {
  if (o.is_none()) return nullptr;
  py::array a = py::array::ensure(o);
  if (!a) throw py::type_error(name + ": expected a numpy array");
  if (!is_dtype(a, 'f', 4)) throw py::type_error(name + ": expected float32, got " + dtype_str(a));
  if (a.ndim() != 1 || a.shape(0) != n)
    throw py::value_error(name + ": expected shape (" + std::to_string(n) + ",)");
  if (n > 1 && a.strides(0) != 4) throw py::value_error(name + ": must be contiguous");
  keep.push_back(a);
  return static_cast<const float*>(a.data());
}

/// Rows-major 2-D array with unit element stride: returns the row stride in elements.
int64_t row_stride_of(const py::array& a, const std::string& name) {
  if (a.ndim() != 2)
    throw py::value_error(name + ": expected a 2-D (N, d) array, got " + std::to_string(a.ndim()) + " dimensions");
  const py::ssize_t it = a.itemsize();
  if (a.size() == 0) return a.shape(1);  // no element is read: any strides will do
  if (a.shape(1) > 1 && a.strides(1) != it)
    throw py::value_error(name + ": rows must be contiguous (element stride " + std::to_string(a.strides(1)) + ")");
  if (a.shape(0) <= 1) return a.shape(1);
  if (a.strides(0) % it != 0 || a.strides(0) / it < a.shape(1))
    throw py::value_error(name + ": unsupported row stride " + std::to_string(a.strides(0)));
  return a.strides(0) / it;
}

/// One table: a 2-D float32 / float16 array, or a (uint8 codes, row_scale, row_min) tuple.
recmeta::TableView table_view(const py::handle& h, const std::string& name, std::vector<py::array>& keep) {
  recmeta::TableView v;
  if (py::isinstance<py::tuple>(h)) {
    py::tuple tup = py::reinterpret_borrow<py::tuple>(h);
    if (tup.size() != 3)
      throw py::type_error(name + ": an int8 table is a (codes, row_scale, row_min) tuple, got " +
                           std::to_string(tup.size()) + " items");
    py::array q = py::array::ensure(tup[0]);
    if (!q) throw py::type_error(name + ": codes must be a numpy array");
    if (!is_dtype(q, 'u', 1)) throw py::type_error(name + ": int8 codes must be uint8, got " + dtype_str(q));
    v.type = recmeta::TableType::I8Rowwise;
    v.row_stride = row_stride_of(q, name);
    v.rows = q.shape(0);
    v.dim = q.shape(1);
    v.data = q.data();
    keep.push_back(q);
    v.row_scale = float_vector(tup[1], v.rows, name + " row_scale", keep);
    v.row_min = float_vector(tup[2], v.rows, name + " row_min", keep);
    if (v.row_scale == nullptr || v.row_min == nullptr)
      throw py::type_error(name + ": int8 tables need row_scale and row_min arrays");
    return v;
  }
  py::array a = py::array::ensure(h);
  if (!a) throw py::type_error(name + ": expected a numpy array or an int8 (codes, scale, min) tuple");
  if (is_dtype(a, 'f', 4)) v.type = recmeta::TableType::F32;
  else if (is_dtype(a, 'f', 2)) v.type = recmeta::TableType::F16;
  else throw py::type_error(name + ": tables must be float32 or float16 (or an int8 tuple), got " + dtype_str(a));
  v.row_stride = row_stride_of(a, name);
  v.rows = a.shape(0);
  v.dim = a.shape(1);
  v.data = a.data();
  keep.push_back(a);
  return v;
}

// ---------------------------------------------------------------------------------------
// Descriptors: (address, type code, sizes...) tuples of ints describing memory the caller
// keeps alive for the duration of the call. recmeta_sdk builds them from torch CPU tensors
// (data_ptr(), dtype, shape, stride) to skip the cost of Tensor.numpy(); sizes and codes are
// checked here like an array's, the address is the caller's responsibility.
// ---------------------------------------------------------------------------------------
bool is_descriptor(const py::handle& h) {
  if (!py::isinstance<py::tuple>(h)) return false;
  py::tuple t = py::reinterpret_borrow<py::tuple>(h);
  return t.size() > 0 && py::isinstance<py::int_>(t[0]);
}

std::vector<int64_t> descriptor_ints(const py::handle& h, size_t n, const std::string& name) {
  py::tuple t = py::reinterpret_borrow<py::tuple>(h);
  if (t.size() != n)
    throw py::type_error(name + ": a descriptor has " + std::to_string(n) + " integers, got " +
                         std::to_string(t.size()));
  std::vector<int64_t> v(n);
  for (size_t i = 0; i < n; ++i) {
    if (!py::isinstance<py::int_>(t[i])) throw py::type_error(name + ": descriptor entries must be integers");
    v[i] = t[i].cast<int64_t>();
  }
  return v;
}

/// (address, code 0 = int32 / 1 = int64, n)
recmeta::IndexView index_descriptor(const py::handle& h, const std::string& name) {
  const auto v = descriptor_ints(h, 3, name);
  if (v[1] != 0 && v[1] != 1) throw py::type_error(name + ": ids must be int32 or int64 (descriptor code " + std::to_string(v[1]) + ")");
  if (v[2] < 0 || (v[0] == 0 && v[2] > 0)) throw py::value_error(name + ": bad descriptor");
  recmeta::IndexView iv;
  iv.type = v[1] == 0 ? recmeta::IndexType::I32 : recmeta::IndexType::I64;
  iv.data = reinterpret_cast<const void*>(static_cast<uintptr_t>(v[0]));
  iv.size = v[2];
  return iv;
}

/// (address, code 0 = float32 / 1 = float16 / 2 = int8 row-wise, rows, dim, row_stride,
///  row_scale address, row_min address)
recmeta::TableView table_descriptor(const py::handle& h, const std::string& name) {
  const auto v = descriptor_ints(h, 7, name);
  if (v[1] < 0 || v[1] > 2) throw py::type_error(name + ": bad table type code " + std::to_string(v[1]));
  if (v[2] < 0 || v[3] < 0 || v[4] < v[3] || (v[0] == 0 && v[2] * v[3] > 0))
    throw py::value_error(name + ": bad table descriptor");
  recmeta::TableView t;
  t.type = static_cast<recmeta::TableType>(v[1]);
  t.data = reinterpret_cast<const void*>(static_cast<uintptr_t>(v[0]));
  t.rows = v[2];
  t.dim = v[3];
  t.row_stride = v[4];
  if (t.type == recmeta::TableType::I8Rowwise) {
    if ((v[5] == 0 || v[6] == 0) && t.rows > 0) throw py::value_error(name + ": int8 tables need row_scale and row_min");
    t.row_scale = reinterpret_cast<const float*>(static_cast<uintptr_t>(v[5]));
    t.row_min = reinterpret_cast<const float*>(static_cast<uintptr_t>(v[6]));
  }
  return t;
}

/// Indices / offsets given as an array or a descriptor.
recmeta::IndexView index_any(const py::object& o, const std::string& name, std::vector<py::array>& keep) {
  if (is_descriptor(o)) return index_descriptor(o, name);
  py::array a = py::array::ensure(o);
  if (!a) throw py::type_error(name + ": expected a numpy array");
  keep.push_back(a);
  return index_view(a, name);
}

/// Per-sample weights given as None, an array, or an (address, n) descriptor.
const float* weights_any(const py::object& o, int64_t n, const std::string& name, std::vector<py::array>& keep) {
  if (is_descriptor(o)) {
    const auto v = descriptor_ints(o, 2, name);
    if (v[1] != n) throw py::value_error(name + ": expected shape (" + std::to_string(n) + ",), got (" + std::to_string(v[1]) + ",)");
    if (v[0] == 0 && n > 0) throw py::value_error(name + ": bad descriptor");
    return reinterpret_cast<const float*>(static_cast<uintptr_t>(v[0]));
  }
  return float_vector(o, n, name, keep);
}

recmeta::PoolingMode pooling_mode(const std::string& mode) {
  if (mode == "sum") return recmeta::PoolingMode::Sum;
  if (mode == "mean") return recmeta::PoolingMode::Mean;
  throw py::value_error("mode: must be 'sum' or 'mean', got '" + mode + "'");
}

py::array_t<float> forward(const py::sequence& tables, const py::object& indices,
                           const py::object& offsets, const py::object& per_sample_weights,
                           const std::string& mode) {
  const recmeta::PoolingMode pm = pooling_mode(mode);
  std::vector<py::array> keep;
  std::vector<recmeta::TableView> views;
  const py::ssize_t T = py::len(tables);
  if (T < 1) throw py::value_error("tables: the list of tables is empty");
  for (py::ssize_t t = 0; t < T; ++t) {
    const py::handle h = tables[t];
    const std::string name = "weight[" + std::to_string(t) + "]";
    views.push_back(is_descriptor(h) ? table_descriptor(h, name) : table_view(h, name, keep));
  }
  const recmeta::IndexView idx = index_any(indices, "indices", keep);
  const recmeta::IndexView off = index_any(offsets, "offsets", keep);
  if (off.size < 1) throw py::value_error("offsets: expected T*B+1 >= 1 offsets, got 0");
  if ((off.size - 1) % T != 0)
    throw py::value_error("offsets: " + std::to_string(off.size - 1) + " bags is not a multiple of the " +
                          std::to_string(T) + " tables");
  const float* psw = weights_any(per_sample_weights, idx.size, "per_sample_weights", keep);
  const int64_t B = (off.size - 1) / T;
  int64_t D = 0;
  for (const auto& v : views) D += v.dim;
  py::array_t<float> out({static_cast<py::ssize_t>(B), static_cast<py::ssize_t>(D)});
  float* po = out.mutable_data();
  {
    py::gil_scoped_release nogil;
    recmeta::embedding_bag_forward(views.data(), T, idx, off, psw, pm, po, D);
  }
  return out;
}

void backward(py::array weight, const py::array& indices, const py::array& offsets,
              const py::array& grad_output, const py::object& per_sample_weights,
              const std::string& mode, const std::string& optimizer, double lr, double eps,
              const py::object& state) {
  const recmeta::PoolingMode pm = pooling_mode(mode);
  recmeta::SparseOptimizer opt;
  if (optimizer == "sgd") opt = recmeta::SparseOptimizer::Sgd;
  else if (optimizer == "rowwise_adagrad") opt = recmeta::SparseOptimizer::RowwiseAdagrad;
  else throw py::value_error("optimizer: must be 'sgd' or 'rowwise_adagrad', got '" + optimizer + "'");
  if (!is_dtype(weight, 'f', 4)) throw py::type_error("weight: the fused update needs a float32 table, got " + dtype_str(weight));
  if (!weight.writeable()) throw py::value_error("weight: the array is read-only");
  const int64_t ws = row_stride_of(weight, "weight");
  const int64_t N = weight.shape(0), d = weight.shape(1);
  const recmeta::IndexView idx = index_view(indices, "indices");
  const recmeta::IndexView off = index_view(offsets, "offsets");
  if (off.size < 1) throw py::value_error("offsets: expected B+1 >= 1 offsets, got 0");
  const int64_t B = off.size - 1;
  if (!is_dtype(grad_output, 'f', 4)) throw py::type_error("grad_output: expected float32, got " + dtype_str(grad_output));
  const int64_t gs = row_stride_of(grad_output, "grad_output");
  if (grad_output.shape(0) != B || grad_output.shape(1) != d)
    throw py::value_error("grad_output: expected shape (" + std::to_string(B) + ", " + std::to_string(d) +
                          "), got (" + std::to_string(grad_output.shape(0)) + ", " +
                          std::to_string(grad_output.shape(1)) + ")");
  std::vector<py::array> keep;
  const float* psw = float_vector(per_sample_weights, idx.size, "per_sample_weights", keep);
  float* st = nullptr;
  if (!state.is_none()) {
    const float* s = float_vector(state, N, "state", keep);
    if (!keep.back().writeable()) throw py::value_error("state: the array is read-only");
    st = const_cast<float*>(s);
  }
  if (opt == recmeta::SparseOptimizer::RowwiseAdagrad && st == nullptr)
    throw py::value_error("state: rowwise_adagrad needs a (N,) float32 state");
  float* w = static_cast<float*>(weight.mutable_data());
  const float* g = static_cast<const float*>(grad_output.data());
  {
    py::gil_scoped_release nogil;
    recmeta::embedding_bag_backward(w, N, d, ws, idx, off, g, gs, psw, pm, opt, static_cast<float>(lr),
                                    static_cast<float>(eps), st);
  }
}

void backward_tbe(const py::sequence& weights, const py::array& indices, const py::array& offsets,
                  const py::array& grad_output, const py::object& per_sample_weights,
                  const std::string& mode, const std::string& optimizer, double lr, double eps,
                  const py::object& states) {
  const recmeta::PoolingMode pm = pooling_mode(mode);
  recmeta::SparseOptimizer opt;
  if (optimizer == "sgd") opt = recmeta::SparseOptimizer::Sgd;
  else if (optimizer == "rowwise_adagrad") opt = recmeta::SparseOptimizer::RowwiseAdagrad;
  else throw py::value_error("optimizer: must be 'sgd' or 'rowwise_adagrad', got '" + optimizer + "'");
  const py::ssize_t T = py::len(weights);
  if (T < 1) throw py::value_error("weight: the list of tables is empty");
  std::vector<py::array> keep;
  std::vector<recmeta::MutableTable> tabs(static_cast<size_t>(T));
  int64_t D = 0;
  for (py::ssize_t t = 0; t < T; ++t) {
    const std::string name = "weight[" + std::to_string(t) + "]";
    py::array w = py::array::ensure(weights[t]);
    if (!w) throw py::type_error(name + ": expected a numpy array");
    if (!is_dtype(w, 'f', 4)) throw py::type_error(name + ": the fused update needs a float32 table, got " + dtype_str(w));
    if (!w.writeable()) throw py::value_error(name + ": the array is read-only");
    tabs[t].row_stride = row_stride_of(w, name);
    tabs[t].rows = w.shape(0);
    tabs[t].dim = w.shape(1);
    tabs[t].weight = static_cast<float*>(w.mutable_data());
    keep.push_back(w);
    D += tabs[t].dim;
  }
  if (!states.is_none()) {
    py::sequence ss = py::reinterpret_borrow<py::sequence>(states);
    if (!py::isinstance<py::sequence>(states) || py::len(ss) != static_cast<size_t>(T))
      throw py::value_error("state: expected a list of " + std::to_string(T) + " (N_t,) float32 arrays");
    for (py::ssize_t t = 0; t < T; ++t) {
      const std::string name = "state[" + std::to_string(t) + "]";
      const float* s = float_vector(ss[t], tabs[t].rows, name, keep);
      if (!keep.back().writeable()) throw py::value_error(name + ": the array is read-only");
      tabs[t].state = const_cast<float*>(s);
    }
  }
  if (opt == recmeta::SparseOptimizer::RowwiseAdagrad && states.is_none())
    throw py::value_error("state: rowwise_adagrad needs a (N_t,) float32 state per table");
  const recmeta::IndexView idx = index_view(indices, "indices");
  const recmeta::IndexView off = index_view(offsets, "offsets");
  if (off.size < 1) throw py::value_error("offsets: expected T*B+1 >= 1 offsets, got 0");
  if ((off.size - 1) % T != 0)
    throw py::value_error("offsets: " + std::to_string(off.size - 1) + " bags is not a multiple of the " +
                          std::to_string(T) + " tables");
  const int64_t B = (off.size - 1) / T;
  if (!is_dtype(grad_output, 'f', 4)) throw py::type_error("grad_output: expected float32, got " + dtype_str(grad_output));
  const int64_t gs = row_stride_of(grad_output, "grad_output");
  if (grad_output.shape(0) != B || grad_output.shape(1) != D)
    throw py::value_error("grad_output: expected shape (" + std::to_string(B) + ", " + std::to_string(D) +
                          "), got (" + std::to_string(grad_output.shape(0)) + ", " +
                          std::to_string(grad_output.shape(1)) + ")");
  const float* psw = float_vector(per_sample_weights, idx.size, "per_sample_weights", keep);
  const float* g = static_cast<const float*>(grad_output.data());
  {
    py::gil_scoped_release nogil;
    recmeta::embedding_bag_backward_tbe(tabs.data(), T, idx, off, g, gs, psw, pm, opt, static_cast<float>(lr),
                                        static_cast<float>(eps));
  }
}

/// One plain table (float32 / float16, contiguous rows), no per-sample weights: every argument
/// a plain int, the fewest conversions for the common small call (SDK fast path).
py::array_t<float> forward_one(uintptr_t w, int64_t code, int64_t rows, int64_t dim, uintptr_t ids,
                               int64_t ids_code, int64_t nnz, uintptr_t offs, int64_t offs_code,
                               int64_t noffs, bool mean) {
  if (code != 0 && code != 1) throw py::type_error("weight: bad table type code " + std::to_string(code));
  if (ids_code != 0 && ids_code != 1) throw py::type_error("indices: ids must be int32 or int64");
  if (offs_code != 0 && offs_code != 1) throw py::type_error("offsets: ids must be int32 or int64");
  if (rows < 0 || dim < 0 || nnz < 0 || noffs < 1 || (w == 0 && rows * dim > 0) || (ids == 0 && nnz > 0) ||
      offs == 0)
    throw py::value_error("embedding_bag: bad descriptor");
  recmeta::TableView t;
  t.type = static_cast<recmeta::TableType>(code);
  t.data = reinterpret_cast<const void*>(w);
  t.rows = rows;
  t.dim = dim;
  t.row_stride = dim;
  recmeta::IndexView idx;
  idx.type = ids_code == 0 ? recmeta::IndexType::I32 : recmeta::IndexType::I64;
  idx.data = reinterpret_cast<const void*>(ids);
  idx.size = nnz;
  recmeta::IndexView off;
  off.type = offs_code == 0 ? recmeta::IndexType::I32 : recmeta::IndexType::I64;
  off.data = reinterpret_cast<const void*>(offs);
  off.size = noffs;
  py::array_t<float> out({static_cast<py::ssize_t>(noffs - 1), static_cast<py::ssize_t>(dim)});
  float* po = out.mutable_data();
  {
    py::gil_scoped_release nogil;
    recmeta::embedding_bag_forward(&t, 1, idx, off, nullptr,
                                   mean ? recmeta::PoolingMode::Mean : recmeta::PoolingMode::Sum, po, dim);
  }
  return out;
}

}  // namespace

void bind_embedding_bag(py::module_& m) {
  // The fast path takes raw addresses (converting three torch tensors to numpy arrays would
  // double the cost of a small call), so it is not a module function: the SDK claims the one
  // handle to it, once per process, when it first needs it (recmeta_sdk._op_embedding_bag
  // ._init_fast_core), and a second claim raises. Nothing on the module surface accepts an
  // address to read from this way.
  m.def(
      "_claim_embedding_bag_fast_forward",
      []() {
        static bool claimed = false;  // the GIL is held
        if (claimed)
          throw std::runtime_error(
              "_claim_embedding_bag_fast_forward: the fast path is already claimed by recmeta_sdk "
              "(use recmeta_sdk.ops.embedding_bag)");
        claimed = true;
        return py::cpp_function(
            &forward_one, py::name("embedding_bag_forward_one"), py::arg("weight"), py::arg("code"),
            py::arg("rows"), py::arg("dim"), py::arg("indices"), py::arg("indices_code"), py::arg("nnz"),
            py::arg("offsets"), py::arg("offsets_code"), py::arg("num_offsets"), py::arg("mean"),
            R"doc(One contiguous float32 (code 0) / float16 (code 1) table at address `weight`, ids and
offsets at the given addresses (code 0 = int32, 1 = int64), no per-sample weights: the forward
of embedding_bag_forward with every argument a plain int (the SDK's fast path for small calls).
The caller keeps the memory alive; values (ids, offsets) are checked as in embedding_bag_forward.)doc");
      },
      R"doc(Private: hand out the SDK's raw-address embedding-bag fast path, once per process (a
second call raises RuntimeError). Not for use outside recmeta_sdk._op_embedding_bag.)doc");
  m.def("embedding_bag_forward", &forward, py::arg("tables"), py::arg("indices"), py::arg("offsets"),
        py::arg("per_sample_weights") = py::none(), py::arg("mode") = "sum",
        R"doc(Table-batched embedding-bag forward (T = 1: a plain embedding bag).

Parameters
----------
tables : list of T tables; each a (N_t, d_t) float32 or float16 array, or an int8 tuple
    (codes (N_t, d_t) uint8, row_scale (N_t,) float32, row_min (N_t,) float32)
indices : (nnz,) int32 or int64, row ids local to their table
offsets : (T*B+1,) int32 or int64 CSR offsets, table-major (bag t*B+b = sample b of table t)
per_sample_weights : (nnz,) float32 or None

Instead of an array, each of these may be a descriptor tuple of ints for memory the caller
keeps alive (recmeta_sdk passes torch tensors so): a table (address, 0 float32 / 1 float16 /
2 int8, rows, dim, row_stride, row_scale address, row_min address), ids and offsets
(address, 0 int32 / 1 int64, n), weights (address, n).
mode : "sum" or "mean" (empty bags give zero rows)

Returns
-------
(B, sum_t d_t) float32. Raises ValueError / TypeError on bad input before reading any row.)doc");
  m.def("embedding_bag_backward", &backward, py::arg("weight"), py::arg("indices"), py::arg("offsets"),
        py::arg("grad_output"), py::arg("per_sample_weights") = py::none(), py::arg("mode") = "sum",
        py::arg("optimizer") = "sgd", py::arg("lr") = 0.01, py::arg("eps") = 1e-8,
        py::arg("state") = py::none(),
        R"doc(Embedding-bag backward fused with a sparse optimiser, in place (one table).

Parameters
----------
weight : (N, d) float32, writable; only the rows present in ``indices`` change
indices : (nnz,) int32 or int64 in [0, N)
offsets : (B+1,) int32 or int64 CSR offsets
grad_output : (B, d) float32
per_sample_weights : (nnz,) float32 or None
mode : "sum" or "mean"
optimizer : "sgd" or "rowwise_adagrad"
lr, eps : learning rate and Adagrad epsilon
state : (N,) float32 writable Adagrad state (required for rowwise_adagrad)

Deterministic: bit-identical results for any thread count.)doc");
  m.def("embedding_bag_backward_tbe", &backward_tbe, py::arg("weights"), py::arg("indices"), py::arg("offsets"),
        py::arg("grad_output"), py::arg("per_sample_weights") = py::none(), py::arg("mode") = "sum",
        py::arg("optimizer") = "sgd", py::arg("lr") = 0.01, py::arg("eps") = 1e-8,
        py::arg("states") = py::none(),
        R"doc(Table-batched embedding-bag backward fused with a sparse optimiser, in place.

Parameters
----------
weights : list of T (N_t, d_t) float32 writable arrays; only rows present in ``indices`` change
indices : (nnz,) int32 or int64, local to their table, each in [0, N_t)
offsets : (T*B+1,) int32 or int64 CSR offsets, table-major (bag t*B+b = sample b of table t)
grad_output : (B, sum_t d_t) float32, the gradient of the forward output
per_sample_weights : (nnz,) float32 or None
mode : "sum" or "mean"
optimizer : "sgd" or "rowwise_adagrad"
lr, eps : learning rate and Adagrad epsilon
states : None, or a list of T (N_t,) float32 writable Adagrad states (required for rowwise_adagrad)

Everything is validated before any table changes; then the tables are updated in table order,
each bit-identically for any thread count.)doc");
}

}  // namespace recmeta_bindings

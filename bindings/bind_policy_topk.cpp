// Binding of the fused policy scoring ops (policy_topk, policy_sample): numpy buffers in
// (torch CPU tensors arrive as zero-copy numpy views), numpy arrays out, GIL released
// while the core works.
#include <algorithm>
#include <cstdint>
#include <optional>
#include <string>
#include <tuple>

#include <pybind11/stl.h>

#include "bindings.h"
#include "recmeta/policy_topk.h"

namespace py = pybind11;

namespace recmeta_bindings {

namespace {

std::string dtype_str(const py::array& a) { return py::str(a.dtype()).cast<std::string>(); }

/// A 1-D contiguous int32/int64 array as an IndexView.
recmeta::IndexView index_view(const py::array& a, const char* name) {
  if (a.ndim() != 1) throw py::value_error(std::string(name) + ": expected a 1-D array, got " +
                                           std::to_string(a.ndim()) + " dimensions");
  recmeta::IndexView v;
  if (a.dtype().is(py::dtype::of<int64_t>())) {
    v.type = recmeta::IndexType::I64;
  } else if (a.dtype().is(py::dtype::of<int32_t>())) {
    v.type = recmeta::IndexType::I32;
  } else {
    throw py::type_error(std::string(name) + ": ids and offsets must be int32 or int64, got " + dtype_str(a));
  }
  if (a.size() > 1 && a.strides(0) != a.itemsize())
    throw py::value_error(std::string(name) + ": array must be contiguous");
  v.data = a.data();
  v.size = a.size();
  return v;
}

const float* float_vector(const std::optional<py::array>& a, const char* name, int64_t n) {
  if (!a) return nullptr;
  if (!a->dtype().is(py::dtype::of<float>()))
    throw py::type_error(std::string(name) + ": expected float32, got " + dtype_str(*a));
  if (a->ndim() != 1 || a->shape(0) != n)
    throw py::value_error(std::string(name) + ": expected shape (" + std::to_string(n) + ",)");
  if (n > 1 && a->strides(0) != 4) throw py::value_error(std::string(name) + ": array must be contiguous");
  return static_cast<const float*>(a->data());
}

recmeta::PolicyArgs make_args(const py::array& users, const py::array& items, int64_t k,
                              const std::optional<py::array>& row_scale,
                              const std::optional<py::array>& row_min,
                              const std::optional<py::array>& bias,
                              const std::optional<py::array>& exclude_offsets,
                              const std::optional<py::array>& exclude_ids,
                              const std::optional<py::array>& candidate_offsets,
                              const std::optional<py::array>& candidate_ids, double temperature) {
  recmeta::PolicyArgs a;
  if (items.ndim() != 2)
    throw py::value_error("items: expected a 2-D (N, d) table, got " + std::to_string(items.ndim()) + " dimensions");
  const int64_t N = items.shape(0), d = items.shape(1);
  if (items.dtype().is(py::dtype::of<float>())) {
    a.items.type = recmeta::TableType::F32;
  } else if (items.dtype().is(py::dtype("float16"))) {
    a.items.type = recmeta::TableType::F16;
  } else if (items.dtype().is(py::dtype::of<uint8_t>())) {
    a.items.type = recmeta::TableType::I8Rowwise;
  } else {
    throw py::type_error("items: table must be float32, float16 or uint8 (row-wise int8), got " + dtype_str(items));
  }
  const int64_t isz = items.itemsize();
  // An empty table (N = 0 or d = 0) is never read: numpy / torch give such arrays any strides.
  const bool empty = N == 0 || d == 0;
  if (!empty && d > 1 && items.strides(1) != isz) throw py::value_error("items: rows must be contiguous");
  if (!empty && N > 1 && (items.strides(0) % isz != 0 || items.strides(0) / isz < d))
    throw py::value_error("items: unsupported row stride");
  a.items.data = items.data();
  a.items.rows = N;
  a.items.dim = d;
  a.items.row_stride = (!empty && N > 1) ? items.strides(0) / isz : d;
  if (a.items.type == recmeta::TableType::I8Rowwise) {
    if (!row_scale || !row_min) throw py::value_error("items: a uint8 table needs row_scale and row_min");
    a.items.row_scale = float_vector(row_scale, "row_scale", N);
    a.items.row_min = float_vector(row_min, "row_min", N);
  }
  if (!users.dtype().is(py::dtype::of<float>()))
    throw py::type_error("user_states: expected float32, got " + dtype_str(users));
  if (users.ndim() != 2 || users.shape(1) != d)
    throw py::value_error("user_states: expected shape (B, " + std::to_string(d) + ")");
  if (!(users.flags() & py::array::c_style)) throw py::value_error("user_states: array must be C-contiguous");
  a.users = static_cast<const float*>(users.data());
  a.batch = users.shape(0);
  a.bias = float_vector(bias, "bias", N);
  if (exclude_offsets.has_value() != exclude_ids.has_value())
    throw py::value_error("exclude: pass both exclude_offsets and exclude_ids");
  if (exclude_offsets) {
    a.has_exclude = true;
    a.exclude_offsets = index_view(*exclude_offsets, "exclude offsets");
    a.exclude_ids = index_view(*exclude_ids, "exclude ids");
  }
  if (candidate_offsets.has_value() != candidate_ids.has_value())
    throw py::value_error("candidates: pass both candidate_offsets and candidate_ids");
  if (candidate_offsets) {
    a.has_candidates = true;
    a.candidate_offsets = index_view(*candidate_offsets, "candidates offsets");
    a.candidate_ids = index_view(*candidate_ids, "candidates ids");
  }
  a.temperature = static_cast<float>(temperature);
  if (k < 0) throw py::value_error("k must be >= 0, got " + std::to_string(k));
  a.k = std::min(k, N);  // at most N columns: k above the catalogue pads up to N, no more
  return a;
}

py::tuple run(recmeta::PolicyArgs a, bool sample) {
  const py::ssize_t B = a.batch, k = a.k;
  py::array_t<int64_t> ids({B, k});
  py::array_t<float> scores({B, k});
  py::array_t<float> lognorm(B);
  py::array_t<double> logtail(sample ? B : 0);
  a.out_ids = ids.mutable_data();
  a.out_scores = scores.mutable_data();
  a.out_lognorm = lognorm.mutable_data();
  if (sample) a.out_logtail = logtail.mutable_data();
  {
    py::gil_scoped_release release;
    if (sample) recmeta::policy_sample(a);
    else recmeta::policy_topk(a);
  }
  if (sample) return py::make_tuple(ids, scores, lognorm, logtail);
  return py::make_tuple(ids, scores, lognorm);
}

}  // namespace

void bind_policy_topk(py::module_& m) {
  m.def(
      "policy_topk",
      [](const py::array& user_states, const py::array& items, int64_t k, std::optional<py::array> row_scale,
         std::optional<py::array> row_min, std::optional<py::array> bias,
         std::optional<py::array> exclude_offsets, std::optional<py::array> exclude_ids,
         std::optional<py::array> candidate_offsets, std::optional<py::array> candidate_ids,
         double temperature) {
        return run(make_args(user_states, items, k, row_scale, row_min, bias, exclude_offsets, exclude_ids,
                             candidate_offsets, candidate_ids, temperature),
                   false);
      },
      py::arg("user_states"), py::arg("items"), py::arg("k"), py::kw_only(), py::arg("row_scale") = py::none(),
      py::arg("row_min") = py::none(), py::arg("bias") = py::none(), py::arg("exclude_offsets") = py::none(),
      py::arg("exclude_ids") = py::none(), py::arg("candidate_offsets") = py::none(),
      py::arg("candidate_ids") = py::none(), py::arg("temperature") = 1.0,
      "Fused top-k of s = (U @ I.T + bias) / temperature over each user's eligible items.\n\n"
      "user_states (B, d) float32; items (N, d) float32, float16, or uint8 codes with row_scale and\n"
      "row_min (N,) float32 (value = code * row_scale + row_min); bias (N,) float32; exclude_* and\n"
      "candidate_* CSR pairs (B+1 offsets, ids in [0, N), int32 or int64). One streaming pass;\n"
      "the GIL is released. Returns (ids (B, k) int64, scores (B, k) float32, log_normalizer (B,)\n"
      "float32), best first, ties broken by the smaller id, padded with -1 / -inf; k is capped at N\n"
      "(min(k, N) columns). A -inf bias masks an item; a NaN / inf item value in a row read, or a\n"
      "score overflowing float32, raises ValueError naming the row.");
  m.def(
      "policy_sample",
      [](const py::array& user_states, const py::array& items, int64_t k, uint64_t seed,
         std::optional<py::array> row_scale, std::optional<py::array> row_min, std::optional<py::array> bias,
         std::optional<py::array> exclude_offsets, std::optional<py::array> exclude_ids,
         std::optional<py::array> candidate_offsets, std::optional<py::array> candidate_ids,
         double temperature) {
        recmeta::PolicyArgs a = make_args(user_states, items, k, row_scale, row_min, bias, exclude_offsets,
                                          exclude_ids, candidate_offsets, candidate_ids, temperature);
        a.seed = seed;
        return run(a, true);
      },
      py::arg("user_states"), py::arg("items"), py::arg("k"), py::arg("seed"), py::kw_only(),
      py::arg("row_scale") = py::none(), py::arg("row_min") = py::none(), py::arg("bias") = py::none(),
      py::arg("exclude_offsets") = py::none(), py::arg("exclude_ids") = py::none(),
      py::arg("candidate_offsets") = py::none(), py::arg("candidate_ids") = py::none(),
      py::arg("temperature") = 1.0,
      "Gumbel-top-k sample of k distinct items per user from softmax(s), s as in policy_topk, with\n"
      "the counter-based noise of reference.gumbel_noise keyed by (seed mod 2**64, row, item).\n"
      "Same arguments as policy_topk plus seed (0 <= seed < 2**64). Returns (ids (B, k) int64,\n"
      "the unperturbed scores s (B, k) float32, log_normalizer (B,) float32, log_tail (B,) float64:\n"
      "the log of the mass of the eligible items outside the slate, summed directly); the result\n"
      "depends only on the inputs and the seed, never on the thread count.");
  m.def(
      "fma_probe",
      [](int64_t iters) {
        py::gil_scoped_release release;
        return recmeta::fma_probe(iters);
      },
      py::arg("iters"),
      "Run iters steps of 12 independent vector float32 FMA chains in the active ISA variant and "
      "return the floating-point operations done; time the call for this core's FMA peak (bench).");
  m.def(
      "gumbel_uniform",
      [](uint64_t seed, int64_t row, int64_t item) { return recmeta::gumbel_uniform(seed, row, item); },
      py::arg("seed"), py::arg("row"), py::arg("item"),
      "The counter-based uniform of (seed, row, item) used by policy_sample (as reference.hash_uniform).");
}

}  // namespace recmeta_bindings

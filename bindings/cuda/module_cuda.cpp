// recmeta_sdk._core_cuda: the pybind11 adaptor over the CUDA kernels (csrc/cuda/*.cu).
// Takes device pointers as integers and the caller's CUDA stream handle (an integer, e.g.
// torch.cuda.current_stream().cuda_stream; 0 = the legacy default stream); no libtorch.
// The caller (recmeta_sdk._gpu) validates ids and offsets on the host first; here the
// scalar arguments are checked again by the entry points (ValueError on failure) and
// launch errors raise RuntimeError.
#include <pybind11/pybind11.h>

#include <cstdint>
#include <string>

#include "recmeta/common.h"
#include "recmeta/cuda_ops.h"

namespace py = pybind11;
using recmeta::IndexType;
using recmeta::IndexView;
using recmeta::TableType;
using recmeta::TableView;

namespace {

template <typename T>
T* ptr(std::uintptr_t p) {
  return reinterpret_cast<T*>(p);
}

void* stream_of(std::uintptr_t s) { return reinterpret_cast<void*>(s); }

IndexView index_view(std::uintptr_t p, bool is64, int64_t size) {
  IndexView v;
  v.type = is64 ? IndexType::I64 : IndexType::I32;
  v.data = ptr<const void>(p);
  v.size = size;
  return v;
}

TableView table_view(int kind, std::uintptr_t data, std::uintptr_t scale, std::uintptr_t rmin, int64_t rows,
                     int64_t dim, int64_t row_stride) {
  if (kind < 0 || kind > 2) throw py::value_error("table kind must be 0 (fp32), 1 (fp16) or 2 (int8), got " +
                                                  std::to_string(kind));
  TableView t;
  t.type = static_cast<TableType>(kind);
  t.data = ptr<const void>(data);
  t.rows = rows;
  t.dim = dim;
  t.row_stride = row_stride;
  t.row_scale = ptr<const float>(scale);
  t.row_min = ptr<const float>(rmin);
  return t;
}

}  // namespace

PYBIND11_MODULE(_core_cuda, m) {
  m.doc() = "recmeta CUDA kernels: fused embedding bags and fused policy scoring (device pointers in)";
  py::register_exception_translator([](std::exception_ptr p) {
    try {
      if (p) std::rethrow_exception(p);
    } catch (const recmeta::InvalidArgument& e) {
      PyErr_SetString(PyExc_ValueError, e.what());
    }
  });

  m.def(
      "embedding_bag_fwd",
      [](int kind, std::uintptr_t data, std::uintptr_t scale, std::uintptr_t rmin, int64_t rows, int64_t dim,
         int64_t row_stride, std::uintptr_t indices, bool indices_64, int64_t nnz, std::uintptr_t offsets,
         bool offsets_64, int64_t num_bags, std::uintptr_t psw, bool mean, std::uintptr_t out, int64_t out_stride,
         std::uintptr_t stream) {
        recmeta::cuda::embedding_bag_forward(table_view(kind, data, scale, rmin, rows, dim, row_stride),
                                             index_view(indices, indices_64, nnz),
                                             index_view(offsets, offsets_64, num_bags + 1), num_bags,
                                             ptr<const float>(psw), mean, ptr<float>(out), out_stride,
                                             stream_of(stream));
      },
      py::arg("kind"), py::arg("data"), py::arg("row_scale"), py::arg("row_min"), py::arg("rows"), py::arg("dim"),
      py::arg("row_stride"), py::arg("indices"), py::arg("indices_64"), py::arg("nnz"), py::arg("offsets"),
      py::arg("offsets_64"), py::arg("num_bags"), py::arg("per_sample_weights"), py::arg("mean"), py::arg("out"),
      py::arg("out_stride"), py::arg("stream"),
      "Pooled lookup of num_bags bags of one table into out (float32, out_stride apart).");

  m.def(
      "embedding_bag_bwd",
      [](std::uintptr_t weight, int64_t dim, int64_t row_stride, std::uintptr_t state, std::uintptr_t grad,
         int64_t grad_stride, std::uintptr_t sorted_pos, std::uintptr_t seg, std::uintptr_t uniq, int64_t num_unique,
         std::uintptr_t bag_of, std::uintptr_t offsets, bool offsets_64, int64_t num_bags, std::uintptr_t psw,
         bool mean, bool adagrad, float lr, float eps, std::uintptr_t stream) {
        recmeta::cuda::embedding_bag_backward_sorted(
            ptr<float>(weight), dim, row_stride, ptr<float>(state), ptr<const float>(grad), grad_stride,
            ptr<const int64_t>(sorted_pos), ptr<const int64_t>(seg), ptr<const int64_t>(uniq), num_unique,
            ptr<const int64_t>(bag_of), index_view(offsets, offsets_64, num_bags + 1), ptr<const float>(psw), mean,
            adagrad, lr, eps, stream_of(stream));
      },
      py::arg("weight"), py::arg("dim"), py::arg("row_stride"), py::arg("state"), py::arg("grad"),
      py::arg("grad_stride"), py::arg("sorted_pos"), py::arg("seg"), py::arg("uniq"), py::arg("num_unique"),
      py::arg("bag_of"), py::arg("offsets"), py::arg("offsets_64"), py::arg("num_bags"),
      py::arg("per_sample_weights"), py::arg("mean"), py::arg("adagrad"), py::arg("lr"), py::arg("eps"),
      py::arg("stream"), "Deterministic backward fused with SGD / row-wise Adagrad (no float atomics).");

  m.def(
      "embedding_bag_bwd_atomic",
      [](std::uintptr_t target, int64_t target_stride, int64_t dim, std::uintptr_t grad, int64_t grad_stride,
         std::uintptr_t rows, bool rows_64, std::uintptr_t offsets, bool offsets_64, int64_t num_bags,
         std::uintptr_t psw, bool mean, float scale, std::uintptr_t stream) {
        recmeta::cuda::embedding_bag_backward_atomic(ptr<float>(target), target_stride, dim, ptr<const float>(grad),
                                                     grad_stride, index_view(rows, rows_64, -1),
                                                     index_view(offsets, offsets_64, num_bags + 1), num_bags,
                                                     ptr<const float>(psw), mean, scale, stream_of(stream));
      },
      py::arg("target"), py::arg("target_stride"), py::arg("dim"), py::arg("grad"), py::arg("grad_stride"),
      py::arg("rows"), py::arg("rows_64"), py::arg("offsets"), py::arg("offsets_64"), py::arg("num_bags"),
      py::arg("per_sample_weights"), py::arg("mean"), py::arg("scale"), py::arg("stream"),
      "target[rows[p]] += scale * w[p] * grad[bag(p)] with float atomics.");

  m.def(
      "rowwise_adagrad_apply",
      [](std::uintptr_t weight, int64_t row_stride, std::uintptr_t state, std::uintptr_t gbuf, std::uintptr_t uniq,
         int64_t num_unique, int64_t dim, float lr, float eps, std::uintptr_t stream) {
        recmeta::cuda::rowwise_adagrad_apply(ptr<float>(weight), row_stride, ptr<float>(state), ptr<const float>(gbuf),
                                             ptr<const int64_t>(uniq), num_unique, dim, lr, eps, stream_of(stream));
      },
      py::arg("weight"), py::arg("row_stride"), py::arg("state"), py::arg("gbuf"), py::arg("uniq"),
      py::arg("num_unique"), py::arg("dim"), py::arg("lr"), py::arg("eps"), py::arg("stream"),
      "Row-wise Adagrad step from summed row gradients.");

  m.def(
      "hash_uniform",
      [](std::uintptr_t out, int64_t rows, int64_t num_items, std::uint32_t seed_key, std::uint32_t hi_mix,
         std::uintptr_t stream) {
        recmeta::cuda::hash_uniform(ptr<float>(out), rows, num_items, seed_key, hi_mix, stream_of(stream));
      },
      py::arg("out"), py::arg("rows"), py::arg("num_items"), py::arg("seed_key"), py::arg("hi_mix"),
      py::arg("stream"), "The Gumbel uniforms hash_uniform(seed, r, i) for r < rows, i < num_items (float32).");

  m.def(
      "policy_topk_stage1",
      [](std::uintptr_t users, int64_t user_stride, int64_t batch, int64_t dim, int kind, std::uintptr_t items,
         int64_t item_stride, std::uintptr_t scale, std::uintptr_t rmin, int64_t num_items, std::uintptr_t bias,
         std::uintptr_t excl, int64_t n_excl, std::uintptr_t cand, int64_t n_cand, float temperature, bool sample,
         std::uint32_t seed_key, std::uint32_t hi_mix, std::uintptr_t keys_out, std::uintptr_t max_out,
         std::uintptr_t sum_out, int64_t splits, int64_t items_per_split, int32_t kb, std::uintptr_t stream) {
        recmeta::cuda::PolicyStage1Args a;
        a.users = ptr<const float>(users);
        a.batch = batch;
        a.dim = dim;
        a.user_stride = user_stride;
        a.items = table_view(kind, items, scale, rmin, num_items, dim, item_stride);
        a.bias = ptr<const float>(bias);
        a.excl_keys = n_excl > 0 ? ptr<const int64_t>(excl) : nullptr;
        a.n_excl = n_excl;
        a.cand_keys = cand ? ptr<const int64_t>(cand) : nullptr;
        a.n_cand = n_cand;
        a.temperature = temperature;
        a.sample = sample;
        a.seed_key = seed_key;
        a.hi_mix = hi_mix;
        a.keys_out = ptr<int64_t>(keys_out);
        a.max_out = ptr<float>(max_out);
        a.sum_out = ptr<float>(sum_out);
        a.splits = splits;
        a.items_per_split = items_per_split;
        a.kb = kb;
        recmeta::cuda::policy_topk_stage1(a, stream_of(stream));
      },
      py::arg("users"), py::arg("user_stride"), py::arg("batch"), py::arg("dim"), py::arg("kind"), py::arg("items"),
      py::arg("item_stride"), py::arg("row_scale"), py::arg("row_min"), py::arg("num_items"), py::arg("bias"),
      py::arg("exclude_keys"), py::arg("n_exclude"), py::arg("candidate_keys"), py::arg("n_candidates"),
      py::arg("temperature"), py::arg("sample"), py::arg("seed_key"), py::arg("hi_mix"), py::arg("keys_out"),
      py::arg("max_out"), py::arg("sum_out"), py::arg("splits"), py::arg("items_per_split"), py::arg("kb"),
      py::arg("stream"),
      "Stage 1 of the fused policy top-k / Gumbel-top-k: per-split top-kb keys and log-sum-exp parts.");
}

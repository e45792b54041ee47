// Entry points of the fused policy scoring: validation, preparation of the per-user id
// lists (sorted, unique; candidates minus exclusions) and dispatch to the ISA variant.
#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>
#include <vector>

#include "recmeta/half.h"
#include "recmeta/policy_topk.h"

namespace recmeta {

namespace {

/// Index of the first non-finite value of x[0, n), or -1. Blocks are screened with integer
/// operations the compiler vectorises (a float is non-finite iff its exponent bits are all
/// ones); only a block that fails is searched element by element.
int64_t first_non_finite(const float* x, int64_t n) {
  constexpr int64_t kBlock = 1024;
  for (int64_t b0 = 0; b0 < n; b0 += kBlock) {
    const int64_t b1 = std::min(n, b0 + kBlock);
    uint32_t bad = 0;
    for (int64_t i = b0; i < b1; ++i) {
      uint32_t bits;
      std::memcpy(&bits, x + i, sizeof bits);
      bad |= static_cast<uint32_t>((bits & 0x7F800000u) == 0x7F800000u);
    }
    if (bad != 0) {
      for (int64_t i = b0; i < b1; ++i)
        if (!std::isfinite(x[i])) return i;
    }
  }
  return -1;
}

/// Index of the first NaN or +inf of x[0, n) (-inf allowed: a bias's mask), or -1.
int64_t first_bad_bias(const float* x, int64_t n) {
  for (int64_t i = 0; i < n; ++i)
    if (std::isnan(x[i]) || x[i] == std::numeric_limits<float>::infinity()) return i;
  return -1;
}

/// The value of item row r, column c, as float32.
float item_value(const TableView& t, int64_t r, int64_t c) {
  const int64_t at = r * t.row_stride + c;
  if (t.type == TableType::F32) return static_cast<const float*>(t.data)[at];
  if (t.type == TableType::F16) return detail::half_to_float_portable(static_cast<const uint16_t*>(t.data)[at]);
  return static_cast<float>(static_cast<const uint8_t*>(t.data)[at]) * t.row_scale[r] + t.row_min[r];
}

/// Throw the error for item row r, whose score was not finite: a non-finite value in the row,
/// or finite values whose score overflows float32.
[[noreturn]] void throw_bad_item(const PolicyArgs& a, int64_t r) {
  const TableView& t = a.items;
  for (int64_t c = 0; c < t.dim; ++c) {
    const float v = item_value(t, r, c);
    RECMETA_CHECK(std::isfinite(v), "items: non-finite value ", v, " at row ", r, ", column ", c);
  }
  RECMETA_CHECK(false, "policy scores overflow float32 at item row ", r,
                ": (user_states . items[", r, "] + bias) / temperature is not finite although every "
                "input is; scale the user states, items or bias down (or raise the temperature)");
  throw InvalidArgument("unreachable");
}

void check_table(const TableView& t) {
  RECMETA_CHECK(t.rows >= 0, "items: number of rows must be >= 0, got ", t.rows);
  RECMETA_CHECK(t.dim >= 0, "items: dim must be >= 0, got ", t.dim);
  RECMETA_CHECK(t.row_stride >= t.dim, "items: row_stride ", t.row_stride, " is smaller than dim ", t.dim);
  RECMETA_CHECK(t.type == TableType::F32 || t.type == TableType::F16 || t.type == TableType::I8Rowwise,
                "items: unknown table type ", static_cast<int>(t.type));
  RECMETA_CHECK(t.rows == 0 || t.dim == 0 || t.data != nullptr, "items: data pointer is null");
  if (t.type == TableType::I8Rowwise) {
    RECMETA_CHECK(t.rows == 0 || (t.row_scale != nullptr && t.row_min != nullptr),
                  "items: an int8 table needs row_scale and row_min");
  }
}

/// The checks of values that the dense pass screens while it reads them (see
/// cpu::ValueChecks): the int8 table's row_scale / row_min and the bias are finite.
void check_values(const PolicyArgs& a) {
  const TableView& t = a.items;
  if (t.type == TableType::I8Rowwise && t.rows > 0) {
    const int64_t bad_scale = first_non_finite(t.row_scale, t.rows);
    const int64_t bad_min = first_non_finite(t.row_min, t.rows);
    RECMETA_CHECK(bad_scale < 0 && bad_min < 0, "items: non-finite row_scale/row_min at row ",
                  bad_scale < 0 ? bad_min : (bad_min < 0 ? bad_scale : std::min(bad_scale, bad_min)));
  }
  if (a.bias != nullptr && t.rows > 0) {
    const int64_t i = first_non_finite(a.bias, t.rows) < 0 ? -1 : first_bad_bias(a.bias, t.rows);
    RECMETA_CHECK(i < 0, "bias: non-finite value ", i < 0 ? 0.0f : a.bias[i], " at position ", i,
                  " (-inf masks an item; NaN and +inf are refused)");
  }
}

/// Check a CSR (offsets: batch+1, ids in [0, n)).
void check_csr(const char* name, int64_t batch, int64_t n, const IndexView& off, const IndexView& ids) {
  RECMETA_CHECK(off.size == batch + 1, name, ": expected ", batch + 1, " offsets (B+1), got ", off.size);
  RECMETA_CHECK(off.data != nullptr, name, ": offsets pointer is null");
  RECMETA_CHECK(off[0] == 0, name, ": offsets[0] must be 0, got ", off[0]);
  for (int64_t b = 0; b < batch; ++b) {
    RECMETA_CHECK(off[b + 1] >= off[b], name, ": offsets decrease at position ", b + 1, " (", off[b],
                  " -> ", off[b + 1], ")");
  }
  RECMETA_CHECK(off[batch] == ids.size, name, ": offsets[-1] must equal the number of ids ", ids.size,
                ", got ", off[batch]);
  RECMETA_CHECK(ids.size == 0 || ids.data != nullptr, name, ": ids pointer is null");
  for (int64_t i = 0; i < ids.size; ++i) {
    const int64_t v = ids[i];
    RECMETA_CHECK(v >= 0 && v < n, name, ": id ", v, " at position ", i, " is out of range [0, ", n, ")");
  }
}

void validate(const PolicyArgs& a) {
  RECMETA_CHECK(a.batch >= 0, "user_states: batch must be >= 0, got ", a.batch);
  RECMETA_CHECK(a.k >= 0, "k must be >= 0, got ", a.k);
  RECMETA_CHECK(std::isfinite(a.temperature) && a.temperature > 0.0f,
                "temperature must be finite and > 0, got ", a.temperature);
  check_table(a.items);
  const int64_t d = a.items.dim, N = a.items.rows;
  RECMETA_CHECK(a.batch == 0 || d == 0 || a.users != nullptr, "user_states: pointer is null");
  if (a.batch > 0 && d > 0) {
    const int64_t i = first_non_finite(a.users, a.batch * d);
    RECMETA_CHECK(i < 0, "user_states: non-finite value ", i < 0 ? 0.0f : a.users[i], " at flat position ", i);
  }
  if (a.has_exclude) check_csr("exclude", a.batch, N, a.exclude_offsets, a.exclude_ids);
  if (a.has_candidates) check_csr("candidates", a.batch, N, a.candidate_offsets, a.candidate_ids);
  RECMETA_CHECK(a.batch == 0 || a.k == 0 || (a.out_ids != nullptr && a.out_scores != nullptr),
                "output pointers are null");
  RECMETA_CHECK(a.batch == 0 || a.out_lognorm != nullptr, "out_lognorm pointer is null");
}

/// Sorted unique ids per user, as int64 CSR.
void sorted_lists(int64_t batch, const IndexView& off, const IndexView& ids, std::vector<int64_t>& out_off,
                  std::vector<int64_t>& out_ids) {
  out_off.assign(static_cast<size_t>(batch + 1), 0);
  out_ids.resize(static_cast<size_t>(ids.size));
  for (int64_t i = 0; i < ids.size; ++i) out_ids[i] = ids[i];
  int64_t w = 0;
  for (int64_t b = 0; b < batch; ++b) {
    const int64_t lo = off[b], hi = off[b + 1];
    std::sort(out_ids.begin() + lo, out_ids.begin() + hi);
    auto end = std::unique(out_ids.begin() + lo, out_ids.begin() + hi);
    for (auto it = out_ids.begin() + lo; it != end; ++it) out_ids[w++] = *it;
    out_off[b + 1] = w;
  }
  out_ids.resize(static_cast<size_t>(w));
}

void run(const PolicyArgs& args) {
  validate(args);
  // The dense pass screens bias / row_scale / row_min block by block as it reads them (the
  // values then come from memory once); the candidate path reads only some rows, so those
  // values are checked here, before any work.
  const bool defer_values = !args.has_candidates && args.batch > 0;
  if (!defer_values) check_values(args);
  std::vector<int64_t> ex_off, ex_ids, ca_off, ca_ids;
  PolicyLists ex, ca;
  if (args.has_exclude && args.exclude_ids.size > 0) {
    sorted_lists(args.batch, args.exclude_offsets, args.exclude_ids, ex_off, ex_ids);
    ex.offsets = ex_off.data();
    ex.ids = ex_ids.data();
  }
  if (args.has_candidates) {
    sorted_lists(args.batch, args.candidate_offsets, args.candidate_ids, ca_off, ca_ids);
    if (ex.offsets) {  // candidates minus excluded
      int64_t w = 0;
      for (int64_t b = 0; b < args.batch; ++b) {
        const int64_t lo = ca_off[b], hi = ca_off[b + 1];
        const int64_t* eb = ex.ids + ex.offsets[b];
        const int64_t* ee = ex.ids + ex.offsets[b + 1];
        ca_off[b] = w;
        for (int64_t i = lo; i < hi; ++i) {
          const int64_t v = ca_ids[i];
          while (eb < ee && *eb < v) ++eb;
          if (eb < ee && *eb == v) continue;
          ca_ids[w++] = v;
        }
      }
      ca_off[args.batch] = w;
      ca_ids.resize(static_cast<size_t>(w));
    }
    ca.offsets = ca_off.data();
    ca.ids = ca_ids.data();
    ex = PolicyLists{};  // already applied
  }
  if (args.batch == 0) return;
  cpu::ValueChecks checks;
  checks.enabled = defer_values;
  RECMETA_DISPATCH_ISA(policy_run, args, ex, ca, checks);
  if (checks.failed) {
    check_values(args);  // throws, naming the first bad value
    RECMETA_CHECK(false, "policy: a non-finite bias / row_scale / row_min was seen");  // unreachable
  }
  if (checks.bad_item != std::numeric_limits<int64_t>::max()) throw_bad_item(args, checks.bad_item);
}

}  // namespace

void policy_topk(const PolicyArgs& args) {
  PolicyArgs a = args;
  a.sample = false;
  run(a);
}

void policy_sample(const PolicyArgs& args) {
  PolicyArgs a = args;
  a.sample = true;
  run(a);
}

double fma_probe(int64_t iters) {
  RECMETA_CHECK(iters >= 0, "fma_probe: iters must be >= 0, got ", iters);
  double flops = 0.0;
  RECMETA_DISPATCH_ISA(fma_probe, iters, &flops);
  return flops;
}

float gumbel_uniform(uint64_t seed, int64_t row, int64_t item) {
  auto mix32 = [](uint32_t x) {
    x ^= x >> 16;
    x *= 0x7FEB352Du;
    x ^= x >> 15;
    x *= 0x846CA68Bu;
    x ^= x >> 16;
    return x;
  };
  const uint32_t key = mix32(static_cast<uint32_t>(seed) ^ mix32(static_cast<uint32_t>(seed >> 32) + 0x9E3779B9u));
  uint32_t h = mix32(key ^ mix32(static_cast<uint32_t>(row) + 0x85EBCA6Bu));
  h = mix32(h ^ static_cast<uint32_t>(item));
  h = mix32(h ^ mix32(static_cast<uint32_t>(static_cast<uint64_t>(item) >> 32) + 0xC2B2AE35u));
  return static_cast<float>((static_cast<double>(h >> 9) + 0.5) * (1.0 / 8388608.0));
}

}  // namespace recmeta

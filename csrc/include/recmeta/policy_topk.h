#pragma once
// Fused batched policy scoring: s = (U . I^T + b) / temperature over the eligible items of
// each user, with a running top-k (or Gumbel-top-k sample) and an online log-sum-exp, in one
// streaming pass over the item table. The B x N score matrix is never materialised.
#include <cstdint>
#include <limits>

#include "recmeta/common.h"
#include "recmeta/cpu_features.h"

namespace recmeta {

/// Arguments of policy_topk / policy_sample (all pointers are borrowed, read-only unless
/// they are outputs).
struct PolicyArgs {
  /// (batch, dim) float32 user states, row-major with row stride `dim`.
  const float* users = nullptr;
  int64_t batch = 0;
  /// (rows = N, dim) item table in any TableType.
  TableView items;
  /// (N,) float32 item bias, or nullptr. -inf masks an item (never returned, no mass in
  /// the log-normaliser); NaN and +inf are refused.
  const float* bias = nullptr;
  /// Excluded ids per user (CSR): offsets has batch+1 entries, ids has offsets[batch]
  /// entries in [0, N); both nullptr-data views when absent (has_exclude = false).
  bool has_exclude = false;
  IndexView exclude_offsets;
  IndexView exclude_ids;
  /// Candidate ids per user (CSR, duplicates count once), same layout; optional.
  bool has_candidates = false;
  IndexView candidate_offsets;
  IndexView candidate_ids;
  float temperature = 1.0f;
  int64_t k = 0;
  /// When true, the top-k is taken over s + Gumbel(seed, row, item) (policy_sample).
  bool sample = false;
  uint64_t seed = 0;
  /// Outputs: out_ids (batch*k) int64, out_scores (batch*k) float32 (the unperturbed s),
  /// out_lognorm (batch) float32, and optionally out_logtail (batch) float64: log of the
  /// sum of exp(s) over the eligible items that are not returned (-inf if none), computed
  /// as a sum of its own terms (never as Z minus the slate's mass), so that the
  /// Plackett-Luce probability of a slate is exact even when the slate holds nearly all of Z.
  int64_t* out_ids = nullptr;
  float* out_scores = nullptr;
  float* out_lognorm = nullptr;
  double* out_logtail = nullptr;
};

/// Per-user lists prepared by the entry point (sorted, unique, int64).
struct PolicyLists {
  /// (batch+1) offsets into ids, or nullptr when the lists are absent.
  const int64_t* offsets = nullptr;
  /// ids, sorted ascending and unique inside each user's range.
  const int64_t* ids = nullptr;
};

/// Top-k of s over the eligible items, best first (ties broken by the smaller id), padded
/// with id -1 / score -inf, and log sum exp(s) over the eligible items (-inf if none).
/// `k` is the number of output columns (the caller caps it at the number of rows). An item
/// whose bias is -inf is not eligible.
/// Validates every argument (throws InvalidArgument naming the bad value) before any work,
/// except the finiteness of `bias` and of an int8 table's row_scale / row_min without
/// candidate lists: the streaming pass screens those blocks as it reads them (so they come
/// from memory once) and throws after the pass; the outputs then hold unspecified values.
/// Likewise a score that is not finite (a NaN / inf item value in a row the pass reads: every
/// row without candidate lists, the listed candidates that are not excluded with them; or
/// finite values whose score overflows float32) throws after the pass, naming the smallest
/// such item row. The results do not depend on the number of threads.
void policy_topk(const PolicyArgs& args);

/// Gumbel-top-k sample: the top-k of s + G with G = -log(-log(u)), u = hash_uniform(seed,
/// row, item) (see gumbel_uniform); returns ids, the unperturbed scores s and the
/// log-normaliser like policy_topk. `args.sample` is forced to true.
void policy_sample(const PolicyArgs& args);

/// The counter-based uniform in (0, 1) of (seed, row, item), bit-identical to
/// recmeta_sdk.reference.hash_uniform.
float gumbel_uniform(uint64_t seed, int64_t row, int64_t item);

/// A measure of this CPU's float32 FMA peak for benchmarks (the floor of the register-blocked
/// scoring): runs `iters` steps of 12 independent vector FMA chains in the active ISA
/// variant's vector width and returns the number of floating-point operations done (2 per
/// lane per FMA). The caller times the call.
double fma_probe(int64_t iters);

namespace cpu {
/// Checks of values left to the dense pass: when `enabled`, every block of `bias` and of an
/// int8 table's row_scale / row_min is screened for non-finite values just before it is
/// read (once, whatever the number of user tiles) and `failed` is set if one is found.
struct ValueChecks {
  bool enabled = false;
  bool failed = false;  ///< written with __atomic_store_n by any thread
  /// Always on: the smallest item id whose score was not finite (and not a -inf bias's
  /// mask), INT64_MAX if none; lowered with atomic compare-exchange by any thread.
  int64_t bad_item = INT64_MAX;
};

/// Kernel entry per ISA: `args` validated (but see ValueChecks); `exclude` holds sorted
/// unique excluded ids per user (offsets nullptr when none); `candidates` the sorted unique
/// candidate ids per user with the excluded ones already removed (offsets nullptr when no
/// candidate lists).
RECMETA_DECLARE_FOR_ISAS(void fma_probe(int64_t iters, double* flops))
RECMETA_DECLARE_FOR_ISAS(void policy_run(const PolicyArgs& args, const PolicyLists& exclude,
                                         const PolicyLists& candidates, ValueChecks& checks))
}  // namespace cpu

}  // namespace recmeta

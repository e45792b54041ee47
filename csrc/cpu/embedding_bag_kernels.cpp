// Per-ISA kernels of the fused embedding bag. Compiled once per variant (generic / avx2 /
// avx512) inside namespace recmeta::cpu::RECMETA_ISA_NS; arguments arrive validated from
// embedding_bag_cpu.cpp.
//
// Forward: OpenMP work items of up to 64 bags of one table (down to 8 when a small call would
// leave threads idle); each bag is pooled whole by one thread. The avx2 / avx512 variants keep the
// bag's running sum in up to 8 vector registers (dims up to 64 / 128 floats in one pass over
// the bag's rows, longer rows in chunks of that size), convert float16 with F16C and int8 codes
// with a single FMA per element (sum_i w_i*(q*s_i + m_i) = sum_i (w_i s_i) q + sum_i w_i m_i),
// and prefetch the rows a fixed distance ahead in the index stream, as FBGEMM does.
// Backward: each thread owns whole rows (segments of the row-sorted occurrences) and sums
// their contributions in position order, so results do not depend on the thread count.
#include <algorithm>
#include <type_traits>
#include <cmath>
#include <cstring>
#include <vector>

#include <unistd.h>

#include "recmeta/embedding_bag.h"
#include "recmeta/half.h"

#if defined(__AVX512F__) || defined(__AVX2__)
#include <immintrin.h>
#endif
#ifdef RECMETA_HAVE_OPENMP
#include <omp.h>
#endif

#ifndef RECMETA_ISA_NS
#error "RECMETA_ISA_NS must name the ISA variant (generic, avx2, avx512)"
#endif

namespace recmeta {
namespace cpu {
namespace RECMETA_ISA_NS {

namespace {

constexpr int64_t kPrefetchDistance = 16;  ///< rows ahead in the index stream (into L1)
/// When the tables of a call together exceed far_table_bytes(), the rows it reads are unlikely to
/// be in the caches (a training or serving stream reads new ids batch after batch), and in 4 KiB
/// pages nearly every row also needs a page walk. They are prefetched in three stages: the
/// first cache line of the row kPrimeDistance rows ahead alone (into L2), which starts the
/// row's page walk early; the whole row kFarDistance rows ahead (into L2), whose prefetches then
/// find the translation ready instead of all waiting on the same walk; the whole row
/// kNearDistance rows ahead (into L1). bench/prefetch_gather.cpp times the schemes on one core
/// (256-byte rows, new ids every call; median time of the single stage at 16 rows that FBGEMM,
/// and so torch, uses over ours): 1M rows in 4 KiB pages 1.25-1.30x for the three stages,
/// 1.17x for the last two alone; in 2 MiB pages 1.22-1.31x; prime distances of 64 to 160 rows
/// alike. Smaller tables keep the single stage: their rows stay in the last-level cache between
/// calls and the extra prefetches only cost there (the same tool: 0.86-0.89x at 51 MB, 1.02x at
/// 77 MB, 1.13x at 128 MB). The bound is a quarter of the last-level cache (75 MB of this
/// machine's 300 MB L3, which other machines' cores share), at least 32 MB. Whether the call
/// reads many rows does not enter: with new ids every call, B = 1024 gains as B = 8192 does.
constexpr int64_t kFarTableBytesMin = int64_t{32} << 20;

inline int64_t far_table_bytes() {
  static const int64_t bytes = [] {
    long llc = 0;
#ifdef _SC_LEVEL3_CACHE_SIZE
    llc = sysconf(_SC_LEVEL3_CACHE_SIZE);
#endif
    return std::max<int64_t>(kFarTableBytesMin, llc > 0 ? static_cast<int64_t>(llc) / 4 : 0);
  }();
  return bytes;
}
constexpr int64_t kFarDistance = 48;
constexpr int64_t kNearDistance = 12;
constexpr int64_t kPrimeDistance = 128;
constexpr int kMaxVecs = 8;  ///< accumulators held in registers per pass (SIMD variants)
constexpr int64_t kBagsPerItem = 64;  ///< bags of one table per forward work item
constexpr int64_t kMinBagsPerItem = 8;  ///< the fewest a small call splits its items into
constexpr int64_t kParallelMinWork = int64_t{1} << 16;  ///< the backward's: elements before threads pay off
/// The forward's: elements gathered before its threads pay off (2 threads, bags of about 20:
/// 64 bags of d = 32 on one thread took 16.6 / 29.0 us at N = 100k / 1M, split 13.2 / 22.9 us).
constexpr int64_t kForwardParallelMinWork = int64_t{1} << 15;

/// Portable IEEE half -> float (handles subnormals, inf, NaN).
inline float half_to_float(uint16_t h) { return ::recmeta::detail::half_to_float_portable(h); }

inline int64_t elem_size(TableType t) {
  return t == TableType::F32 ? 4 : (t == TableType::F16 ? 2 : 1);
}

inline void prefetch_row(const char* p, int64_t bytes) {
  for (int64_t o = 0; o < bytes; o += 64) __builtin_prefetch(p + o, 0, 3);
}

// =========================================================================================
// Vector traits: W float lanes, masked loads of W elements of each storage type.
// =========================================================================================
#if defined(__AVX512F__)
#define RECMETA_EB_SIMD 1
struct Vec {
  static constexpr int W = 16;
  using V = __m512;
  using M = __mmask16;
  static inline M mask(int64_t n) { return n >= 16 ? static_cast<M>(0xFFFF) : static_cast<M>((1u << n) - 1u); }
  static inline V zero() { return _mm512_setzero_ps(); }
  static inline V set1(float x) { return _mm512_set1_ps(x); }
  static inline V fmadd(V a, V b, V c) { return _mm512_fmadd_ps(a, b, c); }
  static inline V add(V a, V b) { return _mm512_add_ps(a, b); }
  static inline V mul(V a, V b) { return _mm512_mul_ps(a, b); }
  static inline V div(V a, V b) { return _mm512_div_ps(a, b); }
  static inline V sub(V a, V b) { return _mm512_sub_ps(a, b); }
  static inline V load(const float* p, M m) { return _mm512_maskz_loadu_ps(m, p); }
  static inline V load(const uint16_t* p, M m) { return _mm512_cvtph_ps(_mm256_maskz_loadu_epi16(m, p)); }
  static inline V load(const uint8_t* p, M m) {
    return _mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(_mm_maskz_loadu_epi8(m, p)));
  }
  static inline void store(float* p, V v, M m) { _mm512_mask_storeu_ps(p, m, v); }
  static inline float hsum(V v) { return _mm512_reduce_add_ps(v); }
};
#elif defined(__AVX2__)
#define RECMETA_EB_SIMD 1
struct Vec {
  static constexpr int W = 8;
  using V = __m256;
  using M = int;  ///< number of valid lanes (1..8)
  static inline M mask(int64_t n) { return n >= 8 ? 8 : static_cast<int>(n); }
  static inline __m256i lane_mask(int n) {
    return _mm256_cmpgt_epi32(_mm256_set1_epi32(n), _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7));
  }
  static inline V zero() { return _mm256_setzero_ps(); }
  static inline V set1(float x) { return _mm256_set1_ps(x); }
  static inline V fmadd(V a, V b, V c) { return _mm256_fmadd_ps(a, b, c); }
  static inline V add(V a, V b) { return _mm256_add_ps(a, b); }
  static inline V mul(V a, V b) { return _mm256_mul_ps(a, b); }
  static inline V div(V a, V b) { return _mm256_div_ps(a, b); }
  static inline V sub(V a, V b) { return _mm256_sub_ps(a, b); }
  static inline V load(const float* p, M m) {
    return m == 8 ? _mm256_loadu_ps(p) : _mm256_maskload_ps(p, lane_mask(m));
  }
  static inline V load(const uint16_t* p, M m) {
    if (m == 8) return _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
    alignas(16) uint16_t tmp[8] = {0, 0, 0, 0, 0, 0, 0, 0};
    std::memcpy(tmp, p, static_cast<size_t>(m) * 2);
    return _mm256_cvtph_ps(_mm_load_si128(reinterpret_cast<const __m128i*>(tmp)));
  }
  static inline V load(const uint8_t* p, M m) {
    __m128i q;
    if (m == 8) {
      q = _mm_loadl_epi64(reinterpret_cast<const __m128i*>(p));
    } else {
      alignas(16) uint8_t tmp[16] = {0};
      std::memcpy(tmp, p, static_cast<size_t>(m));
      q = _mm_load_si128(reinterpret_cast<const __m128i*>(tmp));
    }
    return _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(q));
  }
  static inline void store(float* p, V v, M m) {
    if (m == 8) _mm256_storeu_ps(p, v);
    else _mm256_maskstore_ps(p, lane_mask(m), v);
  }
  static inline float hsum(V v) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    s = _mm_add_ss(s, _mm_movehdup_ps(s));
    return _mm_cvtss_f32(s);
  }
};
#endif

/// Whether every id of idx[begin, end) is in [0, rows): a min / max reduction the compiler
/// vectorises, once per work item (up to kBagsPerItem bags) before any of its rows is read:
/// cheaper than a test per row inside the gather loop, or one per bag.
template <typename IdxT>
inline bool ids_in_range(const IdxT* idx, int64_t begin, int64_t end, int64_t rows) {
  IdxT lo = 0, hi = 0;
  for (int64_t i = begin; i < end; ++i) {
    lo = std::min(lo, idx[i]);
    hi = std::max(hi, idx[i]);
  }
  return lo >= 0 && (end == begin || static_cast<int64_t>(hi) < rows);
}

#ifdef RECMETA_EB_SIMD
// =========================================================================================
// Forward, SIMD variants.
// =========================================================================================

/// Pool one bag over the columns [col0, col0 + NV*W) (the last vector masked by `last_mask`)
/// of one table into out[col0 ...]. Storage type S (float, uint16_t half bits, uint8_t codes).
/// Everything that does not change inside the bag is a template parameter (register count,
/// storage type, per-sample weights or not), so the loop over the bag's rows has no branch
/// but its own: the accumulators stay in NV registers, and the row `kPrefetchDistance`
/// positions ahead in the table's index stream (clamped to the table's last position pf_last,
/// so no test either) is prefetched, pf_bytes of it (0 in the later passes over a long row).
/// Prefetch the cache lines of one row: PfLines of them (a compile-time count, unrolled), or,
/// with PfLines < 0, those of the first `bytes` bytes.
template <int PfLines, int Locality>
inline void prefetch_lines(const char* p, int64_t bytes) {
  if constexpr (PfLines >= 0) {
    (void)bytes;
#pragma GCC unroll 16
    for (int l = 0; l < PfLines; ++l) __builtin_prefetch(p + 64 * l, 0, Locality);
  } else {
    for (int64_t o = 0; o < bytes; o += 64) __builtin_prefetch(p + o, 0, Locality);
  }
}

template <int NV, typename S, bool Int8, bool HasW, bool Far, typename IdxT, int PfLines = -1>
inline void pool_chunk(const S* data, int64_t row_stride, const float* row_scale,
                       const float* row_min, const IdxT* idx, int64_t begin, int64_t end,
                       int64_t pf_last, int64_t pf_bytes, const float* psw, bool mean,
                       int64_t col0, typename Vec::M last_mask, float* out) {
  using V = typename Vec::V;
  const typename Vec::M full = Vec::mask(Vec::W);
  V acc[NV];
  #pragma GCC unroll 8
  for (int v = 0; v < NV; ++v) acc[v] = Vec::zero();
  float bias = 0.f;
  const S* base = data + col0;
  // Rows far enough from the end of the table's ids prefetch without clamping the position.
  const int64_t reach = Far ? kPrimeDistance : kPrefetchDistance;
  const int64_t unclamped_end = std::max(begin, std::min(end, pf_last - reach + 1));
  auto step = [&](int64_t i, auto clamped) {
    constexpr bool C = decltype(clamped)::value;
    auto at = [&](int64_t dist) {
      return static_cast<int64_t>(idx[C ? std::min(i + dist, pf_last) : i + dist]);
    };
    if (Far) {
      if (PfLines >= 0 || pf_bytes > 0) {  // not in the later passes over a long row
        const int64_t pp = at(kPrimeDistance);
        __builtin_prefetch(reinterpret_cast<const char*>(base + pp * row_stride), 0, 1);
      }
      const int64_t pf = at(kFarDistance);
      prefetch_lines<PfLines, 2>(reinterpret_cast<const char*>(base + pf * row_stride), pf_bytes);
      if (Int8) {
        __builtin_prefetch(row_scale + pf, 0, 2);
        __builtin_prefetch(row_min + pf, 0, 2);
      }
    }
    const int64_t pr = at(Far ? kNearDistance : kPrefetchDistance);
    prefetch_lines<PfLines, 3>(reinterpret_cast<const char*>(base + pr * row_stride), pf_bytes);
    if (Int8) {
      __builtin_prefetch(row_scale + pr, 0, 3);
      __builtin_prefetch(row_min + pr, 0, 3);
    }
    const int64_t r = static_cast<int64_t>(idx[i]);
    const S* row = base + r * row_stride;
    V vw;
    if (Int8) {
      const float w = HasW ? psw[i] : 1.f;
      bias += w * row_min[r];
      vw = Vec::set1(w * row_scale[r]);
    } else if (HasW) {
      vw = Vec::set1(psw[i]);
    }
#pragma GCC unroll 8
    for (int v = 0; v < NV; ++v) {
      const V x = Vec::load(row + v * Vec::W, v == NV - 1 ? last_mask : full);
      acc[v] = (Int8 || HasW) ? Vec::fmadd(x, vw, acc[v]) : Vec::add(acc[v], x);
    }
  };
  int64_t i = begin;
  for (; i < unclamped_end; ++i) step(i, std::false_type{});
  for (; i < end; ++i) step(i, std::true_type{});
  const int64_t cnt = end - begin;
  if (Int8) {
    const V vb = Vec::set1(bias);
    #pragma GCC unroll 8
    for (int v = 0; v < NV; ++v) acc[v] = Vec::add(acc[v], vb);
  }
  if (mean && cnt > 0) {
    const V vc = Vec::set1(static_cast<float>(cnt));
    #pragma GCC unroll 8
    for (int v = 0; v < NV; ++v) acc[v] = Vec::div(acc[v], vc);
  }
  #pragma GCC unroll 8
  for (int v = 0; v < NV; ++v) Vec::store(out + col0 + v * Vec::W, acc[v], v == NV - 1 ? last_mask : full);
}

template <typename S, bool Int8, bool HasW, bool Far, typename IdxT>
inline void pool_bag(const S* data, int64_t row_stride, int64_t dim, const float* row_scale,
                     const float* row_min, const IdxT* idx, int64_t begin, int64_t end,
                     int64_t pf_last, const float* psw, bool mean, float* out) {
  const int64_t chunk = static_cast<int64_t>(kMaxVecs) * Vec::W;
  const int64_t row_bytes = dim * static_cast<int64_t>(sizeof(S));
  for (int64_t col0 = 0; col0 < dim; col0 += chunk) {
    const int64_t n = std::min(chunk, dim - col0);
    const int nv = static_cast<int>((n + Vec::W - 1) / Vec::W);
    const typename Vec::M last = Vec::mask(n - static_cast<int64_t>(nv - 1) * Vec::W);
    // Prefetch whole rows in the first pass only.
    const int64_t pf = col0 == 0 ? row_bytes : 0;
#define RECMETA_EB_CASE(K)                                                                        \
  case K:                                                                                         \
    pool_chunk<K, S, Int8, HasW, Far, IdxT>(data, row_stride, row_scale, row_min, idx, begin, end, \
                                            pf_last, pf, psw, mean, col0, last, out);                  \
    break;
    switch (nv) {
      RECMETA_EB_CASE(1)
      RECMETA_EB_CASE(2)
      RECMETA_EB_CASE(3)
      RECMETA_EB_CASE(4)
      RECMETA_EB_CASE(5)
      RECMETA_EB_CASE(6)
      RECMETA_EB_CASE(7)
      default:
        RECMETA_EB_CASE(8)
    }
#undef RECMETA_EB_CASE
  }
}

/// Pool the bags [p0, p1) of one table (consecutive pairs of the same table; bag p writes
/// output row p - p0). `off` holds the p1 - p0 + 1 offsets of the range as int64. Dims up to
/// kMaxVecs * W dispatch on the register count once per range instead of once per bag.
template <typename S, bool Int8, bool HasW, typename IdxT>
inline void pool_range(const TableView& tab, const IdxT* idx, const int64_t* off, int64_t nbags,
                       int64_t pf_last, bool far, const float* psw, bool mean, float* out,
                       int64_t out_stride) {
  const S* data = static_cast<const S*>(tab.data);
  const int64_t dim = tab.dim;
  if (dim == 0) return;
  const int64_t nv = (dim + Vec::W - 1) / Vec::W;
  if (nv > kMaxVecs) {
    for (int64_t p = 0; p < nbags; ++p) {
      if (far)
        pool_bag<S, Int8, HasW, true, IdxT>(data, tab.row_stride, dim, tab.row_scale, tab.row_min, idx, off[p],
                                            off[p + 1], pf_last, psw, mean, out + p * out_stride);
      else
        pool_bag<S, Int8, HasW, false, IdxT>(data, tab.row_stride, dim, tab.row_scale, tab.row_min, idx, off[p],
                                             off[p + 1], pf_last, psw, mean, out + p * out_stride);
    }
    return;
  }
  const typename Vec::M last = Vec::mask(dim - (nv - 1) * Vec::W);
  const int64_t row_bytes = dim * static_cast<int64_t>(sizeof(S));
  // The whole row in registers: prefetch the lines of K vectors of S (a compile-time count).
#define RECMETA_EB_LINES(K) static_cast<int>((K * Vec::W * sizeof(S) + 63) / 64)
#define RECMETA_EB_RANGE(K)                                                                             \
  case K:                                                                                               \
    if (far)                                                                                            \
      for (int64_t p = 0; p < nbags; ++p)                                                               \
        pool_chunk<K, S, Int8, HasW, true, IdxT, RECMETA_EB_LINES(K)>(                                  \
            data, tab.row_stride, tab.row_scale, tab.row_min, idx, off[p], off[p + 1], pf_last,   \
            row_bytes, psw, mean, 0, last, out + p * out_stride);                                       \
    else                                                                                                \
      for (int64_t p = 0; p < nbags; ++p)                                                               \
        pool_chunk<K, S, Int8, HasW, false, IdxT, RECMETA_EB_LINES(K)>(                                 \
            data, tab.row_stride, tab.row_scale, tab.row_min, idx, off[p], off[p + 1], pf_last,   \
            row_bytes, psw, mean, 0, last, out + p * out_stride);                                       \
    break;
  switch (nv) {
    RECMETA_EB_RANGE(1)
    RECMETA_EB_RANGE(2)
    RECMETA_EB_RANGE(3)
    RECMETA_EB_RANGE(4)
    RECMETA_EB_RANGE(5)
    RECMETA_EB_RANGE(6)
    RECMETA_EB_RANGE(7)
    default:
      RECMETA_EB_RANGE(8)
  }
#undef RECMETA_EB_RANGE
#undef RECMETA_EB_LINES
}
#else
// =========================================================================================
// Forward, generic variant: plain loops the compiler may vectorise.
// =========================================================================================
template <typename S>
inline float to_float(S x);
template <>
inline float to_float<float>(float x) { return x; }
template <>
inline float to_float<uint16_t>(uint16_t x) { return half_to_float(x); }
template <>
inline float to_float<uint8_t>(uint8_t x) { return static_cast<float>(x); }

template <typename S, bool Int8, bool HasW, typename IdxT>
inline void pool_bag(const S* data, int64_t row_stride, int64_t dim, const float* row_scale,
                     const float* row_min, const IdxT* idx, int64_t begin, int64_t end,
                     int64_t pf_last, const float* psw, bool mean, float* out) {
  const int64_t row_bytes = dim * static_cast<int64_t>(sizeof(S));
  for (int64_t j = 0; j < dim; ++j) out[j] = 0.f;
  float bias = 0.f;
  for (int64_t i = begin; i < end; ++i) {
    const int64_t pr = static_cast<int64_t>(idx[std::min(i + kPrefetchDistance, pf_last)]);
    prefetch_row(reinterpret_cast<const char*>(data + pr * row_stride), row_bytes);
    if (Int8) {
      __builtin_prefetch(row_scale + pr, 0, 3);
      __builtin_prefetch(row_min + pr, 0, 3);
    }
    const int64_t r = static_cast<int64_t>(idx[i]);
    const S* row = data + r * row_stride;
    float w = HasW ? psw[i] : 1.f;
    if (Int8) {
      bias += w * row_min[r];
      w *= row_scale[r];
    }
    for (int64_t j = 0; j < dim; ++j) out[j] += w * to_float<S>(row[j]);
  }
  const int64_t cnt = end - begin;
  if (Int8)
    for (int64_t j = 0; j < dim; ++j) out[j] += bias;
  if (mean && cnt > 0) {
    const float c = static_cast<float>(cnt);
    for (int64_t j = 0; j < dim; ++j) out[j] /= c;
  }
}

template <typename S, bool Int8, bool HasW, typename IdxT>
inline void pool_range(const TableView& tab, const IdxT* idx, const int64_t* off, int64_t nbags,
                       int64_t pf_last, bool far, const float* psw, bool mean, float* out,
                       int64_t out_stride) {
  (void)far;  // one prefetch stage in the generic variant
  for (int64_t p = 0; p < nbags; ++p)
    pool_bag<S, Int8, HasW, IdxT>(static_cast<const S*>(tab.data), tab.row_stride, tab.dim, tab.row_scale,
                                  tab.row_min, idx, off[p], off[p + 1], pf_last, psw, mean,
                                  out + p * out_stride);
}
#endif

/// Whether every one of rows x cols floats (row stride `stride`) is finite: an OR-reduction of
/// "exponent all ones" over the bits, which the compiler vectorises (a float reduction it may
/// not reorder without -ffast-math). Run over a work item's output block while it is in L1.
inline bool block_finite(const float* x, int64_t rows, int64_t cols, int64_t stride) {
  uint32_t bad = 0;
  for (int64_t r = 0; r < rows; ++r) {
    const float* p = x + r * stride;
    for (int64_t j = 0; j < cols; ++j) {
      uint32_t b;
      std::memcpy(&b, p + j, sizeof(b));
      bad |= static_cast<uint32_t>((b & 0x7F800000u) == 0x7F800000u);
    }
  }
  return bad == 0;
}

template <typename IdxT>
void forward_impl(const EmbeddingBagForwardArgs& a) {
  const IdxT* idx = static_cast<const IdxT*>(a.indices.data);
  const int64_t B = a.batch;
  const int64_t T = a.num_tables;
  const bool mean = a.mode == PoolingMode::Mean;
  if (T * B == 0) return;
  int64_t max_dim = 0;
  for (int64_t t = 0; t < T; ++t) max_dim = std::max(max_dim, a.tables[t].dim);
  // Threads only pay off past some work: small calls stay on the calling thread, outside any
  // parallel region.
  const bool enough_work = (a.indices.size + T * B) * std::max<int64_t>(max_dim, 1) >= kForwardParallelMinWork;
  // Work items: ranges of up to kBagsPerItem bags of one table. A call with work enough for
  // the threads but too few bags to give each of them two such items gets smaller items
  // (down to kMinBagsPerItem bags): 64 bags would otherwise run on one thread while torch
  // splits them (2 threads, N = 1M, d = 128, bags of 20: 71 us against torch's 47 us; split
  // and in contiguous runs, below, 41 us against 36 us). Each bag is still pooled whole by
  // one thread, so the output does not depend on the split.
  int64_t bags_per_item = kBagsPerItem;
#ifdef RECMETA_HAVE_OPENMP
  const int64_t threads = enough_work ? omp_get_max_threads() : 1;
  while (threads > 1 && bags_per_item > kMinBagsPerItem && T * ((B + bags_per_item - 1) / bags_per_item) < 2 * threads)
    bags_per_item /= 2;
#endif
  const int64_t per_table = (B + bags_per_item - 1) / bags_per_item;
  const int64_t items = T * per_table;
  // Three-stage prefetch when the call's tables together exceed what the caches keep between
  // calls (see far_table_bytes()).
  int64_t table_bytes = 0;
  for (int64_t t = 0; t < T; ++t) {
    const TableView& tb = a.tables[t];
    table_bytes += tb.rows * tb.row_stride * elem_size(tb.type);
  }
  const bool far = table_bytes > far_table_bytes();
  // Item it: table t, bags [b0, b1) of it.
  struct ItemRange {
    int64_t t, b0, b1;
  };
  auto item_range = [&](int64_t it) {
    const int64_t t = it / per_table;
    const int64_t b0 = (it - t * per_table) * bags_per_item;
    return ItemRange{t, b0, std::min(B, b0 + bags_per_item)};
  };
  auto run = [&](int64_t it) {
    const auto [t, b0, b1] = item_range(it);
    const TableView& tab = a.tables[t];
    const int64_t p0 = t * B + b0;
    const int64_t nbags = b1 - b0;
    // The range's offsets as int64, read once (the ids' width is a template parameter, the
    // offsets' is not).
    int64_t off[kBagsPerItem + 1];
    if (a.offsets.type == IndexType::I32) {
      const int32_t* o = static_cast<const int32_t*>(a.offsets.data) + p0;
      for (int64_t p = 0; p <= nbags; ++p) off[p] = o[p];
    } else {
      const int64_t* o = static_cast<const int64_t*>(a.offsets.data) + p0;
      for (int64_t p = 0; p <= nbags; ++p) off[p] = o[p];
    }
    // The range's offsets checked as they are read: non-decreasing and inside the table's span
    // (its boundary offsets were checked before the call), so every bag reads inside the ids.
    const int64_t span_lo = a.offsets[t * B], span_hi = a.offsets[(t + 1) * B];
    bool bad = off[0] < span_lo || off[nbags] > span_hi;
    for (int64_t p = 0; p < nbags; ++p) bad |= off[p + 1] < off[p];
    // The range's ids checked in one pass before any of its rows is read.
    bad = bad || !ids_in_range(idx, off[0], off[nbags], tab.rows);
    if (bad) {
      __atomic_store_n(a.bad_input, 1, __ATOMIC_RELAXED);
      return;
    }
    const int64_t pf_last = span_hi - 1;
    float* out = a.out + b0 * a.out_stride + a.col_offsets[t];
    const float* psw = a.per_sample_weights;
#define RECMETA_EB_TYPED(S, I8)                                                                     \
  if (psw != nullptr)                                                                               \
    pool_range<S, I8, true, IdxT>(tab, idx, off, nbags, pf_last, far, psw, mean, out, a.out_stride); \
  else                                                                                              \
    pool_range<S, I8, false, IdxT>(tab, idx, off, nbags, pf_last, far, psw, mean, out, a.out_stride);
    switch (tab.type) {
      case TableType::F32:
        RECMETA_EB_TYPED(float, false)
        break;
      case TableType::F16:
        RECMETA_EB_TYPED(uint16_t, false)
        break;
      case TableType::I8Rowwise:
        RECMETA_EB_TYPED(uint8_t, true)
        break;
    }
#undef RECMETA_EB_TYPED
    // NaN / inf rows show in the pooled bags (they propagate through the sums): one flag per
    // item, the caller then names the row.
    if (a.bad_value != nullptr && !block_finite(out, nbags, tab.dim, a.out_stride))
      __atomic_store_n(a.bad_value, 1, __ATOMIC_RELAXED);
  };
  const bool parallel = items > 1 && enough_work;
#ifdef RECMETA_HAVE_OPENMP
  if (parallel && omp_get_max_threads() > 1) {
    // Each thread takes one contiguous run of items, the runs balanced by the rows they
    // gather (ids and bags times the dim; tables may differ in both). Contiguous runs keep
    // each thread's prefetches inside its own ids; with items handed out one at a time
    // (schedule(dynamic, 1)), 2 threads took 18-28% longer on 64-128 bags and up to 10% on
    // 8192 (N = 1M). The inner offsets read here are unchecked (the items check their own
    // before reading a row), so they are clamped into the table's checked span: every cost is
    // positive and the prefix sums rise, so the runs cover each item exactly once.
    std::vector<double> cum(static_cast<size_t>(items) + 1, 0.0);
    for (int64_t it = 0; it < items; ++it) {
      const auto [t, b0, b1] = item_range(it);
      const int64_t lo = a.offsets[t * B], hi = a.offsets[(t + 1) * B];
      const int64_t ids = std::clamp(a.offsets[t * B + b1], lo, hi) - std::clamp(a.offsets[t * B + b0], lo, hi);
      cum[it + 1] = cum[it] + static_cast<double>(std::max<int64_t>(ids, 0) + (b1 - b0)) *
                                  static_cast<double>(std::max<int64_t>(a.tables[t].dim, 1));
    }
#pragma omp parallel
    {
      const int64_t nth = omp_get_num_threads(), tid = omp_get_thread_num();
      // The first item whose run starts at or past share k / nth of the cost.
      auto first = [&](int64_t k) -> int64_t {
        if (k >= nth) return items;
        const double share = cum[items] * static_cast<double>(k) / static_cast<double>(nth);
        return std::lower_bound(cum.begin(), cum.end() - 1, share) - cum.begin();
      };
      const int64_t lo = first(tid), hi = first(tid + 1);
      for (int64_t it = lo; it < hi; ++it) run(it);
    }
    return;
  }
#else
  (void)parallel;
#endif
  for (int64_t it = 0; it < items; ++it) run(it);
}

// =========================================================================================
// Backward: per-row gradient accumulation in position order, then the optimiser step.
// =========================================================================================
constexpr int64_t kGradPrefetch = 8;    ///< occurrences ahead (gradient rows)
constexpr int64_t kWeightPrefetch = 4;  ///< segments ahead (weight rows, for writing)

inline float payload_coef(uint64_t p) {
  const uint32_t bits = static_cast<uint32_t>(p & 0xFFFFFFFFu);
  float c;
  std::memcpy(&c, &bits, sizeof(c));
  return c;
}
inline int64_t payload_bag(uint64_t p) { return static_cast<int64_t>(p >> 32); }

inline void prefetch_grad(const EmbeddingBagBackwardArgs& a, int64_t i, int64_t nnz) {
  if (i < nnz)
    prefetch_row(reinterpret_cast<const char*>(a.grad_output + payload_bag(a.sorted_payload[i]) * a.grad_stride),
                 a.dim * 4);
}

#ifdef RECMETA_EB_SIMD
/// One segment (row) with its gradient held in NV registers (dim <= NV * W).
template <int NV>
inline void backward_segment_reg(const EmbeddingBagBackwardArgs& a, int64_t s, int64_t nnz,
                                 typename Vec::M last) {
  using V = typename Vec::V;
  const typename Vec::M full = Vec::mask(Vec::W);
  const int64_t lo = a.segment_start[s];
  const int64_t hi = a.segment_start[s + 1];
  const int64_t r = a.segment_row[s];
  V acc[NV];
  #pragma GCC unroll 8
  for (int v = 0; v < NV; ++v) acc[v] = Vec::zero();
  for (int64_t i = lo; i < hi; ++i) {
    prefetch_grad(a, i + kGradPrefetch, nnz);
    const uint64_t p = a.sorted_payload[i];
    const float* go = a.grad_output + payload_bag(p) * a.grad_stride;
    const V c = Vec::set1(payload_coef(p));
#pragma GCC unroll 8
    for (int v = 0; v < NV; ++v)
      acc[v] = Vec::fmadd(Vec::load(go + v * Vec::W, v == NV - 1 ? last : full), c, acc[v]);
  }
  float* w = a.weight + r * a.row_stride;
  const V lr = Vec::set1(a.lr);
  if (a.optimizer == SparseOptimizer::Sgd) {
    #pragma GCC unroll 8
    for (int v = 0; v < NV; ++v) {
      const typename Vec::M m = v == NV - 1 ? last : full;
      Vec::store(w + v * Vec::W, Vec::sub(Vec::load(w + v * Vec::W, m), Vec::mul(lr, acc[v])), m);
    }
  } else {
    V sq = Vec::zero();
    #pragma GCC unroll 8
    for (int v = 0; v < NV; ++v) sq = Vec::fmadd(acc[v], acc[v], sq);
    const float st = a.state[r] + Vec::hsum(sq) / static_cast<float>(a.dim);
    a.state[r] = st;
    const V den = Vec::set1(std::sqrt(st) + a.eps);
    #pragma GCC unroll 8
    for (int v = 0; v < NV; ++v) {
      const typename Vec::M m = v == NV - 1 ? last : full;
      Vec::store(w + v * Vec::W, Vec::sub(Vec::load(w + v * Vec::W, m), Vec::div(Vec::mul(lr, acc[v]), den)), m);
    }
  }
}
#endif

/// One segment (row) with its gradient in the buffer g (dim floats): any dim.
inline void backward_segment_buf(const EmbeddingBagBackwardArgs& a, int64_t s, int64_t nnz, float* g) {
  const int64_t d = a.dim;
  const int64_t lo = a.segment_start[s];
  const int64_t hi = a.segment_start[s + 1];
  const int64_t r = a.segment_row[s];
  float* w = a.weight + r * a.row_stride;
  for (int64_t j = 0; j < d; ++j) g[j] = 0.f;
  for (int64_t i = lo; i < hi; ++i) {
    prefetch_grad(a, i + kGradPrefetch, nnz);
    const uint64_t p = a.sorted_payload[i];
    const float* go = a.grad_output + payload_bag(p) * a.grad_stride;
    const float c = payload_coef(p);
    for (int64_t j = 0; j < d; ++j) g[j] += c * go[j];
  }
  if (a.optimizer == SparseOptimizer::Sgd) {
    for (int64_t j = 0; j < d; ++j) w[j] -= a.lr * g[j];
  } else {
    float sq = 0.f;
    for (int64_t j = 0; j < d; ++j) sq += g[j] * g[j];
    const float st = a.state[r] + sq / static_cast<float>(d);
    a.state[r] = st;
    const float den = std::sqrt(st) + a.eps;
    for (int64_t j = 0; j < d; ++j) w[j] -= (a.lr * g[j]) / den;
  }
}

}  // namespace

void embedding_bag_forward_kernel(const EmbeddingBagForwardArgs& args) {
  if (args.indices.type == IndexType::I32) forward_impl<int32_t>(args);
  else forward_impl<int64_t>(args);
}

void embedding_bag_backward_kernel(const EmbeddingBagBackwardArgs& args) {
  const int64_t S = args.num_segments;
  if (S == 0 || args.dim == 0) return;
  const int64_t nnz = args.segment_start[S];
  const bool parallel = (nnz + S) * args.dim >= kParallelMinWork;
  (void)parallel;
#ifdef RECMETA_EB_SIMD
  const int64_t nv = (args.dim + Vec::W - 1) / Vec::W;
  const bool in_registers = nv <= kMaxVecs;
  const typename Vec::M last = Vec::mask(args.dim - (nv - 1) * Vec::W);
#else
  const bool in_registers = false;
#endif
#ifdef RECMETA_HAVE_OPENMP
#pragma omp parallel if (parallel)
#endif
  {
    std::vector<float> gbuf(in_registers ? 0 : static_cast<size_t>(args.dim));
#ifdef RECMETA_HAVE_OPENMP
#pragma omp for schedule(static)
#endif
    for (int64_t s = 0; s < S; ++s) {
      if (s + kWeightPrefetch < S) {
        const char* wp = reinterpret_cast<const char*>(args.weight + args.segment_row[s + kWeightPrefetch] * args.row_stride);
        for (int64_t o = 0; o < args.dim * 4; o += 64) __builtin_prefetch(wp + o, 1, 3);
      }
#ifdef RECMETA_EB_SIMD
      if (in_registers) {
        switch (nv) {
#define RECMETA_EB_BCASE(K) \
  case K: backward_segment_reg<K>(args, s, nnz, last); break;
          RECMETA_EB_BCASE(1)
          RECMETA_EB_BCASE(2)
          RECMETA_EB_BCASE(3)
          RECMETA_EB_BCASE(4)
          RECMETA_EB_BCASE(5)
          RECMETA_EB_BCASE(6)
          RECMETA_EB_BCASE(7)
          default:
          RECMETA_EB_BCASE(8)
#undef RECMETA_EB_BCASE
        }
        continue;
      }
#endif
      backward_segment_buf(args, s, nnz, gbuf.data());
    }
  }
}

void index_min_max(IndexView ids, int64_t begin, int64_t end, int64_t* out) {
  int64_t lo = INT64_MAX, hi = INT64_MIN;
  if (ids.type == IndexType::I32) {
    const int32_t* p = static_cast<const int32_t*>(ids.data);
    int32_t l = INT32_MAX, h = INT32_MIN;
    for (int64_t i = begin; i < end; ++i) {
      l = std::min(l, p[i]);
      h = std::max(h, p[i]);
    }
    lo = l;
    hi = h;
  } else {
    const int64_t* p = static_cast<const int64_t*>(ids.data);
    for (int64_t i = begin; i < end; ++i) {
      lo = std::min(lo, p[i]);
      hi = std::max(hi, p[i]);
    }
  }
  out[0] = lo;
  out[1] = hi;
}

}  // namespace RECMETA_ISA_NS
}  // namespace cpu
}  // namespace recmeta

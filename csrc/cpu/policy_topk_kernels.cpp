// Fused policy scoring kernels (compiled once per ISA variant, see CMakeLists.txt).
//
// One streaming pass over the item table: the items are read in blocks of NB rows; each
// block is dequantised and packed once into a transposed float32 panel (dim x SW items per
// slice) that stays in L1/L2, then every user of a tile of up to 64 users is scored against
// it with a register-blocked micro-kernel (MU users x SW items held in vector registers,
// lanes over items). Tiles of at most two users (B <= 2, and the per-user candidate lists)
// skip the packing on AVX-512 and AVX2: a row kernel reads each row front to back with lanes
// over the dim and reduces 16 (AVX2: 8) rows at a time with a shuffle tree (int8 rows as
// scale * (u . codes) + min * sum(u); for d = 32 / 64 / 128, u stays in registers). Tiles of 3 to 8 users skip it too: the small-tile
// kernel reads every row once for all of them (lanes over (user, dim parity), a 64-bit
// broadcast of two dims per FMA, an 8 x 8 transpose to per-user scores). The scores of one
// tile x block (at most 64 x NB floats) are then folded into a per-user online log-sum-exp
// and a running top-k (a bounded heap; a vectorised compare lets only the lanes at or above
// its current k-th best reach it, and whole blocks whose maximum is below it are skipped).
// The B x N score matrix never exists. bias / row_scale / row_min are screened for
// non-finite values block by block just before they are read (see cpu::ValueChecks).
//
// Determinism: the item range is cut into fixed chunks (a function of dim only); each
// (user, chunk) yields a partial (max, sum, top-k) computed in the same order whatever
// thread runs it, and partials are combined in chunk order. The top-k uses a total order
// (score, then smaller id), so results do not depend on the thread count.
#include <algorithm>
#include <cmath>
#include <cstdlib>
#include <cstring>
#include <limits>
#include <memory>
#include <new>
#include <vector>

#include "recmeta/half.h"

#if defined(__x86_64__) || defined(_M_X64)
#include <immintrin.h>
#endif
#ifdef _OPENMP
#include <omp.h>
#endif

#include "recmeta/policy_topk.h"

namespace recmeta {
namespace cpu {
namespace RECMETA_ISA_NS {

namespace {

#if defined(__AVX512F__)
constexpr int VW = 16;  // floats per vector register
constexpr int MU = 6;   // users per micro-tile
constexpr int NV = 4;   // vectors of items per micro-tile (6 x 4 = 24 accumulators)
#elif defined(__AVX2__)
constexpr int VW = 8;
constexpr int MU = 4;
constexpr int NV = 3;  // 12 accumulators of 16 ymm registers
#else
constexpr int VW = 4;
constexpr int MU = 4;
constexpr int NV = 2;
#endif
constexpr int SW = VW * NV;  // items per packed slice
// Users per tile: each tile reads (and packs) the table once. Up to 512 users share a
// packed block (at B = 512 the table was read and packed 8 times with 64-user tiles); they
// are scored and folded in sub-tiles of at most 64 users.
constexpr int64_t kMaxTileUsers = 512;
constexpr int64_t kSubTileUsers = 64;
constexpr double kParallelWork = 4.0 * 1024 * 1024;  // multiply-adds below which one thread runs
constexpr float kInf = std::numeric_limits<float>::infinity();

typedef float vf __attribute__((vector_size(VW * 4)));
typedef int32_t vi __attribute__((vector_size(VW * 4)));

typedef float vfu __attribute__((vector_size(VW * 4), aligned(4)));  // unaligned access

inline vf splat(float x) { return x - vf{}; }  // x - 0 == x for every x (also -0)
inline vf loadu(const float* p) { return *reinterpret_cast<const vfu*>(p); }
inline void storeu(float* p, vf v) { *reinterpret_cast<vfu*>(p) = v; }
/// a > b ? a : b (b when either is NaN), which is exactly MAXPS(a, b); GCC compiled the
/// vector-extension form to a compare and a blend.
inline vf vmax(vf a, vf b) {
#if defined(__AVX512F__)
  return reinterpret_cast<vf>(_mm512_max_ps(reinterpret_cast<__m512>(a), reinterpret_cast<__m512>(b)));
#elif defined(__AVX2__)
  return reinterpret_cast<vf>(_mm256_max_ps(reinterpret_cast<__m256>(a), reinterpret_cast<__m256>(b)));
#else
  return a > b ? a : b;
#endif
}

#if defined(__AVX512F__)
/// exp(x) for x <= 0 (x may be -inf): Cody-Waite reduction, the Cephes polynomial (about
/// 1 ulp) and VSCALEFPS, which underflows gracefully to exactly 0 (exp(-inf) == 0).
inline vf vexp(vf xv) {
  __m512 x = _mm512_max_ps(reinterpret_cast<__m512>(xv), _mm512_set1_ps(-110.0f));
  const __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(x, _mm512_set1_ps(1.44269504088896341f)),
                                        _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m512 r = _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693359375f), x);
  r = _mm512_fnmadd_ps(n, _mm512_set1_ps(-2.12194440e-4f), r);
  __m512 p = _mm512_set1_ps(1.9875691500e-4f);
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.3981999507e-3f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(8.3334519073e-3f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(4.1665795894e-2f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.6666665459e-1f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(5.0000001201e-1f));
  p = _mm512_fmadd_ps(p, _mm512_mul_ps(r, r), _mm512_add_ps(r, _mm512_set1_ps(1.0f)));
  return reinterpret_cast<vf>(_mm512_scalef_ps(p, n));
}
/// The block sum's term exp(x - m), x <= m (x may be -inf); mL = m * log2(e) from
/// shift_of(m). (The AVX-512 variant keeps the Cody-Waite form above.)
inline vf shift_of(float m) { return splat(m); }
inline vf vexp_shifted(vf x, vf m) { return vexp(x - m); }
#else
/// exp(x - m) for x <= m (x may be -inf), as 2^t with t = x * log2(e) - m * log2(e) (one
/// FMA: x * log2(e) is exact inside it, then one rounding), t = n + f with n = round(t) and
/// |f| <= 1/2, 2^f by a degree-5 minimax polynomial and 2^n added to its exponent bits.
/// 12 vector operations (the Cody-Waite form with the Cephes polynomial took 19; the exp
/// pass is the fold's main cost at B >= 8).
///
/// Error bound, per term, relative: the polynomial evaluated in float32 (Horner, FMA) is
/// within 2.1e-7 of 2^f on [-1/2, 1/2] (checked on a 2M-point grid); rounding t adds at
/// most |t| * 2^-24 * ln 2 = |x - m| * 6e-8 (the Cody-Waite form's x - m rounds the same
/// way); mL's own rounding (|m| * 2^-24 * log2(e)) is the same factor on every term of the
/// block, i.e. an error of at most |m| * 6e-8 on its log-sum-exp, relative to a
/// log-normaliser >= m. The terms that dominate a sum are those near its maximum (|x - m|
/// small), so the terms add about 3e-7 (absolute) + 1e-7 * |m| to the log-normaliser's error;
/// the float32 sum of a block adds at most 2.1e-6 (see fold_block; it was the same before).
/// Far inside the reference tests' 1e-5; tests/test_policy_lognorm_bound.py checks it against
/// exact log-sum-exps. t is clamped at -126 (x = -inf included): such a term is at most
/// 2^-126 instead of smaller, and the sum it joins is >= 1/2, so N such terms change
/// nothing at float or double precision.
#if defined(__FMA__)
inline vf fms(vf a, vf b, vf c) {
#if defined(__AVX2__)
  return reinterpret_cast<vf>(_mm256_fmsub_ps(reinterpret_cast<__m256>(a), reinterpret_cast<__m256>(b),
                                              reinterpret_cast<__m256>(c)));
#else
  return a * b - c;
#endif
}
#else
inline vf fms(vf a, vf b, vf c) { return a * b - c; }
#endif
constexpr float kLog2e = 1.44269504088896341f;
inline vf shift_of(float m) { return splat(m * kLog2e); }
inline vf vexp_shifted(vf x, vf mL) {
  vf t = fms(x, splat(kLog2e), mL);
  t = vmax(t, splat(-126.0f));
  const vf y = t + 12582912.0f;  // 1.5 * 2^23: the low mantissa bits of y hold round(t)
  const vf f = t - (y - 12582912.0f);
  vf p = splat(1.3277939287945628e-3f);
  p = p * f + 9.675757959485054e-3f;
  p = p * f + 5.550709739327431e-2f;
  p = p * f + 2.4022114276885986e-1f;
  p = p * f + 6.931469440460205e-1f;
  p = p * f + 1.0000001192092896f;
  vi pb, yb;
  std::memcpy(&pb, &p, sizeof pb);
  std::memcpy(&yb, &y, sizeof yb);
  pb += yb << 23;  // + round(t) in the exponent field (p in [0.70, 1.42], t >= -126: no wrap)
  std::memcpy(&p, &pb, sizeof p);
  return p;
}
#endif

// Horizontal reductions in a fixed tree order (deterministic, short dependency chains).
inline float hsum_tree(vf v) {
#if defined(__AVX512F__)
  return _mm512_reduce_add_ps(reinterpret_cast<__m512>(v));
#else
  float t[VW];
  std::memcpy(t, &v, sizeof t);
  for (int w = VW / 2; w >= 1; w /= 2)
    for (int i = 0; i < w; ++i) t[i] += t[i + w];
  return t[0];
#endif
}
inline float hmax(vf v) {
#if defined(__AVX512F__)
  return _mm512_reduce_max_ps(reinterpret_cast<__m512>(v));
#elif defined(__AVX2__)
  // the same tree as below, in registers (it ran per 64 items through the stack)
  const __m256 x = reinterpret_cast<__m256>(v);
  __m128 m = _mm_max_ps(_mm256_extractf128_ps(x, 1), _mm256_castps256_ps128(x));
  m = _mm_max_ps(_mm_movehl_ps(m, m), m);
  m = _mm_max_ss(_mm_shuffle_ps(m, m, 1), m);
  return _mm_cvtss_f32(m);
#else
  float t[VW];
  std::memcpy(t, &v, sizeof t);
  for (int w = VW / 2; w >= 1; w /= 2)
    for (int i = 0; i < w; ++i) t[i] = t[i + w] > t[i] ? t[i + w] : t[i];
  return t[0];
#endif
}

/// Bit i set iff lane i of v is >= th and > -inf (NaN never qualifies).
inline uint32_t candidate_lanes(vf v, float th) {
#if defined(__AVX512F__)
  const __m512 x = reinterpret_cast<__m512>(v);
  return _mm512_cmp_ps_mask(x, _mm512_set1_ps(th), _CMP_GE_OQ) &
         _mm512_cmp_ps_mask(x, _mm512_set1_ps(-kInf), _CMP_GT_OQ);
#elif defined(__AVX2__)
  const __m256 x = reinterpret_cast<__m256>(v);
  return static_cast<uint32_t>(_mm256_movemask_ps(_mm256_and_ps(
      _mm256_cmp_ps(x, _mm256_set1_ps(th), _CMP_GE_OQ), _mm256_cmp_ps(x, _mm256_set1_ps(-kInf), _CMP_GT_OQ))));
#else
  const vi m = (v >= th) & (v > -kInf);
  uint32_t bits = 0;
  for (int i = 0; i < VW; ++i) bits |= (m[i] != 0 ? 1u : 0u) << i;
  return bits;
#endif
}

/// Whether x[0, n) holds only finite values (a float is non-finite iff its exponent bits are
/// all ones; integer operations, vectorised).
inline bool all_finite(const float* x, int64_t n) {
  uint32_t bad = 0;
  for (int64_t i = 0; i < n; ++i) {
    uint32_t bits;
    std::memcpy(&bits, x + i, sizeof bits);
    bad |= static_cast<uint32_t>((bits & 0x7F800000u) == 0x7F800000u);
  }
  return bad == 0;
}

/// Whether x[0, n) holds no NaN and no +inf (-inf, a bias's mask, is allowed).
inline bool bias_ok(const float* x, int64_t n) {
  uint32_t bad = 0;
  for (int64_t i = 0; i < n; ++i) {
    uint32_t bits;
    std::memcpy(&bits, x + i, sizeof bits);
    bad |= static_cast<uint32_t>((bits & 0x7F800000u) == 0x7F800000u && bits != 0xFF800000u);
  }
  return bad == 0;
}

// ---------------------------------------------------------------------------------------
// Aligned scratch
// ---------------------------------------------------------------------------------------
struct AlignedFloats {
  float* p = nullptr;
  explicit AlignedFloats(size_t n) {
    size_t bytes = ((n * sizeof(float) + 63) / 64) * 64;
    if (bytes == 0) bytes = 64;
    p = static_cast<float*>(std::aligned_alloc(64, bytes));
    if (p == nullptr) throw std::bad_alloc();
  }
  ~AlignedFloats() { std::free(p); }
  AlignedFloats(const AlignedFloats&) = delete;
  AlignedFloats& operator=(const AlignedFloats&) = delete;
};

// ---------------------------------------------------------------------------------------
// Table access and packing
// ---------------------------------------------------------------------------------------
inline float half_to_float(uint16_t h) {
#if defined(__F16C__)
  return _cvtsh_ss(h);
#else
  return ::recmeta::detail::half_to_float_portable(h);
#endif
}

inline float item_value(const TableView& t, int64_t r, int64_t c) {
  switch (t.type) {
    case TableType::F16:
      return half_to_float(static_cast<const uint16_t*>(t.data)[r * t.row_stride + c]);
    case TableType::I8Rowwise:
      return std::fma(static_cast<float>(static_cast<const uint8_t*>(t.data)[r * t.row_stride + c]),
                      t.row_scale[r], t.row_min[r]);
    default:
      return static_cast<const float*>(t.data)[r * t.row_stride + c];
  }
}

#if defined(__AVX512F__)
constexpr int TW = 16;  // transpose width of the vector pack path
inline __m512 load_row16(const TableView& t, int64_t r, int64_t c) {
  switch (t.type) {
    case TableType::F16:
      return _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(
          static_cast<const uint16_t*>(t.data) + r * t.row_stride + c)));
    case TableType::I8Rowwise: {
      __m128i q = _mm_loadu_si128(reinterpret_cast<const __m128i*>(
          static_cast<const uint8_t*>(t.data) + r * t.row_stride + c));
      __m512 v = _mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(q));
      return _mm512_fmadd_ps(v, _mm512_set1_ps(t.row_scale[r]), _mm512_set1_ps(t.row_min[r]));
    }
    default:
      return _mm512_loadu_ps(static_cast<const float*>(t.data) + r * t.row_stride + c);
  }
}
/// In-register transpose of 16 x 16 floats.
inline void transpose16(__m512 r[16]) {
  __m512 t[16];
  for (int i = 0; i < 8; ++i) {
    t[2 * i] = _mm512_unpacklo_ps(r[2 * i], r[2 * i + 1]);
    t[2 * i + 1] = _mm512_unpackhi_ps(r[2 * i], r[2 * i + 1]);
  }
  __m512 u[16];
  for (int g = 0; g < 4; ++g) {
    u[4 * g + 0] = _mm512_shuffle_ps(t[4 * g], t[4 * g + 2], 0x44);
    u[4 * g + 1] = _mm512_shuffle_ps(t[4 * g], t[4 * g + 2], 0xEE);
    u[4 * g + 2] = _mm512_shuffle_ps(t[4 * g + 1], t[4 * g + 3], 0x44);
    u[4 * g + 3] = _mm512_shuffle_ps(t[4 * g + 1], t[4 * g + 3], 0xEE);
  }
  // u[4g + c] holds, in 128-bit lane L, column 4L + c of rows 4g..4g+3.
  for (int c = 0; c < 4; ++c) {
    __m512 x0 = _mm512_shuffle_f32x4(u[c], u[4 + c], 0x88);
    __m512 x1 = _mm512_shuffle_f32x4(u[c], u[4 + c], 0xDD);
    __m512 y0 = _mm512_shuffle_f32x4(u[8 + c], u[12 + c], 0x88);
    __m512 y1 = _mm512_shuffle_f32x4(u[8 + c], u[12 + c], 0xDD);
    r[c] = _mm512_shuffle_f32x4(x0, y0, 0x88);
    r[8 + c] = _mm512_shuffle_f32x4(x0, y0, 0xDD);
    r[4 + c] = _mm512_shuffle_f32x4(x1, y1, 0x88);
    r[12 + c] = _mm512_shuffle_f32x4(x1, y1, 0xDD);
  }
}
#elif defined(__AVX2__)
constexpr int TW = 8;
inline __m256 load_row8(const TableView& t, int64_t r, int64_t c) {
  switch (t.type) {
    case TableType::F16:
      return _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(
          static_cast<const uint16_t*>(t.data) + r * t.row_stride + c)));
    case TableType::I8Rowwise: {
      __m128i q = _mm_loadl_epi64(reinterpret_cast<const __m128i*>(
          static_cast<const uint8_t*>(t.data) + r * t.row_stride + c));
      __m256 v = _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(q));
      return _mm256_fmadd_ps(v, _mm256_set1_ps(t.row_scale[r]), _mm256_set1_ps(t.row_min[r]));
    }
    default:
      return _mm256_loadu_ps(static_cast<const float*>(t.data) + r * t.row_stride + c);
  }
}
inline void transpose8(__m256 r[8]) {
  __m256 t[8], s[8];
  for (int i = 0; i < 4; ++i) {
    t[2 * i] = _mm256_unpacklo_ps(r[2 * i], r[2 * i + 1]);
    t[2 * i + 1] = _mm256_unpackhi_ps(r[2 * i], r[2 * i + 1]);
  }
  for (int g = 0; g < 2; ++g) {
    s[4 * g + 0] = _mm256_shuffle_ps(t[4 * g], t[4 * g + 2], 0x44);
    s[4 * g + 1] = _mm256_shuffle_ps(t[4 * g], t[4 * g + 2], 0xEE);
    s[4 * g + 2] = _mm256_shuffle_ps(t[4 * g + 1], t[4 * g + 3], 0x44);
    s[4 * g + 3] = _mm256_shuffle_ps(t[4 * g + 1], t[4 * g + 3], 0xEE);
  }
  for (int c = 0; c < 4; ++c) {
    r[c] = _mm256_permute2f128_ps(s[c], s[4 + c], 0x20);
    r[4 + c] = _mm256_permute2f128_ps(s[c], s[4 + c], 0x31);
  }
}
#else
constexpr int TW = 0;
#endif

inline int64_t table_elem_size(TableType t) {
  return t == TableType::F32 ? 4 : (t == TableType::F16 ? 2 : 1);
}

/// Pack n (<= NB) table rows into the transposed panel P: slice s (SW items) occupies
/// dim * SW floats, element (item j, dim c) at P[(j / SW) * dim * SW + c * SW + j % SW].
/// Rows are rows[j] when rows != nullptr, else row0 + j. Items n .. round_up(n, SW) are
/// zero-filled. P holds NB * dim floats (NB a multiple of SW). When bias != nullptr,
/// Pb[j] = bias[row j] (NB floats, zero padded), else Pb is left alone.
void pack_block(const TableView& t, int64_t row0, const int64_t* rows, int64_t n, float* P,
                const float* bias, float* Pb) {
  const int64_t d = t.dim;
  const int64_t n_pad = (n + SW - 1) / SW * SW;
  auto row_of = [&](int64_t j) { return rows ? rows[j] : row0 + j; };
  if (bias != nullptr) {
    for (int64_t q = 0; q < n; ++q) Pb[q] = bias[row_of(q)];
    for (int64_t q = n; q < n_pad; ++q) Pb[q] = 0.0f;
  }
  int64_t j = 0;
#if defined(__AVX512F__) || defined(__AVX2__)
  const int64_t d_vec = d / TW * TW;
  for (; j + TW <= n; j += TW) {
    float* base = P + (j / SW) * d * SW + (j % SW);
    int64_t r[TW];
    for (int q = 0; q < TW; ++q) r[q] = row_of(j + q);
#if defined(__x86_64__)
    if (rows == nullptr) {  // contiguous rows: prefetch the group after next
      const char* ahead = static_cast<const char*>(t.data) +
                          (row0 + j + 2 * TW) * t.row_stride * table_elem_size(t.type);
      const int64_t bytes = TW * t.row_stride * table_elem_size(t.type);
      for (int64_t off = 0; off < bytes; off += 64) _mm_prefetch(ahead + off, _MM_HINT_T0);
    }
#endif
    for (int64_t c = 0; c < d_vec; c += TW) {
#if defined(__AVX512F__)
      __m512 v[16];
      for (int q = 0; q < 16; ++q) v[q] = load_row16(t, r[q], c);
      transpose16(v);
      for (int q = 0; q < 16; ++q) _mm512_storeu_ps(base + (c + q) * SW, v[q]);
#else
      __m256 v[8];
      for (int q = 0; q < 8; ++q) v[q] = load_row8(t, r[q], c);
      transpose8(v);
      for (int q = 0; q < 8; ++q) _mm256_storeu_ps(base + (c + q) * SW, v[q]);
#endif
    }
    for (int64_t c = d_vec; c < d; ++c)
      for (int q = 0; q < TW; ++q) base[c * SW + q] = item_value(t, r[q], c);
  }
#endif
  for (; j < n; ++j) {
    float* base = P + (j / SW) * d * SW + (j % SW);
    const int64_t r = row_of(j);
    for (int64_t c = 0; c < d; ++c) base[c * SW] = item_value(t, r, c);
  }
  for (; j < n_pad; ++j) {
    float* base = P + (j / SW) * d * SW + (j % SW);
    for (int64_t c = 0; c < d; ++c) base[c * SW] = 0.0f;
  }
}

/// The screen of the per-row values a row kernel reads anyway (AVX2): the caller's bias
/// (`bias`, unscaled: NaN and +inf are bad) and an int8 table's row_scale / row_min (any
/// non-finite value is bad); `bad` is set when one is seen. Used on the dense path in place
/// of a separate sweep over those arrays before each block (int8 at B = 1: ~10% of the time).
struct RowScreen {
  const float* bias = nullptr;
  bool bad = false;
};

#if defined(__AVX512F__)
// ---------------------------------------------------------------------------------------
// Few users (<= kRowsKernelMaxUsers): no packing. Lanes run over the dim; each group of 16
// items gives 16 accumulators that a shuffle tree reduces to one vector of 16 scores.
// ---------------------------------------------------------------------------------------
constexpr int64_t kRowsKernelMaxUsers = 2;

/// 16 elements (c .. c+15, lanes past mk zero) of row r as floats; for int8 the raw codes
/// (the row's scale and min are applied to the finished dot product).
template <TableType TT>
inline __m512 load_chunk(const TableView& t, int64_t r, int64_t c, __mmask16 mk) {
  if constexpr (TT == TableType::F16) {
    return _mm512_cvtph_ps(
        _mm256_maskz_loadu_epi16(mk, static_cast<const uint16_t*>(t.data) + r * t.row_stride + c));
  } else if constexpr (TT == TableType::I8Rowwise) {
    const __m128i q = _mm_maskz_loadu_epi8(mk, static_cast<const uint8_t*>(t.data) + r * t.row_stride + c);
    return _mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(q));
  } else {
    return _mm512_maskz_loadu_ps(mk, static_cast<const float*>(t.data) + r * t.row_stride + c);
  }
}
/// The same from a row's address.
template <TableType TT>
inline __m512 load_chunk_at(const void* row, int64_t c, __mmask16 mk) {
  if constexpr (TT == TableType::F16) {
    return _mm512_cvtph_ps(_mm256_maskz_loadu_epi16(mk, static_cast<const uint16_t*>(row) + c));
  } else if constexpr (TT == TableType::I8Rowwise) {
    return _mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(_mm_maskz_loadu_epi8(mk, static_cast<const uint8_t*>(row) + c)));
  } else {
    return _mm512_maskz_loadu_ps(mk, static_cast<const float*>(row) + c);
  }
}

/// 16 full elements (c .. c+15) from a row's address, unmasked loads.
template <TableType TT>
inline __m512 load_full_at(const void* row, int64_t c) {
  if constexpr (TT == TableType::F16) {
    return _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(static_cast<const uint16_t*>(row) + c)));
  } else if constexpr (TT == TableType::I8Rowwise) {
    return _mm512_cvtepi32_ps(
        _mm512_cvtepu8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(static_cast<const uint8_t*>(row) + c))));
  } else {
    return _mm512_loadu_ps(static_cast<const float*>(row) + c);
  }
}

/// out[q] = sum of the 16 lanes of a[q], q < 16, in a fixed tree order.
inline __m512 reduce16(const __m512 a[16]) {
  __m512 b[8], c[4];
  for (int i = 0; i < 8; ++i)
    b[i] = _mm512_add_ps(_mm512_unpacklo_ps(a[2 * i], a[2 * i + 1]), _mm512_unpackhi_ps(a[2 * i], a[2 * i + 1]));
  for (int i = 0; i < 4; ++i)
    c[i] = _mm512_add_ps(_mm512_shuffle_ps(b[2 * i], b[2 * i + 1], 0x44),
                         _mm512_shuffle_ps(b[2 * i], b[2 * i + 1], 0xEE));
  // c[i], 128-bit lane L: partial sums (over lane L) of a[4i .. 4i+3]
  const __m512 e0 = _mm512_add_ps(_mm512_shuffle_f32x4(c[0], c[1], 0x88), _mm512_shuffle_f32x4(c[0], c[1], 0xDD));
  const __m512 e1 = _mm512_add_ps(_mm512_shuffle_f32x4(c[2], c[3], 0x88), _mm512_shuffle_f32x4(c[2], c[3], 0xDD));
  return _mm512_add_ps(_mm512_shuffle_f32x4(e0, e1, 0x88), _mm512_shuffle_f32x4(e0, e1, 0xDD));
}

/// S[m * lds + j] = bias[row j] + U[m] . row j for m < nu, j < round_up(n, 16) (rows past n
/// repeat a valid row; their scores are ignored). Rows are rows[j] or row0 + j. For int8
/// rows the dot product with the codes is scaled: scale * (u . q) + min * sum(u).
///
/// ND > 0: the dim is exactly 16 * ND (a compile-time constant): u is held in ND registers
/// and each row is read front to back with its address as the only index (no spills of the
/// 16 row pointers, no per-chunk reload of u); the sum over the dims runs in the same
/// order as for ND = 0, so the scores are bit-identical.
template <TableType TT, int ND>
void rows_kernel_t(const TableView& t, int64_t row0, const int64_t* rows, int64_t n, const float* U,
                   int64_t nu, const float* bias, float* S, int64_t lds) {
  const int64_t d = ND > 0 ? 16 * ND : t.dim;
  const int64_t d16 = d / 16 * 16;
  const __mmask16 tail = static_cast<__mmask16>((1u << (d - d16)) - 1u);
  // Locals, so that the stores into S cannot alias them.
  const char* const base = static_cast<const char*>(t.data);
  const int64_t row_bytes = t.row_stride * table_elem_size(t.type);
  const float* const row_scale = t.row_scale;
  const float* const row_min = t.row_min;
  float usum[kRowsKernelMaxUsers] = {};
  if constexpr (TT == TableType::I8Rowwise) {
    for (int64_t m = 0; m < nu; ++m)
      for (int64_t c = 0; c < d; ++c) usum[m] += U[m * d + c];
  }
  for (int64_t j = 0; j < n; j += 16) {
    const int64_t cnt = std::min<int64_t>(16, n - j);
    int64_t r[16];
    for (int q = 0; q < 16; ++q) r[q] = rows ? rows[j + (q < cnt ? q : 0)] : row0 + j + (q < cnt ? q : 0);
    const char* rp[16];  // the rows' addresses
    for (int q = 0; q < 16; ++q) rp[q] = base + r[q] * row_bytes;
    // Prefetch the group kAhead rows ahead into L2, spread over the first user's FMA loop:
    // about 16 KB of rows ahead (float32: four groups, measured better than one or two;
    // float16 and int8 rows are shorter, so more of them are in flight; int8 32 KB, which
    // measured a little faster than 16 KB on 4 KB pages). The per-row values
    // (bias, int8 scale and min: one line per 16 rows) of that group are prefetched too, so
    // that the screening of the next block and the loads below find them in cache.
    constexpr int64_t kAhead = TT == TableType::F32 ? 64 : (TT == TableType::F16 ? 128 : 512);
    const char* ahead = base + (row0 + j + kAhead) * row_bytes;
    const int64_t ahead_bytes = rows == nullptr ? 16 * row_bytes : 0;
    if (rows == nullptr) {
      if (bias != nullptr) _mm_prefetch(reinterpret_cast<const char*>(bias + row0 + j + kAhead), _MM_HINT_T0);
      if constexpr (TT == TableType::I8Rowwise) {
        _mm_prefetch(reinterpret_cast<const char*>(row_scale + row0 + j + kAhead), _MM_HINT_T0);
        _mm_prefetch(reinterpret_cast<const char*>(row_min + row0 + j + kAhead), _MM_HINT_T0);
      }
    }
    const int64_t per_step = d16 > 0 ? (ahead_bytes / 64 + d16 / 16 - 1) / (d16 / 16) * 64 : 0;
    int64_t pf_off = 0;
    // Per-row values (bias, int8 scale and min) of the 16 rows as vectors.
    auto gather16 = [&](const float* v) {
      if (rows == nullptr && cnt == 16) return _mm512_loadu_ps(v + row0 + j);
      alignas(64) float tmp[16];
      for (int q = 0; q < 16; ++q) tmp[q] = v[r[q]];
      return _mm512_load_ps(tmp);
    };
    const __m512 bias_v = bias ? gather16(bias) : _mm512_setzero_ps();
    __m512 scale_v = _mm512_setzero_ps(), min_v = _mm512_setzero_ps();
    if constexpr (TT == TableType::I8Rowwise) {
      scale_v = gather16(row_scale);
      min_v = gather16(row_min);
    }
    for (int64_t m = 0; m < nu; ++m) {
      const float* u = U + m * d;
      // Dim chunks outside, the 16 rows inside: each chunk of u is loaded once for the 16
      // rows, and the loop runs d / 16 times per group (one accumulator per row).
      __m512 acc[16];
      if constexpr (ND > 0) {
        __m512 uv[ND];
        for (int c = 0; c < ND; ++c) uv[c] = _mm512_loadu_ps(u + 16 * c);
        // Row q of the group kAhead rows ahead is prefetched beside row q (first user, dense
        // rows only): a fixed number of lines per row, no loop.
        constexpr int kLines = (16 * ND * static_cast<int>(sizeof(float)) /
                                    (TT == TableType::F32 ? 1 : (TT == TableType::F16 ? 2 : 4)) + 63) / 64;
        const bool pf = m == 0 && ahead_bytes > 0;
#pragma GCC unroll 16
        for (int q = 0; q < 16; ++q) {
          if (pf) {
#pragma GCC unroll 8
            for (int l = 0; l < kLines; ++l) _mm_prefetch(ahead + q * row_bytes + 64 * l, _MM_HINT_T1);
          }
          const char* p = rp[q];
          __m512 a = _mm512_mul_ps(uv[0], load_full_at<TT>(p, 0));
#pragma GCC unroll 8
          for (int c = 1; c < ND; ++c) a = _mm512_fmadd_ps(uv[c], load_full_at<TT>(p, 16 * c), a);
          acc[q] = a;
        }
      } else {
      for (int q = 0; q < 16; ++q) acc[q] = _mm512_setzero_ps();
      for (int64_t c = 0; c < d16; c += 16) {
        for (const int64_t e = std::min(ahead_bytes, pf_off + per_step); pf_off < e; pf_off += 64)
          _mm_prefetch(ahead + pf_off, _MM_HINT_T1);
        const __m512 uc = _mm512_loadu_ps(u + c);
#pragma GCC unroll 16
        for (int q = 0; q < 16; ++q) acc[q] = _mm512_fmadd_ps(uc, load_chunk_at<TT>(rp[q], c, 0xFFFF), acc[q]);
      }
      for (; pf_off < ahead_bytes; pf_off += 64) _mm_prefetch(ahead + pf_off, _MM_HINT_T1);
      if (tail) {
        const __m512 uc = _mm512_maskz_loadu_ps(tail, u + d16);
#pragma GCC unroll 16
        for (int q = 0; q < 16; ++q) acc[q] = _mm512_fmadd_ps(uc, load_chunk_at<TT>(rp[q], d16, tail), acc[q]);
      }
      }
      __m512 dots = reduce16(acc);
      if constexpr (TT == TableType::I8Rowwise)
        dots = _mm512_fmadd_ps(scale_v, dots, _mm512_mul_ps(min_v, _mm512_set1_ps(usum[m])));
      _mm512_storeu_ps(S + m * lds + j, _mm512_add_ps(bias_v, dots));
    }
  }
}

template <TableType TT>
void rows_kernel_d(const TableView& t, int64_t row0, const int64_t* rows, int64_t n, const float* U,
                   int64_t nu, const float* bias, float* S, int64_t lds) {
  switch (t.dim) {
    case 32: rows_kernel_t<TT, 2>(t, row0, rows, n, U, nu, bias, S, lds); break;
    case 64: rows_kernel_t<TT, 4>(t, row0, rows, n, U, nu, bias, S, lds); break;
    case 128: rows_kernel_t<TT, 8>(t, row0, rows, n, U, nu, bias, S, lds); break;
    default: rows_kernel_t<TT, 0>(t, row0, rows, n, U, nu, bias, S, lds); break;
  }
}

void rows_kernel(const TableView& t, int64_t row0, const int64_t* rows, int64_t n, const float* U,
                 int64_t nu, const float* bias, float* S, int64_t lds, RowScreen* /*screen: AVX2 only*/ = nullptr) {
  switch (t.type) {
    case TableType::F16: rows_kernel_d<TableType::F16>(t, row0, rows, n, U, nu, bias, S, lds); break;
    case TableType::I8Rowwise: rows_kernel_d<TableType::I8Rowwise>(t, row0, rows, n, U, nu, bias, S, lds); break;
    default: rows_kernel_d<TableType::F32>(t, row0, rows, n, U, nu, bias, S, lds); break;
  }
}

// ---------------------------------------------------------------------------------------
// Small tiles (kUsers8Min .. kUsers8Max users): no packing, every row is read once and
// feeds all (up to 8) users. Lanes hold (user, dim parity): lane 2u + e accumulates
// U[u][c] * row[c] over the dims c of parity e, fed by one 64-bit broadcast of the row's
// dims (c, c + 1) per FMA. Per pair of rows, blends and a pair swap fold (even, odd) into
// one vector of (user, row) scores; an 8 x 8 transpose of 64-bit elements then yields 16
// consecutive items per user.
// ---------------------------------------------------------------------------------------
constexpr int64_t kUsers8Min = 3;
constexpr int64_t kUsers8Max = 8;

/// UT[(c / 2) * 16 + 2u + c % 2] = U[u * d + c] for u < nu, c < d; 0 for u >= nu or c >= d.
/// UT holds round_up(d, 2) / 2 * 16 floats.
void pack_users8(const float* U, int64_t nu, int64_t d, float* UT) {
  const int64_t np = (d + 1) / 2;
  for (int64_t i = 0; i < np * 16; ++i) UT[i] = 0.0f;
  for (int64_t u = 0; u < nu; ++u)
    for (int64_t c = 0; c < d; ++c) UT[(c / 2) * 16 + 2 * u + (c & 1)] = U[u * d + c];
}

/// The 16 rows' accumulators acc[q] (lane 2u + e: sum over dims of parity e) for rows at
/// p + q * stride (floats), over dims [0, d) (d even, or the odd last dim broadcast whole:
/// its UT lanes of odd parity are 0). Also prefetches the pf_bytes at pf (64-byte lines).
inline void users8_accumulate(const float* p, int64_t stride, int64_t d, const float* UT, __m512 acc[16],
                              const char* pf, int64_t pf_bytes) {
  for (int q = 0; q < 16; ++q) acc[q] = _mm512_setzero_ps();
  const int64_t dpair = d / 2;
  int64_t cp = 0;
  // The prefetches (pf_bytes from pf) are spread over the FMA loop, a few lines per step.
  const int64_t steps = dpair / 8 * 8;
  const int64_t per_step = steps > 0 ? (pf_bytes / 64 + steps - 1) / steps : 0;
  int64_t pf_off = 0;
  // Blocks of 8 dim pairs: 8 vectors of UT stay in registers for the 16 rows.
  for (; cp + 8 <= dpair; cp += 8) {
    __m512 ut[8];
    for (int i = 0; i < 8; ++i) ut[i] = _mm512_load_ps(UT + (cp + i) * 16);
    // Rows innermost: consecutive FMAs feed different accumulators (no latency chain).
#pragma GCC unroll 8
    for (int i = 0; i < 8; ++i) {
      for (int64_t l = 0; l < per_step && pf_off < pf_bytes; ++l, pf_off += 64) _mm_prefetch(pf + pf_off, _MM_HINT_T1);
#pragma GCC unroll 16
      for (int q = 0; q < 16; ++q) {
        double v;
        std::memcpy(&v, p + q * stride + 2 * (cp + i), sizeof v);
        acc[q] = _mm512_fmadd_ps(ut[i], _mm512_castpd_ps(_mm512_set1_pd(v)), acc[q]);
      }
    }
  }
  for (; cp < dpair; ++cp) {
    const __m512 ut = _mm512_load_ps(UT + cp * 16);
    for (int q = 0; q < 16; ++q) {
      double v;
      std::memcpy(&v, p + q * stride + 2 * cp, sizeof v);
      acc[q] = _mm512_fmadd_ps(ut, _mm512_castpd_ps(_mm512_set1_pd(v)), acc[q]);
    }
  }
  if (d & 1) {
    const __m512 ut = _mm512_load_ps(UT + dpair * 16);
    for (int q = 0; q < 16; ++q)
      acc[q] = _mm512_fmadd_ps(ut, _mm512_set1_ps(p[q * stride + d - 1]), acc[q]);
  }
  for (; pf_off < pf_bytes; pf_off += 64) _mm_prefetch(pf + pf_off, _MM_HINT_T1);
}

/// S[u * lds + j] = bias[row j] + U[u] . row j for u < nu (<= 8), j < round_up(n, 16) (rows
/// past n repeat the last valid row; their scores are ignored). Rows are row0 + j. UT from
/// pack_users8. buf holds 16 * round_up(d, 2) floats (float16 and int8 rows are dequantised
/// into it, 16 rows at a time).
template <TableType TT>
void users8_kernel_t(const TableView& t, int64_t row0, int64_t n, const float* UT, int64_t nu,
                     const float* bias, float* S, int64_t lds, float* buf) {
  const int64_t d = t.dim;
  const int64_t esz = table_elem_size(t.type);
  const int64_t dp = (d + 1) / 2 * 2;
  for (int64_t j = 0; j < n; j += 16) {
    const int64_t cnt = std::min<int64_t>(16, n - j);
    // The group after next is prefetched into L2 while this one is computed (spread over
    // the FMA loop: measured faster than a burst of prefetches at the start of the group).
    const char* ahead = static_cast<const char*>(t.data) + (row0 + j + 32) * t.row_stride * esz;
    const int64_t ahead_bytes = 16 * t.row_stride * esz;
    const float* p;
    int64_t stride;
    __m512 acc[16];
    if constexpr (TT == TableType::F32) {
      p = static_cast<const float*>(t.data) + (row0 + j) * t.row_stride;
      stride = t.row_stride;
      if (cnt < 16) {  // copy the valid rows, repeat the last one
        for (int q = 0; q < 16; ++q)
          std::memcpy(buf + q * dp, p + std::min<int64_t>(q, cnt - 1) * stride, sizeof(float) * d);
        p = buf;
        stride = dp;
      }
    } else {
      const int64_t d16 = d / 16 * 16;
      const __mmask16 tail = static_cast<__mmask16>((1u << (d - d16)) - 1u);
      for (int q = 0; q < 16; ++q) {
        const int64_t r = row0 + j + std::min<int64_t>(q, cnt - 1);
        float* o = buf + q * dp;
        __m512 sc = _mm512_setzero_ps(), mn = _mm512_setzero_ps();
        if constexpr (TT == TableType::I8Rowwise) {
          sc = _mm512_set1_ps(t.row_scale[r]);
          mn = _mm512_set1_ps(t.row_min[r]);
        }
        auto deq = [&](int64_t c, __mmask16 mk) {
          const __m512 v = load_chunk<TT>(t, r, c, mk);
          if constexpr (TT == TableType::I8Rowwise) return _mm512_fmadd_ps(v, sc, mn);
          return v;
        };
        for (int64_t c = 0; c < d16; c += 16) _mm512_storeu_ps(o + c, deq(c, 0xFFFF));
        if (tail) _mm512_mask_storeu_ps(o + d16, tail, deq(d16, tail));
      }
      p = buf;
      stride = dp;
    }
    users8_accumulate(p, stride, d, UT, acc, ahead, ahead_bytes);
    // v[k] lane 2u + e = score of user u, row 2k + e.
    __m512d v[8];
    for (int k = 0; k < 8; ++k) {
      const __m512 x = _mm512_mask_blend_ps(0xAAAA, acc[2 * k], acc[2 * k + 1]);
      const __m512 y = _mm512_mask_blend_ps(0xAAAA, acc[2 * k + 1], acc[2 * k]);
      v[k] = _mm512_castps_pd(_mm512_add_ps(x, _mm512_permute_ps(y, 0xB1)));
    }
    // 8 x 8 transpose of 64-bit elements: w[u] element k = v[k] element u.
    __m512d a[8], b[8], w[8];
    for (int i = 0; i < 4; ++i) {
      a[2 * i] = _mm512_unpacklo_pd(v[2 * i], v[2 * i + 1]);
      a[2 * i + 1] = _mm512_unpackhi_pd(v[2 * i], v[2 * i + 1]);
    }
    // a[2i + o], 128-bit lane L: (v[2i], v[2i+1]) elements 2L + o
    for (int o = 0; o < 2; ++o) {
      b[4 * o + 0] = _mm512_shuffle_f64x2(a[o], a[2 + o], 0x88);      // elems 2o, 2o+4... of v0..v3
      b[4 * o + 1] = _mm512_shuffle_f64x2(a[o], a[2 + o], 0xDD);
      b[4 * o + 2] = _mm512_shuffle_f64x2(a[4 + o], a[6 + o], 0x88);  // the same of v4..v7
      b[4 * o + 3] = _mm512_shuffle_f64x2(a[4 + o], a[6 + o], 0xDD);
    }
    // b[4o + h] (h = 0: 128-bit lanes hold elements o, 4 + o; h = 1: 2 + o, 6 + o)
    for (int o = 0; o < 2; ++o) {
      w[o] = _mm512_shuffle_f64x2(b[4 * o], b[4 * o + 2], 0x88);
      w[4 + o] = _mm512_shuffle_f64x2(b[4 * o], b[4 * o + 2], 0xDD);
      w[2 + o] = _mm512_shuffle_f64x2(b[4 * o + 1], b[4 * o + 3], 0x88);
      w[6 + o] = _mm512_shuffle_f64x2(b[4 * o + 1], b[4 * o + 3], 0xDD);
    }
    __m512 bias_v = _mm512_setzero_ps();
    if (bias) {
      if (cnt == 16) {
        bias_v = _mm512_loadu_ps(bias + row0 + j);
      } else {
        alignas(64) float tmp[16];
        for (int q = 0; q < 16; ++q) tmp[q] = bias[row0 + j + std::min<int64_t>(q, cnt - 1)];
        bias_v = _mm512_load_ps(tmp);
      }
    }
    for (int64_t u = 0; u < nu; ++u) _mm512_storeu_ps(S + u * lds + j, _mm512_add_ps(bias_v, _mm512_castpd_ps(w[u])));
  }
}

void users8_kernel(const TableView& t, int64_t row0, int64_t n, const float* UT, int64_t nu,
                   const float* bias, float* S, int64_t lds, float* buf) {
  switch (t.type) {
    case TableType::F16: users8_kernel_t<TableType::F16>(t, row0, n, UT, nu, bias, S, lds, buf); break;
    case TableType::I8Rowwise: users8_kernel_t<TableType::I8Rowwise>(t, row0, n, UT, nu, bias, S, lds, buf); break;
    default: users8_kernel_t<TableType::F32>(t, row0, n, UT, nu, bias, S, lds, buf); break;
  }
}
#endif

#if !defined(__AVX512F__) && defined(__AVX2__)
// ---------------------------------------------------------------------------------------
// Few users (<= kRowsKernelMaxUsers) on AVX2: no packing, as on AVX-512 with 8 lanes. Lanes
// run over the dim; each group of 8 items gives 8 accumulators that a horizontal-add tree
// reduces to one vector of 8 scores. Each row is read front to back once per group.
// ---------------------------------------------------------------------------------------
constexpr int64_t kRowsKernelMaxUsers = 2;

/// 8 full elements (c .. c+7) of a row, as floats (int8: the raw codes).
template <TableType TT>
inline __m256 load8_at(const void* row, int64_t c) {
  if constexpr (TT == TableType::F16) {
    return _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(static_cast<const uint16_t*>(row) + c)));
  } else if constexpr (TT == TableType::I8Rowwise) {
    return _mm256_cvtepi32_ps(
        _mm256_cvtepu8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(static_cast<const uint8_t*>(row) + c))));
  } else {
    return _mm256_loadu_ps(static_cast<const float*>(row) + c);
  }
}

/// The last n (< 8) elements c .. c+n-1 of a row, the other lanes zero (no read past the row).
template <TableType TT>
inline __m256 load8_tail_at(const void* row, int64_t c, int n) {
  alignas(32) float v[8] = {0.f, 0.f, 0.f, 0.f, 0.f, 0.f, 0.f, 0.f};
  for (int i = 0; i < n; ++i) {
    if constexpr (TT == TableType::F16) v[i] = half_to_float(static_cast<const uint16_t*>(row)[c + i]);
    else if constexpr (TT == TableType::I8Rowwise) v[i] = static_cast<float>(static_cast<const uint8_t*>(row)[c + i]);
    else v[i] = static_cast<const float*>(row)[c + i];
  }
  return _mm256_load_ps(v);
}

/// out[q] = sum of the 8 lanes of a[q], q < 8, in a fixed order.
inline __m256 reduce8(const __m256 a[8]) {
  const __m256 g0 = _mm256_hadd_ps(_mm256_hadd_ps(a[0], a[1]), _mm256_hadd_ps(a[2], a[3]));
  const __m256 g1 = _mm256_hadd_ps(_mm256_hadd_ps(a[4], a[5]), _mm256_hadd_ps(a[6], a[7]));
  // g0: lanes 0-3 the low halves' sums of a[0..3], lanes 4-7 their high halves' (g1: a[4..7])
  return _mm256_add_ps(_mm256_permute2f128_ps(g0, g1, 0x20), _mm256_permute2f128_ps(g0, g1, 0x31));
}

/// S[m * lds + j] = bias[row j] + U[m] . row j for m < nu, j < round_up(n, 8) (rows past n
/// repeat a valid row; their scores are ignored). Rows are rows[j] or row0 + j. For int8
/// rows the dot product with the codes is scaled: scale * (u . q) + min * sum(u).
template <TableType TT>
void rows_kernel_t(const TableView& t, int64_t row0, const int64_t* rows, int64_t n, const float* U,
                   int64_t nu, const float* bias, float* S, int64_t lds, RowScreen* screen) {
  const int64_t d = t.dim;
  const int64_t d8 = d / 8 * 8;
  const __m256 inf_v = _mm256_set1_ps(kInf);
  const __m256 abs_mask = _mm256_castsi256_ps(_mm256_set1_epi32(0x7FFFFFFF));
  __m256 screen_bad = _mm256_setzero_ps();  // lanes all ones where a screened value is bad
  const int tail = static_cast<int>(d - d8);
  const char* const base = static_cast<const char*>(t.data);
  const int64_t row_bytes = t.row_stride * table_elem_size(t.type);
  const float* const row_scale = t.row_scale;
  const float* const row_min = t.row_min;
  float usum[kRowsKernelMaxUsers] = {};
  alignas(32) float utail[kRowsKernelMaxUsers][8] = {};
  for (int64_t m = 0; m < nu; ++m) {
    if constexpr (TT == TableType::I8Rowwise)
      for (int64_t c = 0; c < d; ++c) usum[m] += U[m * d + c];
    for (int i = 0; i < tail; ++i) utail[m][i] = U[m * d + d8 + i];
  }
  // Rows this far ahead are prefetched into L2 (about 16 KB, as on AVX-512).
  constexpr int64_t kAhead = TT == TableType::F32 ? 32 : (TT == TableType::F16 ? 128 : 512);
  // float32 rows are read front to back, one row after the other (see below); float16 and
  // int8 rows dim-outer, 8 rows interleaved: their conversions make the kernel
  // instruction-bound, and a row's chain of dependent FMAs (8 at d = 64) then stalled it:
  // the interleaved order has 8 independent chains. Same bits either way (each row's sum
  // runs over its dims in the same order).
  constexpr bool row_order = TT == TableType::F32;
  const int64_t lines = (row_bytes + 63) / 64;
  for (int64_t j = 0; j < n; j += 8) {
    const int64_t cnt = std::min<int64_t>(8, n - j);
    const char* rp[8];
    int64_t r[8];
    for (int q = 0; q < 8; ++q) {
      r[q] = rows ? rows[j + (q < cnt ? q : 0)] : row0 + j + (q < cnt ? q : 0);
      rp[q] = base + r[q] * row_bytes;
    }
    // The 8 rows kAhead ahead (contiguous) are prefetched a few lines per step of the first
    // user's loop over the dim, not in one burst that would stall on the fill buffers.
    const char* pf = base + (row0 + j + kAhead) * row_bytes;
    const char* const pf_end = rows == nullptr ? pf + 8 * 64 * lines : pf;
    const int64_t pf_step = d8 > 0 ? 64 * ((8 * lines + d8 / 8 - 1) / (d8 / 8)) : 0;
    if (rows == nullptr) {
      if (bias != nullptr) _mm_prefetch(reinterpret_cast<const char*>(bias + row0 + j + kAhead), _MM_HINT_T0);
      if constexpr (TT == TableType::I8Rowwise) {
        _mm_prefetch(reinterpret_cast<const char*>(row_scale + row0 + j + kAhead), _MM_HINT_T0);
        _mm_prefetch(reinterpret_cast<const char*>(row_min + row0 + j + kAhead), _MM_HINT_T0);
      }
    }
    auto gather8 = [&](const float* v) {
      if (rows == nullptr && cnt == 8) return _mm256_loadu_ps(v + row0 + j);
      alignas(32) float tmp[8];
      for (int q = 0; q < 8; ++q) tmp[q] = v[r[q]];
      return _mm256_load_ps(tmp);
    };
    const __m256 bias_v = bias ? gather8(bias) : _mm256_setzero_ps();
    __m256 scale_v = _mm256_setzero_ps(), min_v = _mm256_setzero_ps();
    if constexpr (TT == TableType::I8Rowwise) {
      scale_v = gather8(row_scale);
      min_v = gather8(row_min);
    }
    if (screen != nullptr && rows == nullptr) {  // padding lanes repeat row j (valid)
      if (screen->bias != nullptr) {
        const __m256 b = cnt == 8 ? _mm256_loadu_ps(screen->bias + row0 + j) : gather8(screen->bias);
        screen_bad = _mm256_or_ps(screen_bad, _mm256_cmp_ps(b, inf_v, _CMP_NLT_UQ));  // NaN or +inf
      }
      if constexpr (TT == TableType::I8Rowwise) {
        screen_bad = _mm256_or_ps(screen_bad, _mm256_cmp_ps(_mm256_and_ps(scale_v, abs_mask), inf_v, _CMP_NLT_UQ));
        screen_bad = _mm256_or_ps(screen_bad, _mm256_cmp_ps(_mm256_and_ps(min_v, abs_mask), inf_v, _CMP_NLT_UQ));
      }
    }
    for (int64_t m = 0; m < nu; ++m) {
      const float* u = U + m * d;
      __m256 acc[8];
      if (d8 > 0 && row_order) {
        // Each row front to back (the memory is read in address order, as a plain sum
        // reads it): measured 80-95% of this machine's streaming read rate at B = 1 against
        // 65-80% for the dim-outer order (8 rows interleaved), same bits (each row's sum runs
        // over its dims in the same order). Row q of the group kAhead rows ahead is
        // prefetched beside row q (first user, dense rows only).
        const bool dopf = pf < pf_end;
#pragma GCC unroll 8
        for (int q = 0; q < 8; ++q) {
          if (dopf) for (int64_t l = 0; l < lines; ++l) _mm_prefetch(pf + q * row_bytes + 64 * l, _MM_HINT_T1);
          __m256 a = _mm256_setzero_ps();
          for (int64_t c = 0; c < d8; c += 8) a = _mm256_fmadd_ps(_mm256_loadu_ps(u + c), load8_at<TT>(rp[q], c), a);
          acc[q] = a;
        }
        pf = pf_end;
      } else {
        // Named accumulators and row pointers: with an array GCC stored all eight to the
        // stack on every step of the loop.
        __m256 a0 = _mm256_setzero_ps(), a1 = a0, a2 = a0, a3 = a0, a4 = a0, a5 = a0, a6 = a0, a7 = a0;
        const char *r0 = rp[0], *r1 = rp[1], *r2 = rp[2], *r3 = rp[3], *r4 = rp[4], *r5 = rp[5], *r6 = rp[6],
                   *r7 = rp[7];
        for (int64_t c = 0; c < d8; c += 8) {
          for (const char* e = std::min(pf_end, pf + pf_step); pf < e; pf += 64) _mm_prefetch(pf, _MM_HINT_T1);
          const __m256 uc = _mm256_loadu_ps(u + c);
          a0 = _mm256_fmadd_ps(uc, load8_at<TT>(r0, c), a0);
          a1 = _mm256_fmadd_ps(uc, load8_at<TT>(r1, c), a1);
          a2 = _mm256_fmadd_ps(uc, load8_at<TT>(r2, c), a2);
          a3 = _mm256_fmadd_ps(uc, load8_at<TT>(r3, c), a3);
          a4 = _mm256_fmadd_ps(uc, load8_at<TT>(r4, c), a4);
          a5 = _mm256_fmadd_ps(uc, load8_at<TT>(r5, c), a5);
          a6 = _mm256_fmadd_ps(uc, load8_at<TT>(r6, c), a6);
          a7 = _mm256_fmadd_ps(uc, load8_at<TT>(r7, c), a7);
        }
        acc[0] = a0; acc[1] = a1; acc[2] = a2; acc[3] = a3; acc[4] = a4; acc[5] = a5; acc[6] = a6; acc[7] = a7;
      }
      for (; pf < pf_end; pf += 64) _mm_prefetch(pf, _MM_HINT_T1);
      if (tail) {
        const __m256 uc = _mm256_load_ps(utail[m]);
        for (int q = 0; q < 8; ++q) acc[q] = _mm256_fmadd_ps(uc, load8_tail_at<TT>(rp[q], d8, tail), acc[q]);
      }
      __m256 dots = reduce8(acc);
      if constexpr (TT == TableType::I8Rowwise)
        dots = _mm256_fmadd_ps(scale_v, dots, _mm256_mul_ps(min_v, _mm256_set1_ps(usum[m])));
      _mm256_storeu_ps(S + m * lds + j, _mm256_add_ps(bias_v, dots));
    }
  }
  if (screen != nullptr && _mm256_movemask_ps(screen_bad) != 0) screen->bad = true;
}

void rows_kernel(const TableView& t, int64_t row0, const int64_t* rows, int64_t n, const float* U,
                 int64_t nu, const float* bias, float* S, int64_t lds, RowScreen* screen = nullptr) {
  switch (t.type) {
    case TableType::F16: rows_kernel_t<TableType::F16>(t, row0, rows, n, U, nu, bias, S, lds, screen); break;
    case TableType::I8Rowwise: rows_kernel_t<TableType::I8Rowwise>(t, row0, rows, n, U, nu, bias, S, lds, screen); break;
    default: rows_kernel_t<TableType::F32>(t, row0, rows, n, U, nu, bias, S, lds, screen); break;
  }
}

// ---------------------------------------------------------------------------------------
// Small tiles (kUsers8Min .. kUsers8Max users) on AVX2: no packing, every row is read once
// (front to back) and feeds all (up to 8) users. Lanes hold the users: acc[q] lane u
// accumulates U[u][c] * row_q[c] over the dims c in order, fed by a broadcast of the row's
// element c; an 8 x 8 transpose then yields 8 consecutive items per user. (The packed path
// transposes the whole table for a handful of users: at B = 8 it read and rewrote every
// row for 8 x 64 multiply-adds per row.)
// ---------------------------------------------------------------------------------------
constexpr int64_t kUsers8Min = 3;
constexpr int64_t kUsers8Max = 8;

/// UT[c * 8 + u] = U[u * d + c] for u < nu, c < d; 0 for u >= nu. UT holds 8 * d floats.
void pack_users8(const float* U, int64_t nu, int64_t d, float* UT) {
  for (int64_t i = 0; i < 8 * d; ++i) UT[i] = 0.0f;
  for (int64_t u = 0; u < nu; ++u)
    for (int64_t c = 0; c < d; ++c) UT[c * 8 + u] = U[u * d + c];
}

/// S[u * lds + j] = bias[row j] + U[u] . row j for u < nu (<= 8), j < round_up(n, 8) (rows
/// past n repeat the last valid row; their scores are ignored). Rows are row0 + j. UT from
/// pack_users8. buf holds 8 * d floats (float16 and int8 rows are dequantised into it, 8
/// rows at a time).
template <TableType TT>
void users8_kernel_t(const TableView& t, int64_t row0, int64_t n, const float* UT, int64_t nu,
                     const float* bias, float* S, int64_t lds, float* buf) {
  const int64_t d = t.dim;
  const int64_t esz = table_elem_size(t.type);
  const int64_t row_bytes = t.row_stride * esz;
  const char* const base = static_cast<const char*>(t.data);
  // Rows this far ahead are prefetched into L2, a few lines per dim step (about 8 KB of
  // float32 rows ahead, as for the row kernel).
  constexpr int64_t kAhead = TT == TableType::F32 ? 32 : (TT == TableType::F16 ? 64 : 128);
  const int64_t pf_bytes = 8 * row_bytes;
  const int64_t pf_step = d > 0 ? 64 * ((pf_bytes / 64 + d - 1) / d + 1) : 0;
  for (int64_t j = 0; j < n; j += 8) {
    const int64_t cnt = std::min<int64_t>(8, n - j);
    const float* rp[8];
    if constexpr (TT == TableType::F32) {
      for (int q = 0; q < 8; ++q)
        rp[q] = reinterpret_cast<const float*>(base + (row0 + j + std::min<int64_t>(q, cnt - 1)) * row_bytes);
    } else {
      for (int q = 0; q < 8; ++q) {
        const int64_t r = row0 + j + std::min<int64_t>(q, cnt - 1);
        float* o = buf + q * d;
        int64_t c = 0;
        for (; c + 8 <= d; c += 8) _mm256_storeu_ps(o + c, load_row8(t, r, c));
        for (; c < d; ++c) o[c] = item_value(t, r, c);
        rp[q] = o;
      }
    }
    const char* pf = base + (row0 + j + kAhead) * row_bytes;
    const char* const pf_end = pf + pf_bytes;
    __m256 acc[8];
    for (int q = 0; q < 8; ++q) acc[q] = _mm256_setzero_ps();
    int64_t c = 0;
    // Four dims per step: one pointer bump per row for four broadcasts (the loop is
    // otherwise bound by its instruction count, not by the two FMA pipes).
    for (; c + 4 <= d; c += 4) {
      for (const char* e = std::min(pf_end, pf + 4 * pf_step); pf < e; pf += 64) _mm_prefetch(pf, _MM_HINT_T1);
#pragma GCC unroll 4
      for (int i = 0; i < 4; ++i) {
        const __m256 ut = _mm256_load_ps(UT + (c + i) * 8);
#pragma GCC unroll 8
        for (int q = 0; q < 8; ++q) acc[q] = _mm256_fmadd_ps(ut, _mm256_broadcast_ss(rp[q] + c + i), acc[q]);
      }
    }
    for (; c < d; ++c) {
      const __m256 ut = _mm256_load_ps(UT + c * 8);
#pragma GCC unroll 8
      for (int q = 0; q < 8; ++q) acc[q] = _mm256_fmadd_ps(ut, _mm256_broadcast_ss(rp[q] + c), acc[q]);
    }
    for (; pf < pf_end; pf += 64) _mm_prefetch(pf, _MM_HINT_T1);
    transpose8(acc);  // acc[u] lane q: user u, row j + q
    __m256 bias_v = _mm256_setzero_ps();
    if (bias) {
      if (cnt == 8) {
        bias_v = _mm256_loadu_ps(bias + row0 + j);
      } else {
        alignas(32) float tmp[8];
        for (int q = 0; q < 8; ++q) tmp[q] = bias[row0 + j + std::min<int64_t>(q, cnt - 1)];
        bias_v = _mm256_load_ps(tmp);
      }
    }
    for (int64_t u = 0; u < nu; ++u) _mm256_storeu_ps(S + u * lds + j, _mm256_add_ps(acc[u], bias_v));
  }
}

void users8_kernel(const TableView& t, int64_t row0, int64_t n, const float* UT, int64_t nu,
                   const float* bias, float* S, int64_t lds, float* buf) {
  switch (t.type) {
    case TableType::F16: users8_kernel_t<TableType::F16>(t, row0, n, UT, nu, bias, S, lds, buf); break;
    case TableType::I8Rowwise: users8_kernel_t<TableType::I8Rowwise>(t, row0, n, UT, nu, bias, S, lds, buf); break;
    default: users8_kernel_t<TableType::F32>(t, row0, n, UT, nu, bias, S, lds, buf); break;
  }
}
#endif

/// Micro-kernel: S[m * lds + i] = Pb[i] + sum_c U[m * ldu + c] * Pslice[c * SW + i] for m < M
/// and i < SW (Pb nullptr: 0 + ...); the sum runs over c in order (the same for every M, so a user's score does not
/// depend on its place in a tile). Pslice is 64-byte aligned.
template <int M>
inline void micro_kernel(const float* U, int64_t ldu, const float* Pslice, int64_t d, float* S,
                         int64_t lds, const float* Pb) {
  vf acc[M][NV];
  for (int v = 0; v < NV; ++v) {
    const vf init = Pb ? *reinterpret_cast<const vf*>(Pb + v * VW) : splat(0.0f);
    for (int m = 0; m < M; ++m) acc[m][v] = init;
  }
  for (int64_t c = 0; c < d; ++c) {
    const float* p = Pslice + c * SW;
    vf b[NV];
    for (int v = 0; v < NV; ++v) b[v] = *reinterpret_cast<const vf*>(p + v * VW);
    for (int m = 0; m < M; ++m) {
      const vf a = splat(U[m * ldu + c]);
      for (int v = 0; v < NV; ++v) acc[m][v] += a * b[v];
    }
  }
  for (int m = 0; m < M; ++m)
    for (int v = 0; v < NV; ++v) storeu(S + m * lds + v * VW, acc[m][v]);
}

inline void micro_dispatch(int m, const float* U, int64_t ldu, const float* Pslice, int64_t d,
                           float* S, int64_t lds, const float* Pb) {
  switch (m) {
    case 1: micro_kernel<1>(U, ldu, Pslice, d, S, lds, Pb); break;
    case 2: micro_kernel<2>(U, ldu, Pslice, d, S, lds, Pb); break;
    case 3: micro_kernel<3>(U, ldu, Pslice, d, S, lds, Pb); break;
    case 4: micro_kernel<4>(U, ldu, Pslice, d, S, lds, Pb); break;
#if defined(__AVX512F__)
    case 5: micro_kernel<5>(U, ldu, Pslice, d, S, lds, Pb); break;
    case 6: micro_kernel<6>(U, ldu, Pslice, d, S, lds, Pb); break;
#endif
    default: break;
  }
}

// ---------------------------------------------------------------------------------------
// Gumbel noise (bit-identical uniforms to reference.hash_uniform)
// ---------------------------------------------------------------------------------------
inline uint32_t mix32(uint32_t x) {
  x ^= x >> 16;
  x *= 0x7FEB352Du;
  x ^= x >> 15;
  x *= 0x846CA68Bu;
  x ^= x >> 16;
  return x;
}
inline uint32_t seed_key(uint64_t seed) {
  const uint32_t lo = static_cast<uint32_t>(seed), hi = static_cast<uint32_t>(seed >> 32);
  return mix32(lo ^ mix32(hi + 0x9E3779B9u));
}
inline uint32_t row_key(uint32_t key, int64_t row) {
  return mix32(key ^ mix32(static_cast<uint32_t>(row) + 0x85EBCA6Bu));
}
inline float gumbel(uint32_t rkey, int64_t item) {
  uint32_t h = mix32(rkey ^ static_cast<uint32_t>(item));
  h = mix32(h ^ mix32(static_cast<uint32_t>(static_cast<uint64_t>(item) >> 32) + 0xC2B2AE35u));
  const float u = static_cast<float>((static_cast<double>(h >> 9) + 0.5) * (1.0 / 8388608.0));
  return -std::log(-std::log(u));
}

// ---------------------------------------------------------------------------------------
// Running top-k and log-sum-exp
// ---------------------------------------------------------------------------------------
struct Entry {
  float key;    // the ranking value (s, or s + G when sampling)
  float score;  // s
  int64_t id;
};
inline bool better(const Entry& a, const Entry& b) {
  return a.key > b.key || (a.key == b.key && a.id < b.id);
}
/// `better` as a function object: the heap and sort calls inline it (a function pointer
/// made every comparison of std::push_heap / pop_heap an indirect call).
struct Better {
  bool operator()(const Entry& a, const Entry& b) const { return better(a, b); }
};

struct Heap {
  Entry* e = nullptr;
  int64_t size = 0;
  int64_t cap = 0;
  float thresh() const { return size < cap ? -kInf : e[0].key; }
  bool full() const { return size == cap; }
  // Heap ordered by `better`: e[0] is the worst kept entry. Returns 0 when x is not kept,
  // 1 when it is kept and nothing left, 2 when it is kept and `evicted` left the heap.
  int push(const Entry& x, Entry& evicted) {
    if (size < cap) {
      e[size++] = x;
      std::push_heap(e, e + size, Better{});
      return 1;
    }
    if (better(x, e[0])) {
      evicted = e[0];
      std::pop_heap(e, e + size, Better{});
      e[size - 1] = x;
      std::push_heap(e, e + size, Better{});
      return 2;
    }
    return 0;
  }
};

/// Fold (m, s) -- a max and a sum of exp(x - m) -- into the running (M, S).
inline void lse_combine(float& M, double& S, float m, double s) {
  if (m == -kInf) return;
  if (m > M) {
    S = (M == -kInf ? 0.0 : S * std::exp(static_cast<double>(M) - static_cast<double>(m))) + s;
    M = m;
  } else {
    S += s * std::exp(static_cast<double>(m) - static_cast<double>(M));
  }
}

/// Fold one value x (a score) into the running (M, S).
inline void lse_add(float& M, double& S, float x) { lse_combine(M, S, x, 1.0); }

struct Ctx {
  const PolicyArgs* a;
  const PolicyLists* ex;
  const float* users;  // (B, d) user states divided by the temperature
  const float* bias;   // (N,) bias divided by the temperature, or nullptr
  uint32_t key;
  float gmax;  // an upper bound of the Gumbel noise
  ValueChecks* checks;  // checks->enabled: screen bias / row_scale / row_min blocks; always:
                        // record non-finite scores (checks->bad_item)
  int64_t d, NB, CH, cap;
};

/// Record the non-finite scores of x[0, n) (item j has id ids[j] or i0 + j): a score of
/// -inf is an item masked by a -inf bias when its bias is -inf, anything else non-finite
/// (NaN, +inf, -inf without a -inf bias: a non-finite item value or an overflow) is recorded
/// in checks->bad_item (the smallest such id, whatever the thread) and its lane set to -inf
/// so the pass goes on with well-ordered values; the entry point then raises. Rare: only
/// blocks holding a non-finite score come here.
void screen_scores(const Ctx& c, float* x, int64_t n, const int64_t* ids, int64_t i0) {
  for (int64_t j = 0; j < n; ++j) {
    const float v = x[j];
    if (std::isfinite(v)) continue;
    const int64_t id = ids ? ids[j] : i0 + j;
    if (v == -kInf && c.a->bias != nullptr && c.a->bias[id] == -kInf) continue;  // masked
    x[j] = -kInf;
    int64_t cur = __atomic_load_n(&c.checks->bad_item, __ATOMIC_RELAXED);
    while (id < cur &&
           !__atomic_compare_exchange_n(&c.checks->bad_item, &cur, id, false, __ATOMIC_RELAXED, __ATOMIC_RELAXED)) {
    }
  }
}

/// Fold one block of raw dot products x[0..n) of one user (batch row `row`) into its chunk
/// partial (m, s) and its heap. Item j has id ids[j] (ids != nullptr) or i0 + j. ex_b..ex_e
/// are the user's excluded ids inside [i0, i0 + n) (dense path only). x has room for
/// round_up(n, VW) floats and is scratch (overwritten).
///
/// (m, s) is the log-sum-exp of the *tail*: the eligible items that are not in the heap
/// (never kept, or evicted since). An item kept by the heap is left out of it (its lane is
/// set to -inf after the push) and an evicted one is added back, so at the end the tail and
/// the heap partition the eligible items: Z = tail + sum of the kept items' exp(s) is a sum
/// of positive terms, and the tail mass of a slate (what policy_sample's slate probability
/// needs) is exact, never the difference Z - sum over the slate (which cancels when the
/// slate holds nearly all the mass). That bookkeeping is for policy_sample only: for
/// policy_topk (no tail asked for) (m, s) sums every eligible item, kept or not, and the
/// heap is only the ranking (no eviction pays a double-precision exp, no kept item lowers a
/// sub-block's maximum). At B = 64 the bookkeeping cost about a quarter of the time: each
/// chunk's heaps start empty (for thread-count-independent bits), so every chunk's first
/// blocks push and evict many entries.
void fold_block(const Ctx& c, int64_t row, float* x, int64_t n, const int64_t* ids, int64_t i0,
                const int64_t* ex_b, const int64_t* ex_e, float& m, double& s, Heap& h) {
  const int64_t n_round = (n + VW - 1) / VW * VW;
  // One pass for the block's maximum and the screen for non-finite scores (a float is
  // non-finite iff its exponent bits are all ones); both are redone in the rare cases
  // that need it (a non-finite score, or an excluded item at the maximum).
  // Per 64 items, the maximum is kept too (an upper bound of what the threshold test
  // below sees: exclusions and the screen only lower values), so that test skips the
  // sub-blocks that cannot hold a candidate: with a k-th best key that only rises, most
  // of a block's sub-blocks are below it.
  constexpr int64_t kSubItems = 64;  // a multiple of VW
  float submax[1024 / kSubItems + 1];
  const int64_t nsub = (n + kSubItems - 1) / kSubItems;
  vf vm0 = splat(-kInf);
  // The screen is a sum: it is finite iff every value is finite, unless finite values
  // overflow it (then the slow screen below finds nothing to change). One add per vector
  // instead of three integer operations.
  vf sumv = splat(0.0f), sumw = splat(0.0f);
  int64_t jj = 0;
  int64_t sb = 0;
  for (; jj + kSubItems <= n; jj += kSubItems, ++sb) {
    vf a0 = splat(-kInf), a1 = splat(-kInf);
#pragma GCC unroll 8
    for (int64_t q = 0; q < kSubItems; q += 2 * VW) {
      const vf x0 = loadu(x + jj + q), x1 = loadu(x + jj + q + VW);
      sumv += x0;
      sumw += x1;
      a0 = vmax(a0, x0);
      a1 = vmax(a1, x1);
    }
    const vf mx = vmax(a0, a1);
    submax[sb] = hmax(mx);
    vm0 = vmax(vm0, mx);
  }
  float tail_max = -kInf;
  {
    vf at = splat(-kInf);
    for (; jj + VW <= n; jj += VW) {
      const vf x0 = loadu(x + jj);
      sumv += x0;
      at = vmax(at, x0);
    }
    tail_max = hmax(at);
  }
  bool bad = !std::isfinite(hsum_tree(sumv + sumw));
  for (; jj < n; ++jj) {
    bad |= !std::isfinite(x[jj]);
    tail_max = x[jj] > tail_max ? x[jj] : tail_max;
  }
  if (sb < nsub) submax[sb] = tail_max;
  float bm = hmax(vm0);
  bm = tail_max > bm ? tail_max : bm;
  // Sub-blocks whose values were lowered after the first pass (exclusions, the screen,
  // items kept by the heap) get their maximum recomputed, so that submax is exact again
  // where it must be: the block maximum is the shift of the exp pass, and one far above
  // the remaining values would underflow their terms (a kept or excluded item at 1000
  // beside items at 0).
  uint32_t dirty = 0;  // bit sb: sub-block sb needs its maximum again (nsub <= 17)
  if (bad) {  // rare: the slow screen
    screen_scores(c, x, n, ids, i0);
    dirty = ~0u;
  }
  for (const int64_t* p = ex_b; p < ex_e; ++p) {
    dirty |= 1u << ((*p - i0) / kSubItems);
    x[*p - i0] = -kInf;
  }
  for (int64_t q = n; q < n_round; ++q) x[q] = -kInf;
  // Recompute the dirty sub-blocks' maxima and the block's (the first pass already has
  // the block maximum when nothing is dirty).
  auto refresh = [&]() {
    float b = -kInf;
    for (int64_t q = 0; q < nsub; ++q) {
      if (dirty >> q & 1u) {
        vf v = splat(-kInf);
        const int64_t e = std::min<int64_t>(n_round, (q + 1) * kSubItems);
        for (int64_t jq = q * kSubItems; jq < e; jq += VW) v = vmax(v, loadu(x + jq));
        submax[q] = hmax(v);
      }
      b = submax[q] > b ? submax[q] : b;
    }
    dirty = 0;
    return b;
  };
  if (dirty) bm = refresh();
  if (bm == -kInf) return;  // nothing eligible in this block
  // Vectorised threshold test: only the lanes at or above the current k-th best key (an
  // upper bound of it when sampling) reach the scalar code; the threshold only rises, so
  // each candidate is checked again against the current one before the heap sees it.
  const float shift = c.a->sample ? c.gmax : 0.0f;
  const bool tail = c.a->sample;
  if (h.cap > 0 && !(h.full() && bm + shift < h.thresh())) {
    const uint32_t rk = c.a->sample ? row_key(c.key, row) : 0u;
    float em = -kInf;  // log-sum-exp of the evicted entries' scores
    double es = 0.0;
    Entry ev;
    for (int64_t j0 = 0; j0 < n_round; j0 += VW) {
      if (j0 % kSubItems == 0 && submax[j0 / kSubItems] + shift < h.thresh()) {
        j0 += kSubItems - VW;  // no candidate in this sub-block
        continue;
      }
      uint32_t bits = candidate_lanes(loadu(x + j0) + shift, h.thresh());
      while (bits != 0) {
        const int64_t j = j0 + __builtin_ctz(bits);
        bits &= bits - 1;
        const float v = x[j];  // > -inf (padding lanes are -inf, never candidates)
        if (v + shift < h.thresh()) continue;
        const int64_t id = ids ? ids[j] : i0 + j;
        float key = v;
        if (c.a->sample) {
          key = v + gumbel(rk, id);
          if (key < h.thresh()) continue;
        }
        const int r = h.push(Entry{key, v, id}, ev);
        if (r == 0 || !tail) continue;
        x[j] = -kInf;  // kept: not in the tail
        dirty |= 1u << (j / kSubItems);
        if (r == 2) lse_add(em, es, ev.score);
      }
    }
    if (em != -kInf) lse_combine(m, s, em, es);
    if (dirty) {
      bm = refresh();
      if (bm == -kInf) return;
    }
  }
  const float m2 = bm > m ? bm : m;
  // Four partial sums: no lane adds more than n / (4 VW) + 1 terms in sequence (at most 33
  // at NB = 1024 on AVX2), which bounds the float32 accumulation error of the block sum by
  // about 35 * 2^-24 = 2.1e-6 relative (one chain of 128 terms: 7.6e-6), and the four
  // chains overlap the adds' latency.
  const vf m2v = shift_of(m2);
  vf acc0 = splat(0.0f), acc1 = acc0, acc2 = acc0, acc3 = acc0;
  int64_t j = 0;
  for (; j + 4 * VW <= n_round; j += 4 * VW) {
    acc0 += vexp_shifted(loadu(x + j), m2v);
    acc1 += vexp_shifted(loadu(x + j + VW), m2v);
    acc2 += vexp_shifted(loadu(x + j + 2 * VW), m2v);
    acc3 += vexp_shifted(loadu(x + j + 3 * VW), m2v);
  }
  for (; j < n_round; j += VW) acc0 += vexp_shifted(loadu(x + j), m2v);
  const double bs = static_cast<double>(hsum_tree((acc0 + acc1) + (acc2 + acc3)));
  if (m2 != m) s = (m == -kInf ? 0.0 : s * std::exp(static_cast<double>(m) - static_cast<double>(m2)));
  s += bs;
  m = m2;
}

/// Per-thread scratch of the dense path.
struct Scratch {
  AlignedFloats P;   // NB * d packed items
  AlignedFloats Pb;  // NB packed (scaled) biases
  AlignedFloats S;   // kSubTileUsers * NB scores
  AlignedFloats UT;  // users of the small-tile kernel: 8 * round_up(d, 2) floats
  AlignedFloats R;   // 16 dequantised rows: 16 * round_up(d, 2) floats
  Scratch(int64_t NB, int64_t d)
      : P(static_cast<size_t>(NB * (d > 0 ? d : 1))), Pb(static_cast<size_t>(NB)),
        S(static_cast<size_t>(kSubTileUsers * NB)), UT(static_cast<size_t>(8 * (d + 2))),
        R(static_cast<size_t>(16 * (d + 2))) {}
};

/// Scan items [c0, c1) (one chunk) for users [u0, u0 + nu): chunk partials (m[i], s[i]) are
/// reset and computed; entries go into heaps[i].
void scan_chunk(const Ctx& c, Scratch& w, int64_t u0, int64_t nu, int64_t c0, int64_t c1,
                float* m, double* s, Heap* heaps) {
  const PolicyArgs& a = *c.a;
  const int64_t d = c.d, NB = c.NB;
  for (int64_t i = 0; i < nu; ++i) {
    m[i] = -kInf;
    s[i] = 0.0;
  }
#if defined(__AVX512F__) || defined(__AVX2__)
  const bool users8 = nu > kRowsKernelMaxUsers && nu >= kUsers8Min && nu <= kUsers8Max;
  if (users8) pack_users8(c.users + u0 * d, nu, d, w.UT.p);
#endif
  for (int64_t i0 = c0; i0 < c1; i0 += NB) {
    const int64_t n = std::min(NB, c1 - i0);
#if !defined(__AVX512F__) && defined(__AVX2__)
    const bool kernel_screens = nu <= kRowsKernelMaxUsers;  // the row kernel screens what it reads
#else
    const bool kernel_screens = false;
#endif
    RowScreen screen;
    screen.bias = a.bias;
    RowScreen* const scr = c.checks->enabled && u0 == 0 && kernel_screens ? &screen : nullptr;
    if (c.checks->enabled && u0 == 0 && !kernel_screens) {  // the first user tile screens each block once
      bool bad = a.bias != nullptr && !bias_ok(a.bias + i0, n);
      if (a.items.type == TableType::I8Rowwise)
        bad = bad || !all_finite(a.items.row_scale + i0, n) || !all_finite(a.items.row_min + i0, n);
      if (bad) __atomic_store_n(&c.checks->failed, true, __ATOMIC_RELAXED);
    }
    // Fold the scores of tile users [f, f + cnt) (S row i - f) into their partials.
    auto fold_users = [&](int64_t f, int64_t cnt) {
      for (int64_t i = f; i < f + cnt; ++i) {
        const int64_t row = u0 + i;
        const int64_t* eb = nullptr;
        const int64_t* ee = nullptr;
        if (c.ex->offsets) {
          const int64_t* lo = c.ex->ids + c.ex->offsets[row];
          const int64_t* hi = c.ex->ids + c.ex->offsets[row + 1];
          eb = std::lower_bound(lo, hi, i0);
          ee = std::lower_bound(eb, hi, i0 + n);
        }
        fold_block(c, row, w.S.p + (i - f) * NB, n, nullptr, i0, eb, ee, m[i], s[i], heaps[i]);
      }
    };
#if defined(__AVX512F__) || defined(__AVX2__)
    if (nu <= kRowsKernelMaxUsers) {
      rows_kernel(a.items, i0, nullptr, n, c.users + u0 * d, nu, c.bias, w.S.p, NB, scr);
      if (scr != nullptr && scr->bad) __atomic_store_n(&c.checks->failed, true, __ATOMIC_RELAXED);
      fold_users(0, nu);
      continue;
    }
    if (users8) {
      users8_kernel(a.items, i0, n, w.UT.p, nu, c.bias, w.S.p, NB, w.R.p);
      fold_users(0, nu);
      continue;
    }
#endif
    // The block is packed once for the whole tile (up to kMaxTileUsers users), then scored
    // and folded sub-tile by sub-tile (at most kSubTileUsers users: their scores, NB floats
    // each, stay in L2 between the micro-kernel and the fold).
    pack_block(a.items, i0, nullptr, n, w.P.p, c.bias, w.Pb.p);
    const int64_t nslices = (n + SW - 1) / SW;
    // The next block's rows are prefetched into L2 a few lines per micro-kernel call, so
    // that its packing finds them there instead of waiting on memory (the packing reads
    // the table at the streaming rate otherwise, with no arithmetic to hide it behind).
    const int64_t esz = table_elem_size(a.items.type);
    const char* pf = static_cast<const char*>(a.items.data) + (i0 + n) * a.items.row_stride * esz;
    const int64_t n_next = std::max<int64_t>(0, std::min<int64_t>(NB, a.items.rows - (i0 + n)));
    const char* const pf_end = pf + n_next * a.items.row_stride * esz;
    const int64_t calls = nslices * ((nu + MU - 1) / MU);
    const int64_t pf_step = 64 * ((n_next * a.items.row_stride * esz / 64 + calls) / std::max<int64_t>(calls, 1) + 1);
    const int64_t nsub = (nu + kSubTileUsers - 1) / kSubTileUsers;
    const int64_t SU = (nu + nsub - 1) / nsub;
    for (int64_t f = 0; f < nu; f += SU) {
      const int64_t cnt = std::min(SU, nu - f);
      for (int64_t sl = 0; sl < nslices; ++sl) {
        const float* Ps = w.P.p + sl * d * SW;
        const float* Pb = c.bias ? w.Pb.p + sl * SW : nullptr;
        for (int64_t ug = 0; ug < cnt; ug += MU) {
          for (const char* e = std::min(pf_end, pf + pf_step); pf < e; pf += 64) __builtin_prefetch(pf, 0, 2);
          const int mm = static_cast<int>(std::min<int64_t>(MU, cnt - ug));
          micro_dispatch(mm, c.users + (u0 + f + ug) * d, d, Ps, d, w.S.p + ug * NB + sl * SW, NB, Pb);
        }
      }
      fold_users(f, cnt);
    }
  }
}

/// Write user `row`'s slate (the heap, best first, padded with -1 / -inf), its
/// log-normaliser log(tail + sum over the heap of exp(s)) (policy_topk: M + log S, the sum
/// over every eligible item) and, when asked, the log tail mass.
void write_user(const PolicyArgs& a, int64_t row, float M, double S, Heap& h) {
  std::sort(h.e, h.e + h.size, Better{});
  int64_t* oi = a.out_ids + row * a.k;
  float* os = a.out_scores + row * a.k;
  for (int64_t j = 0; j < a.k; ++j) {
    if (j < h.size) {
      oi[j] = h.e[j].id;
      os[j] = h.e[j].score;
    } else {
      oi[j] = -1;
      os[j] = -kInf;
    }
  }
  const double tail = (M == -kInf || !(S > 0.0)) ? -static_cast<double>(kInf)
                                                  : static_cast<double>(M) + std::log(S);
  if (!a.sample) {  // (M, S) sums every eligible item (see fold_block)
    a.out_lognorm[row] = static_cast<float>(tail);
    return;
  }
  if (a.out_logtail != nullptr) a.out_logtail[row] = tail;
  double mz = tail;
  for (int64_t j = 0; j < h.size; ++j) mz = std::max(mz, static_cast<double>(h.e[j].score));
  if (mz == -static_cast<double>(kInf)) {
    a.out_lognorm[row] = -kInf;
    return;
  }
  double sz = tail == -static_cast<double>(kInf) ? 0.0 : std::exp(tail - mz);
  for (int64_t j = 0; j < h.size; ++j) sz += std::exp(static_cast<double>(h.e[j].score) - mz);
  a.out_lognorm[row] = static_cast<float>(mz + std::log(sz));
}

/// Push a chunk's kept entries e[0, n) into the user's heap h; what h drops (an entry not
/// kept, or one evicted) joins the tail (M, S).
/// Without a tail (policy_topk) (M, S) already counts every entry: only the ranking merges.
void merge_heap(Heap& h, const Entry* e, int64_t n, float& M, double& S, bool tail) {
  Entry ev;
  for (int64_t q = 0; q < n; ++q) {
    const int r = h.push(e[q], ev);
    if (!tail) continue;
    if (r == 0) lse_add(M, S, e[q].score);
    else if (r == 2) lse_add(M, S, ev.score);
  }
}

int num_threads() {
#ifdef _OPENMP
  return omp_get_max_threads();
#else
  return 1;
#endif
}

void run_dense(const Ctx& c) {
  const PolicyArgs& a = *c.a;
  const int64_t B = a.batch, N = a.items.rows;
  const int64_t ntiles = (B + kMaxTileUsers - 1) / kMaxTileUsers;
  const int64_t UT = ntiles > 0 ? (B + ntiles - 1) / ntiles : 0;
  const int64_t nchunks = (N + c.CH - 1) / c.CH;
  const int64_t cap = c.cap;
  // Small problems run on the calling thread: waking a team costs more than it saves
  // (and on a loaded machine a parallel region can wait a whole scheduler quantum).
  const bool big = static_cast<double>(B) * static_cast<double>(N) * static_cast<double>(std::max<int64_t>(c.d, 1)) >= kParallelWork;
  const int threads = big ? num_threads() : 1;
  // Chunk-parallel when there are too few user tiles to keep the threads busy.
  const double partial_bytes =
      static_cast<double>(nchunks) * static_cast<double>(B) * static_cast<double>(cap) * sizeof(Entry);
  const bool chunk_parallel = threads > 1 && ntiles < 2 * threads && nchunks > 1 &&
                              partial_bytes <= 256.0 * 1024 * 1024;
  if (!chunk_parallel) {
#pragma omp parallel if (big)
    {
      Scratch w(c.NB, c.d);
      // Each chunk fills its own heaps, merged into the users' heaps in chunk order exactly
      // as the chunk-parallel path merges its partials, so both give the same bits.
      std::vector<Entry> ebuf(static_cast<size_t>(UT * cap)), cbuf(static_cast<size_t>(UT * cap));
      std::vector<Heap> heaps(static_cast<size_t>(UT)), cheaps(static_cast<size_t>(UT));
      std::vector<float> M(UT), cm(UT);
      std::vector<double> S(UT), cs(UT);
#pragma omp for schedule(dynamic, 1)
      for (int64_t t = 0; t < ntiles; ++t) {
        const int64_t u0 = t * UT, nu = std::min(UT, B - u0);
        for (int64_t i = 0; i < nu; ++i) {
          heaps[i] = Heap{ebuf.data() + i * cap, 0, cap};
          M[i] = -kInf;
          S[i] = 0.0;
        }
        for (int64_t ch = 0; ch < nchunks; ++ch) {
          const int64_t c0 = ch * c.CH, c1 = std::min(N, c0 + c.CH);
          // policy_topk: the chunk scans into the users' heaps themselves. Its partials (m, s)
          // do not depend on what a heap holds (see fold_block), and the top-k of all the
          // chunks is unique (a total order), so the bits are those of the chunk-parallel path;
          // a heap that starts full raises the threshold test's bar from the first block
          // (empty per-chunk heaps pushed and evicted many entries at the start of each chunk).
          // policy_sample's tail bookkeeping needs a heap per chunk.
          if (a.sample)
            for (int64_t i = 0; i < nu; ++i) cheaps[i] = Heap{cbuf.data() + i * cap, 0, cap};
          scan_chunk(c, w, u0, nu, c0, c1, cm.data(), cs.data(), a.sample ? cheaps.data() : heaps.data());
          for (int64_t i = 0; i < nu; ++i) {
            lse_combine(M[i], S[i], cm[i], cs[i]);
            if (a.sample) merge_heap(heaps[i], cheaps[i].e, cheaps[i].size, M[i], S[i], true);
          }
        }
        for (int64_t i = 0; i < nu; ++i) write_user(a, u0 + i, M[i], S[i], heaps[i]);
      }
    }
    return;
  }
  // Partials per (chunk, user): max, sum, heap.
  std::vector<float> pm(static_cast<size_t>(nchunks * B));
  std::vector<double> ps(static_cast<size_t>(nchunks * B));
  std::vector<Entry> pe(static_cast<size_t>(nchunks * B * cap));
  std::vector<int64_t> psize(static_cast<size_t>(nchunks * B));
  const int64_t ntasks = ntiles * nchunks;
#pragma omp parallel if (big)
  {
    Scratch w(c.NB, c.d);
    std::vector<Heap> heaps(static_cast<size_t>(UT));
#pragma omp for schedule(dynamic, 1)
    for (int64_t task = 0; task < ntasks; ++task) {
      const int64_t t = task / nchunks, ch = task % nchunks;
      const int64_t u0 = t * UT, nu = std::min(UT, B - u0);
      const int64_t c0 = ch * c.CH, c1 = std::min(N, c0 + c.CH);
      const int64_t base = ch * B + u0;
      for (int64_t i = 0; i < nu; ++i) heaps[i] = Heap{pe.data() + (base + i) * cap, 0, cap};
      scan_chunk(c, w, u0, nu, c0, c1, pm.data() + base, ps.data() + base, heaps.data());
      for (int64_t i = 0; i < nu; ++i) psize[base + i] = heaps[i].size;
    }
#pragma omp barrier
    std::vector<Entry> ebuf(static_cast<size_t>(cap));
#pragma omp for schedule(static)
    for (int64_t row = 0; row < B; ++row) {
      Heap h{ebuf.data(), 0, cap};
      float M = -kInf;
      double S = 0.0;
      for (int64_t ch = 0; ch < nchunks; ++ch) {
        const int64_t idx = ch * B + row;
        lse_combine(M, S, pm[idx], ps[idx]);
        merge_heap(h, pe.data() + idx * cap, psize[idx], M, S, a.sample);
      }
      write_user(a, row, M, S, h);
    }
  }
}

void run_candidates(const Ctx& c, const PolicyLists& cand) {
  const PolicyArgs& a = *c.a;
  const int64_t B = a.batch, d = c.d, NB = c.NB;
  const bool big = static_cast<double>(cand.offsets[B]) * static_cast<double>(std::max<int64_t>(d, 1)) >= kParallelWork && B > 1;
#pragma omp parallel if (big)
  {
    Scratch w(NB, d);
    std::vector<Entry> ebuf;
#pragma omp for schedule(dynamic, 1)
    for (int64_t row = 0; row < B; ++row) {
      const int64_t* ids = cand.ids + cand.offsets[row];
      const int64_t L = cand.offsets[row + 1] - cand.offsets[row];
      const int64_t cap = std::min(a.k, L);
      if (static_cast<int64_t>(ebuf.size()) < cap) ebuf.resize(static_cast<size_t>(cap));
      Heap h{ebuf.data(), 0, cap};
      float m = -kInf;
      double s = 0.0;
      for (int64_t j0 = 0; j0 < L; j0 += NB) {
        const int64_t n = std::min(NB, L - j0);
#if defined(__AVX512F__) || defined(__AVX2__)
        rows_kernel(a.items, 0, ids + j0, n, c.users + row * d, 1, c.bias, w.S.p, NB);
#else
        pack_block(a.items, 0, ids + j0, n, w.P.p, c.bias, w.Pb.p);
        const int64_t nslices = (n + SW - 1) / SW;
        for (int64_t sl = 0; sl < nslices; ++sl)
          micro_kernel<1>(c.users + row * d, d, w.P.p + sl * d * SW, d, w.S.p + sl * SW, NB,
                          c.bias ? w.Pb.p + sl * SW : nullptr);
#endif
        fold_block(c, row, w.S.p, n, ids + j0, 0, nullptr, nullptr, m, s, h);
      }
      float M = -kInf;
      double S = 0.0;
      lse_combine(M, S, m, s);
      write_user(a, row, M, S, h);
    }
  }
}

}  // namespace

void fma_probe(int64_t iters, double* flops) {
  vf a0 = splat(1.0f + 0 * 1e-3f);
  vf a1 = splat(1.0f + 1 * 1e-3f);
  vf a2 = splat(1.0f + 2 * 1e-3f);
  vf a3 = splat(1.0f + 3 * 1e-3f);
  vf a4 = splat(1.0f + 4 * 1e-3f);
  vf a5 = splat(1.0f + 5 * 1e-3f);
  vf a6 = splat(1.0f + 6 * 1e-3f);
  vf a7 = splat(1.0f + 7 * 1e-3f);
  vf a8 = splat(1.0f + 8 * 1e-3f);
  vf a9 = splat(1.0f + 9 * 1e-3f);
  vf a10 = splat(1.0f + 10 * 1e-3f);
  vf a11 = splat(1.0f + 11 * 1e-3f);
  const vf x = splat(0.999999f), y = splat(1e-7f);
  for (int64_t it = 0; it < iters; ++it) {
    a0 = a0 * x + y;
    a1 = a1 * x + y;
    a2 = a2 * x + y;
    a3 = a3 * x + y;
    a4 = a4 * x + y;
    a5 = a5 * x + y;
    a6 = a6 * x + y;
    a7 = a7 * x + y;
    a8 = a8 * x + y;
    a9 = a9 * x + y;
    a10 = a10 * x + y;
    a11 = a11 * x + y;
#if defined(__x86_64__)
    // keep the 12 chains in registers, one FMA each per step (no reassociation)
    __asm__ volatile("" : "+x"(a0), "+x"(a1), "+x"(a2), "+x"(a3), "+x"(a4), "+x"(a5), "+x"(a6), "+x"(a7), "+x"(a8), "+x"(a9), "+x"(a10), "+x"(a11));
#endif
  }
  const vf t = a0 + a1 + a2 + a3 + a4 + a5 + a6 + a7 + a8 + a9 + a10 + a11;
  volatile float sink = hsum_tree(t);
  (void)sink;
  *flops = static_cast<double>(iters) * 12.0 * 2.0 * VW;
}

void policy_run(const PolicyArgs& args, const PolicyLists& exclude, const PolicyLists& candidates,
                ValueChecks& checks) {
  Ctx c;
  c.a = &args;
  c.ex = &exclude;
  c.checks = &checks;
  // s = (U.I + b) / t is computed as (U / t).I + b / t (the same up to rounding).
  std::vector<float> scaled_users, scaled_bias;
  c.users = args.users;
  c.bias = args.bias;
  if (args.temperature != 1.0f) {
    const float inv_t = 1.0f / args.temperature;
    // sized construction, not resize(): resize() instantiates an out-of-line std:: template
    // that every ISA variant would share (the linker keeps one copy, maybe an AVX-512 one)
    scaled_users = std::vector<float>(static_cast<size_t>(args.batch * args.items.dim));
    for (size_t i = 0; i < scaled_users.size(); ++i) scaled_users[i] = args.users[i] * inv_t;
    c.users = scaled_users.data();
    if (args.bias) {
      scaled_bias = std::vector<float>(static_cast<size_t>(args.items.rows));
      for (size_t i = 0; i < scaled_bias.size(); ++i) scaled_bias[i] = args.bias[i] * inv_t;
      c.bias = scaled_bias.data();
    }
  }
  c.key = seed_key(args.seed);
  {
    // Largest uniform: (2^23 - 1 + 0.5) / 2^23; a margin covers the rounding of x + G.
    const float umax = static_cast<float>((8388607.0 + 0.5) / 8388608.0);
    c.gmax = -std::log(-std::log(umax)) + 1e-3f;
  }
  c.d = args.items.dim;
  // Item blocks of about 256 KB of packed floats (L2-resident), at most 1024 items.
  const int64_t target = 65536 / std::max<int64_t>(c.d, 1);
  int64_t nb = std::min<int64_t>(1024, std::max<int64_t>(64, target));
  nb = std::max<int64_t>(SW, nb / SW * SW);
  c.NB = nb;
  c.CH = nb * ((16384 + nb - 1) / nb);
  c.cap = std::min(args.k, args.items.rows);
  if (candidates.offsets) {
    run_candidates(c, candidates);
  } else {
    run_dense(c);
  }
}

}  // namespace RECMETA_ISA_NS
}  // namespace cpu
}  // namespace recmeta

// Prefetch schemes for a random gather of embedding rows, on one core, without Python:
// the measurement behind the embedding bag's three-stage prefetch (csrc/cpu/embedding_bag_kernels.cpp).
//
//   g++ -O3 -march=x86-64-v3 -o /tmp/prefetch_gather bench/prefetch_gather.cpp
//   taskset -c 0 /tmp/prefetch_gather [rows=1000000] [dim=64 (32, 64 or 128)]
//
// A table of `rows` x `dim` float32 rows is mapped twice, once advised to 4 KiB pages
// (MADV_NOHUGEPAGE, what a torch tensor gets where transparent huge pages are `madvise`) and
// once to 2 MiB pages (MADV_HUGEPAGE). Each call sums 8192 bags of 20 random rows; 16 seeded
// sets of ids are cycled so that every call reads ids the call before did not (as training
// does, batch after batch). The schemes are timed interleaved, 40 calls each; best and median.
//
// Also printed, for each page size: the latency of one dependent random load over the table
// (a pointer chase), and for each scheme the cache lines it keeps in flight on average
// (Little's law: lines read x latency / time), which is what bounds a random gather on one
// core. The last scheme reads the rows in id order instead (a two-pass radix sort of
// (id, bag) pairs, then the sorted gather adding each row into its bag), sort included.
#include <sys/mman.h>

#include <algorithm>
#include <chrono>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <random>
#include <vector>

namespace {

float* map_table(size_t rows, size_t dim, bool huge) {
  const size_t bytes = rows * dim * sizeof(float);
  void* p = mmap(nullptr, bytes, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
  if (p == MAP_FAILED) {
    std::perror("mmap");
    std::exit(1);
  }
  madvise(p, bytes, huge ? MADV_HUGEPAGE : MADV_NOHUGEPAGE);
  float* f = static_cast<float*>(p);
  for (size_t i = 0; i < rows * dim; ++i) f[i] = static_cast<float>(i % 1000) * 1e-3f;
  return f;
}

// Prime: the first line of the row Prime rows ahead (into L2), 0 = none; Far: the whole row
// Far rows ahead (into L2), 0 = none; Near: the whole row Near rows ahead (into L1).
template <int Dim, int Prime, int Far, int Near>
__attribute__((noinline)) void gather(const float* w, const int64_t* idx, int64_t n, int64_t bag, float* out) {
  constexpr int64_t dim = Dim, row_bytes = Dim * 4;
  float acc[Dim];
  for (int64_t j = 0; j < dim; ++j) acc[j] = 0.f;
  for (int64_t i = 0; i < n; ++i) {
    if (Prime) __builtin_prefetch(w + idx[std::min<int64_t>(i + Prime, n - 1)] * dim, 0, 1);
    if (Far) {
      const char* p = reinterpret_cast<const char*>(w + idx[std::min<int64_t>(i + Far, n - 1)] * dim);
      for (int64_t o = 0; o < row_bytes; o += 64) __builtin_prefetch(p + o, 0, 2);
    }
    const char* q = reinterpret_cast<const char*>(w + idx[std::min<int64_t>(i + Near, n - 1)] * dim);
    for (int64_t o = 0; o < row_bytes; o += 64) __builtin_prefetch(q + o, 0, 3);
    const float* r = w + idx[i] * dim;
    for (int64_t j = 0; j < dim; ++j) acc[j] += r[j];
    if (i % bag == bag - 1) {
      float* o = out + (i / bag) * dim;
      for (int64_t j = 0; j < dim; ++j) {
        o[j] = acc[j];
        acc[j] = 0.f;
      }
    }
  }
}

// Rows read in id order: (id << 32 | bag) pairs radix-sorted on the id (two passes of
// ceil(bits / 2) bits), out zeroed, then each row added into its bag, prefetched as the
// two-stage scheme does. Fewer page walks (each page is visited once, in order), but the
// bags' sums are scattered over the whole output.
template <int Dim>
__attribute__((noinline)) void sorted_gather(const float* w, const int64_t* idx, int64_t n, int64_t bag, float* out) {
  constexpr int64_t dim = Dim, row_bytes = Dim * 4;
  static std::vector<uint64_t> buf_a, buf_b;
  static std::vector<uint32_t> count;
  buf_a.resize(n);
  buf_b.resize(n);
  uint64_t* a = buf_a.data();
  uint64_t* b = buf_b.data();
  uint64_t max_id = 0;
  for (int64_t i = 0; i < n; ++i) {
    a[i] = (static_cast<uint64_t>(idx[i]) << 32) | static_cast<uint64_t>(i / bag);
    max_id = std::max<uint64_t>(max_id, static_cast<uint64_t>(idx[i]));
  }
  const int bits = max_id > 0 ? 64 - __builtin_clzll(max_id) : 1, width = (bits + 1) / 2;
  for (int pass = 0; pass < 2; ++pass) {
    const int shift = 32 + pass * width;
    const uint64_t mask = (uint64_t{1} << width) - 1;
    count.assign((size_t{1} << width) + 1, 0);
    for (int64_t i = 0; i < n; ++i) ++count[((a[i] >> shift) & mask) + 1];
    for (size_t k = 1; k < count.size(); ++k) count[k] += count[k - 1];
    for (int64_t i = 0; i < n; ++i) b[count[(a[i] >> shift) & mask]++] = a[i];
    std::swap(a, b);
  }
  std::memset(out, 0, static_cast<size_t>(n / bag * dim) * sizeof(float));
  for (int64_t i = 0; i < n; ++i) {
    const char* p = reinterpret_cast<const char*>(w + (a[std::min<int64_t>(i + 48, n - 1)] >> 32) * dim);
    for (int64_t o = 0; o < row_bytes; o += 64) __builtin_prefetch(p + o, 0, 2);
    const char* q = reinterpret_cast<const char*>(w + (a[std::min<int64_t>(i + 12, n - 1)] >> 32) * dim);
    for (int64_t o = 0; o < row_bytes; o += 64) __builtin_prefetch(q + o, 0, 3);
    const float* r = w + (a[i] >> 32) * dim;
    float* o = out + (a[i] & 0xFFFFFFFFu) * dim;
    for (int64_t j = 0; j < dim; ++j) o[j] += r[j];
  }
}

// Nanoseconds of one dependent load at a random line of the table's memory (a random cyclic
// order over all its lines; the table's contents are rewritten afterwards).
double chase_latency_ns(float* w, size_t bytes) {
  const size_t lines = bytes / 64;
  std::vector<uint32_t> order(lines);
  for (size_t i = 0; i < lines; ++i) order[i] = static_cast<uint32_t>(i);
  std::mt19937_64 gen(7);
  std::shuffle(order.begin(), order.end(), gen);
  char* base = reinterpret_cast<char*>(w);
  for (size_t i = 0; i < lines; ++i)
    *reinterpret_cast<uint64_t*>(base + size_t{order[i]} * 64) = size_t{order[(i + 1) % lines]} * 64;
  const int64_t steps = 1000000;
  uint64_t off = 0;
  const auto t0 = std::chrono::steady_clock::now();
  for (int64_t s = 0; s < steps; ++s) off = *reinterpret_cast<volatile uint64_t*>(base + off);
  const double ns = std::chrono::duration<double, std::nano>(std::chrono::steady_clock::now() - t0).count();
  return off == 1 ? -1.0 : ns / static_cast<double>(steps);  // off is a multiple of 64: never 1
}

using Fn = void (*)(const float*, const int64_t*, int64_t, int64_t, float*);
struct Scheme {
  const char* name;
  Fn fn;
};

}  // namespace

int main(int argc, char** argv) {
  const size_t rows = argc > 1 ? std::strtoull(argv[1], nullptr, 10) : 1000000;
  const int64_t dim = argc > 2 ? std::strtoll(argv[2], nullptr, 10) : 64;
  if (rows < 1 || (dim != 32 && dim != 64 && dim != 128)) {
    std::fprintf(stderr, "rows >= 1 and dim 32, 64 or 128\n");
    return 2;
  }
  const int64_t bags = 8192, bag = 20, n = bags * bag, sets = 16, calls = 40;
  std::mt19937_64 gen(20261129);
  std::vector<std::vector<int64_t>> ids(sets, std::vector<int64_t>(n));
  for (auto& s : ids)
    for (auto& x : s) x = static_cast<int64_t>(gen() % rows);
  std::vector<float> out(bags * dim);
#define RECMETA_SCHEMES(D)                                          \
  {{"single stage, 16 rows (FBGEMM)", gather<D, 0, 0, 16>},        \
   {"two stages, 48 / 12", gather<D, 0, 48, 12>},                  \
   {"three stages, 128 / 48 / 12", gather<D, 128, 48, 12>},        \
   {"three stages, 64 / 32 / 12", gather<D, 64, 32, 12>},          \
   {"three stages, 160 / 64 / 16", gather<D, 160, 64, 16>},        \
   {"id order (radix sort included)", sorted_gather<D>}}
  const Scheme s32[] = RECMETA_SCHEMES(32), s64[] = RECMETA_SCHEMES(64), s128[] = RECMETA_SCHEMES(128);
#undef RECMETA_SCHEMES
  const Scheme* schemes = dim == 32 ? s32 : dim == 64 ? s64 : s128;
  const int K = sizeof(s64) / sizeof(s64[0]);
  std::printf("table %zu x %lld float32 (%.0f MB), %lld bags of %lld ids per call, %lld id sets cycled\n", rows,
              static_cast<long long>(dim), rows * dim * 4 / 1e6, static_cast<long long>(bags),
              static_cast<long long>(bag), static_cast<long long>(sets));
  for (const bool huge : {false, true}) {
    float* w = map_table(rows, dim, huge);
    {  // every scheme sums the same bags (id order adds in another order: a tolerance)
      std::vector<float> want(out.size());
      schemes[0].fn(w, ids[0].data(), n, bag, want.data());
      for (int k = 1; k < K; ++k) {
        schemes[k].fn(w, ids[0].data(), n, bag, out.data());
        for (size_t i = 0; i < out.size(); ++i)
          if (std::abs(out[i] - want[i]) > 1e-4f * (1.0f + std::abs(want[i]))) {
            std::fprintf(stderr, "%s: bag value %zu is %g, not %g\n", schemes[k].name, i, out[i], want[i]);
            return 1;
          }
      }
    }
    std::vector<std::vector<double>> ms(K);
    for (int64_t c = 0; c < calls; ++c)
      for (int k = 0; k < K; ++k) {
        const auto& s = ids[(c * K + k) % sets];
        const auto t0 = std::chrono::steady_clock::now();
        schemes[k].fn(w, s.data(), n, bag, out.data());
        ms[k].push_back(std::chrono::duration<double, std::milli>(std::chrono::steady_clock::now() - t0).count());
      }
    const double lat = chase_latency_ns(w, rows * dim * sizeof(float));
    const double lines = static_cast<double>(n) * static_cast<double>(dim * 4 / 64);
    std::printf("%s pages: one dependent random load %.0f ns\n", huge ? "2 MiB" : "4 KiB", lat);
    const double base = [&] { auto v = ms[0]; std::sort(v.begin(), v.end()); return v[v.size() / 2]; }();
    for (int k = 0; k < K; ++k) {
      std::sort(ms[k].begin(), ms[k].end());
      const double med = ms[k][ms[k].size() / 2];
      std::printf("  %-32s best %7.3f ms  median %7.3f ms  (single stage / this, medians: %.2fx; %4.1f lines in flight)\n",
                  schemes[k].name, ms[k][0], med, base / med, lines * lat * 1e-6 / med);
    }
    munmap(w, rows * dim * sizeof(float));
  }
  return 0;
}

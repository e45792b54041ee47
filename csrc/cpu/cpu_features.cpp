#include "recmeta/cpu_features.h"

#include <cstdlib>
#include <cstring>

#ifdef RECMETA_HAVE_OPENMP
#include <omp.h>
#endif

namespace recmeta {
namespace cpu {

Isa best_isa() {
#if defined(__x86_64__) && defined(RECMETA_HAVE_ISA_AVX512) && defined(RECMETA_HAVE_ISA_AVX2)
  __builtin_cpu_init();
  if (__builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
      __builtin_cpu_supports("avx512dq") && __builtin_cpu_supports("avx512vl") &&
      __builtin_cpu_supports("fma") && __builtin_cpu_supports("f16c"))
    return Isa::Avx512;
  if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") &&
      __builtin_cpu_supports("f16c"))
    return Isa::Avx2;
#endif
  return Isa::Generic;
}

static Isa compute_active() {
  Isa best = best_isa();
  const char* env = std::getenv("RECMETA_CPU_ISA");
  if (env == nullptr || *env == '\0') return best;
  Isa want = best;
  if (std::strcmp(env, "generic") == 0) want = Isa::Generic;
  else if (std::strcmp(env, "avx2") == 0) want = Isa::Avx2;
  else if (std::strcmp(env, "avx512") == 0) want = Isa::Avx512;
  return static_cast<int32_t>(want) < static_cast<int32_t>(best) ? want : best;
}

Isa active_isa() {
  static const Isa isa = compute_active();
  return isa;
}

const char* isa_name(Isa isa) {
  switch (isa) {
    case Isa::Avx512: return "avx512";
    case Isa::Avx2: return "avx2";
    default: return "generic";
  }
}

int max_threads() {
#ifdef RECMETA_HAVE_OPENMP
  return omp_get_max_threads();
#else
  return 1;
#endif
}

void set_threads(int n) {
#ifdef RECMETA_HAVE_OPENMP
  if (n >= 1) omp_set_num_threads(n);
#else
  (void)n;
#endif
}

bool has_openmp() {
#ifdef RECMETA_HAVE_OPENMP
  return true;
#else
  return false;
#endif
}

}  // namespace cpu
}  // namespace recmeta

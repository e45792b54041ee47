#pragma once
// Run-time choice of the CPU kernel variant. Kernel sources named *_kernels.cpp are
// compiled once per variant inside namespace recmeta::cpu::<isa> (the macro
// RECMETA_ISA_NS names it while compiling); dispatchers call the variant that
// active_isa() returns.
#include <cstdint>

namespace recmeta {
namespace cpu {

enum class Isa : int32_t { Generic = 0, Avx2 = 1, Avx512 = 2 };

/// The best variant this CPU supports among the ones built; the environment variable
/// RECMETA_CPU_ISA ("generic", "avx2", "avx512") may lower it (never raise it).
Isa active_isa();
/// The best variant built into this binary and supported by this CPU, ignoring overrides.
Isa best_isa();
const char* isa_name(Isa isa);
/// Number of OpenMP threads a parallel region would use now (1 without OpenMP).
int max_threads();
/// Set the number of OpenMP threads for later calls (no-op without OpenMP); n >= 1.
void set_threads(int n);
/// Whether the core was built with OpenMP.
bool has_openmp();

}  // namespace cpu
}  // namespace recmeta

// Dispatch helper: RECMETA_DISPATCH_ISA(fn, args...) calls recmeta::cpu::<isa>::fn(args...)
// for the active variant.
#if defined(RECMETA_HAVE_ISA_AVX512) && defined(RECMETA_HAVE_ISA_AVX2)
#define RECMETA_DISPATCH_ISA(fn, ...)                                   \
  do {                                                                   \
    switch (::recmeta::cpu::active_isa()) {                              \
      case ::recmeta::cpu::Isa::Avx512: ::recmeta::cpu::avx512::fn(__VA_ARGS__); break; \
      case ::recmeta::cpu::Isa::Avx2: ::recmeta::cpu::avx2::fn(__VA_ARGS__); break;     \
      default: ::recmeta::cpu::generic::fn(__VA_ARGS__); break;          \
    }                                                                    \
  } while (0)
#define RECMETA_DECLARE_FOR_ISAS(decl) \
  namespace generic { decl; }          \
  namespace avx2 { decl; }             \
  namespace avx512 { decl; }
#else
#define RECMETA_DISPATCH_ISA(fn, ...) ::recmeta::cpu::generic::fn(__VA_ARGS__)
#define RECMETA_DECLARE_FOR_ISAS(decl) \
  namespace generic { decl; }
#endif

#pragma once
// Portable IEEE binary16 -> float32 conversion, shared by the CPU kernels.
// `static inline`: every translation unit (and so every ISA variant of the kernels) keeps its
// own copy, so no weak symbol is shared across variants compiled with different flags.
#include <cstdint>
#include <cstring>

namespace recmeta {
namespace detail {

/// Exact half -> float for every input: zeros, subnormals (normalised), inf and NaN.
static inline float half_to_float_portable(uint16_t h) {
  const uint32_t sign = static_cast<uint32_t>(h & 0x8000u) << 16;
  uint32_t exp = (h >> 10) & 0x1Fu;
  uint32_t man = h & 0x3FFu;
  uint32_t bits;
  if (exp == 0) {
    if (man == 0) {
      bits = sign;
    } else {  // subnormal half -> normal float
      int e = -1;
      do {
        ++e;
        man <<= 1;
      } while ((man & 0x400u) == 0);
      bits = sign | (static_cast<uint32_t>(127 - 15 - e) << 23) | ((man & 0x3FFu) << 13);
    }
  } else if (exp == 0x1F) {
    bits = sign | 0x7F800000u | (man << 13);
  } else {
    bits = sign | ((exp + 127 - 15) << 23) | (man << 13);
  }
  float f;
  std::memcpy(&f, &bits, sizeof(f));
  return f;
}

}  // namespace detail
}  // namespace recmeta

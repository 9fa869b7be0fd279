// Element types understood by the native module, and host-side conversions.
//
// The module never sees a torch type: Python passes a small integer code for
// the dtype of each buffer. Half and bfloat16 are converted here by bit
// manipulation so that the CPU build needs no compiler extension for them.
#pragma once
#include <cstdint>
#include <cstring>
#include <stdexcept>

namespace ssmlab {

enum class DType : int { kFloat32 = 0, kFloat16 = 1, kBFloat16 = 2, kFloat64 = 3 };

inline const char* dtype_name(DType d) {
  switch (d) {
    case DType::kFloat32: return "float32";
    case DType::kFloat16: return "float16";
    case DType::kBFloat16: return "bfloat16";
    case DType::kFloat64: return "float64";
  }
  return "unknown";
}

struct Half { uint16_t bits; };
struct BFloat16 { uint16_t bits; };

inline float bits_to_float(uint32_t x) { float f; std::memcpy(&f, &x, 4); return f; }
inline uint32_t float_to_bits(float f) { uint32_t x; std::memcpy(&x, &f, 4); return x; }

inline float half_to_float(uint16_t h) {
  uint32_t sign = uint32_t(h & 0x8000u) << 16;
  uint32_t exp = (h >> 10) & 0x1fu;
  uint32_t mant = h & 0x3ffu;
  if (exp == 0) {
    if (mant == 0) return bits_to_float(sign);
    // Subnormal half: renormalise into a float's wider exponent range.
    int e = 1;
    while (!(mant & 0x400u)) { mant <<= 1; --e; }
    mant &= 0x3ffu;
    return bits_to_float(sign | uint32_t(e + 112) << 23 | mant << 13);
  }
  if (exp == 31) return bits_to_float(sign | 0x7f800000u | mant << 13);
  return bits_to_float(sign | (exp + 112) << 23 | mant << 13);
}

// Round to nearest, ties to even, as the hardware conversion does.
inline uint16_t float_to_half(float f) {
  uint32_t x = float_to_bits(f);
  uint32_t sign = (x >> 16) & 0x8000u;
  uint32_t fexp = (x >> 23) & 0xffu;
  uint32_t mant = x & 0x7fffffu;
  if (fexp == 0xff) return uint16_t(sign | 0x7c00u | (mant ? 0x200u : 0u));
  int32_t exp = int32_t(fexp) - 127 + 15;
  if (exp >= 31) return uint16_t(sign | 0x7c00u);
  if (exp <= 0) {
    if (exp < -10) return uint16_t(sign);
    mant |= 0x800000u;
    uint32_t shift = uint32_t(14 - exp);
    uint32_t hm = mant >> shift;
    uint32_t rem = mant & ((1u << shift) - 1u);
    uint32_t halfway = 1u << (shift - 1u);
    if (rem > halfway || (rem == halfway && (hm & 1u))) ++hm;
    return uint16_t(sign | hm);
  }
  uint32_t hm = mant >> 13, rem = mant & 0x1fffu;
  uint32_t h = sign | uint32_t(exp) << 10 | hm;
  if (rem > 0x1000u || (rem == 0x1000u && (hm & 1u))) ++h;  // a carry rolls into the exponent correctly
  return uint16_t(h);
}

inline float bf16_to_float(uint16_t b) { return bits_to_float(uint32_t(b) << 16); }

inline uint16_t float_to_bf16(float f) {
  uint32_t x = float_to_bits(f);
  if ((x & 0x7fffffffu) > 0x7f800000u) return uint16_t((x >> 16) | 0x40u);  // keep NaN a NaN
  x += 0x7fffu + ((x >> 16) & 1u);
  return uint16_t(x >> 16);
}

// Load/store an element as its accumulation type (float for the 16-bit types).
template <typename T> struct Elem;
template <> struct Elem<float> {
  using acc = float;
  static float load(const float* p) { return *p; }
  static void store(float* p, float v) { *p = v; }
};
template <> struct Elem<double> {
  using acc = double;
  static double load(const double* p) { return *p; }
  static void store(double* p, double v) { *p = v; }
};
template <> struct Elem<Half> {
  using acc = float;
  static float load(const Half* p) { return half_to_float(p->bits); }
  static void store(Half* p, float v) { p->bits = float_to_half(v); }
};
template <> struct Elem<BFloat16> {
  using acc = float;
  static float load(const BFloat16* p) { return bf16_to_float(p->bits); }
  static void store(BFloat16* p, float v) { p->bits = float_to_bf16(v); }
};

// Calls f(T{}) with T the C++ type for a dtype code.
template <typename F>
void dispatch_dtype(DType d, F&& f) {
  switch (d) {
    case DType::kFloat32: f(float{}); return;
    case DType::kFloat64: f(double{}); return;
    case DType::kFloat16: f(Half{}); return;
    case DType::kBFloat16: f(BFloat16{}); return;
  }
  throw std::invalid_argument("unsupported dtype code");
}

// An element whose dtype is a run-time code, as float32 (CPU side). The
// kernels call these outside their vector loops: one switch per element read.
inline float load_float(const void* p, DType d, int64_t i) {
  switch (d) {
    case DType::kFloat16: return half_to_float(static_cast<const Half*>(p)[i].bits);
    case DType::kBFloat16: return bf16_to_float(static_cast<const BFloat16*>(p)[i].bits);
    case DType::kFloat64: return float(static_cast<const double*>(p)[i]);
    case DType::kFloat32: break;
  }
  return static_cast<const float*>(p)[i];
}

inline void store_float(void* p, DType d, int64_t i, float v) {
  switch (d) {
    case DType::kFloat16: static_cast<Half*>(p)[i].bits = float_to_half(v); return;
    case DType::kBFloat16: static_cast<BFloat16*>(p)[i].bits = float_to_bf16(v); return;
    case DType::kFloat64: static_cast<double*>(p)[i] = v; return;
    case DType::kFloat32: break;
  }
  static_cast<float*>(p)[i] = v;
}

}  // namespace ssmlab

// Storage types and their conversions. Half types are stored as raw bits and
// converted with round-to-nearest-even, so results do not depend on the host
// compiler's support for _Float16 or __bf16.
#pragma once

#include <cstdint>
#include <cstring>
#include <type_traits>

#include "flashjit/flashjit.h"

namespace flashjit {

struct Half {
  uint16_t bits;
};
struct BFloat16 {
  uint16_t bits;
};

inline uint32_t float_bits(float value) {
  uint32_t bits;
  std::memcpy(&bits, &value, sizeof bits);
  return bits;
}

inline float bits_float(uint32_t bits) {
  float value;
  std::memcpy(&value, &bits, sizeof value);
  return value;
}

inline float to_float(BFloat16 x) {
  return bits_float(uint32_t(x.bits) << 16);
}

inline BFloat16 bfloat16_from_float(float value) {
  uint32_t bits = float_bits(value);
  if ((bits & 0x7fffffffu) > 0x7f800000u) return BFloat16{uint16_t((bits >> 16) | 0x40u)};  // quiet NaN
  bits += 0x7fffu + ((bits >> 16) & 1u);  // round to nearest, ties to even
  return BFloat16{uint16_t(bits >> 16)};
}

inline float to_float(Half x) {
  const uint32_t sign = uint32_t(x.bits & 0x8000u) << 16;
  const uint32_t exponent = (x.bits >> 10) & 0x1fu;
  const uint32_t mantissa = x.bits & 0x3ffu;
  if (exponent == 0x1f) return bits_float(sign | 0x7f800000u | (mantissa << 13));  // inf, NaN
  if (exponent != 0) return bits_float(sign | ((exponent + 112u) << 23) | (mantissa << 13));
  // Subnormal or zero: mantissa * 2^-24 is exact in float.
  const float magnitude = float(mantissa) * 5.9604644775390625e-8f;
  return sign ? -magnitude : magnitude;
}

inline Half half_from_float(float value) {
  const uint32_t bits = float_bits(value);
  const uint16_t sign = uint16_t((bits >> 16) & 0x8000u);
  const uint32_t magnitude = bits & 0x7fffffffu;
  if (magnitude > 0x7f800000u) return Half{uint16_t(sign | 0x7e00u)};   // NaN
  if (magnitude >= 0x477ff000u) return Half{uint16_t(sign | 0x7c00u)};  // rounds to inf
  if (magnitude < 0x38800000u) {
    // Result is subnormal in half: round magnitude / 2^-24 to an integer, ties to even.
    const float scaled = bits_float(magnitude) * 16777216.0f;  // exact
    uint32_t integral = uint32_t(scaled);
    const float remainder = scaled - float(integral);
    if (remainder > 0.5f || (remainder == 0.5f && (integral & 1u))) ++integral;
    return Half{uint16_t(sign | integral)};
  }
  // Normal: rebias exponent, round 13 dropped mantissa bits to nearest even.
  uint32_t rebased = magnitude - (112u << 23);
  rebased += 0xfffu + ((rebased >> 13) & 1u);
  return Half{uint16_t(sign | (rebased >> 13))};
}

// Element type -> accumulation type: float for every storage type but double.
template <typename T>
struct AccumulatorOf {
  using type = float;
};
template <>
struct AccumulatorOf<double> {
  using type = double;
};

template <typename Acc, typename T>
inline Acc to_acc(T x) {
  if constexpr (std::is_same_v<T, Half> || std::is_same_v<T, BFloat16>) {
    return Acc(to_float(x));
  } else {
    return Acc(x);
  }
}

template <typename T, typename Acc>
inline T from_acc(Acc x) {
  if constexpr (std::is_same_v<T, Half>) {
    return half_from_float(float(x));
  } else if constexpr (std::is_same_v<T, BFloat16>) {
    return bfloat16_from_float(float(x));
  } else {
    return T(x);
  }
}

inline const char* dtype_name(fj_dtype dtype) {
  switch (dtype) {
    case FJ_FLOAT32: return "float32";
    case FJ_FLOAT16: return "float16";
    case FJ_BFLOAT16: return "bfloat16";
    case FJ_FLOAT64: return "float64";
    case FJ_BOOL: return "bool";
    case FJ_INT8: return "int8";
    case FJ_INT32: return "int32";
    case FJ_INT64: return "int64";
  }
  return "unknown";
}

inline int64_t dtype_size(fj_dtype dtype) {
  switch (dtype) {
    case FJ_FLOAT32: return 4;
    case FJ_FLOAT16: return 2;
    case FJ_BFLOAT16: return 2;
    case FJ_FLOAT64: return 8;
    case FJ_BOOL: return 1;
    case FJ_INT8: return 1;
    case FJ_INT32: return 4;
    case FJ_INT64: return 8;
  }
  return 0;
}

inline bool is_float_dtype(fj_dtype dtype) {
  return dtype == FJ_FLOAT32 || dtype == FJ_FLOAT16 || dtype == FJ_BFLOAT16 || dtype == FJ_FLOAT64;
}

}  // namespace flashjit

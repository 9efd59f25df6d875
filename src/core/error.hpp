// Errors inside the C++ core. They carry the C status they map to; the C API
// boundary (src/core/c_api.cpp) turns them into a status and fj_last_error().
#pragma once

#include <charconv>
#include <sstream>
#include <stdexcept>
#include <string>
#include <string_view>
#include <type_traits>
#include <utility>

#include "flashjit/flashjit.h"

namespace flashjit {

class Error : public std::runtime_error {
 public:
  Error(fj_status status, const std::string& message) : std::runtime_error(message), status_(status) {}
  fj_status status() const { return status_; }

 private:
  fj_status status_;
};

namespace detail {
// One argument of str_cat as operator<< would print it: strings, characters and integers
// appended directly (kernel names and cache keys are built on every call), anything else
// (floating point, pointers, types with their own operator<<) through a stream.
template <typename T>
void append_printed(std::string& out, const T& value) {
  using U = std::decay_t<T>;
  if constexpr (std::is_same_v<U, std::string> || std::is_same_v<U, std::string_view> ||
                std::is_array_v<T>) {  // strings, and literals (character arrays)
    out.append(value);
  } else if constexpr (std::is_same_v<U, const char*> || std::is_same_v<U, char*>) {
    if (value != nullptr) out.append(value);
  } else if constexpr (std::is_same_v<U, bool>) {
    out += value ? '1' : '0';
  } else if constexpr (std::is_same_v<U, char> || std::is_same_v<U, signed char> || std::is_same_v<U, unsigned char>) {
    out += static_cast<char>(value);
  } else if constexpr (std::is_integral_v<U>) {
    char digits[24];
    const auto end = std::to_chars(digits, digits + sizeof(digits), value).ptr;
    out.append(digits, end);
  } else {
    std::ostringstream stream;
    stream << value;
    out += stream.str();
  }
}
}  // namespace detail

// Concatenates its arguments, each as operator<< prints it, into one message.
template <typename... Args>
std::string str_cat(Args&&... args) {
  std::string out;
  (detail::append_printed(out, args), ...);
  return out;
}

template <typename... Args>
[[noreturn]] void throw_value_error(Args&&... args) {
  throw Error(FJ_ERROR_INVALID_VALUE, str_cat(std::forward<Args>(args)...));
}

template <typename... Args>
[[noreturn]] void throw_type_error(Args&&... args) {
  throw Error(FJ_ERROR_INVALID_TYPE, str_cat(std::forward<Args>(args)...));
}

template <typename... Args>
[[noreturn]] void throw_unsupported(Args&&... args) {
  throw Error(FJ_ERROR_UNSUPPORTED, str_cat(std::forward<Args>(args)...));
}

}  // namespace flashjit

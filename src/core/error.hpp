// Errors inside the C++ core. They carry the C status they map to; the C API
// boundary (src/core/c_api.cpp) turns them into a status and fj_last_error().
#pragma once

#include <sstream>
#include <stdexcept>
#include <string>
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

// Concatenates its arguments with operator<< into one message.
template <typename... Args>
std::string str_cat(Args&&... args) {
  std::ostringstream out;
  (out << ... << std::forward<Args>(args));
  return out.str();
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

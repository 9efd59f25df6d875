// The C boundary's one rule: every C++ exception becomes a status plus the
// text fj_last_error() returns. Used by each file that defines C entry points.
#pragma once

#include <new>
#include <string>

#include "core/error.hpp"
#include "flashjit/flashjit.h"

namespace flashjit {

// This thread's last error message.
std::string& last_error_text();

template <typename Fn>
fj_status guarded(Fn&& fn) {
  try {
    fn();
    last_error_text().clear();
    return FJ_SUCCESS;
  } catch (const flashjit::Error& e) {
    last_error_text() = e.what();
    return e.status();
  } catch (const std::bad_alloc&) {
    last_error_text() = "out of memory";
    return FJ_ERROR_OUT_OF_MEMORY;
  } catch (const std::exception& e) {
    last_error_text() = std::string("internal error: ") + e.what();
    return FJ_ERROR_INTERNAL;
  } catch (...) {
    last_error_text() = "internal error: unknown exception";
    return FJ_ERROR_INTERNAL;
  }
}

}  // namespace flashjit

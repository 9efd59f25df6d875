// Device sources embedded at build time (cmake/embed_sources.cmake).
#pragma once

namespace flashjit::cuda {

// The text of an embedded file by name ("common.cuh"); throws if there is none.
const char* embedded_source(const char* name);

}  // namespace flashjit::cuda

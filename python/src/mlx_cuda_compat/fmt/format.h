// Stands in for {fmt} where MLX's CUDA headers are compiled without it: they call
// fmt::format only in template members that flashjit.mlx never instantiates, so a
// declaration is all the compiler needs. Used only when no fmt/format.h is found.
#pragma once
#include <string>

namespace fmt {
template <class... Args>
std::string format(const char* pattern, Args&&... args);
}  // namespace fmt

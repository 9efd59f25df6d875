// A hash of a few 64-bit words for the host's small caches (tensor maps, kept plans, validated
// calls): splitmix64's finaliser over the running hash and each word.
#pragma once

#include <cstddef>
#include <cstdint>
#include <initializer_list>

namespace flashjit {

inline uint64_t hash_words(const uint64_t* words, size_t count) {
  uint64_t hash = 0;
  for (size_t index = 0; index < count; ++index) {
    hash += words[index] + 0x9e3779b97f4a7c15ull;
    hash = (hash ^ (hash >> 30)) * 0xbf58476d1ce4e5b9ull;
    hash = (hash ^ (hash >> 27)) * 0x94d049bb133111ebull;
    hash ^= hash >> 31;
  }
  return hash;
}

inline uint64_t hash_words(std::initializer_list<uint64_t> words) { return hash_words(words.begin(), words.size()); }

}  // namespace flashjit

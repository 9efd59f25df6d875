// Philox4x32-10 and the dropout keep rule of flashjit.h (fj_dropout_keep).
// Shared verbatim by the host (CPU backend, C API) and the CUDA kernels: the CUDA
// backend embeds this file into every kernel source, so both backends drop
// exactly the same elements (host_device.h).
#pragma once

#ifndef FJ_HOST_DEVICE  // kernel sources embed host_device.h before this file
#include "core/host_device.h"
#endif

namespace flashjit {

struct Philox4x32 {
  uint32_t word[4];
};

FJ_HOST_DEVICE Philox4x32 philox4x32_10(uint32_t c0, uint32_t c1, uint32_t c2, uint32_t c3, uint32_t k0,
                                        uint32_t k1) {
  constexpr uint32_t kMultiplier0 = 0xD2511F53u;
  constexpr uint32_t kMultiplier1 = 0xCD9E8D57u;
  constexpr uint32_t kWeyl0 = 0x9E3779B9u;  // golden ratio
  constexpr uint32_t kWeyl1 = 0xBB67AE85u;  // sqrt(3) - 1
  for (int round = 0; round < 10; ++round) {
    const uint64_t product0 = uint64_t(kMultiplier0) * c0;
    const uint64_t product1 = uint64_t(kMultiplier1) * c2;
    const uint32_t next0 = uint32_t(product1 >> 32) ^ c1 ^ k0;
    const uint32_t next2 = uint32_t(product0 >> 32) ^ c3 ^ k1;
    c1 = uint32_t(product1);
    c3 = uint32_t(product0);
    c0 = next0;
    c2 = next2;
    k0 += kWeyl0;
    k1 += kWeyl1;
  }
  return Philox4x32{{c0, c1, c2, c3}};
}

// The four dropout words for keys [4 * key_quad, 4 * key_quad + 4) of one
// (batch, head, query) row: counter = (key_quad, query, batch * heads + head, lo(offset)).
FJ_HOST_DEVICE Philox4x32 dropout_words(uint64_t seed, uint64_t offset, int64_t batch_head, int64_t query,
                                        int64_t key_quad) {
  return philox4x32_10(uint32_t(key_quad), uint32_t(query), uint32_t(batch_head), uint32_t(offset),
                       uint32_t(seed), uint32_t(seed >> 32) ^ uint32_t(offset >> 32));
}

FJ_HOST_DEVICE bool dropout_keep(uint64_t seed, uint64_t offset, uint32_t threshold, int64_t batch_head,
                                 int64_t query, int64_t key) {
  return dropout_words(seed, offset, batch_head, query, key >> 2).word[key & 3] >= threshold;
}

}  // namespace flashjit

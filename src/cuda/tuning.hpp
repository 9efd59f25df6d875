// Tile choices of the sm_90a forward, and the sm_90a backward's pass, measured on a device
// (`flashjit tune`, `flashjit tune --backward`).
//
// A tuning file holds, for one device (by name) and arch, the configuration
// (FLASHJIT_CUDA_TILES syntax; for a backward class, whose key starts "bwd_", "one-pass" or
// "split") that measured fastest for each problem class:
//
//   <cache base>/<version>/tuning/sm<arch>-<device name, [A-Za-z0-9._-] kept>.txt
//
//   flashjit tuning 1
//   device NVIDIA H200
//   arch 90
//   version 0.1.0
//   entry <class key> <tiles> <TFLOP/s measured>
//   ...
//   checksum <FNV-1a 64 of every byte above, hex>
//
// A file is read once a process; one that is not flashjit's, names another
// device, arch or library version, fails its checksum or holds a malformed line
// is ignored whole, with one warning on stderr. FLASHJIT_CUDA_TILES (FLASHJIT_CUDA_BACKWARD),
// when set, wins over a tuned choice.
#pragma once

#include <cstdint>
#include <string>

#include "cuda/kernel_spec.hpp"

namespace flashjit::cuda {

// The class a tuned choice applies to: dtype, the forward kernel's padded head
// dims, features, and the key length in three bands (up to 2k, up to 8k, more).
std::string tuning_key(const KernelTraits& traits, int64_t seqlen_k);

// The class of a backward (its pass: one-pass or split): "bwd_" and the forward's class.
std::string backward_tuning_key(const KernelTraits& traits, int64_t seqlen_k);

// A backward class's pass: the split kernels, the one pass (its dQ sums as
// FLASHJIT_CUDA_ONE_PASS_DQ says, by default writer-pair), or the one pass with the diagonal order
// (writer-diagonal; "one-pass-diagonal" in a tuning file).
constexpr int kSplitPass = 0, kOnePass = 1, kOnePassDiagonal = 2;

// The backward's pass for a class on a device (kSplitPass, kOnePass, kOnePassDiagonal) as tuned
// on it, else as the built-in table of its arch says; -1 where neither has the class.
int tuned_one_pass(const std::string& device_name, int arch, const std::string& key);

// The pass of a backward of `traits` over seqlen_k keys on a device: FLASHJIT_CUDA_BACKWARD where
// set (kOnePass or kSplitPass), else its class's tuned choice (tuned_one_pass), else kSplitPass.
int backward_pass_chosen(const KernelTraits& traits, int64_t seqlen_k, const std::string& device_name);
// Whether that pass is a one pass.
bool one_pass_backward_chosen(const KernelTraits& traits, int64_t seqlen_k, const std::string& device_name);
// backward_kernels' dq_mode for a chosen pass: the diagonal order for kOnePassDiagonal unless
// FLASHJIT_CUDA_ONE_PASS_DQ is set; else -1 (the setting's, or its default).
int backward_dq_mode(int pass);

// The tiles for a class on a device: those tuned on it, else those of the
// built-in table of its arch (src/cuda/tuned_sm<arch>.txt: the tuner's output
// on one device of the arch, committed); not forced (ForwardTiles{}) where
// neither has the class. An empty device name: the built-in table's alone.
ForwardTiles tuned_forward_tiles(const std::string& device_name, int arch, const std::string& key);

// Writes the tuning file of a device from "<key> <tiles> <TFLOP/s>" lines
// (checked: tiles must parse; "built-in" drops the class's entry), keeping the
// classes of a valid earlier file that these lines do not name, and makes later
// calls read it; returns its path.
std::string save_tuning(const std::string& device_name, int arch, const std::string& entries);

// For `flashjit info`: the file's path, then its "<key> <tiles>" lines, or why it is ignored.
std::string describe_tuning(const std::string& device_name, int arch);

// Forgets the tuning files read by this process.
void clear_tuning();

// A number that changes whenever the tables of this process change (clear_tuning, save_tuning).
uint64_t tuning_generation();

// The key length's band of a class (tuning_key): 0 up to 2k keys, 1 up to 8k, 2 more.
int tuning_band(int64_t seqlen_k);

}  // namespace flashjit::cuda

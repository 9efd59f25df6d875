// The shared-memory layout of every kernel, in one place for the host and the
// kernels: byte offsets of each region from the block's base, and the bytes the
// block uses. The kernels take their pointers from these offsets (their own
// template sizes as arguments); the host sizes the launch with the same
// functions (KernelSpec::shared_memory_bytes), so a region added to a kernel is
// added here or the kernel's static_asserts fail. The Hopper kernels' base is
// the dynamic shared memory rounded up to 1024 bytes (swizzled tiles): the host
// adds that slack. Embedded into every kernel source after host_device.h.
#pragma once

#ifndef FJ_HOST_DEVICE  // kernel sources embed host_device.h before this file
#include "core/host_device.h"
#endif

#if defined(__CUDACC__) || defined(__CUDACC_RTC__)
#define FJ_LAYOUT __host__ __device__ constexpr
#else
#define FJ_LAYOUT constexpr
#endif

namespace flashjit {
namespace layout {

constexpr int kHopperBaseAlignment = 1024;  // the swizzled tiles' alignment
constexpr int kBarrierBytes = 8;            // an mbarrier
constexpr int kHalfBytes = 2;               // a float16/bfloat16 element of the tensor-core kernels

// Regions taken one after another from offset 0.
struct Carver {
  int bytes = 0;
  FJ_LAYOUT int take(int size) {
    const int offset = bytes;
    bytes += size;
    return offset;
  }
};

// dS tiles of the one-pass backward: tile t's dS is written after its gradient and read by
// both consumers' dQ products two steps later (attention_hopper_bwd.cuh says why four); with
// whole steps in the same step, so that two buffers suffice.
constexpr int kOnePassDsBuffers = 4;
constexpr int kWholeStepDsBuffers = 2;
// The dK/dV kernel's [keys][queries] tiles: the one pass's dS buffers, or (shared operands) P^T and dS^T.
FJ_LAYOUT int dkdv_ds_buffers(bool one_pass, bool shared_operands, bool whole_steps = false) {
  return one_pass ? (whole_steps ? kWholeStepDsBuffers : kOnePassDsBuffers) : shared_operands ? 2 : 0;
}
// The one pass in arrival order keeps each key block's walk of its head (its first tile, tile
// count and phase: 16 bytes) for the ranks it counts at each add; a head may have at most this
// many key blocks for it (the host's guard).
constexpr int kArrivalWalkBlocks = 256;
FJ_LAYOUT int dkdv_walk_blocks(bool arrival) { return arrival ? kArrivalWalkBlocks : 0; }
// The one pass's dQ sums (KernelSpec::dq_diagnostic, FJ_DQ_DIAGNOSTIC): 4 and 6 in the arrival
// order, 5 to 8, 10 and 11 made by the dQ writer (below); 8 in kDqGroups groups of a tile's visitors; 9
// (FLASHJIT_CUDA_ONE_PASS_DQ=atomic, not deterministic) added by every visitor at once, in no
// order, into sums the prep kernel zeroed. A kernel of its own writes dQ from the sums of 5 to 11
// (10, writer-pair: 5 by two writer threads on alternate tiles; 11, writer-diagonal: 10 with tiles
// walked upward and the visitors adding from the highest down).
FJ_LAYOUT bool dq_in_arrival_order(int diagnostic) { return diagnostic == 4 || diagnostic == 6; }
FJ_LAYOUT bool dq_by_writer(int diagnostic) { return (diagnostic >= 5 && diagnostic <= 8) || diagnostic == 10 || diagnostic == 11; }
FJ_LAYOUT bool dq_atomic(int diagnostic) { return diagnostic == 9; }
// The writer pair's orders (writer-pair, writer-diagonal): a writer thread a staging slot.
FJ_LAYOUT bool dq_by_writer_pair(int diagnostic) { return diagnostic == 10 || diagnostic == 11; }
FJ_LAYOUT bool dq_converted(int diagnostic) { return dq_by_writer(diagnostic) || dq_atomic(diagnostic); }
// FLASHJIT_CUDA_ONE_PASS_DQ=writer-groups (8): a tile's visitors in block order are dealt into
// kDqGroups groups by rank (rank % kDqGroups), each group summing into float32 sums of its own in
// block order, so that a visitor waits only for the one kDqGroups ranks below it (a chain a
// quarter as long); the convert kernel adds the groups' sums in group order. Scratch: kDqGroups
// times the sums and counters.
constexpr int kDqGroups = 4;
FJ_LAYOUT int dq_groups(int diagnostic) { return diagnostic == 8 ? kDqGroups : 1; }
// The one pass with a dQ writer (FLASHJIT_CUDA_ONE_PASS_DQ=writer): each consumer warpgroup stages
// its float32 share of a query tile's dQ (128 threads x dq_queries / 2 floats: at head dim 128
// every query of the step and 64 of dQ's columns, at 64 every column of half the queries) in one
// of kDqStagingSlots buffers, which a writer thread of the producer warpgroup adds into the tile's
// sums in global memory in one bulk copy; a full and an empty mbarrier a buffer.
constexpr int kDqStagingSlots = 2;
FJ_LAYOUT int dkdv_dq_chunk_floats(int block_n, int dim_qk) {
  return 128 * (dim_qk == 128 ? block_n : block_n / 2) / 2;
}
FJ_LAYOUT int dkdv_dq_staging_buffers(bool writer, int consumers, int slots = kDqStagingSlots) {
  return writer ? consumers * slots : 0;
}

// A ring of `buffers` buffers has a full and an empty mbarrier per buffer (pipeline.cuh's Ring).
FJ_LAYOUT int ring_bytes(int buffers) { return 2 * buffers * kBarrierBytes; }

// sm_90a forward (attention_hopper.cuh): Q buffers of `rows` x `q_row` (O is
// staged there when stored by TMA), K and V rings of `stages` tiles of
// `block_n` rows, the Q/K/V rings' mbarriers, and the work-tile queue (a ring
// of two and its two slots of `slot_ints` ints: the tile, and with the producer's setup its
// block's fields).
constexpr int kTileSlotInts = 8;  // the tile and QueryBlock's seven fields (pipeline.cuh)
struct HopperForward {
  int q_tiles, k_tiles, v_tiles, q_ring, k_ring, v_ring, queue_ring, queue_slots, bytes;
};
FJ_LAYOUT HopperForward hopper_forward(int rows, int q_row, int block_n, int dim_qk, int dim_v, int q_buffers,
                                       int stages, int slot_ints = 1) {
  Carver c;
  HopperForward l{};
  l.q_tiles = c.take(kHalfBytes * q_buffers * rows * q_row);
  l.k_tiles = c.take(kHalfBytes * stages * block_n * dim_qk);
  l.v_tiles = c.take(kHalfBytes * stages * block_n * dim_v);
  l.q_ring = c.take(ring_bytes(q_buffers));
  l.k_ring = c.take(ring_bytes(stages));
  l.v_ring = c.take(ring_bytes(stages));
  l.queue_ring = c.take(ring_bytes(2));
  l.queue_slots = c.take(2 * 4 * slot_ints);
  l.bytes = c.bytes;
  return l;
}

// sm_90a dQ (attention_hopper_bwd.cuh): the block's Q and dO rows, a K ring of
// stages + 1 tiles (K_j serves two steps) and a V ring of `stages`; the rows'
// mbarrier, then the rings'.
struct HopperBackwardDq {
  int q_tile, dout_tile, k_tiles, v_tiles, rows_full, k_ring, v_ring, bytes;
};
FJ_LAYOUT HopperBackwardDq hopper_backward_dq(int rows, int block_n, int dim_qk, int dim_v, int stages) {
  Carver c;
  HopperBackwardDq l{};
  l.q_tile = c.take(kHalfBytes * rows * dim_qk);
  l.dout_tile = c.take(kHalfBytes * rows * dim_v);
  l.k_tiles = c.take(kHalfBytes * (stages + 1) * block_n * dim_qk);
  l.v_tiles = c.take(kHalfBytes * stages * block_n * dim_v);
  l.rows_full = c.take(kBarrierBytes);
  l.k_ring = c.take(ring_bytes(stages + 1));
  l.v_ring = c.take(ring_bytes(stages));
  l.bytes = c.bytes;
  return l;
}

// sm_90a dK/dV (attention_hopper_bwd.cuh): the block's K and V rows; Q and dO
// rings of stages + 1 tiles with each Q tile's float LSE and delta rows; the
// keys' mbarrier, then the rings'. The one-pass kernel (it also forms dQ) adds
// `ds_buffers` swizzled tiles of dS (block_n queries x the block's rows of keys)
// after the dO ring.
struct HopperBackwardDkDv {
  int k_tile, v_tile, q_tiles, dout_tiles, ds_tiles, lse_tiles, delta_tiles, walks, dq_staging, keys_full, q_ring,
      dout_ring, dq_barriers, bytes;
};
FJ_LAYOUT HopperBackwardDkDv hopper_backward_dkdv(int rows, int block_n, int dim_qk, int dim_v, int stages,
                                                  int ds_buffers = 0, int walk_blocks = 0, int staging_buffers = 0) {
  Carver c;
  HopperBackwardDkDv l{};
  const int buffers = stages + 1;
  l.k_tile = c.take(kHalfBytes * rows * dim_qk);
  l.v_tile = c.take(kHalfBytes * rows * dim_v);
  l.q_tiles = c.take(kHalfBytes * buffers * block_n * dim_qk);
  l.dout_tiles = c.take(kHalfBytes * buffers * block_n * dim_v);
  l.ds_tiles = c.take(kHalfBytes * ds_buffers * block_n * rows);
  l.lse_tiles = c.take(4 * buffers * block_n);
  l.delta_tiles = c.take(4 * buffers * block_n);
  l.walks = c.take(16 * walk_blocks);  // 16-byte aligned: every region before is a multiple of 16
  l.dq_staging = c.take(4 * staging_buffers * dkdv_dq_chunk_floats(block_n, dim_qk));  // read 16 bytes at a time
  l.keys_full = c.take(kBarrierBytes);
  l.q_ring = c.take(ring_bytes(buffers));
  l.dout_ring = c.take(ring_bytes(buffers));
  l.dq_barriers = c.take(2 * staging_buffers * kBarrierBytes);  // full, then empty, of each staging buffer
  l.bytes = c.bytes;
  return l;
}

// mma.sync kernels (attention_mma*.cuh): rows padded by 16 bytes (pitch = dim + 8).
// Forward: the block's Q rows, one K and one V tile.
struct MmaForward {
  int q_tile, k_tile, v_tile, bytes;
};
FJ_LAYOUT MmaForward mma_forward(int rows, int block_n, int pitch_qk, int pitch_v) {
  Carver c;
  MmaForward l{};
  l.q_tile = c.take(kHalfBytes * rows * pitch_qk);
  l.k_tile = c.take(kHalfBytes * block_n * pitch_qk);
  l.v_tile = c.take(kHalfBytes * block_n * pitch_v);
  l.bytes = c.bytes;
  return l;
}

// Backward: the block's own rows of two operands (dQ: Q and dO; dK/dV: K and V),
// two buffers of the streamed pair (dQ: K and V; dK/dV: Q and dO), and for
// dK/dV two buffers of float LSE and delta rows.
struct MmaBackward {
  int own_qk, own_v, streamed_qk, streamed_v, lse_tiles, delta_tiles, bytes;
};
FJ_LAYOUT MmaBackward mma_backward(int rows, int block_n, int pitch_qk, int pitch_v, bool with_rows_stats) {
  Carver c;
  MmaBackward l{};
  l.own_qk = c.take(kHalfBytes * rows * pitch_qk);
  l.own_v = c.take(kHalfBytes * rows * pitch_v);
  l.streamed_qk = c.take(kHalfBytes * 2 * block_n * pitch_qk);
  l.streamed_v = c.take(kHalfBytes * 2 * block_n * pitch_v);
  l.lse_tiles = c.take(with_rows_stats ? 4 * 2 * block_n : 0);
  l.delta_tiles = c.take(with_rows_stats ? 4 * 2 * block_n : 0);
  l.bytes = c.bytes;
  return l;
}

// Scalar kernels (attention_simt.cuh), elements of the accumulator type: one
// tile of the streamed pair (forward and dQ: K and V; dK/dV: Q and dO), and for
// dK/dV the tile's LSE and delta.
struct Simt {
  int streamed_qk, streamed_v, lse_tile, delta_tile, bytes;
};
FJ_LAYOUT Simt simt(int tile, int dim_qk, int dim_v, int acc_bytes, bool with_rows_stats) {
  Carver c;
  Simt l{};
  l.streamed_qk = c.take(acc_bytes * tile * dim_qk);
  l.streamed_v = c.take(acc_bytes * tile * dim_v);
  l.lse_tile = c.take(with_rows_stats ? acc_bytes * tile : 0);
  l.delta_tile = c.take(with_rows_stats ? acc_bytes * tile : 0);
  l.bytes = c.bytes;
  return l;
}

}  // namespace layout
}  // namespace flashjit

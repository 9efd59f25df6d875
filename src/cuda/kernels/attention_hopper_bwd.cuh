// Backward attention for sm_90a (H100, H200), float16 and bfloat16, split as
// the mma.sync backward is so that every gradient has one writer (no atomics,
// bitwise deterministic; the one pass below sums dQ in a fixed order, but for its
// atomic mode, FJ_DQ_DIAGNOSTIC 9), with the forward's roles: a producer warpgroup that
// loads with TMA and two consumer warpgroups of 64 rows that multiply with
// wgmma and take turns issuing (pipeline.cuh).
//
//   prep (FJ_BACKWARD_PREP): delta = rowsum(dO * O) and LSE * log2(e) of every query
//     row into scratch rows padded to whole query tiles (padding: 0 and +inf),
//     eight lanes a row.
//   dQ (FJ_BACKWARD_DQ): a block of 128 query rows; per key tile j
//       S_j = Q K_j^T, dP_j = dO V_j^T       wgmma from shared memory
//       dQ += dS_{j-1} K_{j-1}               wgmma, dS in registers, issued with them
//       dS_j = P_j (dP_j - delta) scale      while dQ's product runs
//   dK/dV (FJ_BACKWARD_DKDV): a block of 128 keys; per tile t of queries of every
//     query head of the GQA group (Q_t, dO_t, and LSE and delta by bulk copy)
//       S^T = K Q_t^T, dP^T = V dO_t^T      wgmma from shared memory
//       dV += P^T_{t-1} dO_{t-1}, dK += dS^T_{t-1} Q_{t-1}    from registers
//     Above head dim 128 the dK and dV accumulators do not both fit in the
//     consumers' registers: a kernel with FJ_WITH_DV alone computes dV (no V,
//     no dP^T), one with FJ_WITH_DK alone dK.
//   one pass (FJ_BACKWARD_DKDV with FJ_ONE_PASS, head dims 64 and 128): the dK/dV
//     kernel also forms dQ, five products a tile pair instead of the split's seven.
//     Each consumer writes its 64 keys of dS_t to shared memory (stmatrix,
//     transposed: [queries][keys], K-major), and two steps later, when the other
//     consumer's half is surely written, multiplies
//       dQ_t^T = K^T dS_t^T                 wgmma, K MN-major, dS K-major
//     for its share (head dim 128: 64 of dQ's columns; 64: half the queries). Four dS
//     buffers: the other consumer may finish reading dS_t as late as its step t + 2,
//     which can come after this consumer's turn of step t + 3 (whole steps: two, dS_t
//     read in its own step). The
//     partial sums of a query tile's dQ meet in float32 in global memory in a fixed
//     order, so that the result is bitwise reproducible: the key blocks that see a
//     tile add in ascending order, each waiting on a counter a chunk until the
//     blocks before it have added (a block counts its adds to a tile when it next
//     adds, so that the fence before the count finds them done; with FJ_DQ_DIAGNOSTIC
//     3, "eager", right after them, by one thread); the first stores,
//     the last adds what is there to its own and writes dQ. (FJ_WHOLE_STEPS, head dim 128: steps
//     of twice the queries whose products, S^T and dP^T, then dV, dK and dQ_t^T, take two turns
//     of their own, dS_t read in the same step; FJ_WHOLE_STEPS 2: the same steps with no turns
//     between the consumers; below.) Blocks walk their
//     query tiles from the last down, heads of a group inside, so that every block
//     of a head meets a tile at about the same step (a lag of about a step a block,
//     not a block's whole span), and a
//     block waits only on blocks of lower index, launched before it. With
//     FJ_DQ_DIAGNOSTIC 4, "arrival", a fixed order too, but one that blocks running in
//     step meet without waiting: each block walks its tiles upward from its diagonal
//     tile, round to its first after its last, and a tile's visitors add in the
//     order they reach it (bounds_core.h's KeyBlockSpans), which needs every block of
//     a head resident at once (the host runs it only where they fit). With
//     FJ_DQ_DIAGNOSTIC 5 to 8 ("writer", "writer-arrival", "writer-eager", "writer-groups") the
//     consumers stage their shares in shared memory and a writer thread adds them in bulk copies
//     in those orders (8: a tile's visitors in four groups by rank, each group's sums its own);
//     the last visitor adds too, and dQ is written from the sums by
//   dQ convert (FJ_BACKWARD_DQ_CONVERT): a block of a query tile's scratch rows, after
//     the one pass.
//
// A tile that serves two steps (K_j in dQ, Q_t and dO_t in dK/dV) has a ring of
// kStages + 1 buffers. The per-element gradient and the stores are
// gradient.cuh's.
#pragma once

namespace flashjit {
namespace mma {

static_assert(kRowTiles == 1 && kWarps == 8 && kBlockM == 128, "two consumer warpgroups of 64 rows");
static_assert(kDimQk % 64 == 0 && kDimV % 64 == 0, "head dims padded to whole swizzled regions");
constexpr bool kVarlenKernel = FJ_VARLEN;  // FJ_VARLEN: a variable-length batch (KernelParams::varlen)
// The one pass's dQ sums in groups (writer-groups: shared_layout.h's kDqGroups), else one.
constexpr int kDqGroups = layout::dq_groups(FJ_DQ_DIAGNOSTIC);

#if FJ_BACKWARD_PREP || FJ_BACKWARD_DQ_CONVERT
// Where scratch row `row` belongs: its sequence's parameters (a variable-length batch's entry's,
// sequence_params; else the call's), the batch index its operands take, its head and query row,
// and whether the scratch has the row at all (a variable-length batch's grid may be a bound).
struct ScratchRow {
  bool in_scratch;
  int b, h;
  long long i;
#if FJ_VARLEN
  KernelParams sequence;
  FJ_DEVICE const KernelParams& params(const KernelParams&) const { return sequence; }
#else
  FJ_DEVICE const KernelParams& params(const KernelParams& p) const { return p; }
#endif
};
FJ_DEVICE ScratchRow scratch_row(const KernelParams& p, long long row) {
#if FJ_VARLEN  // scratch rows entry by entry: an entry's heads, each padded to whole dQ tiles of scratch_pitch rows
  const int query_tiles = varlen_tiles(p, kFirstQueryTile);
  const int last_tile = max(query_tiles - 1, 0);
  const int entry = varlen_entry(p, kFirstQueryTile, static_cast<int>(min(row / p.scratch_pitch, 0LL + last_tile)));
  const long long first_row = static_cast<long long>(p.varlen[entry * kVarlenFields + kFirstQueryTile]) * p.scratch_pitch;
  const long long local = row - first_row;
  const KernelParams sequence = sequence_params(p, entry);
  const int h = static_cast<int>(local / sequence.scratch_pitch);
  return ScratchRow{row < static_cast<long long>(query_tiles) * p.scratch_pitch, 0, h,
                    local - h * sequence.scratch_pitch, sequence};
#else
  const long long batch_head = row / p.scratch_pitch;
  const int b = static_cast<int>(batch_head / p.heads_q);
  const int h = static_cast<int>(batch_head - static_cast<long long>(b) * p.heads_q);
  return ScratchRow{row < static_cast<long long>(p.batch) * p.heads_q * p.scratch_pitch, b, h,
                    row - batch_head * p.scratch_pitch};
#endif
}
#endif

#if FJ_BACKWARD_PREP
// Eight lanes a row, each reading 16-byte vectors of O and dO where the row's
// address and the head dim allow it (element by element otherwise).
extern "C" __global__ void __launch_bounds__(kThreads + kProducerThreads)
    fj_attention_backward_prep(const KernelParams p) {
  constexpr int kLanesPerRow = 8;
  constexpr int kVector = 8;  // 16-bit elements in 16 bytes
  constexpr int kRowsPerBlock = (kThreads + kProducerThreads) / kLanesPerRow;
  const long long row = static_cast<long long>(blockIdx.x) * kRowsPerBlock + threadIdx.x / kLanesPerRow;
  const int lane = threadIdx.x % kLanesPerRow;
  float delta = 0.0f;
  float lse2 = -negative_infinity<float>();
  const ScratchRow place = scratch_row(p, row);
  const KernelParams& sp = place.params(p);
  const bool in_scratch = place.in_scratch;
  const int h = place.h, ob = place.b;
  const long long i = place.i;
  if (in_scratch && i < sp.seqlen_q) {
    const elem_t* o_row = operand_row<const elem_t>(sp.o, ob, h, i);
    const elem_t* dout_row = operand_row<const elem_t>(sp.dout, ob, h, i);
    const bool vectors = p.head_dim_v % kVector == 0 &&
                         ((reinterpret_cast<unsigned long long>(o_row) |
                           reinterpret_cast<unsigned long long>(dout_row)) % 16) == 0;
    if (vectors) {
      for (int d = lane * kVector; d < p.head_dim_v; d += kLanesPerRow * kVector) {
        alignas(16) elem_t o_part[kVector];
        alignas(16) elem_t dout_part[kVector];
        *reinterpret_cast<uint4*>(o_part) = *reinterpret_cast<const uint4*>(o_row + d);
        *reinterpret_cast<uint4*>(dout_part) = *reinterpret_cast<const uint4*>(dout_row + d);
#pragma unroll
        for (int e = 0; e < kVector; ++e) delta += to_float(o_part[e]) * to_float(dout_part[e]);
      }
    } else {
      for (int d = lane; d < p.head_dim_v; d += kLanesPerRow) delta += to_float(o_row[d]) * to_float(dout_row[d]);
    }
    lse2 = lse_log2(*operand_row<const float>(sp.lse, ob, h, i));
  }
#pragma unroll
  for (int offset = kLanesPerRow / 2; offset >= 1; offset /= 2) delta += __shfl_xor_sync(0xffffffffu, delta, offset);
  if (in_scratch && lane == 0) {
    static_cast<float*>(p.delta)[row] = delta;
    static_cast<float*>(p.lse_log2)[row] = lse2;
  }
  // The parts' counters of the split dK/dV kernel (FJ_DKDV_PARTS), over the whole grid.
  for (long long c = static_cast<long long>(blockIdx.x) * blockDim.x + threadIdx.x; c < p.dkdv_counter_count;
       c += static_cast<long long>(gridDim.x) * blockDim.x) {
    p.dkdv_counters[c] = 0;
  }
  if (p.dq_semaphore != nullptr) {  // the one-pass backward follows
    if (lane == 0 && row < p.dq_counters) p.dq_semaphore[row] = 0;
    // The atomic one pass's sums (16-byte aligned, a multiple of 4 floats), over the whole grid.
    const long long vectors = p.dq_zero_floats / 4;
    for (long long f = static_cast<long long>(blockIdx.x) * blockDim.x + threadIdx.x; f < vectors;
         f += static_cast<long long>(gridDim.x) * blockDim.x) {
      reinterpret_cast<float4*>(p.dq_accum)[f] = make_float4(0.0f, 0.0f, 0.0f, 0.0f);
    }
    // No key block sees a query tile whose rows see no key: their dQ rows are zeros, written here.
    if (in_scratch && i < sp.seqlen_q && key_begin(sp, i) >= key_end(sp, i)) {
      elem_t* dq_row = operand_row<elem_t>(sp.dq, ob, h, i);
      for (int d = lane; d < p.head_dim_qk; d += kLanesPerRow) dq_row[d] = elem_t{0};
    }
  }
}
#endif  // FJ_BACKWARD_PREP

#if FJ_BACKWARD_DQ_CONVERT
// After the one pass with a dQ writer, or its atomic adds: dQ from its float32 sums
// (writer-groups: the groups' sums added in group order), one query tile (kBlockN scratch rows,
// the one pass's step) a block. The sums of a tile are its two consumers' chunks in their
// accumulators' order (float4 i of a chunk: thread i % 128's fragment i / 128); a tile no key
// block visited (its counts are 0) has no sums, and its rows, which see no key, the prep kernel
// zeroed. Through shared memory, so that the rows are written whole.
extern "C" __global__ void __launch_bounds__(kThreads + kProducerThreads)
    fj_attention_backward_dq_convert(const KernelParams p) {
  constexpr int kDqQueries = kDimQk == 128 ? kBlockN : kBlockN / 2;  // the dK/dV kernel's, as there
  constexpr int kDqChunk = layout::dkdv_dq_chunk_floats(kBlockN, kDimQk);
  constexpr int kPitch = kDimQk + 4;  // floats a row: the fragments' stores meet no bank twice
  __shared__ __align__(16) float tile[kBlockN * kPitch];
  const long long row0 = static_cast<long long>(blockIdx.x) * kBlockN;
  const ScratchRow place = scratch_row(p, row0);
  const KernelParams& sp = place.params(p);
  const int ob = place.b;
  const long long first_chunk = row0 / kBlockN * kConsumers;
  // (Group 0 holds every visited tile's first visitor.) The atomic sums count no visitor: a tile
  // none visited holds the prep kernel's zeros, which are its rows' dQ (they see no key).
  constexpr bool kAtomic = layout::dq_atomic(FJ_DQ_DIAGNOSTIC);
  if (!place.in_scratch || place.i >= sp.seqlen_q || (!kAtomic && p.dq_semaphore[first_chunk] == 0)) return;
  const float* const sums = p.dq_accum + first_chunk * kDqChunk;
  // writer-groups: the later groups' sums of the tile, those that had a visitor (groups fill in
  // order), added in group order.
  const long long group_chunks = p.dq_counters / kDqGroups;
  int groups = 1;
  while (groups < kDqGroups && p.dq_semaphore[groups * group_chunks + first_chunk] != 0) ++groups;
  for (int f = threadIdx.x; f < kConsumers * kDqChunk / 4; f += blockDim.x) {
    const int consumer = f / (kDqChunk / 4), index = f % (kDqChunk / 4);
    const int thread = index % 128, n = index / 128, lane = thread % 32;
    float4 v = *reinterpret_cast<const float4*>(sums + static_cast<long long>(f) * 4);
#pragma unroll
    for (int group = 1; group < kDqGroups; ++group) {
      if (group >= groups) break;
      const float4 more =
          *reinterpret_cast<const float4*>(sums + (group * group_chunks * kDqChunk + static_cast<long long>(f) * 4));
      v.x += more.x;
      v.y += more.y;
      v.z += more.z;
      v.w += more.w;
    }
    const float values[4] = {v.x, v.y, v.z, v.w};
#pragma unroll
    for (int e = 0; e < 4; ++e) {
      const int d = (kDimQk == 128 ? consumer * 64 : 0) + (thread / 32) * 16 + lane / 4 + 8 * (e / 2);
      const int q = (kDimQk == 128 ? 0 : consumer * kDqQueries) + n * 8 + (lane % 4) * 2 + e % 2;
      tile[q * kPitch + d] = values[e];
    }
  }
  __syncthreads();
  constexpr int kVector = 8;  // 16-bit elements in 16 bytes
  for (int f = threadIdx.x; f < kBlockN * (kDimQk / kVector); f += blockDim.x) {
    const int q = f / (kDimQk / kVector), d0 = f % (kDimQk / kVector) * kVector;
    const long long i = place.i + q;
    if (i >= sp.seqlen_q || d0 >= p.head_dim_qk) continue;
    elem_t* const dq_row = operand_row<elem_t>(sp.dq, ob, place.h, i);
    const float* const from = tile + q * kPitch + d0;
    if (d0 + kVector <= p.head_dim_qk && reinterpret_cast<unsigned long long>(dq_row + d0) % 16 == 0) {
      alignas(16) elem_t out[kVector];
#pragma unroll
      for (int e = 0; e < kVector; ++e) out[e] = from_float<elem_t>(from[e]);
      *reinterpret_cast<uint4*>(dq_row + d0) = *reinterpret_cast<const uint4*>(out);
    } else {
      for (int e = 0; e < kVector && d0 + e < p.head_dim_qk; ++e) dq_row[d0 + e] = from_float<elem_t>(from[e]);
    }
  }
}
#endif  // FJ_BACKWARD_DQ_CONVERT

#if FJ_BACKWARD_DQ
constexpr int kKeyBuffers = kStages + 1;  // K_j serves S_j, then dQ += dS_j K_j a step later

extern "C" __global__ void __launch_bounds__(kThreads + kProducerThreads, 1)
    fj_attention_backward_dq(const __grid_constant__ KernelParams p) {
  extern __shared__ __align__(1024) unsigned char shared_raw[];
#if FJ_BACKWARD_OVERLAP
  // The dK/dV kernel, launched programmatically after this one, may start once every block of
  // this grid has begun: it reads nothing this kernel writes.
  let_dependents_launch();
#endif
  constexpr layout::HopperBackwardDq kLayout = layout::hopper_backward_dq(kBlockM, kBlockN, kDimQk, kDimV, kStages);
  static_assert(kLayout.v_ring - kLayout.k_ring == Ring<kKeyBuffers>::kBarriers * layout::kBarrierBytes &&
                    kLayout.bytes - kLayout.v_ring == Ring<kStages>::kBarriers * layout::kBarrierBytes,
                "shared_layout.h sizes the rings as pipeline.cuh does");
  unsigned char* const base = aligned_for_swizzle(shared_raw);
  elem_t* q_tile = reinterpret_cast<elem_t*>(base + kLayout.q_tile);        // [kBlockM][kDimQk]
  elem_t* dout_tile = reinterpret_cast<elem_t*>(base + kLayout.dout_tile);  // [kBlockM][kDimV]
  elem_t* k_tiles = reinterpret_cast<elem_t*>(base + kLayout.k_tiles);      // kKeyBuffers x [kBlockN][kDimQk]
  elem_t* v_tiles = reinterpret_cast<elem_t*>(base + kLayout.v_tiles);      // kStages x [kBlockN][kDimV]
  unsigned long long* rows_full = reinterpret_cast<unsigned long long*>(base + kLayout.rows_full);
  const Ring<kKeyBuffers> k_ring = Ring<kKeyBuffers>::at(reinterpret_cast<unsigned long long*>(base + kLayout.k_ring));
  const Ring<kStages> v_ring = Ring<kStages>::at(reinterpret_cast<unsigned long long*>(base + kLayout.v_ring));
#if FJ_VARLEN
  // The grid may be a bound (a table built on the device): blocks past the tiles have no work.
  if (static_cast<int>(blockIdx.x) >= varlen_tiles(p, kFirstQueryTile)) return;
  const int entry = varlen_entry(p, kFirstQueryTile, static_cast<int>(blockIdx.x));
  const KernelParams sp = sequence_params(p, entry);
  const QueryBlock block(sp, static_cast<int>(blockIdx.x) - p.varlen[entry * kVarlenFields + kFirstQueryTile]);
#else
  const KernelParams& sp = p;
  const QueryBlock block(p);
#endif
  const int b = block.b, h = block.h;
  const long long q_row0 = kVarlenKernel ? sp.q_row0 : 0, k_row0 = kVarlenKernel ? sp.k_row0 : 0;

  const auto init = [&] {
    mbarrier_init(rows_full, 1);
    k_ring.init();
    v_ring.init();
  };
  const auto produce = [&] {
    if (block.tiles == 0) return;
    prefetch_tensor_map(p.q_map);
    prefetch_tensor_map(p.dout_map);
    prefetch_tensor_map(p.k_map);
    prefetch_tensor_map(p.v_map);
    mbarrier_expect_bytes(rows_full, kTileBytes<kBlockM, kDimQk> + kTileBytes<kBlockM, kDimV>);
    tma_load_tile<kBlockM, kDimQk>(q_tile, p.q_map, q_row0 + block.first_query, h, b, rows_full);
    tma_load_tile<kBlockM, kDimV>(dout_tile, p.dout_map, q_row0 + block.first_query, h, b, rows_full);
    for (int j = 0; j < block.tiles; ++j) {
      const int k_buffer = k_ring.produce(j, kTileBytes<kBlockN, kDimQk>);
      tma_load_tile<kBlockN, kDimQk>(k_tiles + k_buffer * kBlockN * kDimQk, p.k_map, k_row0 + block.tile_start(j),
                                     block.kv_head, b, &k_ring.full[k_buffer]);
      const int v_buffer = v_ring.produce(j, kTileBytes<kBlockN, kDimV>);
      tma_load_tile<kBlockN, kDimV>(v_tiles + v_buffer * kBlockN * kDimV, p.v_map, k_row0 + block.tile_start(j),
                                    block.kv_head, b, &v_ring.full[v_buffer]);
    }
  };
  const auto consume = [&](int warpgroup) {
    // Broadcast from lane 0 (as the forward's consumers do), so that ptxas keeps what derives from
    // it (the operands' rows, the wgmma descriptors) in uniform registers rather than rebuilding it
    // in vector ones and moving it over (R2UR) at every product.
    const int consumer = __shfl_sync(0xffffffffu, warpgroup, 0);
    const int warp = threadIdx.x / 32 - 4;  // consumer warp 0..7; rows warp * 16 .. + 15 of the block
    const int lane = threadIdx.x % 32;
    const int quad = lane % 4;
    const long long batch_head = static_cast<long long>(b) * p.heads_q + h;
    long long rows[2];
    rows[0] = block.first_query + warp * 16 + lane / 4;
    rows[1] = rows[0] + 8;
    const long long consumer_first = block.first_query + consumer * 64;
    const QueryBlock::Interior interior = block.interior_tiles(sp, consumer_first, consumer_first + 64 <= sp.seqlen_q);
    const float scale_log2 = static_cast<float>(p.scale) * kLog2e;
    float lse2[2], delta[2];
#pragma unroll
    for (int r = 0; r < 2; ++r) {
      lse2[r] = static_cast<const float*>(sp.lse_log2)[batch_head * sp.scratch_pitch + rows[r]];
      delta[r] = static_cast<const float*>(sp.delta)[batch_head * sp.scratch_pitch + rows[r]];
    }

    float dq[kDimQk / 8][4];
    zero(dq);
    if (block.tiles > 0) {
      mbarrier_wait(rows_full, 0);
      float s[kBlockN / 8][4], dp[kBlockN / 8][4];
      unsigned dscore[kBlockN / 16][4];
      consumer_schedule(
          consumer, block.tiles,
          [&](int j) {  // K_j and V_j
            if (j < block.tiles) {
              k_ring.consume(j);
              v_ring.consume(j);
            }
          },
          [&](int j) {  // S_j = Q K_j^T, dP_j = dO V_j^T
            wgmma_rows_by_rows<kBlockM, kBlockN, kDimQk>(s, q_tile, consumer * 64,
                                                         k_tiles + k_ring.buffer(j) * kBlockN * kDimQk);
            wgmma_rows_by_rows<kBlockM, kBlockN, kDimV>(dp, dout_tile, consumer * 64,
                                                        v_tiles + v_ring.buffer(j) * kBlockN * kDimV);
          },
          [&](int j) {  // dS_j in place of S_j, beside dQ += dS_{j-1} K_{j-1}
            pin(s);
            pin(dp);
            v_ring.release(j, lane);
            if (interior.contains(j)) {
              dq_tile_gradient<true>(s, dp, sp, rows, lse2, delta, block.tile_start(j), b, h, batch_head, quad,
                                     scale_log2);
            } else {
              dq_tile_gradient<false>(s, dp, sp, rows, lse2, delta, block.tile_start(j), b, h, batch_head, quad,
                                      scale_log2);
            }
          },
          [&](int j) {  // dQ += dS_j K_j
            wgmma_fragments_by_rows<kBlockN, kDimQk>(dq, dscore, k_tiles + k_ring.buffer(j) * kBlockN * kDimQk);
          },
          [&](int j) {
            pin(dq);
            pin(dscore);
            k_ring.release(j, lane);
          },
          [&](int) { to_fragments<kBlockN>(dscore, s); });
    }
    store_rows<kDimQk>(sp.dq, b, h, rows, sp.seqlen_q, p.head_dim_qk, dq, quad);
  };
  specialised_roles(init, produce, consume);
}
#endif  // FJ_BACKWARD_DQ

#if FJ_BACKWARD_DKDV
constexpr int kQueryBuffers = kStages + 1;  // Q_t and dO_t serve step t, then dK and dV a step later
constexpr bool kWithDv = FJ_WITH_DV;
constexpr bool kWithDk = FJ_WITH_DK;  // needs V and dP^T
constexpr bool kOnePass = FJ_ONE_PASS;  // dQ too
// FJ_WHOLE_STEPS (the one pass at head dim 128, FLASHJIT_CUDA_ONE_PASS_STEPS=whole): each step's
// products in two turns of its own (S^T and dP^T; then dV, dK and dQ^T of the same tile), nothing
// carried into the next step, so that a step of twice the queries fits the consumers' registers
// (dK and dV 128 a thread, S^T and dP^T 32 each at 64 queries, then P^T and dS^T packed 16 each
// and dQ^T's share 32). The two consumers' turns still alternate, so that one's gradient runs
// beside the other's products: the second consumer's gradient beside the first's dV and dK, which
// the first issues before it waits (within its turn) for the second's half of dS_t, then issues
// dQ_t; the first's gradient beside the second's S^T and dP^T. A dS buffer is written again two
// steps on, after both consumers have waited for the products that read it: two buffers.
constexpr bool kWholeSteps = FJ_WHOLE_STEPS != 0;  // 1: in turns; 2: concurrent (no turns)
// FJ_STEP_TRACE(statement): the statement where the one pass is traced (StepTrace, below), else nothing.
#if FJ_TRACE
#define FJ_STEP_TRACE(statement) statement
#else
#define FJ_STEP_TRACE(statement) ((void)0)
#endif
static_assert(!kWholeSteps || (kOnePass && kDimQk == 128), "whole steps: the one pass at head dim 128");
// FJ_DQ_DIAGNOSTIC 4 (FLASHJIT_CUDA_ONE_PASS_DQ=arrival): the one pass's blocks walk their tiles
// upward, cyclically from each one's diagonal tile, and a tile's visitors add in the order they
// reach it (KeyBlockSpans' arrival order), each count released right after the adds as with 3;
// the host runs it only where every key block of a head can be resident at once.
// (6: the arrival order's sums made by the dQ writer, below.)
#define FJ_DQ_ARRIVAL (FJ_DQ_DIAGNOSTIC == 4 || FJ_DQ_DIAGNOSTIC == 6)
#define FJ_DQ_WRITER ((FJ_DQ_DIAGNOSTIC >= 5 && FJ_DQ_DIAGNOSTIC <= 8) || FJ_DQ_DIAGNOSTIC == 10 || FJ_DQ_DIAGNOSTIC == 11)
#define FJ_DQ_PAIR (FJ_DQ_DIAGNOSTIC == 10 || FJ_DQ_DIAGNOSTIC == 11)
constexpr bool kArrival = FJ_DQ_ARRIVAL;
static_assert(!kArrival || kOnePass, "the arrival order is the one pass's");
// FJ_DQ_DIAGNOSTIC 5 (FLASHJIT_CUDA_ONE_PASS_DQ=writer): the block order's sums, but the waits, adds
// and counts are not the consumers': each stages its share of dQ_t in shared memory and goes on,
// and one thread of the producer warpgroup's other warps (the dQ writer) adds both shares of a tile
// in bulk copies from shared memory (cp.reduce.async.bulk), the last visitor too: dQ is written
// from the sums by the fj_attention_backward_dq_convert kernel after the pass. 6
// (writer-arrival): the same in the arrival order. 7 (writer-eager): the block order with each
// count released as the arrival order's are (below), for comparison. 8 (writer-groups): as 5, a
// tile's visitors dealt into layout::kDqGroups groups by rank, each summing into sums of its own
// (shared_layout.h), which the convert kernel adds in group order. 10 (writer-pair): as 5, but two
// writer threads take alternate tiles, each releasing a tile's counts as soon as its copies are
// complete (the block above then waits for one handoff, not for this block's next tile). 11
// (writer-diagonal): as 10, but each block walks its tiles upward from its first (for causal
// bounds its diagonal tile) and a tile's visitors add in descending block order, the highest
// first: the order in which, running in step, they reach it, so that under causal bounds a block
// seldom waits; a head's key blocks launch from the highest down, so that a block waits only on
// blocks launched before it.
constexpr bool kWriter = FJ_DQ_WRITER;
constexpr bool kDiagonal = FJ_DQ_DIAGNOSTIC == 11;
// The writer's staging slots a consumer (KernelSpec::dq_slots): 2; 1 (10 and 11 only) where that
// gives whole steps room for two Q/dO buffers ahead.
constexpr int kDqSlots = FJ_DQ_SLOTS;
static_assert(!kWriter || kOnePass, "the dQ writer is the one pass's");
// FJ_DKDV_SHARED: P^T and dS^T go through shared memory (two [kBlockM keys][kBlockN queries]
// tiles, K-major, each warp its own 16 keys) for the dV and dK products, which then take both
// operands from shared memory; the registers that held them let twice the queries a step fit
// (head dim 128: 64, 64: 128). One buffer each: prepare(t) writes them after step t's wait for
// t - 1's products.
constexpr bool kSharedOperands = FJ_DKDV_SHARED;
static_assert(!kSharedOperands || (!kOnePass && kWithDv && kWithDk), "shared operands: the split dK/dV kernel");
// (A swizzled row holds 64 columns: a tile of fewer would take the room of 64.)
static_assert(!kSharedOperands || kBlockN % 64 == 0, "shared operands: whole 64-query regions");

#if FJ_DKDV_SHARED
// A warp's 16 keys x 16 queries from `column` (an A fragment, a_from_c) into a [kBlockM][kBlockN]
// tile at its own rows: four 8 x 8 matrices, lane l naming row l % 8 of matrix l / 8 (keys + 8
// for odd matrices, queries + 8 for the last two).
FJ_DEVICE void store_operand_rows(elem_t* tile, const unsigned (&a)[4], int first_key, int column, int lane) {
  const int matrix = lane / 8;
  const int key = first_key + (matrix % 2) * 8 + lane % 8;
  const int query = column + (matrix / 2) * 8;
  asm volatile("stmatrix.sync.aligned.m8n8.x4.shared.b16 [%0], {%1, %2, %3, %4};\n" ::"r"(
                   shared_address(tile + tile_offset<kBlockM, kBlockN>(key, query))),
               "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3])
               : "memory");
}
#endif

#if FJ_DKDV_PARTS
// Named barrier past the turns (pipeline.cuh: 1, 2): the consumers' part sums written. (The one
// pass numbers its dS barriers from the same place; the two never meet in one kernel.)
constexpr int kPartsBarrier = kTurnBarrier + kConsumers;
static_assert(kWithDv && kWithDk && kBlockM == 128, "parts: dK and dV of a two-consumer block");
// visit(offset in a part's slot, accumulator, e) for each pair (e, e + 1) of a consumer thread's dK
// then dV accumulators: a slot is the key block's 128 rows of dK then dV columns, in float32.
template <class Visit>
FJ_DEVICE void each_part_pair(float (&dk)[kDimQk / 8][4], float (&dv)[kDimV / 8][4], int row0, int quad, Visit visit) {
  constexpr int kRowFloats = kDimQk + kDimV;
#pragma unroll
  for (int r = 0; r < 2; ++r) {
#pragma unroll
    for (int n = 0; n < kDimQk / 8; ++n) visit((row0 + 8 * r) * kRowFloats + n * 8 + quad * 2, dk[n], 2 * r);
#pragma unroll
    for (int n = 0; n < kDimV / 8; ++n) visit((row0 + 8 * r) * kRowFloats + kDimQk + n * 8 + quad * 2, dv[n], 2 * r);
  }
}
#endif

#if FJ_ONE_PASS
static_assert(kWithDv && kWithDk && (kDimQk == 64 || kDimQk == 128), "one pass: dK and dV, head dim 64 or 128");
// A consumer's share of dQ_t^T: head dim 128, 64 of the columns for every query of the
// step; 64, every column for half the queries.
constexpr int kDqQueries = kDimQk == 128 ? kBlockN : kBlockN / 2;
static_assert(kDqQueries % 8 == 0, "whole 8-row groups of the dS tile a consumer (wgmma n8 and up)");
// Floats a consumer adds a tile (128 threads' accumulators), as shared_layout.h sizes the staged dQ.
constexpr int kDqChunk = layout::dkdv_dq_chunk_floats(kBlockN, kDimQk);
static_assert(kDqChunk == 128 * kDqQueries / 2, "a consumer's accumulators of its share");
constexpr int kDsBuffers = layout::dkdv_ds_buffers(true, false, kWholeSteps);
static_assert(!kWholeSteps || kWriter || layout::dq_atomic(FJ_DQ_DIAGNOSTIC),
              "whole steps: dQ staged for the writer or added at once (the host's rule)");
// Named barriers past the turns (pipeline.cuh: 1, 2): dS_t of consumer c written, one for
// each of the kDsBuffers tiles in flight (3 + kDsBuffers * c + t % kDsBuffers), and each
// consumer's own (3 + 2 * kDsBuffers + c) around its adds.
constexpr int kDsBarrier = kTurnBarrier + kConsumers;
constexpr int kAddBarrier = kDsBarrier + kConsumers * kDsBuffers;
constexpr int kWalksBarrier = kAddBarrier + kConsumers;  // arrival order: the walks' table written
static_assert(kWalksBarrier + 1 <= 16, "16 named barriers");
// The dQ writer's threads (warps 1 to 3 of the producer warpgroup), which meet at kAddBarrier (the
// consumers do not use it then).
constexpr int kWriterThreads = 96;

// dS^T of a warp's 16 keys and 16 queries from `column` (an A fragment, a_from_c) into the dS
// tile [kBlockN queries][kBlockM keys] transposed: four 8 x 8 matrices, lane l naming row
// l % 8 of matrix l / 8 (keys + 8 for odd matrices, queries + 8 for the last two).
FJ_DEVICE void store_ds_transposed(elem_t* ds_tile, const unsigned (&a)[4], int first_key, int column, int lane) {
  const int matrix = lane / 8;
  const int query = column + (matrix / 2) * 8 + lane % 8;
  const int key = first_key + (matrix % 2) * 8;
  asm volatile("stmatrix.sync.aligned.m8n8.x4.trans.shared.b16 [%0], {%1, %2, %3, %4};\n" ::"r"(
                   shared_address(ds_tile + tile_offset<kBlockN, kBlockM>(query, key))),
               "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3])
               : "memory");
}

FJ_DEVICE int load_acquire(const int* address) {
  int value;
  asm volatile("ld.acquire.gpu.global.b32 %0, [%1];\n" : "=r"(value) : "l"(address) : "memory");
  return value;
}
// A trap out of line: inlined, ptxas reserves for it in the whole kernel and spills.
__device__ __noinline__ void trap_stuck_wait() { __trap(); }
FJ_DEVICE unsigned long long global_nanoseconds() {
  unsigned long long now;
  asm volatile("mov.u64 %0, %%globaltimer;" : "=l"(now));
  return now;
}
// Until the counter reaches `count`: spinning, then napping. A legitimate wait is a few steps of
// the blocks before it in the tile's order (under a millisecond); one of 30 seconds can only be a
// bug in the blocks' order, and traps (a launch error, which leaves the process's CUDA context
// unusable) rather than hang the device.
FJ_DEVICE void wait_for_count(const int* counter, int count) {
  unsigned long long since = 0;
  for (unsigned tries = 0; load_acquire(counter) != count; ++tries) {
    if (tries < 64) continue;
    __nanosleep(100);
    if (tries == 64) since = global_nanoseconds();
    if (tries % 1024 == 0 && global_nanoseconds() - since > 30000000000ull) trap_stuck_wait();
  }
}
#if FJ_TRACE && FJ_BACKWARD_DKDV
// A diagnostic (FLASHJIT_CUDA_TRACE=1 with the one pass in whole-concurrent steps;
// scripts/trace_backward.py): blocks below kBackwardTraceBlocks keep, for their first
// kBackwardTraceSteps steps, clock64() at up to seven points of a step (fields 1-7; field 0
// unused), for the first thread of each consumer warpgroup (slots 1, 2) and each dQ writer thread
// (slots 0, 3), in KernelParams::trace; a last row a slot holds the block's coordinates and its
// start and end (global nanoseconds and clock64()). The host zeroes and prints them (backend.cpp,
// run_traced).
static_assert(FJ_WHOLE_STEPS == 2, "the backward's trace: the one pass in whole-concurrent steps");
static_assert(kConsumers == 2, "the backward's trace: slots 1 and 2 for the consumers, 0 and 3 the writers");
struct StepTrace {
  long long* row = nullptr;  // this thread's first step's fields, or nullptr
  FJ_DEVICE StepTrace(const KernelParams& p, int slot, bool traced_thread) {
    if (p.trace != nullptr && blockIdx.x < kBackwardTraceBlocks && traced_thread) {
      row = p.trace + (static_cast<long long>(blockIdx.x) * kTraceSlots + slot) * (kBackwardTraceSteps + 1) * kTraceFields;
    }
  }
  FJ_DEVICE void mark(int step, int point) const {
    if (row != nullptr && step < kBackwardTraceSteps) row[step * kTraceFields + point] = clock64();
  }
  FJ_DEVICE void note(int step, int point, long long value) const {
    if (row != nullptr && step < kBackwardTraceSteps) row[step * kTraceFields + point] = value;
  }
  // The last row: key block, batch, key/value head, steps, then start and end (global nanoseconds
  // and clock64()).
  FJ_DEVICE void begin(int key_block, int batch, int kv_head, int steps) const {
    if (row == nullptr) return;
    long long* const last = row + kBackwardTraceSteps * kTraceFields;
    last[0] = key_block;
    last[1] = batch;
    last[2] = kv_head;
    last[3] = steps;
    last[4] = static_cast<long long>(global_nanoseconds());
    last[6] = clock64();
  }
  FJ_DEVICE void end() const {
    if (row == nullptr) return;
    long long* const last = row + kBackwardTraceSteps * kTraceFields;
    last[5] = static_cast<long long>(global_nanoseconds());
    last[7] = clock64();
  }
};
#endif
// The dQ writer's handoffs with the consumers: mbarrier_wait, with the same 30-second trap (a wait
// of a step or two is legitimate; a lost arrival would otherwise hang the device).
FJ_DEVICE void wait_for_phase(unsigned long long* barrier, unsigned parity) {
  unsigned long long since = 0;
  for (unsigned tries = 0; !mbarrier_try_wait(barrier, parity); ++tries) {
    if (tries == 64) since = global_nanoseconds();
    if (tries > 64 && tries % 1024 == 0 && global_nanoseconds() - since > 30000000000ull) trap_stuck_wait();
  }
}
FJ_DEVICE void add_release(int* address, int value) {
  asm volatile("red.release.gpu.global.add.s32 [%0], %1;\n" ::"l"(address), "r"(value) : "memory");
}
// A release fence and the counts after it (PTX's release pattern: one fence for several counts).
FJ_DEVICE void fence_release_gpu() { asm volatile("fence.acq_rel.gpu;\n" ::: "memory"); }
FJ_DEVICE void add_relaxed(int* address, int value) {
  asm volatile("red.relaxed.gpu.global.add.s32 [%0], %1;\n" ::"l"(address), "r"(value) : "memory");
}
// How many of the `threads` threads meeting at named barrier `id` hold `predicate` (a barrier
// that also counts; every thread of each warp must reach it).
FJ_DEVICE int count_at_barrier(int id, int threads, bool predicate) {
  int count;
  asm volatile(
      "{\n"
      ".reg .pred p;\n"
      "setp.ne.u32 p, %3, 0;\n"
      "bar.red.popc.u32 %0, %1, %2, p;\n"
      "}\n"
      : "=r"(count)
      : "r"(id), "r"(threads), "r"(predicate ? 1 : 0)
      : "memory");
  return count;
}
FJ_DEVICE void store_float4(float* address, const float (&v)[4]) {
  asm volatile("st.global.v4.f32 [%0], {%1, %2, %3, %4};\n" ::"l"(address), "f"(v[0]), "f"(v[1]), "f"(v[2]),
               "f"(v[3])
               : "memory");
}
FJ_DEVICE void add_float4(float* address, const float (&v)[4]) {
  asm volatile("red.global.add.v4.f32 [%0], {%1, %2, %3, %4};\n" ::"l"(address), "f"(v[0]), "f"(v[1]), "f"(v[2]),
               "f"(v[3])
               : "memory");
}
FJ_DEVICE void store_shared_float4(float* address, const float (&v)[4]) {
  asm volatile("st.shared.v4.f32 [%0], {%1, %2, %3, %4};\n" ::"r"(shared_address(address)), "f"(v[0]), "f"(v[1]),
               "f"(v[2]), "f"(v[3])
               : "memory");
}
// Past L1: the sums other blocks left in L2.
FJ_DEVICE void load_float4(const float* address, float (&v)[4]) {
  asm volatile("ld.global.cg.v4.f32 {%0, %1, %2, %3}, [%4];\n"
               : "=f"(v[0]), "=f"(v[1]), "=f"(v[2]), "=f"(v[3])
               : "l"(address)
               : "memory");
}
// Arrival order: this block's place among a query tile's visitors in the order they reach it, and
// how many they are. `threads` threads meeting at named barrier `barrier` test the head's blocks
// thread, thread + threads, ... from their walks (the shared table) and the barrier counts them
// (every block of a head is resident: the host's guard).
struct ArrivalRank {
  int rank, visitors;
};
FJ_DEVICE ArrivalRank arrival_rank(const int4* walks, int key_blocks, int query_tile, int step, int block, int thread,
                                   int threads, int barrier) {
  ArrivalRank r{0, 0};
  for (int first = 0; first < key_blocks; first += threads) {
    const int other = first + thread;
    const int4 walk = other < key_blocks ? walks[other] : make_int4(0, 0, 0, 0);
    const bool visit = query_tile >= walk.x && query_tile < walk.x + walk.y;
    const bool earlier =
        visit && KeyBlockSpans::arrives_before(other, KeyBlockSpans::step_at(walk.x, walk.y, walk.z, query_tile), block,
                                               step);
    r.rank += count_at_barrier(barrier, threads, earlier);
    r.visitors += count_at_barrier(barrier, threads, visit);
  }
  return r;
}
#endif  // FJ_ONE_PASS

extern "C" __global__ void __launch_bounds__(kThreads + kProducerThreads, 1)
    fj_attention_backward_dkdv(const __grid_constant__ KernelParams p) {
  extern __shared__ __align__(1024) unsigned char shared_raw[];
  constexpr layout::HopperBackwardDkDv kLayout =
      layout::hopper_backward_dkdv(kBlockM, kBlockN, kDimQk, kDimV, kStages,
                                   layout::dkdv_ds_buffers(kOnePass, kSharedOperands, kWholeSteps),
                                   layout::dkdv_walk_blocks(kArrival),
                                   layout::dkdv_dq_staging_buffers(kWriter, kConsumers, kDqSlots));
  static_assert(kLayout.ds_tiles % layout::kHopperBaseAlignment == 0, "swizzled dS tiles start 1024-byte aligned");
  static_assert(kLayout.walks % 16 == 0, "the walks' table is read 16 bytes an entry");
  static_assert(kLayout.dout_ring - kLayout.q_ring == Ring<kQueryBuffers>::kBarriers * layout::kBarrierBytes &&
                    kLayout.dq_barriers - kLayout.dout_ring == Ring<kQueryBuffers>::kBarriers * layout::kBarrierBytes,
                "shared_layout.h sizes the rings as pipeline.cuh does");
  unsigned char* const base = aligned_for_swizzle(shared_raw);
  elem_t* k_tile = reinterpret_cast<elem_t*>(base + kLayout.k_tile);          // [kBlockM][kDimQk]: the keys
  elem_t* v_tile = reinterpret_cast<elem_t*>(base + kLayout.v_tile);          // [kBlockM][kDimV]
  elem_t* q_tiles = reinterpret_cast<elem_t*>(base + kLayout.q_tiles);        // kQueryBuffers x [kBlockN][kDimQk]
  elem_t* dout_tiles = reinterpret_cast<elem_t*>(base + kLayout.dout_tiles);  // kQueryBuffers x [kBlockN][kDimV]
  // One pass: kDsBuffers x [kBlockN][kBlockM]; shared operands: P^T and dS^T, [kBlockM][kBlockN] each.
  elem_t* ds_tiles = reinterpret_cast<elem_t*>(base + kLayout.ds_tiles);
  float* lse_tiles = reinterpret_cast<float*>(base + kLayout.lse_tiles);      // [kQueryBuffers][kBlockN]
  float* delta_tiles = reinterpret_cast<float*>(base + kLayout.delta_tiles);  // [kQueryBuffers][kBlockN]
  // Arrival order: each key block's walk of the head, {first tile index, tile count, phase, 0}.
  int4* walks = reinterpret_cast<int4*>(base + kLayout.walks);
#if FJ_DQ_WRITER
  // The dQ writer: each consumer's kDqSlots buffers of its share of a tile's dQ (consumer c, tile t:
  // buffer c * kDqSlots + t % kDqSlots), and their mbarriers (the consumer's 128 threads fill one,
  // the writer's copying thread empties it). Two slots (a consumer may stage tile t + 1 while the
  // writer adds tile t), or one with a writer pair's order (FJ_DQ_SLOTS: whole steps, for room).
  static_assert(kDqSlots == 2 || (kDqSlots == 1 && FJ_DQ_PAIR), "two staging slots, or one for a writer pair's order");
  static_assert(kLayout.dq_staging % 16 == 0, "the staging buffers are copied in bulk (16-byte aligned)");
  float* dq_staging = reinterpret_cast<float*>(base + kLayout.dq_staging);
  unsigned long long* staging_full = reinterpret_cast<unsigned long long*>(base + kLayout.dq_barriers);
  unsigned long long* staging_empty = staging_full + kConsumers * kDqSlots;
#endif
  unsigned long long* keys_full = reinterpret_cast<unsigned long long*>(base + kLayout.keys_full);
  // Q, LSE and delta of a tile; dO of a tile.
  const Ring<kQueryBuffers> q_ring = Ring<kQueryBuffers>::at(reinterpret_cast<unsigned long long*>(base + kLayout.q_ring));
  const Ring<kQueryBuffers> dout_ring =
      Ring<kQueryBuffers>::at(reinterpret_cast<unsigned long long*>(base + kLayout.dout_ring));

  // A head's key blocks launch in the order their waits mostly point: upward in the block order (a
  // block waits on lower ones only), downward in writer-diagonal's (on higher ones only) and in the
  // arrival order (causal top-left, and
  // bottom-right with no more keys than queries: on higher ones only, which reach each tile first;
  // otherwise both ways, so the host's guard keeps a head's blocks resident together in any case).
  // There a block does not wait on one launched after it, and blocks that start one after
  // another as others end do not stall for siblings still to come.
  int block, b, kv_head;
#if FJ_VARLEN
  if (static_cast<int>(blockIdx.x) >= varlen_tiles(p, kFirstKeyTile)) return;  // a bound's blocks past the tiles
  const int entry = varlen_entry(p, kFirstKeyTile, static_cast<int>(blockIdx.x));
  const KernelParams sp = sequence_params(p, entry);
  block_coordinates(static_cast<int>(blockIdx.x) - p.varlen[entry * kVarlenFields + kFirstKeyTile], sp.num_key_blocks,
                    p.heads_kv, &block, &b, &kv_head, kArrival || kDiagonal);
#elif FJ_DKDV_PARTS
  // A key block's parts are neighbours in the launch order.
  const KernelParams& sp = p;
  const int part = static_cast<int>(blockIdx.x) % p.dkdv_parts;
  block_coordinates(static_cast<int>(blockIdx.x) / p.dkdv_parts, p.num_key_blocks, p.heads_kv, &block, &b, &kv_head,
                    kArrival || kDiagonal);
#else
  const KernelParams& sp = p;
  block_coordinates(p.num_key_blocks, p.heads_kv, &block, &b, &kv_head, kArrival || kDiagonal);
#endif
#if FJ_DKDV_PARTS
  static_assert(!FJ_ONE_PASS && !FJ_VARLEN, "parts: the split dense dK/dV kernel");
  const int group_heads = p.group_size / p.dkdv_parts;  // the host takes parts that divide the group
  const int first_member = part * group_heads;
#else
  const int group_heads = p.group_size;
  constexpr int first_member = 0;
#endif
  const long long q_row0 = kVarlenKernel ? sp.q_row0 : 0, k_row0 = kVarlenKernel ? sp.k_row0 : 0;
  const long long first_key = static_cast<long long>(block) * kBlockM;
  const long long last_key = min(first_key + kBlockM, static_cast<long long>(sp.seqlen_k)) - 1;
  const long long query_lo = query_begin(sp, first_key);
  const long long query_hi = query_end(sp, last_key);
  // The query tiles of every head of the group, one sequence: tile t is head
  // member t / tiles_per_head, queries first_tile + (t % tiles_per_head) * kBlockN;
  // one pass, from the last query tile down with the group's heads inside: head member
  // t % group_size, query tile tiles_per_head - 1 - t / group_size (writer-diagonal: upward from
  // the first, query tile t / group_size; arrival: its own walk).
  const long long first_tile = query_lo / kBlockN * kBlockN;
  // (One pass: a block no query sees walks nothing, rather than the last partial tile, so that it
  // does not join that tile's chain of adds: KeyBlockSpans::visits.)
  const int tiles_per_head = query_hi > first_tile && (!kOnePass || query_hi > query_lo)
                                 ? static_cast<int>((query_hi - first_tile + kBlockN - 1) / kBlockN)
                                 : 0;
  const int tiles = tiles_per_head * group_heads;
#if FJ_ONE_PASS
  const KeyBlockSpans spans{kBlockM, kBlockN, sp.diagonal_shift, sp.window_left, sp.window_right, sp.seqlen_q,
                            sp.seqlen_k};
  // Arrival order: the step of the walk that meets first_tile; the walk goes up from the tile of
  // step 0, round to first_tile after the last (KeyBlockSpans::walk_tile).
  const int walk_phase = kArrival && tiles_per_head > 0 ? static_cast<int>(spans.walk_phase(block, tiles_per_head)) : 0;
#if FJ_VARLEN
  const long long scratch_base = static_cast<long long>(p.varlen[entry * kVarlenFields + kFirstQueryTile]) * p.scratch_pitch;
#else
  const long long scratch_base = 0;
#endif
#if FJ_DQ_ARRIVAL
  // The head's key blocks whose walks the rank of an add counts (at most kArrivalWalkBlocks: the
  // host's guard).
  const int key_blocks =
      spans.blocks() < layout::kArrivalWalkBlocks ? static_cast<int>(spans.blocks()) : layout::kArrivalWalkBlocks;
#else
  // Block order: whether block + 1 visits a tile, found once, so that a tile's add tests two numbers.
  long long above_first = 0, above_end = 0;
  if (block + 1 < spans.blocks() && spans.query_begin(block + 1) < spans.query_end(block + 1)) {
    above_first = spans.first_tile(block + 1);
    above_end = spans.query_end(block + 1);
  }
#endif
  // This block's turn at tile t (queries from `start`) among the tile's visitors: its rank and
  // whether it is the last. Block order: first_block, the lowest visitor of the previous tile
  // (tiles go down), moves up; arrival order: counted by `threads` threads at `barrier`.
  struct TurnAtTile {
    int rank;
    bool last;
  };
  const auto turn_at = [&](int t, long long start, long long& first_block, int thread, int threads, int barrier) {
#if FJ_DQ_ARRIVAL
    (void)first_block;
    const ArrivalRank order = arrival_rank(walks, key_blocks, static_cast<int>(start / kBlockN), t / p.group_size,
                                           block, thread, threads, barrier);  // the group's heads inside
    return TurnAtTile{order.rank, order.rank == order.visitors - 1};
#else
    (void)t, (void)thread, (void)threads, (void)barrier;
    first_block = spans.lowest_visitor(first_block, start);
    // Last where block + 1 does not visit the tile (spans.visits(block + 1, start)).
    return TurnAtTile{static_cast<int>(block - first_block), !(above_first <= start && start < above_end)};
#endif
  };
#endif
  // Tile t's head and first query from q = t / tile_divisor (group_size in the one pass,
  // tiles_per_head in the split): the consumers' q by a multiply (bounds_core.h's Divisor, in
  // their registers: every step asks, and a generic division is ~20 instructions and a
  // reciprocal), the producer's and the writer's by the division (their few registers; the
  // Divisor's made them spill).
  const int tile_divisor = kOnePass ? p.group_size : tiles_per_head;
  const auto tile_head_of = [&](int t, int q) {
    return kv_head * p.group_size + (kOnePass ? t - q * tile_divisor : first_member + q);
  };
  const auto tile_start_of = [&](int t, int q) {
    int index = kOnePass ? (kDiagonal ? q : tiles_per_head - 1 - q) : t - q * tile_divisor;
#if FJ_ONE_PASS
    if (kArrival) {
      index = q - walk_phase;  // KeyBlockSpans::walk_tile, from first_tile
      if (index < 0) index += tiles_per_head;
    }
#endif
    return first_tile + static_cast<long long>(index) * kBlockN;
  };
  const auto tile_head = [&](int t) { return tile_head_of(t, t / tile_divisor); };
  const auto tile_start = [&](int t) { return tile_start_of(t, t / tile_divisor); };

  const auto init = [&] {
    mbarrier_init(keys_full, 1);
    q_ring.init();
    dout_ring.init();
#if FJ_DQ_WRITER
    for (int i = 0; i < kConsumers * kDqSlots; ++i) {
      mbarrier_init(&staging_full[i], 128);
      mbarrier_init(&staging_empty[i], 1);  // the writer's copying thread
    }
#endif
  };
  const auto produce = [&] {
    if (tiles == 0) return;
    prefetch_tensor_map(p.k_map);
    prefetch_tensor_map(p.v_map);
    prefetch_tensor_map(p.q_map);
    prefetch_tensor_map(p.dout_map);
    mbarrier_expect_bytes(keys_full, kTileBytes<kBlockM, kDimQk> + (kWithDk ? kTileBytes<kBlockM, kDimV> : 0));
    tma_load_tile<kBlockM, kDimQk>(k_tile, p.k_map, k_row0 + first_key, kv_head, b, keys_full);
    if (kWithDk) tma_load_tile<kBlockM, kDimV>(v_tile, p.v_map, k_row0 + first_key, kv_head, b, keys_full);
    constexpr unsigned kRowBytes = kBlockN * sizeof(float);
    for (int t = 0; t < tiles; ++t) {
      const int h = tile_head(t);
      const long long start = tile_start(t);
      const long long scratch_row = (static_cast<long long>(b) * p.heads_q + h) * sp.scratch_pitch + start;
      const int q_buffer = q_ring.produce(t, kTileBytes<kBlockN, kDimQk> + 2 * kRowBytes);
      tma_load_tile<kBlockN, kDimQk>(q_tiles + q_buffer * kBlockN * kDimQk, p.q_map, q_row0 + start, h, b,
                                     &q_ring.full[q_buffer]);
      bulk_load(lse_tiles + q_buffer * kBlockN, static_cast<const float*>(sp.lse_log2) + scratch_row, kRowBytes,
                &q_ring.full[q_buffer]);
      bulk_load(delta_tiles + q_buffer * kBlockN, static_cast<const float*>(sp.delta) + scratch_row, kRowBytes,
                &q_ring.full[q_buffer]);
      const int dout_buffer = dout_ring.produce(t, kTileBytes<kBlockN, kDimV>);
      tma_load_tile<kBlockN, kDimV>(dout_tiles + dout_buffer * kBlockN * kDimV, p.dout_map, q_row0 + start, h, b,
                                    &dout_ring.full[dout_buffer]);
    }
  };
#if FJ_DQ_WRITER
  // The dQ writer (the producer warpgroup's warps 1 to 3; one thread but where the arrival order's
  // ranks are counted): for each tile in the block's order, once both consumers have staged their
  // shares, wait for the tile's earlier visitors' counts, then store (the first visitor) or add
  // (every other, the last too) each share into the tile's float32 sums in one bulk copy from
  // shared memory (the fj_attention_backward_dq_convert kernel writes dQ from them after the pass),
  // free the staging buffers once the copies have read them, and release the tile's counts once
  // the copies are complete (the last visitor's too: the convert kernel tells visited tiles by
  // them). In the block order a tile's counts are released after the next tile's copies are
  // issued (its completion overlaps them; blocks wait only on lower ones, which never wait on
  // this one, so the deferral cannot close a cycle); in the arrival order, where a tile's
  // visitors wait on each other both ways in the block order, before any wait of the next tile
  // (so too with FJ_DQ_DIAGNOSTIC 7, the block order); with two writer threads (writer-pair,
  // writer-diagonal: below) once the tile's own copies are complete.
  const auto write_dq = [&] {
    const int w = static_cast<int>(threadIdx.x) - 32;  // 0 .. kWriterThreads - 1
    constexpr unsigned kChunkBytes = kDqChunk * sizeof(float);
    // A tile's turn and copies: wait for its earlier visitors' counts (rank of them, at counters;
    // acquire), then store (the first visitor) or add both consumers' shares staged in `slot` into
    // the sums from chunk0 on, in one bulk group.
    const auto copy_shares = [&](int* counters, long long chunk0, int slot, int rank) {
      if (rank > 0) {
#pragma unroll
        for (int consumer = 0; consumer < kConsumers; ++consumer) wait_for_count(counters + consumer, rank);
        fence_proxy_async_global();  // the earlier visitors' sums, before this one's bulk adds
      }
#pragma unroll
      for (int consumer = 0; consumer < kConsumers; ++consumer) {
        float* const chunk = p.dq_accum + (chunk0 + consumer) * kDqChunk;
        const float* const staged = dq_staging + (consumer * kDqSlots + slot) * kDqChunk;
        if (rank == 0) {
          bulk_store(chunk, staged, kChunkBytes);
        } else {
          bulk_add_floats(chunk, staged, kChunkBytes);
        }
      }
      bulk_commit();
    };
    // The staging slot back to both consumers (its copies have read it).
    const auto free_slot = [&](int slot) {
#pragma unroll
      for (int consumer = 0; consumer < kConsumers; ++consumer) {
        mbarrier_arrive(&staging_empty[consumer * kDqSlots + slot]);
      }
    };
    // A tile's counts, its copies complete (made visible to this thread, then ordered
    // before the counts by a gpu-scope release fence: the release pattern with relaxed counts).
    const auto release_counts = [&](int* counters) {
      fence_proxy_async_global();
      fence_release_gpu();
#pragma unroll
      for (int consumer = 0; consumer < kConsumers; ++consumer) add_relaxed(counters + consumer, 1);
    };
#if FJ_DQ_PAIR
    // writer-pair: lane 0 of warps 1 and 2, tiles t = pair, pair + 2, ... in the block's order, each
    // with its own bulk groups and its own staging slot (t % 2); with one slot (kDqSlots 1), lane 0
    // of warp 1 alone, every tile, in order. A tile: both shares staged, the
    // tile's earlier visitors' counts, the copies, the slot freed once they have read it, the
    // counts released once they are complete. Blocks wait only on lower ones, as in the block
    // order, and each thread's tiles come in that order: no cycle. writer-diagonal: tiles upward,
    // the tile's visitors above this block add first (rank: the highest visitor, carried up from
    // tile to tile, less this block); blocks wait only on higher ones, launched before them.
    // A writer thread a staging slot.
    if (w % 32 != 0 || w >= 32 * kDqSlots) return;
    const int pair = w / 32;
    FJ_STEP_TRACE(const StepTrace trace(p, pair == 0 ? 0 : 3, true));
    FJ_STEP_TRACE(trace.begin(block, b, kv_head, tiles));
    long long carried_visitor = block;  // the previous tile's lowest (writer-diagonal: highest) visitor
    for (int t = pair; t < tiles; t += kDqSlots) {
      FJ_STEP_TRACE(trace.mark(t, 1));
      const int h = tile_head(t);
      const long long start = tile_start(t);
      const long long row = scratch_base + (static_cast<long long>(b) * p.heads_q + h) * sp.scratch_pitch + start;
      const unsigned phase = static_cast<unsigned>(t / kDqSlots) % 2;
#pragma unroll
      for (int consumer = 0; consumer < kConsumers; ++consumer) {
        wait_for_phase(&staging_full[consumer * kDqSlots + pair], phase);
      }
      FJ_STEP_TRACE(trace.mark(t, 2));
      const long long chunk0 = row / kBlockN * kConsumers;
      int* const counters = p.dq_semaphore + chunk0;
#if FJ_DQ_DIAGNOSTIC == 11
      (void)turn_at;
      carried_visitor = spans.highest_visitor(carried_visitor, start);
      const int rank = static_cast<int>(carried_visitor - block);
#else
      const int rank = turn_at(t, start, carried_visitor, w, kWriterThreads, kAddBarrier).rank;
#endif
      copy_shares(counters, chunk0, pair, rank);
      FJ_STEP_TRACE(trace.mark(t, 3));
      bulk_wait_read();
      FJ_STEP_TRACE(trace.mark(t, 4));
      free_slot(pair);
      bulk_wait_all();
      FJ_STEP_TRACE(trace.mark(t, 5));
      release_counts(counters);
      FJ_STEP_TRACE(trace.mark(t, 6));
      FJ_STEP_TRACE(trace.note(t, 7, rank));
    }
    FJ_STEP_TRACE(trace.end());
#else  // one writer thread (more where the arrival order counts ranks)
#if FJ_DQ_ARRIVAL
    // The walks' table (the consumers meet here whether or not the block has tiles: so does the writer).
    named_barrier_sync(kWalksBarrier, kConsumers * 128 + kWriterThreads);
#else
    if (w != 0) return;
#endif
    constexpr bool kReleaseBeforeWait = kArrival || FJ_DQ_DIAGNOSTIC == 7;
    long long first_block = block;
    int* pending = nullptr;
    // The pending tile's counts, its copies complete.
    const auto release = [&] {
      release_counts(pending);
      pending = nullptr;
    };
    for (int t = 0; t < tiles; ++t) {
      const int h = tile_head(t);
      const long long start = tile_start(t);
      const long long row = scratch_base + (static_cast<long long>(b) * p.heads_q + h) * sp.scratch_pitch + start;
      const int slot = t % kDqSlots;
      const unsigned phase = static_cast<unsigned>(t / kDqSlots) % 2;
      // Both consumers' chunks of the tile together (the same rank, consecutive counters).
      const long long first_chunk = row / kBlockN * kConsumers;  // (group 0's)
#pragma unroll
      for (int consumer = 0; consumer < kConsumers; ++consumer) {
        wait_for_phase(&staging_full[consumer * kDqSlots + slot], phase);
      }
      if (kReleaseBeforeWait && w == 0 && pending != nullptr) {  // before any wait: others may be waiting for it
        bulk_wait_all();
        release();
      }
      // The arrival order's counting barrier is an aligned one: warp 1 whole again (its lane 0 copied
      // the previous tile while the others went on).
      if (kArrival) __syncwarp();
      const TurnAtTile turn = turn_at(t, start, first_block, w, kWriterThreads, kAddBarrier);
      if (w != 0) continue;  // (the arrival order's other counting threads)
      // writer-groups: the visitor's group and its rank there; the group's counters and sums
      // follow the groups before it (p.dq_counters counts every group's counters).
      const int rank = turn.rank / kDqGroups;
      const long long chunk0 = first_chunk + (kDqGroups > 1 ? turn.rank % kDqGroups * (p.dq_counters / kDqGroups) : 0);
      int* const counters = p.dq_semaphore + chunk0;
      copy_shares(counters, chunk0, slot, rank);
      if (pending != nullptr) {  // block order: the previous tile's copies, complete by now or soon
        bulk_wait_all_but_newest();
        release();
      }
      bulk_wait_read();
      free_slot(slot);
      pending = counters;
    }
    if (w == 0 && pending != nullptr) {
      bulk_wait_all();
      release();
    }
#endif  // FJ_DQ_PAIR
  };
#endif
  const auto consume = [&](int warpgroup) {
    const int consumer = __shfl_sync(0xffffffffu, warpgroup, 0);  // uniform (the dQ kernel's note)
    // The block's start (before K and V are waited for) and end (after dK and dV are stored) in
    // the trace's last row; the steps' points in the whole-concurrent loop below.
    FJ_STEP_TRACE(const StepTrace trace(p, 1 + consumer, threadIdx.x % 128 == 0));
    FJ_STEP_TRACE(trace.begin(block, b, kv_head, tiles));
    const Divisor fast_divisor(tile_divisor);  // the tiles' q (tile_head_of)
    const int warp = threadIdx.x / 32 - 4;  // consumer warp 0..7; keys warp * 16 .. + 15 of the block
    const int lane = threadIdx.x % 32;
    const int quad = lane % 4;
    long long keys[2];
    keys[0] = first_key + warp * 16 + lane / 4;
    keys[1] = keys[0] + 8;
    const long long consumer_first = first_key + consumer * 64;
    const bool keys_full_block = consumer_first + 64 <= sp.seqlen_k;
    const float scale_log2 = static_cast<float>(p.scale) * kLog2e;
#if FJ_DQ_ARRIVAL
    // The walks of the head's key blocks, a block a consumer thread, before any add counts from
    // them (the dQ writer's threads wait for them too).
    for (int other = static_cast<int>(threadIdx.x) - 128; other < key_blocks; other += kConsumers * 128) {
      const int count = static_cast<int>(spans.tile_count(other));
      walks[other] = make_int4(static_cast<int>(spans.first_tile(other) / kBlockN), count,
                               count > 0 ? static_cast<int>(spans.walk_phase(other, count)) : 0, 0);
    }
    named_barrier_sync(kWalksBarrier, kConsumers * 128 + (kWriter ? kWriterThreads : 0));
#endif

    float dv[kDimV / 8][4], dk[kDimQk / 8][4];
    zero(dv);
    zero(dk);
    if (tiles > 0) {
      mbarrier_wait(keys_full, 0);
      float st[kBlockN / 8][4], dpt[kBlockN / 8][4];  // S^T and dP^T: rows keys, columns queries
      unsigned prob[kBlockN / 16][4], dscore[kBlockN / 16][4];
#if FJ_ONE_PASS
      float dqt[kDqQueries / 8][4];  // this consumer's share of dQ_t^T: rows head dims, columns queries
      zero(dqt);
#if !FJ_DQ_WRITER
      long long first_block = block;  // turn_at's, for the tiles add_dq adds
#endif
      // Until the other consumer's keys of dS_t are in: before the turn that issues dQ_t (a
      // barrier between the turn's fence and its wgmma would serialise them).
      const auto wait_for_ds = [&](int t) {
        named_barrier_sync(kDsBarrier + kDsBuffers * (1 - consumer) + t % kDsBuffers, 2 * 128);
      };
      // dQ_t^T = K^T dS_t^T (t = -1: a product that no add reads, so that the wgmma is not
      // issued under a branch).
      const auto issue_dq = [&](int t) {
        wgmma_columns_by_rows<kBlockN, kDqQueries, kBlockM>(
            dqt, k_tile, kDimQk == 128 ? consumer : 0, ds_tiles + ((t + kDsBuffers) % kDsBuffers) * kBlockN * kBlockM,
            kDimQk == 128 ? 0 : consumer * kDqQueries);
      };
      // The counter of the tile this consumer last added to (not as its last visitor), released at
      // the next add: by then the adds have long reached L2, so the fence that orders them before
      // the count costs little (released at once, it stalled the consumer for the adds' round trip
      // every step). The block above waits a step longer for the tile; it waits on nothing else.
      // (FJ_DQ_DIAGNOSTIC 3: released at once after all, by one thread; nothing is pending.)
      int* pending = nullptr;
      const auto release_pending = [&] {
        if (pending == nullptr) return;
        __threadfence();  // this thread's adds, before the count that releases them
        named_barrier_sync(kAddBarrier + consumer, 128);
        if (threadIdx.x % 128 == 0) add_release(pending, 1);
        pending = nullptr;
      };
#if FJ_DQ_WRITER
      // Tile t's dQ^T share staged for the writer, once it has emptied the slot's previous tile.
      const auto add_dq = [&](int t) {
        const int buffer = consumer * kDqSlots + t % kDqSlots;
        // The first use of a slot passes at once (the parity of the phase before the first).
        wait_for_phase(&staging_empty[buffer], (static_cast<unsigned>(t / kDqSlots) % 2) ^ 1);
        float* const staged = dq_staging + buffer * kDqChunk;
        const int thread = threadIdx.x % 128;
#pragma unroll
        for (int n = 0; n < kDqQueries / 8; ++n) store_shared_float4(staged + (n * 128 + thread) * 4, dqt[n]);
        fence_async_shared();  // the stores, before the writer's bulk copy reads them
        mbarrier_arrive(&staging_full[buffer]);
      };
#else
      // Tile t's dQ^T share into the tile's sum, in key-block order (the file's head comment).
      const auto add_dq = [&](int t) {
        const int q = fast_divisor.quotient(t);
        const int h = tile_head_of(t, q);
        const long long start = tile_start_of(t, q);
        const long long batch_head = static_cast<long long>(b) * p.heads_q + h;
        // The tile's scratch row (a variable-length batch: its entry's rows first) names its chunks.
        const long long row = scratch_base + batch_head * sp.scratch_pitch + start;
        const long long chunk_index = row / kBlockN * kConsumers + consumer;
        const int thread = threadIdx.x % 128;
#if FJ_DQ_DIAGNOSTIC == 2 || FJ_DQ_DIAGNOSTIC == 9
        // Every block adds at once, in no order: 9 (atomic) into sums the prep kernel zeroed, which
        // the convert kernel makes dQ; 2 (unordered, timing only) the same adds, no dQ written.
        {
          float* const sums = p.dq_accum + chunk_index * kDqChunk;
#pragma unroll
          for (int n = 0; n < kDqQueries / 8; ++n) add_float4(sums + (n * 128 + thread) * 4, dqt[n]);
          return;
        }
#endif
        const TurnAtTile turn = turn_at(t, start, first_block, thread, 128, kAddBarrier + consumer);
        const int rank = turn.rank;
        const bool last = turn.last;
        float* const chunk = p.dq_accum + chunk_index * kDqChunk;
        int* const counter = p.dq_semaphore + chunk_index;
#if FJ_DQ_DIAGNOSTIC == 1  // timing only: no sums, no dQ
        (void)chunk, (void)counter, (void)rank, (void)last, (void)thread, (void)row;
        return;
#endif
        release_pending();  // before any wait: the blocks above may be waiting for it
        if (rank > 0) {
          if (thread == 0) wait_for_count(counter, rank);
          named_barrier_sync(kAddBarrier + consumer, 128);
        }
        if (last) {
#pragma unroll
          for (int n = 0; n < kDqQueries / 8; ++n) {
            if (rank > 0) {
              float before[4];
              load_float4(chunk + (n * 128 + thread) * 4, before);
#pragma unroll
              for (int e = 0; e < 4; ++e) dqt[n][e] += before[e];
            }
#pragma unroll
            for (int e = 0; e < 4; ++e) {
              const int d = (kDimQk == 128 ? consumer * 64 : 0) + (warp % 4) * 16 + lane / 4 + 8 * (e / 2);
              const long long i = start + (kDimQk == 128 ? 0 : consumer * kDqQueries) + n * 8 + quad * 2 + e % 2;
              if (i < sp.seqlen_q && d < p.head_dim_qk) {
                operand_row<elem_t>(sp.dq, b, h, i)[d] = from_float<elem_t>(dqt[n][e]);
              }
            }
          }
        } else {
#pragma unroll
          for (int n = 0; n < kDqQueries / 8; ++n) {
            if (rank == 0) {
              store_float4(chunk + (n * 128 + thread) * 4, dqt[n]);
            } else {
              add_float4(chunk + (n * 128 + thread) * 4, dqt[n]);
            }
          }
#if FJ_DQ_DIAGNOSTIC >= 3
          // Released at once by one thread once every thread's adds are issued (the pattern of
          // CUTLASS's GenericBarrier::arrive_inc: a barrier, then one gpu-scope release, which is
          // cumulative over the other threads' writes before the barrier), so that the block
          // above waits for the adds' round trip rather than for this block's next step.
          named_barrier_sync(kAddBarrier + consumer, 128);
          if (thread == 0) add_release(counter, 1);
#else
          pending = counter;
#endif
        }
      };
#endif  // FJ_DQ_WRITER
#endif  // FJ_ONE_PASS
      const auto arrive = [&](int t) {  // Q_t (with LSE, delta) and dO_t; one pass: dS_{t-2}
        if (t < tiles) {
          q_ring.consume(t);
          dout_ring.consume(t);
        }
#if FJ_ONE_PASS
        if (t >= 2) wait_for_ds(t - 2);  // step t issues dQ_{t-2} (issue_second(t - 1))
#endif
      };
      const auto issue_first = [&](int t) {  // S^T = K Q_t^T, dP^T = V dO_t^T
        wgmma_rows_by_rows<kBlockM, kBlockN, kDimQk>(st, k_tile, consumer * 64,
                                                     q_tiles + q_ring.buffer(t) * kBlockN * kDimQk);
        if (kWithDk) {
          wgmma_rows_by_rows<kBlockM, kBlockN, kDimV>(dpt, v_tile, consumer * 64,
                                                      dout_tiles + dout_ring.buffer(t) * kBlockN * kDimV);
        }
      };
      const auto after_first = [&](int t) {  // P^T and dS^T in place, beside tile t - 1's dV and dK products
        pin(st);
        if (kWithDk) {
          pin(dpt);
        } else {
          zero(dpt);  // the dV kernel has no dP^T: its gradient reads zeros and goes unused
        }
        const int q = fast_divisor.quotient(t);
        const int h = tile_head_of(t, q);
        const long long start = tile_start_of(t, q);
        const long long batch_head = static_cast<long long>(b) * p.heads_q + h;
        const bool interior = keys_full_block && start >= query_lo && start + kBlockN <= query_hi &&
                              all_visible(sp, start, start + kBlockN - 1, consumer_first, consumer_first + 63);
        const float* lse_tile = lse_tiles + q_ring.buffer(t) * kBlockN;
        const float* delta_tile = delta_tiles + q_ring.buffer(t) * kBlockN;
        if (interior) {
          dkdv_tile_gradient<true>(st, dpt, sp, keys, lse_tile, delta_tile, start, b, h, batch_head, quad,
                                   scale_log2);
        } else {
          dkdv_tile_gradient<false>(st, dpt, sp, keys, lse_tile, delta_tile, start, b, h, batch_head, quad,
                                    scale_log2);
        }
      };
      const auto issue_second = [&](int t) {  // dV += P^T_t dO_t, dK += dS^T_t Q_t (one pass: and dQ_{t-1})
#if FJ_DKDV_SHARED
        wgmma_rows_by_mn_rows<kBlockM, kBlockN, kDimV>(dv, ds_tiles, consumer * 64,
                                                       dout_tiles + dout_ring.buffer(t) * kBlockN * kDimV);
        wgmma_rows_by_mn_rows<kBlockM, kBlockN, kDimQk>(dk, ds_tiles + kBlockM * kBlockN, consumer * 64,
                                                        q_tiles + q_ring.buffer(t) * kBlockN * kDimQk);
#else
        if (kWithDv) {
          wgmma_fragments_by_rows<kBlockN, kDimV>(dv, prob, dout_tiles + dout_ring.buffer(t) * kBlockN * kDimV);
        }
        if (kWithDk) {
          wgmma_fragments_by_rows<kBlockN, kDimQk>(dk, dscore, q_tiles + q_ring.buffer(t) * kBlockN * kDimQk);
        }
#endif
#if FJ_ONE_PASS
        issue_dq(t - 1);
#endif
      };
      const auto after_second = [&](int t) {
        if (kWithDv) {
          pin(dv);
          if (!kSharedOperands) pin(prob);
        }
        if (kWithDk) {
          pin(dk);
          if (!kSharedOperands) pin(dscore);
        }
        q_ring.release(t, lane);
        dout_ring.release(t, lane);
#if FJ_ONE_PASS
        pin(dqt);
        if (t > 0) add_dq(t - 1);
#endif
      };
      const auto prepare = [&](int t) {
#if FJ_DKDV_SHARED
        // This warp's keys of P^T_t and dS^T_t, read by the next turn's products (the turn's
        // barrier joins the warpgroup's warps after each one's fence).
#pragma unroll
        for (int kk = 0; kk < kBlockN / 16; ++kk) {
          unsigned a[4];
          a_from_c(a, st[2 * kk], st[2 * kk + 1]);
          store_operand_rows(ds_tiles, a, warp * 16, kk * 16, lane);
          a_from_c(a, dpt[2 * kk], dpt[2 * kk + 1]);
          store_operand_rows(ds_tiles + kBlockM * kBlockN, a, warp * 16, kk * 16, lane);
        }
        fence_async_shared();
#else
        if (kWithDv) to_fragments<kBlockN>(prob, st);
        if (kWithDk) to_fragments<kBlockN>(dscore, dpt);
#endif
#if FJ_ONE_PASS
        // This consumer's keys of dS_t, for both consumers' dQ_t two steps on.
        elem_t* const ds = ds_tiles + (t % kDsBuffers) * kBlockN * kBlockM;
#pragma unroll
        for (int kk = 0; kk < kBlockN / 16; ++kk) store_ds_transposed(ds, dscore[kk], warp * 16, kk * 16, lane);
        fence_async_shared();
        named_barrier_arrive(kDsBarrier + kDsBuffers * consumer + t % kDsBuffers, 2 * 128);
#endif
      };
#if FJ_WHOLE_STEPS
      // Step t: S^T_t and dP^T_t in one turn; the gradient; P^T_t and dS^T_t packed and dS_t
      // stored (prepare); in a second turn dV and dK, then, once the other consumer's dS_t is in,
      // dQ_t^T (so that the first consumer's dV and dK run beside the second's gradient); Q_t and
      // dO_t freed and dQ_t^T staged or added once they are done. (The second consumer arrives
      // on its dS barrier before it waits for its turn: no cycle.)
      (void)arrive, (void)issue_second, (void)after_second;  // the carried schedule's
#if FJ_WHOLE_STEPS == 2
      // Concurrent (FLASHJIT_CUDA_ONE_PASS_STEPS=whole-concurrent): the same step with no turns,
      // both consumers issuing whenever they are ready, and within the second half dV, then
      // (once the other consumer's dS_t is in) dQ_t^T, then dK, so that dQ_t's share is staged
      // or added while dK runs. The dS barriers alone keep the two dS buffers safe: a consumer
      // writes buffer t % 2 again at step t + 2 only after waiting for the other's dS_{t+1}, which
      // the other stores after its products of step t (its read of dS_t) are done.
      // Trace points (FJ_TRACE): 1 before Q_t and dO_t are waited for, 2 after, 3 the gradient and
      // dS_t stored, 4 past the dS barrier (the other consumer's dS_t in, and this warpgroup's
      // other warps), 5 dV and dQ_t^T done, 6 dQ_t^T staged or added, 7 dK done.
      for (int t = 0; t < tiles; ++t) {
        FJ_STEP_TRACE(trace.mark(t, 1));
        q_ring.consume(t);
        dout_ring.consume(t);
        FJ_STEP_TRACE(trace.mark(t, 2));
        wgmma_fence();
        issue_first(t);
        wgmma_commit();
        wgmma_wait<0>();
        after_first(t);
        prepare(t);
        FJ_STEP_TRACE(trace.mark(t, 3));
        wgmma_fence();
        wgmma_fragments_by_rows<kBlockN, kDimV>(dv, prob, dout_tiles + dout_ring.buffer(t) * kBlockN * kDimV);
        wgmma_commit();
        wait_for_ds(t);
        FJ_STEP_TRACE(trace.mark(t, 4));
        issue_dq(t);
        wgmma_commit();
        wgmma_fragments_by_rows<kBlockN, kDimQk>(dk, dscore, q_tiles + q_ring.buffer(t) * kBlockN * kDimQk);
        wgmma_commit();
        wgmma_wait<1>();  // dV and dQ_t^T done (groups complete in order); dK may still run
        pin(dv);
        pin(prob);
        pin(dqt);
        FJ_STEP_TRACE(trace.mark(t, 5));
        dout_ring.release(t, lane);
        add_dq(t);
        FJ_STEP_TRACE(trace.mark(t, 6));
        wgmma_wait<0>();
        pin(dk);
        pin(dscore);
        FJ_STEP_TRACE(trace.mark(t, 7));
        q_ring.release(t, lane);
      }
#else
      first_turn(consumer);
      for (int t = 0; t < tiles; ++t) {
        q_ring.consume(t);
        dout_ring.consume(t);
        wait_turn(consumer);
        wgmma_fence();
        issue_first(t);
        wgmma_commit();
        pass_turn(consumer);
        wgmma_wait<0>();
        after_first(t);
        prepare(t);
        wait_turn(consumer);
        wgmma_fence();
        wgmma_fragments_by_rows<kBlockN, kDimV>(dv, prob, dout_tiles + dout_ring.buffer(t) * kBlockN * kDimV);
        wgmma_fragments_by_rows<kBlockN, kDimQk>(dk, dscore, q_tiles + q_ring.buffer(t) * kBlockN * kDimQk);
        wgmma_commit();
        wait_for_ds(t);
        issue_dq(t);
        wgmma_commit();
        pass_turn(consumer);
        wgmma_wait<0>();
        pin(dv);
        pin(prob);
        pin(dk);
        pin(dscore);
        pin(dqt);
        q_ring.release(t, lane);
        dout_ring.release(t, lane);
        add_dq(t);
      }
      last_turn(consumer);
#endif
#elif FJ_ONE_PASS
      first_turn(consumer);
      consumer_steps(consumer, tiles, arrive, issue_first, after_first, issue_second, after_second, prepare);
      wait_for_ds(tiles - 1);
      wait_turn(consumer);  // the last tile's dQ, in a turn of its own
      wgmma_fence();
      issue_dq(tiles - 1);
      wgmma_commit();
      pass_turn(consumer);
      wgmma_wait<0>();
      pin(dqt);
      add_dq(tiles - 1);
      release_pending();
      last_turn(consumer);
#else
      consumer_schedule(consumer, tiles, arrive, issue_first, after_first, issue_second, after_second, prepare);
#endif
    }
#if FJ_DKDV_PARTS
    if (p.dkdv_parts > 1) {
      // This part's sums into its slot, then the key block's last part to arrive adds every
      // part's in part order (the same order whichever block is last: deterministic) and writes
      // dK and dV. A thread reads back exactly the entries it and its peers at the same place of
      // the other parts wrote.
      __shared__ int last_part;
      const long long unit = (static_cast<long long>(b) * p.heads_kv + kv_head) * p.num_key_blocks + block;
      const long long units = static_cast<long long>(p.batch) * p.heads_kv * p.num_key_blocks;
      const auto slot = [&](int i) { return p.dkdv_partial + (i * units + unit) * kBlockM * (kDimQk + kDimV); };
      const int row0 = warp * 16 + lane / 4;
      float* const mine = slot(part);
      each_part_pair(dk, dv, row0, quad, [&](int at, float(&acc)[4], int e) {
        *reinterpret_cast<float2*>(mine + at) = make_float2(acc[e], acc[e + 1]);
      });
      __threadfence();  // this thread's sums visible at gpu scope before the block's arrival counts
      named_barrier_sync(kPartsBarrier, kConsumers * 128);
      if (threadIdx.x == 128) {
        __threadfence();  // and the block's, ordered before the count (the reduction pattern's fence)
        last_part = atomicAdd(p.dkdv_counters + unit, 1) == p.dkdv_parts - 1;
      }
      named_barrier_sync(kPartsBarrier, kConsumers * 128);
      if (!last_part) return;
      __threadfence();
      zero(dk);
      zero(dv);
      for (int i = 0; i < p.dkdv_parts; ++i) {
        const float* const sums = slot(i);
        each_part_pair(dk, dv, row0, quad, [&](int at, float(&acc)[4], int e) {
          const float2 part_sums = __ldcg(reinterpret_cast<const float2*>(sums + at));
          acc[e] += part_sums.x;
          acc[e + 1] += part_sums.y;
        });
      }
    }  // (the prep kernel zeroes the counters again before the next backward)
#endif
    if (kWithDk) store_rows<kDimQk>(sp.dk, b, kv_head, keys, sp.seqlen_k, p.head_dim_qk, dk, quad);
    if (kWithDv) store_rows<kDimV>(sp.dv, b, kv_head, keys, sp.seqlen_k, p.head_dim_v, dv, quad);
    FJ_STEP_TRACE(trace.end());
  };
#if FJ_DQ_WRITER
  specialised_roles(init, produce, consume, write_dq);
#else
  specialised_roles(init, produce, consume);
#endif
#if FJ_BACKWARD_OVERLAP
  static_assert(!FJ_VARLEN && !FJ_ONE_PASS, "the overlapping dK/dV kernel: dense, split (no early exit)");
  // Launched programmatically while the dQ kernel runs, the block ends only once that kernel has:
  // what follows the backward in the stream then finds dQ written too. (Dense only: no block
  // leaves before this point.)
  wait_for_previous_kernel();
#endif
}
#endif  // FJ_BACKWARD_DKDV

}  // namespace mma
}  // namespace flashjit

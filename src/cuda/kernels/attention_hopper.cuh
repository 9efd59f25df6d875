// Forward attention for sm_90a (H100, H200), float16 and bfloat16: a producer
// warpgroup that loads tiles with TMA and two consumer warpgroups that multiply
// with wgmma, 64 query rows each (kBlockM = 128 a block).
//
//   producer (warpgroup 0): one thread loads the block's Q tile once, then K
//     and V tiles of kBlockN keys into rings of kStages buffers (pipeline.cuh),
//     each as swizzled 64-column boxes; the warpgroup hands its registers over
//     to the consumers.
//   consumers (warpgroups 1, 2): per key tile j,
//       S_j = Q K_j^T                 wgmma, both operands in shared memory
//       O  += P_{j-1} V_{j-1}         wgmma, P in registers, issued with S_j
//       softmax(S_j) -> P_j           while the tensor cores run P_{j-1} V_{j-1}
//     and the two warpgroups take turns issuing (named barriers 1 and 2), so
//     that one's softmax runs beside the other's matrix products.
//
// Head dims are padded to multiples of 64 (one swizzled region each); the TMA
// fills rows past the sequence and columns past the head dim with zeros. The
// logits, the online softmax and the output are softmax.cuh's, as in the
// mma.sync kernel.
//
// Macros from the prelude: those of mma_common.cuh (FJ_WARPS = 8 consumer warps)
// and FJ_STAGES, FJ_MASK, FJ_MASK_TYPE, FJ_HAS_WINDOW, FJ_DROPOUT, FJ_SOFTCAP.
#pragma once

namespace flashjit {
namespace mma {

static_assert(kRowTiles == 1 && kWarps == 8 && kBlockM == 128, "two consumer warpgroups of 64 rows");
static_assert(kDimQk % 64 == 0 && kDimV % 64 == 0, "head dims padded to whole swizzled regions");

constexpr int kStages = FJ_STAGES;
constexpr int kProducerThreads = 128;
// 24 + 2 x 240 registers a thread of each warpgroup fit the 64K of the SM
// that the launch bounds (384 threads, 168 registers each) reserve.
constexpr int kProducerRegisters = 24;
constexpr int kConsumerRegisters = 240;
constexpr int kTurnBarrier = 1;  // consumer w issues its mma after named barrier kTurnBarrier + w

FJ_DEVICE void wait_turn(int consumer) { named_barrier_sync(kTurnBarrier + consumer, kThreads); }
FJ_DEVICE void pass_turn(int consumer) { named_barrier_arrive(kTurnBarrier + (consumer ^ 1), kThreads); }

// A consumer warp is done reading a ring buffer (after the wgmma that read it).
FJ_DEVICE void release(unsigned long long* empty, int lane) {
  if (lane == 0) mbarrier_arrive(empty);
}

// S = Q K^T for the consumer's 64 rows (issue only).
FJ_DEVICE void issue_scores(float (&s)[kBlockN / 8][4], const elem_t* q_tile, const elem_t* k_tile, int consumer) {
#pragma unroll
  for (int kk = 0; kk < kDimQk / 16; ++kk) {
    wgmma_ss<kBlockN>(s, k_major_descriptor<kBlockM, kDimQk>(q_tile, consumer * 64, kk * 16),
                      k_major_descriptor<kBlockN, kDimQk>(k_tile, 0, kk * 16), kk == 0);
  }
}

// O += P V with P in registers (issue only).
FJ_DEVICE void issue_output(float (&o)[kDimV / 8][4], const unsigned (&prob)[kBlockN / 16][4], const elem_t* v_tile) {
#pragma unroll
  for (int kk = 0; kk < kBlockN / 16; ++kk) wgmma_rs<kDimV>(o, prob[kk], mn_major_descriptor<kBlockN>(v_tile, kk * 16));
}

// P (C fragments, float) -> A fragments of the element type.
FJ_DEVICE void to_fragments(unsigned (&prob)[kBlockN / 16][4], const float (&s)[kBlockN / 8][4]) {
#pragma unroll
  for (int kk = 0; kk < kBlockN / 16; ++kk) a_from_c(prob[kk], s[2 * kk], s[2 * kk + 1]);
}

extern "C" __global__ void __launch_bounds__(kThreads + kProducerThreads, 1)
    fj_attention_forward(const __grid_constant__ KernelParams p) {
  extern __shared__ __align__(1024) unsigned char shared_raw[];
  unsigned char* shared_bytes = shared_raw + ((1024 - (shared_address(shared_raw) & 1023)) & 1023);
  elem_t* q_tile = reinterpret_cast<elem_t*>(shared_bytes);  // [kBlockM][kDimQk], swizzled
  elem_t* k_tiles = q_tile + kBlockM * kDimQk;                 // kStages x [kBlockN][kDimQk]
  elem_t* v_tiles = k_tiles + kStages * kBlockN * kDimQk;      // kStages x [kBlockN][kDimV]
  unsigned long long* q_full = reinterpret_cast<unsigned long long*>(v_tiles + kStages * kBlockN * kDimV);
  unsigned long long* k_full = q_full + 1;  // [kStages] each
  unsigned long long* k_empty = k_full + kStages;
  unsigned long long* v_full = k_empty + kStages;
  unsigned long long* v_empty = v_full + kStages;

  int block, b, h;
  block_coordinates(p.num_query_blocks, p.heads_q, &block, &b, &h);
  const int kv_head = h / p.group_size;
  const long long first_query = static_cast<long long>(block) * kBlockM;
  const long long last_query = min(first_query + kBlockM, static_cast<long long>(p.seqlen_q)) - 1;
  const long long key_lo = key_begin(p, first_query);
  const long long key_hi = key_end(p, last_query);
  const long long first_tile = key_lo / kBlockN * kBlockN;
  const int tiles = first_tile < key_hi ? static_cast<int>((key_hi - first_tile + kBlockN - 1) / kBlockN) : 0;

  if (threadIdx.x == 0) {
    mbarrier_init(q_full, 1);
#pragma unroll
    for (int stage = 0; stage < kStages; ++stage) {
      mbarrier_init(&k_full[stage], 1);
      mbarrier_init(&v_full[stage], 1);
      mbarrier_init(&k_empty[stage], kWarps);  // one arrival per consumer warp
      mbarrier_init(&v_empty[stage], kWarps);
    }
    mbarrier_init_fence();
  }
  __syncthreads();

  const int warpgroup = threadIdx.x / 128;
  if (warpgroup == 0) {
    release_registers<kProducerRegisters>();
    // Nothing is loaded for a block that sees no key: no copy may outlive the block.
    if (threadIdx.x == 0 && tiles > 0) {
      prefetch_tensor_map(p.q_map);
      prefetch_tensor_map(p.k_map);
      prefetch_tensor_map(p.v_map);
      mbarrier_expect_bytes(q_full, kTileBytes<kBlockM, kDimQk>);
      tma_load_tile<kBlockM, kDimQk>(q_tile, p.q_map, first_query, h, b, q_full);
      // In the order the consumers need them: K_j, then V_{j-1}.
      for (int j = 0; j <= tiles; ++j) {
        if (j < tiles) {
          const Ring k = ring_slot<kStages>(j);
          mbarrier_wait(&k_empty[k.buffer], k.phase ^ 1);
          mbarrier_expect_bytes(&k_full[k.buffer], kTileBytes<kBlockN, kDimQk>);
          tma_load_tile<kBlockN, kDimQk>(k_tiles + k.buffer * kBlockN * kDimQk, p.k_map, first_tile + j * kBlockN,
                                         kv_head, b, &k_full[k.buffer]);
        }
        if (j > 0) {
          const Ring v = ring_slot<kStages>(j - 1);
          mbarrier_wait(&v_empty[v.buffer], v.phase ^ 1);
          mbarrier_expect_bytes(&v_full[v.buffer], kTileBytes<kBlockN, kDimV>);
          tma_load_tile<kBlockN, kDimV>(v_tiles + v.buffer * kBlockN * kDimV, p.v_map,
                                        first_tile + (j - 1) * kBlockN, kv_head, b, &v_full[v.buffer]);
        }
      }
    }
    return;
  }
  claim_registers<kConsumerRegisters>();

  const int consumer = warpgroup - 1;
  const int warp = threadIdx.x / 32 - 4;  // consumer warp 0..7; rows warp * 16 .. + 15 of the block
  const int lane = threadIdx.x % 32;
  const int group = lane / 4;
  const int quad = lane % 4;
#if FJ_DROPOUT
  const long long batch_head = static_cast<long long>(b) * p.heads_q + h;
#endif
  long long rows[1][2];
  rows[0][0] = first_query + warp * 16 + group;
  rows[0][1] = rows[0][0] + 8;
  const long long consumer_first = first_query + consumer * 64;
  const bool rows_full = consumer_first + 64 <= p.seqlen_q;
  const float scale_log2 = static_cast<float>(p.scale) * kLog2e;

  float o[1][kDimV / 8][4];
  zero(o);
  float row_max[1][2] = {{negative_infinity<float>(), negative_infinity<float>()}};  // log2 domain
  float row_sum[1][2] = {{0.0f, 0.0f}};

  // Logits of tile j in place of S, the softmax step, dropout; returns the
  // factor for O in scale_old.
  const auto softmax_tile = [&](float (&s)[1][kBlockN / 8][4], int j, float (&scale_old)[1][2]) {
    const long long tile_start = first_tile + static_cast<long long>(j) * kBlockN;
    const bool interior = rows_full && tile_start >= key_lo && tile_start + kBlockN <= key_hi &&
                          all_visible(p, consumer_first, consumer_first + 63, tile_start, tile_start + kBlockN - 1);
    if (interior) {
      tile_logits<1, true>(s, p, rows, tile_start, key_lo, key_hi, b, h, quad, scale_log2);
    } else {
      tile_logits<1, false>(s, p, rows, tile_start, key_lo, key_hi, b, h, quad, scale_log2);
    }
    softmax_step(s, row_max, row_sum, scale_old);
#if FJ_DROPOUT
    apply_dropout(s, p, batch_head, rows, tile_start, quad);
#endif
  };

  if (tiles > 0) {
    if (consumer == 1) named_barrier_arrive(kTurnBarrier, kThreads);  // consumer 0 issues first
    mbarrier_wait(q_full, 0);
    float s[1][kBlockN / 8][4];
    unsigned prob[kBlockN / 16][4];
    float scale_old[1][2];

    // Tile 0: S alone.
    {
      const Ring k = ring_slot<kStages>(0);
      mbarrier_wait(&k_full[k.buffer], k.phase);
      wait_turn(consumer);
      wgmma_fence();
      issue_scores(s[0], q_tile, k_tiles + k.buffer * kBlockN * kDimQk, consumer);
      wgmma_commit();
      pass_turn(consumer);
      wgmma_wait<0>();
      pin(s[0]);
      release(&k_empty[k.buffer], lane);
      softmax_tile(s, 0, scale_old);  // O is still 0: no rescale
      to_fragments(prob, s[0]);
    }
    for (int j = 1; j < tiles; ++j) {
      const Ring k = ring_slot<kStages>(j);
      const Ring v = ring_slot<kStages>(j - 1);
      mbarrier_wait(&k_full[k.buffer], k.phase);
      mbarrier_wait(&v_full[v.buffer], v.phase);
      wait_turn(consumer);
      wgmma_fence();
      issue_scores(s[0], q_tile, k_tiles + k.buffer * kBlockN * kDimQk, consumer);
      wgmma_commit();
      issue_output(o[0], prob, v_tiles + v.buffer * kBlockN * kDimV);
      wgmma_commit();
      pass_turn(consumer);

      wgmma_wait<1>();  // S_j done; P_{j-1} V_{j-1} may still run
      pin(s[0]);
      release(&k_empty[k.buffer], lane);
      softmax_tile(s, j, scale_old);

      wgmma_wait<0>();
      pin(o[0]);
      pin(prob);
      release(&v_empty[v.buffer], lane);
      rescale_rows(o, scale_old);
      to_fragments(prob, s[0]);
    }
    // The last tile's P V.
    {
      const Ring v = ring_slot<kStages>(tiles - 1);
      mbarrier_wait(&v_full[v.buffer], v.phase);
      wait_turn(consumer);
      wgmma_fence();
      issue_output(o[0], prob, v_tiles + v.buffer * kBlockN * kDimV);
      wgmma_commit();
      pass_turn(consumer);
      wgmma_wait<0>();
      pin(o[0]);
      pin(prob);
    }
    // Consumer 1's last pass_turn leaves barrier kTurnBarrier one arrival ahead: take it.
    if (consumer == 0) wait_turn(0);
  }
  write_output(p, o, row_max, row_sum, rows, b, h, quad);
}

}  // namespace mma
}  // namespace flashjit

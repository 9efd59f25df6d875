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

extern "C" __global__ void __launch_bounds__(kThreads + kProducerThreads, 1)
    fj_attention_forward(const __grid_constant__ KernelParams p) {
  extern __shared__ __align__(1024) unsigned char shared_raw[];
  elem_t* q_tile = reinterpret_cast<elem_t*>(aligned_for_swizzle(shared_raw));  // [kBlockM][kDimQk]
  elem_t* k_tiles = q_tile + kBlockM * kDimQk;                                    // kStages x [kBlockN][kDimQk]
  elem_t* v_tiles = k_tiles + kStages * kBlockN * kDimQk;                         // kStages x [kBlockN][kDimV]
  unsigned long long* q_full = reinterpret_cast<unsigned long long*>(v_tiles + kStages * kBlockN * kDimV);
  const Ring<kStages> k_ring = Ring<kStages>::at(q_full + 1);
  const Ring<kStages> v_ring = Ring<kStages>::at(q_full + 1 + Ring<kStages>::kBarriers);

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
    k_ring.init();
    v_ring.init();
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
          const int buffer = k_ring.produce(j, kTileBytes<kBlockN, kDimQk>);
          tma_load_tile<kBlockN, kDimQk>(k_tiles + buffer * kBlockN * kDimQk, p.k_map, first_tile + j * kBlockN,
                                         kv_head, b, &k_ring.full[buffer]);
        }
        if (j > 0) {
          const int buffer = v_ring.produce(j - 1, kTileBytes<kBlockN, kDimV>);
          tma_load_tile<kBlockN, kDimV>(v_tiles + buffer * kBlockN * kDimV, p.v_map, first_tile + (j - 1) * kBlockN,
                                        kv_head, b, &v_ring.full[buffer]);
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

  // Logits of tile j in place of S, the softmax step, dropout; the factor for O in scale_old.
  const auto softmax_tile = [&](float (&s)[1][kBlockN / 8][4], int j, float (&scale_old)[1][2]) {
    const long long tile_start = first_tile + static_cast<long long>(j) * kBlockN;
    const bool interior = rows_full && tile_start >= key_lo && tile_start + kBlockN <= key_hi &&
                          all_visible(p, consumer_first, consumer_first + 63, tile_start, tile_start + kBlockN - 1);
    if (interior) {
      tile_logits<1, true>(s, p, rows, tile_start, b, h, quad, scale_log2);
    } else {
      tile_logits<1, false>(s, p, rows, tile_start, b, h, quad, scale_log2);
    }
    softmax_step(s, row_max, row_sum, scale_old);
#if FJ_DROPOUT
    apply_dropout(s, p, batch_head, rows, tile_start, quad);
#endif
  };

  if (tiles > 0) {
    first_turn(consumer);
    mbarrier_wait(q_full, 0);
    float s[1][kBlockN / 8][4];
    unsigned prob[kBlockN / 16][4];
    float scale_old[1][2];
    // Tile 0: S alone (O is still 0: no rescale).
    {
      const int k_buffer = k_ring.consume(0);
      wait_turn(consumer);
      wgmma_fence();
      wgmma_rows_by_rows<kBlockM, kBlockN, kDimQk>(s[0], q_tile, consumer * 64, k_tiles + k_buffer * kBlockN * kDimQk);
      wgmma_commit();
      pass_turn(consumer);
      wgmma_wait<0>();
      pin(s[0]);
      k_ring.release(0, lane);
      softmax_tile(s, 0, scale_old);
      to_fragments<kBlockN>(prob, s[0]);
    }
    for (int j = 1; j < tiles; ++j) {
      const int k_buffer = k_ring.consume(j);
      const int v_buffer = v_ring.consume(j - 1);
      wait_turn(consumer);
      wgmma_fence();
      wgmma_rows_by_rows<kBlockM, kBlockN, kDimQk>(s[0], q_tile, consumer * 64, k_tiles + k_buffer * kBlockN * kDimQk);
      wgmma_commit();
      wgmma_fragments_by_rows<kBlockN, kDimV>(o[0], prob, v_tiles + v_buffer * kBlockN * kDimV);
      wgmma_commit();
      pass_turn(consumer);

      wgmma_wait<1>();  // S_j done; P_{j-1} V_{j-1} may still run beside the softmax
      pin(s[0]);
      k_ring.release(j, lane);
      softmax_tile(s, j, scale_old);

      wgmma_wait<0>();
      pin(o[0]);
      pin(prob);
      v_ring.release(j - 1, lane);
      rescale_rows(o, scale_old);  // O holds tiles up to j - 1: rebase it on tile j's maxima
      to_fragments<kBlockN>(prob, s[0]);
    }
    // The last tile's P V.
    {
      const int v_buffer = v_ring.consume(tiles - 1);
      wait_turn(consumer);
      wgmma_fence();
      wgmma_fragments_by_rows<kBlockN, kDimV>(o[0], prob, v_tiles + v_buffer * kBlockN * kDimV);
      wgmma_commit();
      pass_turn(consumer);
      wgmma_wait<0>();
      pin(o[0]);
      pin(prob);
    }
    last_turn(consumer);
  }
  write_output(p, o, row_max, row_sum, rows, b, h, quad);
}

}  // namespace mma
}  // namespace flashjit

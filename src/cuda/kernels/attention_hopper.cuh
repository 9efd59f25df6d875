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
  const QueryBlock block(p);
  const int b = block.b, h = block.h;

  const auto init = [&] {
    mbarrier_init(q_full, 1);
    k_ring.init();
    v_ring.init();
  };
  const auto produce = [&] {
    // Nothing is loaded for a block that sees no key: no copy may outlive the block.
    if (block.tiles == 0) return;
    prefetch_tensor_map(p.q_map);
    prefetch_tensor_map(p.k_map);
    prefetch_tensor_map(p.v_map);
    mbarrier_expect_bytes(q_full, kTileBytes<kBlockM, kDimQk>);
    tma_load_tile<kBlockM, kDimQk>(q_tile, p.q_map, block.first_query, h, b, q_full);
    // In the order the consumers need them: K_j, then V_{j-1}.
    for (int j = 0; j <= block.tiles; ++j) {
      if (j < block.tiles) {
        const int buffer = k_ring.produce(j, kTileBytes<kBlockN, kDimQk>);
        tma_load_tile<kBlockN, kDimQk>(k_tiles + buffer * kBlockN * kDimQk, p.k_map, block.tile_start(j),
                                       block.kv_head, b, &k_ring.full[buffer]);
      }
      if (j > 0) {
        const int buffer = v_ring.produce(j - 1, kTileBytes<kBlockN, kDimV>);
        tma_load_tile<kBlockN, kDimV>(v_tiles + buffer * kBlockN * kDimV, p.v_map, block.tile_start(j - 1),
                                      block.kv_head, b, &v_ring.full[buffer]);
      }
    }
  };
  const auto consume = [&](int consumer) {
    const int warp = threadIdx.x / 32 - 4;  // consumer warp 0..7; rows warp * 16 .. + 15 of the block
    const int lane = threadIdx.x % 32;
    const int quad = lane % 4;
    long long rows[1][2];
    rows[0][0] = block.first_query + warp * 16 + lane / 4;
    rows[0][1] = rows[0][0] + 8;
    const long long consumer_first = block.first_query + consumer * 64;
    const bool rows_full = consumer_first + 64 <= p.seqlen_q;
    const float scale_log2 = static_cast<float>(p.scale) * kLog2e;

    float o[1][kDimV / 8][4];
    zero(o);
    float row_max[1][2] = {{negative_infinity<float>(), negative_infinity<float>()}};  // log2 domain
    float row_sum[1][2] = {{0.0f, 0.0f}};
    if (block.tiles > 0) {
      mbarrier_wait(q_full, 0);
      float s[1][kBlockN / 8][4];
      unsigned prob[kBlockN / 16][4];
      float scale_old[1][2];
      consumer_schedule(
          consumer, block.tiles,
          [&](int j) {  // K_j, and V_{j-1}
            if (j < block.tiles) k_ring.consume(j);
            if (j > 0) v_ring.consume(j - 1);
          },
          [&](int j) {  // S_j = Q K_j^T
            wgmma_rows_by_rows<kBlockM, kBlockN, kDimQk>(s[0], q_tile, consumer * 64,
                                                         k_tiles + k_ring.buffer(j) * kBlockN * kDimQk);
          },
          [&](int j) {  // logits, the softmax step and dropout of S_j, beside P_{j-1} V_{j-1}
            pin(s[0]);
            k_ring.release(j, lane);
            const long long tile_start = block.tile_start(j);
            if (block.interior(p, j, consumer_first, rows_full)) {
              tile_logits<1, true>(s, p, rows, tile_start, b, h, quad, scale_log2);
            } else {
              tile_logits<1, false>(s, p, rows, tile_start, b, h, quad, scale_log2);
            }
            softmax_step(s, row_max, row_sum, scale_old);
#if FJ_DROPOUT
            apply_dropout(s, p, static_cast<long long>(b) * p.heads_q + h, rows, tile_start, quad);
#endif
          },
          [&](int j) {  // O += P_j V_j
            wgmma_fragments_by_rows<kBlockN, kDimV>(o[0], prob, v_tiles + v_ring.buffer(j) * kBlockN * kDimV);
          },
          [&](int j) {
            pin(o[0]);
            pin(prob);
            v_ring.release(j, lane);
          },
          [&](int j) {
            if (j > 0) rescale_rows(o, scale_old);  // O holds tiles up to j - 1: rebase it on tile j's maxima
            to_fragments<kBlockN>(prob, s[0]);
          });
    }
    write_output(p, o, row_max, row_sum, rows, b, h, quad);
  };
  specialised_roles(init, produce, consume);
}

}  // namespace mma
}  // namespace flashjit

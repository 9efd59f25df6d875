// Forward attention for sm_90a (H100, H200), float16 and bfloat16: a producer
// warpgroup that loads tiles with TMA and two (or, as a variant at head dim 64,
// three) consumer warpgroups that multiply with wgmma, 64 query rows each
// (kBlockM = 128 or 192 a work tile). The grid is persistent: a block an SM,
// taking work tiles from a counter (TileQueue). FJ_SPLIT (decoding): the work
// tiles of each span of keys in turn, a block a work tile, float partials for
// combine.cuh; a consumer warpgroup none of whose rows is a query only takes its
// turns (idle_steps). Each consumer warpgroup runs the work tile's key tiles up to
// the last one its own rows see, then only takes turns (idle_tail): in a causal
// 192-row tile the first 64 rows end a key tile or two before the last 64, and 64
// rows past the sequence run a single tile (FJ_BLOCK_SPAN: every warpgroup all of them).
//
//   producer (warpgroup 0): one thread loads each work tile's Q tile into a
//     ring of kQBuffers, then K and V tiles of kBlockN keys into rings of
//     kStages buffers (pipeline.cuh), each as swizzled 64-column boxes; the
//     warpgroup hands its registers over to the consumers.
//   consumers (warpgroups 1, 2 [, 3]): per key tile j,
//       S_j = Q K_j^T                 wgmma, both operands in shared memory
//       O  += P_{j-1} V_{j-1}         wgmma, P in registers, issued with S_j
//       softmax(S_j) -> P_j           while the tensor cores run P_{j-1} V_{j-1}
//     and the warpgroups take turns issuing (a named barrier each), so that
//     one's softmax runs beside the others' matrix products.
//   epilogue (FJ_O_TMA): each consumer writes its 64 rows of O into its own rows
//     of the Q buffer (its last S has read them), and one thread stores them
//     with TMA; the buffer goes back to the producer once the store has read it
//     (at once with one Q buffer; with two, during the next work tile). Without
//     FJ_O_TMA (an output TMA cannot address) the threads store O directly, as
//     they do (FJ_VARLEN) for 64 rows that cross the end of their sequence.
//
// Head dims are padded to multiples of 64 (one swizzled region each); the TMA
// fills rows past the sequence and columns past the head dim with zeros. The
// logits, the online softmax and the output are softmax.cuh's, as in the
// mma.sync kernel.
//
// Macros from the prelude: those of mma_common.cuh (FJ_WARPS = 8 or 12 consumer warps)
// and FJ_STAGES, FJ_Q_BUFFERS, FJ_O_TMA, FJ_MASK, FJ_MASK_TYPE, FJ_HAS_WINDOW, FJ_DROPOUT, FJ_SOFTCAP.
#pragma once

namespace flashjit {
namespace mma {

static_assert(kRowTiles == 1 && kBlockM == 64 * kConsumers, "consumer warpgroups of 64 rows");
// Three consumers hold 160 registers a thread: S, P and O fit for head dim 64 and up to 96 keys a step.
static_assert(kConsumers == 2 || (kDimQk <= 64 && kDimV <= 64 && kBlockN <= 128), "three consumers: small tiles only");
static_assert(kDimQk % 64 == 0 && kDimV % 64 == 0, "head dims padded to whole swizzled regions");
constexpr bool kVarlen = FJ_VARLEN;
static_assert(!FJ_SPLIT || (!FJ_O_TMA && !FJ_VARLEN), "a split forward writes float partials of a dense batch");
static_assert(FJ_KV_CACHE == 0 || !FJ_VARLEN, "a KV cache of a dense batch");
// FJ_CHAIN_TILES: a work tile's last P V goes with the next tile's S_0 (chained_steps), its
// output after them, through its Q buffer while the next tile's S reads the other one.
static_assert(!FJ_CHAIN_TILES || (FJ_O_TMA && FJ_Q_BUFFERS == 2 && !FJ_SPLIT && !FJ_VARLEN && !FJ_KV_CACHE),
              "chained work tiles store O by TMA from two Q buffers, in a dense unsplit forward");

constexpr int kQBuffers = FJ_Q_BUFFERS;
// A Q buffer holds the work tile's Q, then (FJ_O_TMA) its O.
constexpr int kQTileDim = FJ_O_TMA && kDimV > kDimQk ? kDimV : kDimQk;
constexpr int kEpilogueBarrier = kTurnBarrier + kConsumers;  // + consumer: one per consumer warpgroup

#if FJ_O_TMA
// This consumer warpgroup's 64 rows of O x inverse (1 / rowsum, finish_rows) into its rows of
// the Q buffer (the swizzled layout of the Q tile); then one thread stores them with TMA boxes
// of 64 rows through o_map (the kernel parameter's: a copy of a tensor map outside parameter
// or global memory does not address) and returns (in that thread) with the stores committed.
FJ_DEVICE void store_output_rows(const TensorMap& o_map, const float (&o)[1][kDimV / 8][4],
                                 const float (&inverse)[1][2], int b, int h, int quad, int warp, int consumer,
                                 elem_t* tile, long long first_query) {
  const int lane = threadIdx.x % 32;
#pragma unroll
  for (int r = 0; r < 2; ++r) {
    const int row = warp * 16 + lane / 4 + 8 * r;  // of the work tile
#pragma unroll
    for (int n = 0; n < kDimV / 8; ++n) {
      const unsigned pair = pack2(o[0][n][2 * r] * inverse[0][r], o[0][n][2 * r + 1] * inverse[0][r]);
      *reinterpret_cast<unsigned*>(tile + tile_offset<kBlockM, kQTileDim>(row, n * 8 + quad * 2)) = pair;
    }
  }
  fence_async_shared();  // the stores above, before the TMA reads them
  named_barrier_sync(kEpilogueBarrier + consumer, 128);
  if (threadIdx.x % 128 == 0) {
#pragma unroll
    for (int region = 0; region < kDimV / kSwizzleElems; ++region) {
      tma_store(tile + region * kBlockM * kSwizzleElems + consumer * 64 * kSwizzleElems, o_map,
                region * kSwizzleElems, static_cast<int>(first_query + consumer * 64), h, b);
    }
    bulk_commit();
  }
}
// The same after finish_rows (LSE to memory).
FJ_DEVICE void store_output_tile(const KernelParams& p, const TensorMap& o_map, const float (&o)[1][kDimV / 8][4],
                                 const float (&row_max)[1][2], const float (&row_sum)[1][2],
                                 const long long (&rows)[1][2], int b, int h, int quad, int warp, int consumer,
                                 elem_t* tile, long long first_query) {
  float inverse[1][2];
  finish_rows(p, row_max, row_sum, rows, b, h, quad, inverse);
  store_output_rows(o_map, o, inverse, b, h, quad, warp, consumer, tile, first_query);
}
#endif

#if FJ_KV_CACHE == 2
// A paged cache's key tile (keys start .. start + kBlockN - 1 of batch entry b) as kPageBoxes
// TMA boxes, one a page of kPageRows keys (or one box of the whole tile within its page, where a
// page holds whole tiles), each page through the entry's row of the table. Only the boxes that
// hold keys below the entry's count are loaded (the table's row may end there); the others keep
// what the buffer held, which the key bounds mask (K) and zero_rows_past_count clears (V). The
// caller announces the bytes of page_boxes_of(...) boxes beforehand.
constexpr int kPageBoxes = FJ_PAGE_BOXES;
constexpr int kPageRows = kBlockN / kPageBoxes;
static_assert(kBlockN % kPageBoxes == 0 && kPageRows % 16 == 0, "whole pages of 16-row multiples a key tile");
FJ_DEVICE int page_boxes_of(const KernelParams& sp, long long start) {
  const long long left = sp.seqlen_k - start;  // > 0: a tile the block sees
  return static_cast<int>(min(static_cast<long long>(kPageBoxes), (left + kPageRows - 1) / kPageRows));
}
template <int kDim>
FJ_DEVICE void load_paged_tile(elem_t* tile, const TensorMap& map, const KernelParams& p, int b, int kv_head,
                               long long start, int boxes, unsigned long long* barrier) {
  // With several boxes a tile a box is a page (page_size == kPageRows, a constant) and starts it
  // (tiles start at whole steps); one box lies at its row of its page. The table's entries are
  // read before the first load is issued, so that their latencies overlap.
  const int* entries = p.page_table + b * p.page_table_stride;
  const int first = static_cast<int>(kPageBoxes > 1 ? start / kPageRows : start / p.page_size);
  const int row = kPageBoxes > 1 ? 0 : static_cast<int>(start % p.page_size);
  int pages[kPageBoxes];
#pragma unroll
  for (int box = 0; box < kPageBoxes; ++box) pages[box] = box < boxes ? entries[first + box] : 0;
#pragma unroll
  for (int box = 0; box < kPageBoxes; ++box) {
    if (box >= boxes) break;
#pragma unroll
    for (int region = 0; region < kDim / kSwizzleElems; ++region) {
      tma_load(tile + region * kBlockN * kSwizzleElems + box * kPageRows * kSwizzleElems, map, region * kSwizzleElems,
               row, kv_head, page_of(p, pages[box]), barrier);
    }
  }
}
#endif

#if FJ_KV_CACHE
// Rows first .. kBlockN - 1 of a V tile to zero, by a consumer warpgroup's 128 threads, seen by
// its wgmma after: a cache's rows past an entry's key count are memory the TMA loads as they
// are (not its zero fill past the map), and P = 0 there would still give 0 x NaN = NaN where
// they hold NaN or Inf. A warpgroup zeroes before its own product: two doing so write the same
// zeros.
FJ_DEVICE void zero_rows_past_count(elem_t* tile, int first, int consumer) {
  constexpr int kChunks = kDimV / 8;  // 16-byte chunks a row
  for (int index = first * kChunks + static_cast<int>(threadIdx.x % 128); index < kBlockN * kChunks; index += 128) {
    const int r = index / kChunks, c = index - r * kChunks;
    *reinterpret_cast<uint4*>(tile + tile_offset<kBlockN, kDimV>(r, c * 8)) = make_uint4(0u, 0u, 0u, 0u);
  }
  fence_async_shared();  // the stores above, before the wgmma reads the tile
  named_barrier_sync(kEpilogueBarrier + consumer, 128);
}
#endif

#if FJ_TRACE
// A diagnostic (FLASHJIT_CUDA_TRACE=1, scripts/trace_tiles.py): in every kTraceEvery-th block,
// the producer thread (slot 0) and the first thread of each consumer warpgroup (slots 1..) keep
// a tile's steps and clock64() at six points of each of their first kTraceTiles work tiles in
// KernelParams::trace, which the host prints after the launch. Consumer points: before the
// tile's pop, after it, Q arrived, K_0 arrived, the last P V done, the output issued. Producer
// points: the tile pushed, Q issued (FJ_EARLY_NEXT, where it was loaded early: the tile's loads
// begin), K_0 issued, before and after the atomic that takes the next tile (after the last V is
// issued, or with FJ_EARLY_NEXT after the last K).
struct TileTrace {
  long long* row = nullptr;  // this thread's first tile's fields, or nullptr
  FJ_DEVICE TileTrace(const KernelParams& p, int slot) {
    if (p.trace != nullptr && blockIdx.x % kTraceEvery == 0 && threadIdx.x % 128 == 0) {
      row = p.trace + (static_cast<long long>(blockIdx.x / kTraceEvery) * kTraceSlots + slot) * kTraceTiles * kTraceFields;
    }
  }
  FJ_DEVICE void mark(int tile, int point) const {
    if (row != nullptr && tile < kTraceTiles) row[tile * kTraceFields + 1 + point] = clock64();
  }
  FJ_DEVICE void steps(int tile, int count) const {
    if (row != nullptr && tile < kTraceTiles) row[tile * kTraceFields] = count;
  }
  // The last field: a value the next mark must wait for (the store needs it in a register).
  FJ_DEVICE void note(int tile, int value) const {
    if (row != nullptr && tile < kTraceTiles) row[tile * kTraceFields + 7] = value;
  }
};
static_assert(kConsumers + 1 <= kTraceSlots, "a trace slot for the producer and each consumer warpgroup");
#define FJ_TRACE_MARK(trace, tile, point) trace.mark(tile, point)
#define FJ_TRACE_STEPS(trace, tile, count) trace.steps(tile, count)
#else
#define FJ_TRACE_MARK(trace, tile, point) ((void)0)
#define FJ_TRACE_STEPS(trace, tile, count) ((void)0)
#endif

extern "C" __global__ void __launch_bounds__(kThreads + kProducerThreads, 1)
    fj_attention_forward(const __grid_constant__ KernelParams p) {
  extern __shared__ __align__(1024) unsigned char shared_raw[];
  if (FJ_SPLIT) let_dependents_launch();  // the combine kernel may start (it waits for this one)
  constexpr layout::HopperForward kLayout =
      layout::hopper_forward(kBlockM, kQTileDim, kBlockN, kDimQk, kDimV, kQBuffers, kStages, kTileSlotInts);
  static_assert(kLayout.k_ring - kLayout.q_ring == Ring<kQBuffers>::kBarriers * layout::kBarrierBytes &&
                    kLayout.queue_slots - kLayout.queue_ring == Ring<2>::kBarriers * layout::kBarrierBytes,
                "shared_layout.h sizes the rings as pipeline.cuh does");
  unsigned char* const base = aligned_for_swizzle(shared_raw);
  elem_t* q_tiles = reinterpret_cast<elem_t*>(base + kLayout.q_tiles);  // kQBuffers x [kBlockM][kQTileDim]
  elem_t* k_tiles = reinterpret_cast<elem_t*>(base + kLayout.k_tiles);  // kStages x [kBlockN][kDimQk]
  elem_t* v_tiles = reinterpret_cast<elem_t*>(base + kLayout.v_tiles);  // kStages x [kBlockN][kDimV]
  const auto barriers_at = [&](int offset) { return reinterpret_cast<unsigned long long*>(base + offset); };
  const Ring<kQBuffers> q_ring = Ring<kQBuffers>::at(barriers_at(kLayout.q_ring));
  const Ring<kStages> k_ring = Ring<kStages>::at(barriers_at(kLayout.k_ring));
  const Ring<kStages> v_ring = Ring<kStages>::at(barriers_at(kLayout.v_ring));
  const TileQueue tiles{Ring<2>::at(barriers_at(kLayout.queue_ring)),
                        reinterpret_cast<int*>(base + kLayout.queue_slots)};
#if FJ_VARLEN
  const int num_tiles = varlen_tiles(p, kFirstQueryTile);
#else
  // FJ_SPLIT: the work tiles of split 0, then those of split 1, ...
  const int tiles_a_split = p.num_query_blocks * p.batch * p.heads_q;
  const int num_tiles = tiles_a_split * (FJ_SPLIT ? p.num_splits : 1);
#endif
  // The parameters a work tile runs with: the kernel's own, or (FJ_VARLEN) its sequence's,
  // or (FJ_KV_CACHE) its batch entry's key count.
#if FJ_VARLEN
#define FJ_TILE_PARAMS(tile, local)                                       \
  const int entry_of_tile = varlen_entry(p, kFirstQueryTile, tile);        \
  const int local = tile - p.varlen[entry_of_tile * kVarlenFields];         \
  const KernelParams sp = sequence_params(p, entry_of_tile)
#elif FJ_KV_CACHE
  const auto batch_of_tile = [&](int local) {
    int block, b, h;
    block_coordinates(local % tiles_a_split, p.num_query_blocks, p.heads_q, &block, &b, &h);
    return b;
  };
#define FJ_TILE_PARAMS(tile, local) \
  const int local = tile;           \
  const KernelParams sp = kv_cache_params(p, batch_of_tile(local))
#else
#define FJ_TILE_PARAMS(tile, local) \
  const int local = tile;           \
  const KernelParams& sp = p
#endif
  // A work tile's query block, over (FJ_SPLIT) its split's span of keys alone.
  const auto block_of = [&](const KernelParams& sp, int local) {
#if FJ_SPLIT
    QueryBlock block(sp, local % tiles_a_split);
    block.clip_keys(static_cast<long long>(local / tiles_a_split) * p.split_keys, p.split_keys);
    return block;
#else
    return QueryBlock(sp, local);
#endif
  };

  const auto init = [&] {
    // A Q buffer is freed by each consumer warp after its last S, or (FJ_O_TMA)
    // by each consumer warpgroup once the store of its O has read the buffer.
    q_ring.init(FJ_O_TMA ? kConsumers : kWarps);
    k_ring.init();
    v_ring.init();
    tiles.init();
  };
  // The block is persistent: per work tile (block_coordinates' order) the
  // producer loads Q into the next free Q buffer, then K and V tiles, whose
  // rings run on across work tiles; the next tile's Q and first K load while the
  // consumers finish and store this one. The next tile is taken late, so that the
  // block nearest done takes it (heavy tiles come first under causal bounds): after
  // this tile's last V, or (FJ_EARLY_NEXT, a tile of more key tiles than K/V buffers)
  // once its last K is issued, about two steps before the consumers finish it, with
  // its Q loaded then into the buffer the consumers freed at this tile's step 0 (so
  // that the atomic's round trip and Q's latency leave the path between two tiles:
  // the trace's "wait for Q", bench/NOTES.md).
  const auto produce = [&] {
    prefetch_tensor_map(p.q_map);
    prefetch_tensor_map(p.k_map);
    prefetch_tensor_map(p.v_map);
    int kv_use = 0, q_use = 0;
    int tile = next_tile(p, 0, true);
#if FJ_TRACE
    const TileTrace trace(p, 0);
#endif
    // A work tile's Q into the next Q buffer.
    const auto load_q = [&](const QueryBlock& block, long long q_row0) {
      const int q_buffer = q_ring.produce(q_use++, kTileBytes<kBlockM, kDimQk>);
      tma_load_tile<kBlockM, kDimQk>(q_tiles + q_buffer * kBlockM * kQTileDim, p.q_map, q_row0 + block.first_query,
                                     block.h, block.b, &q_ring.full[q_buffer]);
    };
#if FJ_EARLY_NEXT
    static_assert(kQBuffers == 2 && !FJ_CHAIN_TILES && !FJ_SPLIT && !FJ_VARLEN && !FJ_KV_CACHE,
                  "the next tile's Q goes into the buffer this tile's step 0 freed");
    int next = -1;           // the next work tile once taken early, else -1
    bool next_q = false;     // whether its Q is loaded
#endif
    for (int n = 0;; ++n) {
#if !FJ_PRODUCER_SETUP
      tiles.push(n, tile);
      FJ_TRACE_MARK(trace, n, 0);
#endif
      if (tile >= num_tiles) {
#if FJ_PRODUCER_SETUP
        tiles.push(n, tile);
        FJ_TRACE_MARK(trace, n, 0);
#endif
        done_taking_tiles(p);
        return;
      }
      FJ_TILE_PARAMS(tile, local_tile);
      const QueryBlock block = block_of(sp, local_tile);
#if FJ_PRODUCER_SETUP
      {
        // Pushed with its block, which the consumers take as it is (they still make the
        // tile's parameters: a sequence's, a cache entry's, a split's).
        int fields[QueryBlock::kFields];
        block.to_fields(fields);
        tiles.push(n, tile, fields);
      }
      FJ_TRACE_MARK(trace, n, 0);
#endif
      const long long q_row0 = kVarlen ? sp.q_row0 : 0, k_row0 = kVarlen ? sp.k_row0 : 0;
#if FJ_KV_CACHE != 2
      // Key tile j for TMA: its first row and the map's outer coordinate, the batch entry.
      const auto key_tile_at = [&](int j, long long& row, int& outer) {
        outer = block.b;
        row = k_row0 + block.tile_start(j);
      };
#endif
#if FJ_EARLY_NEXT
      const bool q_loaded = next_q;
      next = -1;
      next_q = false;
      // The next tile, taken once the last K of a tile longer than the K/V rings is issued: the
      // consumers have then passed this tile's step 0, where (o=tma) they free the Q buffer it
      // loads into (o=direct: freed at the previous tile's last step). ptxas spills 34-62 bytes
      // in these kernels (the producer's 24 registers hold a second tile's coordinates for a
      // moment), wherever in the step the take goes (after V_{T-2} too).
      const auto take_next_early = [&](int j) {
        if (j != block.tiles - 1 || j < kStages) return;
        FJ_TRACE_MARK(trace, n, 3);
        next = next_tile(p, tile, false);
#if FJ_TRACE
        trace.note(n, next);
#endif
        FJ_TRACE_MARK(trace, n, 4);
        if (next < num_tiles) {
          const QueryBlock after = block_of(p, next);
          if (after.tiles > 0) {
            load_q(after, 0);
            next_q = true;
          }
        }
      };
#else
      constexpr bool q_loaded = false;
#endif
      // Nothing is loaded for a block that sees no key.
      if (block.tiles > 0) {
        if (!q_loaded) load_q(block, q_row0);
        FJ_TRACE_MARK(trace, n, 1);
        // In the order the consumers need them: K_j, then V_{j-1}.
        for (int j = 0; j <= block.tiles; ++j) {
#if FJ_KV_CACHE == 2
          // A paged cache: a box a page (load_paged_tile), as many bytes as the boxes loaded.
          if (j < block.tiles) {
            const int boxes = page_boxes_of(sp, block.tile_start(j));
            const int buffer = k_ring.produce(kv_use + j, boxes * kTileBytes<kPageRows, kDimQk>);
            load_paged_tile<kDimQk>(k_tiles + buffer * kBlockN * kDimQk, p.k_map, p, block.b, block.kv_head,
                                    block.tile_start(j), boxes, &k_ring.full[buffer]);
            if (j == 0) FJ_TRACE_MARK(trace, n, 2);
          }
          if (j > 0) {
            const int boxes = page_boxes_of(sp, block.tile_start(j - 1));
            const int buffer = v_ring.produce(kv_use + j - 1, boxes * kTileBytes<kPageRows, kDimV>);
            load_paged_tile<kDimV>(v_tiles + buffer * kBlockN * kDimV, p.v_map, p, block.b, block.kv_head,
                                   block.tile_start(j - 1), boxes, &v_ring.full[buffer]);
          }
#else
          long long row;
          int outer;
          if (j < block.tiles) {
            const int buffer = k_ring.produce(kv_use + j, kTileBytes<kBlockN, kDimQk>);
            key_tile_at(j, row, outer);
            tma_load_tile<kBlockN, kDimQk>(k_tiles + buffer * kBlockN * kDimQk, p.k_map, row, block.kv_head, outer,
                                           &k_ring.full[buffer]);
            if (j == 0) FJ_TRACE_MARK(trace, n, 2);
#if FJ_EARLY_NEXT
            take_next_early(j);
#endif
          }
          if (j > 0) {
            const int buffer = v_ring.produce(kv_use + j - 1, kTileBytes<kBlockN, kDimV>);
            key_tile_at(j - 1, row, outer);
            tma_load_tile<kBlockN, kDimV>(v_tiles + buffer * kBlockN * kDimV, p.v_map, row, block.kv_head, outer,
                                          &v_ring.full[buffer]);
          }
#endif
        }
        kv_use += block.tiles;
      }
      FJ_TRACE_STEPS(trace, n, block.tiles);
#if FJ_EARLY_NEXT
      if (next >= 0) {
        tile = next;
        continue;
      }
#endif
      FJ_TRACE_MARK(trace, n, 3);
      tile = next_tile(p, tile, false);
#if FJ_TRACE
      trace.note(n, tile);  // the atomic's result, before the point that times it
#endif
      FJ_TRACE_MARK(trace, n, 4);
    }
  };
  const auto consume = [&](int warpgroup) {
    // Broadcast from lane 0, so that ptxas keeps what derives from it (the Q tile's rows, its
    // wgmma descriptors) in uniform registers rather than rebuilding it in vector ones each step.
    const int consumer = __shfl_sync(0xffffffffu, warpgroup, 0);
    const int warp = threadIdx.x / 32 - 4;  // consumer warp 0..kWarps-1; rows warp * 16 .. + 15 of the block
    const int lane = threadIdx.x % 32;
    const int quad = lane % 4;
    const float scale_log2 = static_cast<float>(p.scale) * kLog2e;
    int kv_use = 0, q_use = 0;
#if FJ_O_TMA
    // The Q buffer whose O store this warpgroup's first thread has yet to see
    // read before freeing it (two Q buffers: freed during the next work tile).
    int store_pending = -1;
    const auto free_stored = [&] {
      if (store_pending >= 0 && threadIdx.x % 128 == 0) {
        bulk_wait_read();
        mbarrier_arrive(&q_ring.empty[store_pending]);
      }
      store_pending = -1;
    };
#endif
    first_turn(consumer);  // one turn sequence over all the block's work tiles (consumer_steps)
#if FJ_TRACE
    const TileTrace trace(p, 1 + consumer);
#endif
#if FJ_CHAIN_TILES
    // A work tile whose last P V is left to the next tile's first turn: O accumulates on in o,
    // P_last waits in prob, 1 / rowsum in carry_inverse (its LSE is written), the tile's index
    // in carry_tile (its place is worked out again at the store, so as to hold fewer registers).
    float o[1][kDimV / 8][4];
    unsigned prob[kBlockN / 16][4];
    float carry_inverse[1][2] = {};
    int carry_tile = 0;
    bool carrying = false;
    // The carried tile's output, once its last P V is done (tile n - 1's: the trace's index), from
    // its Q buffer: the last Q taken (q_use counts the tile being set up only after its steps).
    const auto store_carried = [&](int n) {
      free_stored();
      int block, b, h;
      block_coordinates(carry_tile, p.num_query_blocks, p.heads_q, &block, &b, &h);
      const int buffer = q_ring.buffer(q_use - 1);
      store_output_rows(p.o_map, o, carry_inverse, b, h, quad, warp, consumer, q_tiles + buffer * kBlockM * kQTileDim,
                        static_cast<long long>(block) * kBlockM);
      store_pending = buffer;
      carrying = false;
      FJ_TRACE_MARK(trace, n - 1, 5);
    };
    // The carried P V in a turn of its own, then the output: no next tile, or one with no key.
    const auto flush = [&](int n) {
      chained_last_step(
          consumer, -1, [&](int) { v_ring.consume(kv_use - 1); },
          [&](int) {
            wgmma_fragments_by_rows<kBlockN, kDimV>(o[0], prob,
                                                    v_tiles + v_ring.buffer(kv_use - 1) * kBlockN * kDimV);
          },
          [&](int) {
            pin(o[0]);
            pin(prob);
            v_ring.release(kv_use - 1, lane);
          });
      store_carried(n);
    };
#endif
    for (int n = 0;; ++n) {
      FJ_TRACE_MARK(trace, n, 0);
#if FJ_PRODUCER_SETUP
      int fields[QueryBlock::kFields];
      const int tile = tiles.pop(n, lane, fields);
#else
      const int tile = tiles.pop(n, lane);
#endif
      if (tile >= num_tiles) {
#if FJ_CHAIN_TILES
        if (carrying) flush(n);
#endif
        break;
      }
      FJ_TRACE_MARK(trace, n, 1);
      FJ_TILE_PARAMS(tile, local_tile);
#if FJ_PRODUCER_SETUP
      const QueryBlock block = QueryBlock::from_fields(fields);  // the producer's block_of
#else
      const QueryBlock block = block_of(sp, local_tile);
#endif
#if FJ_SPLIT
      const int split = local_tile / tiles_a_split;
#else
      const int split = 0;
#endif
      const int b = block.b, h = block.h;
      // The thread's rows g and g + 8 (ints, as seqlen_q is), made into the softmax's
      // 64-bit pairs where they are used, so that the step loop holds one register for them.
      const int row = static_cast<int>(block.first_query) + warp * 16 + lane / 4;
      const long long rows[1][2] = {{row, row + 8}};
      const int first_tile = static_cast<int>(block.first_tile);
      const long long consumer_first = block.first_query + consumer * 64;
      const QueryBlock::Interior interior = block.interior_tiles(sp, consumer_first, consumer_first + 64 <= sp.seqlen_q);
#if FJ_HAS_WINDOW && !FJ_EDGE_GENERAL && FJ_FOLD_SCALE && FJ_MASK == 0
      // Edge tiles without a left bound (right_edge_logits): each row's visible keys past the work
      // tile's first key, less the thread's first column; rows past the sequence see none.
      int right_limit[2];
#pragma unroll
      for (int r = 0; r < 2; ++r) {
        const long long end = rows[0][r] < sp.seqlen_q ? key_end(sp, rows[0][r]) : first_tile;
        right_limit[r] = static_cast<int>(end - first_tile) - 2 * quad;
      }
#endif

#if FJ_CHAIN_TILES
      if (carrying && block.tiles == 0) flush(n);
      if (!carrying) zero(o);
      const bool carried = carrying;  // this tile's first turn issues the carried P V
#else
      float o[1][kDimV / 8][4];
      zero(o);
      constexpr bool carried = false;
#endif
      float row_max[1][2] = {{negative_infinity<float>(), negative_infinity<float>()}};  // log2 domain
      float row_sum[1][2] = {{0.0f, 0.0f}};
      if (block.tiles == 0) {
        write_result(sp, o, row_max, row_sum, rows, b, h, quad, split);  // O = 0, LSE = -inf
        continue;
      }
      const int q_buffer = __shfl_sync(0xffffffffu, q_ring.buffer(q_use), 0);  // uniform (as consumer above)
      elem_t* q_tile = q_tiles + q_buffer * kBlockM * kQTileDim;
      q_ring.consume(q_use);
      FJ_TRACE_MARK(trace, n, 2);
      // The same waits and releases as the working path's lambdas below: a change to
      // either must be made to both, or the rings' phases break.
      if (FJ_SPLIT && consumer_first >= sp.seqlen_q) {
        // No row of this warpgroup is a query (decoding: a block's few packed rows all lie in
        // the first): its turns and buffers, no product, no output. Only in split kernels: in
        // the others the branch alone makes ptxas spill in the step loop (D64 with three
        // warpgroups 52 -> 132 bytes, D256 0 -> 36), where it would save a 192-row tile's last
        // warpgroups at most.
        idle_steps(
            consumer, block.tiles,
            [&](int j) {
              if (j < block.tiles) k_ring.consume(kv_use + j);
              if (j > 0) v_ring.consume(kv_use + j - 1);
            },
            [&](int j) {
              k_ring.release(kv_use + j, lane);
              if (j == block.tiles - 1) q_ring.release(q_use, lane);  // split kernels: no FJ_O_TMA
            },
            [&](int j) { v_ring.release(kv_use + j, lane); });
        kv_use += block.tiles;
        ++q_use;
        continue;
      }
      // This warpgroup's own tiles: the first `mine` of the block's, then only turns.
      // (Broadcast from lane 0, so that ptxas sees it uniform and keeps the rings' arithmetic in
      // uniform registers.)
      const int mine =
          FJ_BLOCK_SPAN ? block.tiles : __shfl_sync(0xffffffffu, block.tiles_seen_by(sp, consumer_first), 0);
#if FJ_CHAIN_TILES
      // Where every warpgroup runs all the block's tiles (no idle turns to keep in step), the
      // last P V goes with the next tile's S_0. The same in every warpgroup.
      bool all_run_all = true;
#pragma unroll
      for (int c = 0; c < kConsumers; ++c) {
        all_run_all = all_run_all && block.tiles_seen_by(sp, block.first_query + 64 * c) == block.tiles;
      }
      const bool keep_last = FJ_BLOCK_SPAN || __shfl_sync(0xffffffffu, all_run_all, 0);
#endif
      float s[1][kBlockN / 8][4];
#if !FJ_CHAIN_TILES
      unsigned prob[kBlockN / 16][4];
#endif
      float scale_old[1][2];
      bool rescale = false;
#if FJ_CHAIN_TILES
      chained_steps(
          consumer, mine, carried, keep_last,
#else
      consumer_steps(
          consumer, mine,
#endif
          [&](int j) {  // K_j, and V_{j-1} (j = 0 carried: the previous tile's last)
            if (j < mine) k_ring.consume(kv_use + j);
            if (j == 0) FJ_TRACE_MARK(trace, n, 3);
            if (j > 0 || carried) v_ring.consume(kv_use + j - 1);
#if FJ_KV_CACHE
            if (j == block.tiles) {  // the last V tile: its rows past the entry's count
              const long long past = sp.seqlen_k - block.tile_start(j - 1);
              if (past < kBlockN) {
                zero_rows_past_count(v_tiles + v_ring.buffer(kv_use + j - 1) * kBlockN * kDimV,
                                     static_cast<int>(past), consumer);
              }
            }
#endif
          },
          [&](int j) {  // S_j = Q K_j^T
            wgmma_rows_by_rows<kBlockM, kBlockN, kDimQk>(s[0], q_tile, consumer * 64,
                                                         k_tiles + k_ring.buffer(kv_use + j) * kBlockN * kDimQk);
          },
          [&](int j) {  // logits, the softmax step and dropout of S_j, beside P_{j-1} V_{j-1}
            pin(s[0]);
            k_ring.release(kv_use + j, lane);
#if FJ_O_TMA
            // The previous work tile's Q buffer (a carried output's: a step after its store).
            if (j == (carried ? 1 : 0)) free_stored();
#else
            if (j == mine - 1) q_ring.release(q_use, lane);  // the last read of Q
#endif
            const long long tile_start = first_tile + j * kBlockN;
            const long long step_rows[1][2] = {{row, row + 8}};
            if (interior.contains(j)) {
              tile_logits<1, true>(s, sp, step_rows, tile_start, b, h, quad, scale_log2);
#if FJ_HAS_WINDOW && !FJ_EDGE_GENERAL && FJ_FOLD_SCALE && FJ_MASK == 0
            } else if (sp.window_left < 0) {
              const int limit[1][2] = {{right_limit[0] - j * kBlockN, right_limit[1] - j * kBlockN}};
              right_edge_logits<1>(s, limit);
#endif
            } else {
              tile_logits<1, false>(s, sp, step_rows, tile_start, b, h, quad, scale_log2);
            }
            // O is rescaled (in prepare) only where a row of this warp moved its base.
            rescale = __any_sync(0xffffffffu, softmax_step(s, row_max, row_sum, scale_old, scale_log2));
#if FJ_DROPOUT
            apply_dropout(s, sp, static_cast<long long>(b) * p.heads_q + h, step_rows, tile_start, quad);
#endif
            return rescale;  // warp-uniform: consumer_steps waits for P_{j-1} V_{j-1} after this work
          },
          [&](int j) {  // O += P_j V_j
            wgmma_fragments_by_rows<kBlockN, kDimV>(o[0], prob,
                                                    v_tiles + v_ring.buffer(kv_use + j) * kBlockN * kDimV);
          },
          [&](int j) {
            pin(o[0]);
            pin(prob);
            v_ring.release(kv_use + j, lane);
          },
          [&](int j) {
            if (j > 0 && rescale) rescale_rows(o, scale_old);  // O holds tiles up to j - 1: rebase it on tile j's bases
            to_fragments<kBlockN>(prob, s[0]);
          }
#if FJ_CHAIN_TILES
          ,
          [&] {  // the carried tile's O is whole: out, and o starts this tile's
            store_carried(n);
            zero(o);
          }
#endif
      );
      FJ_TRACE_MARK(trace, n, 4);
      FJ_TRACE_STEPS(trace, n, mine);
      idle_tail(
          consumer, mine, block.tiles,
          [&](int j) {
            k_ring.consume(kv_use + j);
            v_ring.consume(kv_use + j);
          },
          [&](int j) {
            k_ring.release(kv_use + j, lane);
            v_ring.release(kv_use + j, lane);
          });
      kv_use += block.tiles;
      ++q_use;
#if FJ_CHAIN_TILES
      if (carried) free_stored();  // the carried output's Q buffer, where no step 1 freed it
      if (keep_last) {
        // The LSE now, O once the next turn's P V is done (store_carried).
        finish_rows(p, row_max, row_sum, rows, b, h, quad, carry_inverse);
        carry_tile = tile;
        carrying = true;
        continue;
      }
#endif
#if FJ_VARLEN
      // The sequence's parameters again from the table, so that its output fields are not
      // held in registers through the loop (the table's loads are not moved across it).
      const KernelParams out = sequence_params(p, entry_of_tile);
#else
      const KernelParams& out = p;
#endif
#if FJ_O_TMA
      if (!kVarlen || consumer_first + 64 <= out.seqlen_q) {
        const long long q_row0 = kVarlen ? out.q_row0 : 0;
        store_output_tile(out, p.o_map, o, row_max, row_sum, rows, b, h, quad, warp, consumer, q_tile,
                          q_row0 + block.first_query);
        store_pending = q_buffer;
        if (kQBuffers == 1) free_stored();  // the producer waits for this buffer before the next Q
      } else {
        // A sequence's last rows (FJ_VARLEN): a 64-row box would write into the next sequence's.
        write_output(out, o, row_max, row_sum, rows, b, h, quad);
        named_barrier_sync(kEpilogueBarrier + consumer, 128);  // every warp's last S has read Q
        store_pending = q_buffer;
        free_stored();
      }
#else
      write_result(out, o, row_max, row_sum, rows, b, h, quad, split);
#endif
      FJ_TRACE_MARK(trace, n, 5);
    }
    last_turn(consumer);
#if FJ_O_TMA
    if (threadIdx.x % 128 == 0) bulk_wait_all();  // shared memory stays until the stores are done
#endif
  };
  specialised_roles(init, produce, consume);
#undef FJ_TILE_PARAMS
}

}  // namespace mma
}  // namespace flashjit

// Forward attention on tensor cores for float16 and bfloat16 (mma_common.cuh):
// each of FJ_WARPS warps owns FJ_ROW_TILES x 16 query rows of the block, so
// every K and V fragment read from shared memory feeds FJ_ROW_TILES mma; K and V stream
// through in tiles of FJ_BLOCK_N keys, K loaded with cp.async while P V runs
// and V while Q K^T runs. Head dims are padded to FJ_HEAD_DIM_QK /
// FJ_HEAD_DIM_V (multiples of 16) with zeros in shared memory. P goes from
// the C fragments of S to the A fragments of P V without leaving registers.
//
// The online softmax is softmax.cuh's. Macros from the prelude: those of
// mma_common.cuh and FJ_MASK, FJ_MASK_TYPE, FJ_HAS_WINDOW, FJ_DROPOUT, FJ_SOFTCAP,
// FJ_SPLIT (a span of the keys a block, partial results for combine.cuh), FJ_KV_CACHE (each
// batch entry's own key count, 2: and its keys through a page table; KernelParams::seqused_k).
// In the split forward's one-warp blocks a boolean mask whose entries do not depend on the query
// row (a key-padding mask) lets the block pass over the key tiles it hides entirely: their K and
// V are not loaded.
#pragma once

namespace flashjit {
namespace mma {

// FJ_SKIP_HIDDEN: the split forward's one-warp blocks (decoding) with a boolean mask. (The unsplit
// kernel and the four-warp split kernel with a mask sit at the register limit at head dim 128: the
// few values the search keeps made them spill.)
#define FJ_SKIP_HIDDEN (FJ_MASK == 1 && FJ_SPLIT && FJ_WARPS == 1)
#if FJ_SKIP_HIDDEN
// The key tiles of a block's span [key_lo, key_hi) that its boolean mask row leaves some key of,
// found 32 at a time by a ballot (a lane a tile, each reading its tile's entries; 16-byte loads
// where the row is contiguous and aligned). Tiles that cross the span's ends count as visible:
// their entries outside the span are not read. Where the entries depend on the query row, every
// tile. Each warp finds the same tiles from the same entries, so that the block's loop stays
// uniform. Only the chunk and its bits are kept (two registers); the rest is read again from the
// parameters and the kernel's own values when a chunk is found, and the next chunk's entries are
// sent toward L2 meanwhile. A skipped tile's logits would all be -inf, which leaves the row's
// maximum, sum and output as they were: the same bits, but for non-finite values in a hidden
// key's V, which no longer reach the output (0 * inf).
struct VisibleTiles {
  int chunk = -1;  // the chunk of 32 tiles (from the span's first tile) that bits describes
  unsigned bits = 0;

  FJ_DEVICE static bool row_independent(const KernelParams& p) { return p.mask_stride[2] == 0 || p.seqlen_q == 1; }

  FJ_DEVICE static unsigned chunk_bits(const KernelParams& p, int b, int h, long long first_tile, long long key_lo,
                                       long long key_hi, int c) {
    const long long start = first_tile + static_cast<long long>(c * 32 + static_cast<int>(threadIdx.x % 32)) * kBlockN;
    const long long ahead = start + 32 * kBlockN;  // this lane's tile of the next chunk
    if (ahead >= key_lo && ahead + kBlockN <= key_hi) {
      asm volatile("prefetch.global.L2 [%0];\n" ::"l"(mask_element(p, b, h, 0, ahead)));
    }
    bool seen = start < key_hi;
    if (seen && start >= key_lo && start + kBlockN <= key_hi) {
      const long long stride = p.mask_stride[3];
      const FJ_MASK_TYPE* entry = mask_element(p, b, h, 0, start);
      seen = false;
      if (stride == 1 && reinterpret_cast<unsigned long long>(entry) % 16 == 0) {
        const uint4* words = reinterpret_cast<const uint4*>(entry);
#pragma unroll
        for (int w = 0; w < kBlockN / 16; ++w) {
          const uint4 x = words[w];
          seen |= (x.x | x.y | x.z | x.w) != 0;
        }
      } else {
#pragma unroll 8
        for (int j = 0; j < kBlockN; ++j) seen |= entry[j * stride] != 0;
      }
    }
    return __ballot_sync(0xffffffffu, seen);
  }

  // The first visible tile's first key from `from` (a tile's first key) on; key_hi or past it: none.
  FJ_DEVICE long long next(const KernelParams& p, int b, int h, long long first_tile, long long key_lo,
                           long long key_hi, long long from) {
    if (!row_independent(p)) return from;
    while (from < key_hi) {
      const int index = static_cast<int>((from - first_tile) / kBlockN);
      const int c = index / 32;
      if (c != chunk) {
        bits = chunk_bits(p, b, h, first_tile, key_lo, key_hi, c);
        chunk = c;
      }
      const unsigned left = bits >> (index % 32);
      if (left != 0) return from + static_cast<long long>(__ffs(static_cast<int>(left)) - 1) * kBlockN;
      from = first_tile + static_cast<long long>(c + 1) * 32 * kBlockN;
    }
    return from;
  }
};
static_assert(sizeof(FJ_MASK_TYPE) == 1 && kBlockN % 16 == 0, "a boolean mask's entries are bytes");
#endif

// S = Q K^T for this warp's rows (kRowTiles x 16 x kBlockN): each K fragment feeds every row tile.
FJ_DEVICE void scores(float (&s)[kRowTiles][kBlockN / 8][4], const elem_t* q_tile, const elem_t* k_tile, int warp,
                      int lane) {
  zero(s);
  mma_rows_by_rows<kDimQk, kBlockN, kPitchQk, kPitchQk>(s, q_tile + (warp * kRowTiles * 16) * kPitchQk, k_tile,
                                                        lane);
}

// Key rows [first, first + kBlockN) of k or v into a tile: in place, or (FJ_KV_CACHE 2)
// each through the batch entry's row of the page table.
template <int kDim>
FJ_DEVICE void load_key_tile(elem_t* tile, const KernelParams& p, const KernelOperand& x, int b, int kv_head,
                             long long first, long long row_end, int dim) {
#if FJ_KV_CACHE == 2
  const int* pages = p.page_table + b * p.page_table_stride;
  const elem_t* head = static_cast<const elem_t*>(x.data) + kv_head * x.stride_head;
  const int page_size = p.page_size, key = static_cast<int>(first);  // keys are ints (seqlen_k)
  if (page_size % kBlockN == 0) {  // the tile (first a multiple of kBlockN) within one page: one lookup
    const elem_t* rows = head + static_cast<long long>(page_of(p, pages[key / page_size])) * x.stride_batch +
                         static_cast<long long>(key % page_size - key) * x.stride_seq;
    load_rows<kBlockN, kDim>(tile, first, row_end, dim, head, [&](long long row) { return rows + row * x.stride_seq; });
  } else {
    load_rows<kBlockN, kDim>(tile, first, row_end, dim, head, [&](long long row) {
      const int r = static_cast<int>(row);
      return head + static_cast<long long>(page_of(p, pages[r / page_size])) * x.stride_batch +
             static_cast<long long>(r % page_size) * x.stride_seq;
    });
  }
#else
  load_tile<kBlockN, kDim>(tile, operand_row<const elem_t>(x, b, kv_head, 0), x.stride_seq, first, row_end, dim);
#endif
}

extern "C" __global__ void __launch_bounds__(kThreads) fj_attention_forward(const KernelParams launch_params) {
  extern __shared__ __align__(16) unsigned char shared_bytes[];
  if (FJ_SPLIT) let_dependents_launch();  // the combine kernel may start (it waits for this one)
  constexpr layout::MmaForward kLayout = layout::mma_forward(kBlockM, kBlockN, kPitchQk, kPitchV);
  elem_t* q_tile = reinterpret_cast<elem_t*>(shared_bytes + kLayout.q_tile);  // [kBlockM][kPitchQk]
  elem_t* k_tile = reinterpret_cast<elem_t*>(shared_bytes + kLayout.k_tile);  // [kBlockN][kPitchQk]
  elem_t* v_tile = reinterpret_cast<elem_t*>(shared_bytes + kLayout.v_tile);  // [kBlockN][kPitchV]

  int block, b, h;
  block_coordinates(launch_params.num_query_blocks, launch_params.heads_q, &block, &b, &h);
#if FJ_KV_CACHE
  const KernelParams p = kv_cache_params(launch_params, b);
#else
  const KernelParams& p = launch_params;
#endif
  const int kv_head = h / p.group_size;
  const int warp = threadIdx.x / 32;
  const int lane = threadIdx.x % 32;
  const int group = lane / 4;  // g: row within the 8-row half of a fragment
  const int quad = lane % 4;   // t: column pair
  const long long first_query = static_cast<long long>(block) * kBlockM;
#if FJ_DROPOUT
  const long long batch_head = static_cast<long long>(b) * p.heads_q + h;
#endif
  long long rows[kRowTiles][2];
  fragment_rows(first_query, warp, group, rows);

  const bool block_full = first_query + kBlockM <= p.seqlen_q;
  const long long last_query = min(first_query + kBlockM, static_cast<long long>(p.seqlen_q)) - 1;
#if FJ_SPLIT
  // This block's span of keys (blockIdx.y): split_keys is a multiple of kBlockN,
  // so no key tile straddles two spans.
  const long long span_lo = static_cast<long long>(blockIdx.y) * p.split_keys;
  const long long key_lo = max(key_begin(p, first_query), span_lo);
  const long long key_hi = min(key_end(p, last_query), span_lo + p.split_keys);
#else
  const long long key_lo = key_begin(p, first_query);
  const long long key_hi = key_end(p, last_query);
#endif
  const float scale_log2 = static_cast<float>(p.scale) * kLog2e;

  load_tile<kBlockM, kDimQk>(q_tile, operand_row<const elem_t>(p.q, b, h, 0), p.q.stride_seq, first_query,
                             p.seqlen_q, p.head_dim_qk);
  const long long first_tile = key_lo / kBlockN * kBlockN;
#if FJ_SKIP_HIDDEN
  VisibleTiles visible_tiles;
  const auto next_tile = [&](long long from) {
    return visible_tiles.next(p, b, h, first_tile, key_lo, key_hi, from);
  };
#else
  const auto next_tile = [](long long from) { return from; };
#endif
  long long tile_start = next_tile(first_tile);
  if (tile_start < key_hi) {
    load_key_tile<kDimQk>(k_tile, p, p.k, b, kv_head, tile_start, key_hi, p.head_dim_qk);
  }
  cp_async_commit();

  float o[kRowTiles][kDimV / 8][4];
  zero(o);
  float row_max[kRowTiles][2], row_sum[kRowTiles][2];  // max in the log2 domain
#pragma unroll
  for (int m = 0; m < kRowTiles; ++m) {
    row_max[m][0] = row_max[m][1] = negative_infinity<float>();
    row_sum[m][0] = row_sum[m][1] = 0.0f;
  }
  while (tile_start < key_hi) {
    cp_async_wait<0>();
    __syncthreads();  // K tile (and Q) in shared memory; V tile free
    load_key_tile<kDimV>(v_tile, p, p.v, b, kv_head, tile_start, key_hi, p.head_dim_v);
    cp_async_commit();

    float s[kRowTiles][kBlockN / 8][4];
    scores(s, q_tile, k_tile, warp, lane);

    // Logits (scale, softcap, mask, bounds) in the log2 domain, and the row maxima.
    const bool interior = block_full && tile_start >= key_lo && tile_start + kBlockN <= key_hi &&
                          all_visible(p, first_query, first_query + kBlockM - 1, tile_start, tile_start + kBlockN - 1);
    if (interior) {
      tile_logits<kRowTiles, true>(s, p, rows, tile_start, b, h, quad, scale_log2);
    } else {
      tile_logits<kRowTiles, false>(s, p, rows, tile_start, b, h, quad, scale_log2);
    }
    float scale_old[kRowTiles][2];
    softmax_step(s, row_max, row_sum, scale_old, scale_log2);
    rescale_rows(o, scale_old);
#if FJ_DROPOUT
    apply_dropout(s, p, batch_head, rows, tile_start, quad);
#endif

    const long long next_start = next_tile(tile_start + kBlockN);
    cp_async_wait<0>();
    __syncthreads();  // V tile in shared memory; every warp done reading K
    if (next_start < key_hi) {
      load_key_tile<kDimQk>(k_tile, p, p.k, b, kv_head, next_start, key_hi, p.head_dim_qk);
    }
    cp_async_commit();

    // O += P V: P from the C fragments of S; each V fragment feeds every row tile.
    mma_fragments_by_rows<kBlockN, kDimV, kPitchV>(o, s, v_tile, lane);
    __syncthreads();  // every warp done reading V before the next tile's V load
    tile_start = next_start;
  }
  cp_async_wait<0>();
  write_result(p, o, row_max, row_sum, rows, b, h, quad, static_cast<int>(blockIdx.y));
}

}  // namespace mma
}  // namespace flashjit

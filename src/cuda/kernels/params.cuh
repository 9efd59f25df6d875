// The parameters of every attention kernel: one struct, passed by value. The
// host launcher and the NVRTC sources include this same file, so the layout
// cannot drift. Plain types only: it compiles as host C++ and under NVRTC.
#pragma once

namespace flashjit {

// A [batch, heads, seqlen, dim] operand: base pointer and element strides.
// The last dim is contiguous; broadcast and size-1 dims have stride 0.
struct KernelOperand {
  void* data;
  long long stride_batch;
  long long stride_head;
  long long stride_seq;
};

// A TMA descriptor (CUtensorMap) of an operand, encoded on the host
// (backend.cpp): [batch, heads, seqlen, dim] read in boxes of 64 columns (128
// bytes, the wgmma swizzle's width) by a kernel-chosen number of rows.
struct alignas(64) TensorMap {
  unsigned long long opaque[16];
};

struct KernelParams {
  // The sm_90a kernels (attention_hopper*.cuh) load q, k, v and dout through these
  // (and the forward may store o through o_map, in boxes of 64 rows); the others
  // leave them unset. First, for their 64-byte alignment.
  TensorMap q_map, k_map, v_map, dout_map, o_map;
  KernelOperand q, k, v, o;              // forward inputs and output
  KernelOperand dout, dq, dk, dv;        // backward only
  KernelOperand lse;                     // [batch, heads_q, seqlen_q], accumulator type
  void* delta;                           // backward scratch: rowsum(dO * O), [B * Hq][scratch_pitch]
  void* lse_log2;                        // sm_90a backward scratch: LSE * log2(e) (+inf: no key), same layout
  long long scratch_pitch;               // seqlen_q (mma.sync), or rounded up to whole query tiles (sm_90a;
                                         // FJ_VARLEN: a dQ tile's rows, sequence_params gives a sequence's)
  const void* mask;                      // [b, h, i, j] with zero strides on broadcast dims
  long long mask_stride[4];

  int batch;
  int heads_q;
  int heads_kv;
  int group_size;  // heads_q / heads_kv: query head h reads kv head h / group_size
  int seqlen_q;
  int seqlen_k;
  int head_dim_qk;  // true sizes; the kernel pads to its compiled head dims
  int head_dim_v;
  int num_query_blocks;  // ceil(seqlen_q / block rows) for the launched kernel
  int num_key_blocks;    // ceil(seqlen_k / block rows) for the dK/dV kernel
  // Persistent sm_90a forward: blocks take work tiles (query block, batch, head)
  // from tile_counter[0], zero at the launch (nullptr: a block a tile). With
  // tile_counter_resets, tile_counter[1] counts the blocks done taking tiles, and
  // the last of them sets both back to zero for the next launch on the stream.
  // With static_tiles (and no counter) a block takes one tile of each round of
  // gridDim.x tiles in a snake's order (pipeline.cuh, next_tile): a fixed schedule.
  unsigned* tile_counter;
  int tile_counter_resets;
  int static_tiles;
  // Split forward (few query blocks, many keys: decoding): blockIdx.y picks a span
  // of split_keys keys (a multiple of the key step); each block writes its span's
  // normalised O and LSE (natural log, -inf: no key) as floats to split_o
  // [num_splits][batch * heads_q][seqlen_q][head_dim_v] and split_lse
  // [num_splits][batch * heads_q][seqlen_q], which the combine kernel merges into o and lse.
  float* split_o;
  float* split_lse;
  int num_splits;
  int split_keys;

  double scale;    // multiplies q.k
  double softcap;  // > 0: score = softcap * tanh(score / softcap)

  // Key j is visible from query i when
  //   window_left < 0 || j >= i + diagonal_shift - window_left, and
  //   window_right < 0 || j <= i + diagonal_shift + window_right.
  long long window_left;
  long long window_right;
  long long diagonal_shift;

  unsigned long long dropout_seed;
  unsigned long long dropout_offset;
  // Device words (seed low, high, offset low, high) read in place of the two above where
  // given (fj_attention_options.dropout_seed_words): dropout_seed_of, dropout_offset_of.
  const unsigned* dropout_seed_words;
  unsigned int dropout_threshold;  // drop when the Philox word is below this
  double dropout_keep_scale;       // 1 / (1 - p)
  // Added to b * heads_q + h in the dropout counter: a sequence of a variable-length
  // batch, run as a batch of one, draws as its batch entry (AttentionProblem::dropout_batch).
  long long dropout_head_base;

  // A variable-length batch in one launch (the sm_90a kernels with FJ_VARLEN): q, k, v,
  // o, lse and the gradients are the packed operands (batch strides 0, maps over one
  // batch entry of all the rows). Entry s of varlen (kVarlenFields ints; the order of
  // the forward's work, longest first) is a sequence: first query tile and first key
  // tile of its work (counted over all heads), sequence index, first query row,
  // queries, first key row, keys; after the last entry, the query tiles and the key
  // tiles of all of them (varlen_tiles), which the kernels read (the host knows only a
  // bound where the table was built on the device); the backward's scratch rows are
  // entry-major. A sequence's diagonal shift is
  // its keys - queries unless varlen_top_left. q_row0 and k_row0 are the first rows
  // of the sequence a block works on (sequence_params), 0 otherwise.
  const int* varlen;
  // The device-side table's inputs (varlen_table.cuh): offsets in device memory and the
  // rows of a query tile and of a key tile the counts are taken in.
  const int* cu_seqlens_q;
  const int* cu_seqlens_k;
  int varlen_query_rows;
  int varlen_key_rows;
  int varlen_top_left;
  long long q_row0;
  long long k_row0;

  // A KV cache in one launch (the mma.sync forward with FJ_KV_CACHE): batch entry b uses its
  // first seqused_k[b] keys (device memory; seqlen_k is the longest), its diagonal shifted
  // by its own count unless varlen_top_left (kv_cache_params). FJ_KV_CACHE 2: key j of entry
  // b is row j % page_size of page page_table[b * page_table_stride + j / page_size] (device
  // memory), k's and v's batch strides stepping pages.
  const int* seqused_k;
  const int* page_table;
  long long page_table_stride;
  int page_size;
  int num_pages;  // FJ_KV_CACHE 2: page indices are clamped into 0 .. num_pages - 1 (page_of)

  // The one-pass sm_90a backward (FJ_ONE_PASS): dQ's float32 partial sums, laid out like the
  // scratch rows (delta, lse_log2) in tiles of the kernel's block_n rows: tile r / block_n of
  // scratch row r holds two chunks of block_n x head_dim_qk / 2 floats, one a consumer warpgroup,
  // in its accumulator's fragment order; and a counter a chunk, which orders the key blocks' adds.
  // The prep kernel zeroes the dq_counters counters, and the first dq_zero_floats floats of
  // dq_accum (the atomic one pass's sums, which every visitor adds into; 0 for the others).
  float* dq_accum;
  int* dq_semaphore;
  long long dq_counters;
  long long dq_zero_floats;
  // The split dK/dV kernel over a GQA group's query heads in parts (FJ_DKDV_PARTS): dkdv_parts
  // blocks a key block, part i walking query heads i * group / parts onward; each part's float32
  // sums go to dkdv_partial ([part][b][kv head][key block][kBlockM rows][dk then dv columns]), and
  // the key block's last part to arrive (dkdv_counters, one a key block, which the prep kernel
  // zeroes: dkdv_counter_count of them) adds them in part order and writes dK and dV. 1: no parts.
  float* dkdv_partial;
  int* dkdv_counters;
  long long dkdv_counter_count;
  int dkdv_parts;

  // FJ_TRACE (a diagnostic, FLASHJIT_CUDA_TRACE=1): kTraceTiles x kTraceFields clock64() values a
  // work tile for each traced thread (attention_hopper.cuh), zeroed and printed by the host.
  long long* trace;
};

// The sm_90a forward's trace (FJ_TRACE): every kTraceEvery-th block, its producer thread and the
// first thread of each consumer warpgroup (4 slots a block), kTraceTiles work tiles each, a
// tile's steps, six clock64() points and one value (the producer's next tile).
constexpr int kTraceEvery = 16;
constexpr int kTraceTiles = 40;
constexpr int kTraceFields = 8;
constexpr int kTraceSlots = 4;
// The one pass's trace (attention_hopper_bwd.cuh, StepTrace): blocks below kBackwardTraceBlocks,
// kTraceSlots slots each (the dQ writer threads, the consumer warpgroups), kBackwardTraceSteps
// steps and a last row each.
constexpr int kBackwardTraceBlocks = 512;
constexpr int kBackwardTraceSteps = 64;

constexpr int kVarlenFields = 7;
enum VarlenField { kFirstQueryTile, kFirstKeyTile, kSequence, kFirstQuery, kQueries, kFirstKey, kKeys };

}  // namespace flashjit

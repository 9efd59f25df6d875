// The table of a variable-length batch (KernelParams::varlen) built on the device
// from offsets in device memory (cu_seqlens_q, cu_seqlens_k), which the host never
// reads: kVarlenFields ints an entry as the host's varlen_table writes them, then
// the total query tiles and key tiles (the trailer the kernels read their counts
// from). One block. Each offset is clamped into the packed rows (seqlen_q and
// seqlen_k of this launch: the totals) and not below its sequence's start, so that
// offsets nobody checked cannot address outside the operands. Entries go longest
// first (ties in the batch's order) up to kSortedEntries sequences, in the batch's
// order beyond (ranking costs each thread a pass over the batch).
#pragma once

namespace flashjit {

constexpr int kSortedEntries = 2048;

// Rows of sequence b within [0, total].
FJ_DEVICE void clamped_rows(const int* offsets, int b, int total, int* first, int* count) {
  const int start = min(max(offsets[b], 0), total);
  const int end = min(max(offsets[b + 1], start), total);
  *first = start;
  *count = end - start;
}

extern "C" __global__ void __launch_bounds__(FJ_THREADS) fj_varlen_table(const KernelParams p) {
  __shared__ long long query_sums[FJ_THREADS], key_sums[FJ_THREADS];
  int* const table = const_cast<int*>(p.varlen);
  const int batch = p.batch, t = threadIdx.x;
  // Each sequence's fields at its place in the order; its tile counts in the first-tile fields for now.
  for (int b = t; b < batch; b += FJ_THREADS) {
    int first_q, queries, first_k, keys;
    clamped_rows(p.cu_seqlens_q, b, p.seqlen_q, &first_q, &queries);
    clamped_rows(p.cu_seqlens_k, b, p.seqlen_k, &first_k, &keys);
    int place = b;
    if (batch <= kSortedEntries) {
      place = 0;
      for (int c = 0; c < batch; ++c) {
        int first_c, queries_c;
        clamped_rows(p.cu_seqlens_q, c, p.seqlen_q, &first_c, &queries_c);
        place += queries_c > queries || (queries_c == queries && c < b);
      }
    }
    int* e = table + place * kVarlenFields;
    e[kFirstQueryTile] = (queries + p.varlen_query_rows - 1) / p.varlen_query_rows * p.heads_q;
    e[kFirstKeyTile] = (keys + p.varlen_key_rows - 1) / p.varlen_key_rows * p.heads_kv;
    e[kSequence] = b;
    e[kFirstQuery] = first_q;
    e[kQueries] = queries;
    e[kFirstKey] = first_k;
    e[kKeys] = keys;
  }
  __syncthreads();
  // The counts -> first tiles: a thread's run of entries summed, the runs' sums scanned.
  const int run = (batch + FJ_THREADS - 1) / FJ_THREADS;
  const int lo = min(t * run, batch), hi = min(lo + run, batch);
  long long query_tiles = 0, key_tiles = 0;
  for (int r = lo; r < hi; ++r) {
    query_tiles += table[r * kVarlenFields + kFirstQueryTile];
    key_tiles += table[r * kVarlenFields + kFirstKeyTile];
  }
  query_sums[t] = query_tiles;
  key_sums[t] = key_tiles;
  __syncthreads();
  for (int step = 1; step < FJ_THREADS; step *= 2) {  // inclusive scan
    const long long q = t >= step ? query_sums[t - step] : 0, k = t >= step ? key_sums[t - step] : 0;
    __syncthreads();
    query_sums[t] += q;
    key_sums[t] += k;
    __syncthreads();
  }
  long long next_query = t > 0 ? query_sums[t - 1] : 0, next_key = t > 0 ? key_sums[t - 1] : 0;
  for (int r = lo; r < hi; ++r) {
    int* e = table + r * kVarlenFields;
    const int queries_tiles = e[kFirstQueryTile], keys_tiles = e[kFirstKeyTile];
    e[kFirstQueryTile] = static_cast<int>(next_query);
    e[kFirstKeyTile] = static_cast<int>(next_key);
    next_query += queries_tiles;
    next_key += keys_tiles;
  }
  if (t == FJ_THREADS - 1) {
    table[batch * kVarlenFields] = static_cast<int>(query_sums[t]);
    table[batch * kVarlenFields + 1] = static_cast<int>(key_sums[t]);
  }
}

}  // namespace flashjit

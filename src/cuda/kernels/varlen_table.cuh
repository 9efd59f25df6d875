// The table of a variable-length batch (KernelParams::varlen) built on the device
// from offsets in device memory (cu_seqlens_q, cu_seqlens_k), which the host never
// reads: kVarlenFields ints an entry as the host's varlen_table writes them, then
// the total query tiles and key tiles (the trailer the kernels read their counts
// from). One block; each thread takes a run of consecutive sequences.
//
// Offsets nobody checked must not address outside the operands or the scratch: the
// offsets are made never decreasing (offset b becomes the largest of offsets 0..b)
// and clamped into the packed rows (seqlen_q and seqlen_k of this launch: the
// totals), so the sequences are disjoint and their tiles stay within the host's
// bounds, which sized the grids and the scratch. Valid offsets are unchanged.
// Entries go longest first (ties in the batch's order, as the host's stable sort) up
// to kSortedEntries sequences, ranked through shared memory; in the batch's order beyond.
#pragma once

namespace flashjit {

constexpr int kSortedEntries = 2048;

// An exclusive scan over the block's threads of one value each (sum, or maximum);
// every thread calls it.
template <bool kMax>
FJ_DEVICE long long block_exclusive_scan(long long value, long long* shared) {
  const int t = threadIdx.x;
  shared[t] = value;
  __syncthreads();
  for (int step = 1; step < FJ_THREADS; step *= 2) {
    const long long other = t >= step ? shared[t - step] : (kMax ? -1 : 0);
    __syncthreads();
    shared[t] = kMax ? max(shared[t], other) : shared[t] + other;
    __syncthreads();
  }
  const long long before = t > 0 ? shared[t - 1] : (kMax ? -1 : 0);
  __syncthreads();  // the shared array may be reused at once
  return before;
}

// The sequences of a thread's run, in order: the offsets made never decreasing from
// `before` (the largest offset ahead of the run) and clamped to [0, total].
struct OffsetWalk {
  const int* offsets;
  int total;
  long long running;
  FJ_DEVICE OffsetWalk(const int* offsets_, int lo, long long before, int total_)
      : offsets(offsets_), total(total_), running(max(before, static_cast<long long>(offsets_[lo]))) {}
  FJ_DEVICE int bounded(long long x) const {
    return static_cast<int>(min(max(x, 0LL), static_cast<long long>(total)));
  }
  // Sequence b's first row and rows (b = the run's first, then each next in turn).
  FJ_DEVICE void next(int b, int* first, int* count) {
    const long long end = max(running, static_cast<long long>(offsets[b + 1]));
    *first = bounded(running);
    *count = bounded(end) - *first;
    running = end;
  }
};

extern "C" __global__ void __launch_bounds__(FJ_THREADS) fj_varlen_table(const KernelParams p) {
  __shared__ long long scan[FJ_THREADS];
  __shared__ int lengths[kSortedEntries];
  int* const table = const_cast<int*>(p.varlen);
  const int batch = p.batch, t = threadIdx.x;
  const int run = (batch + FJ_THREADS - 1) / FJ_THREADS;
  const int lo = min(t * run, batch), hi = min(lo + run, batch);
  // The largest offset ahead of each run, of q and of k.
  long long run_max_q = -1, run_max_k = -1;
  for (int b = lo; b < hi; ++b) {
    run_max_q = max(run_max_q, static_cast<long long>(p.cu_seqlens_q[b]));
    run_max_k = max(run_max_k, static_cast<long long>(p.cu_seqlens_k[b]));
  }
  const long long before_q = block_exclusive_scan<true>(run_max_q, scan);
  const long long before_k = block_exclusive_scan<true>(run_max_k, scan);
  const bool sorted = batch <= kSortedEntries;
  if (sorted) {  // every sequence's queries, for the ranks
    OffsetWalk walk(p.cu_seqlens_q, lo, before_q, p.seqlen_q);
    int first;
    for (int b = lo; b < hi; ++b) walk.next(b, &first, &lengths[b]);
  }
  __syncthreads();
  // Each sequence's fields at its place in the order; its tile counts in the first-tile fields for now.
  OffsetWalk walk_q(p.cu_seqlens_q, lo, before_q, p.seqlen_q), walk_k(p.cu_seqlens_k, lo, before_k, p.seqlen_k);
  for (int b = lo; b < hi; ++b) {
    int first_q, queries, first_k, keys;
    walk_q.next(b, &first_q, &queries);
    walk_k.next(b, &first_k, &keys);
    int place = b;
    if (sorted) {
      place = 0;
      for (int c = 0; c < batch; ++c) place += lengths[c] > queries || (lengths[c] == queries && c < b);
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
  // The counts -> first tiles, over the entries in the table's order: a run of entries a
  // thread, the runs' sums scanned.
  long long query_tiles = 0, key_tiles = 0;
  for (int r = lo; r < hi; ++r) {
    query_tiles += table[r * kVarlenFields + kFirstQueryTile];
    key_tiles += table[r * kVarlenFields + kFirstKeyTile];
  }
  long long next_query = block_exclusive_scan<false>(query_tiles, scan);
  long long next_key = block_exclusive_scan<false>(key_tiles, scan);
  for (int r = lo; r < hi; ++r) {
    int* e = table + r * kVarlenFields;
    const int queries_tiles = e[kFirstQueryTile], keys_tiles = e[kFirstKeyTile];
    e[kFirstQueryTile] = static_cast<int>(next_query);
    e[kFirstKeyTile] = static_cast<int>(next_key);
    next_query += queries_tiles;
    next_key += keys_tiles;
  }
  if (t == FJ_THREADS - 1) {  // the last run ends at the totals
    table[batch * kVarlenFields] = static_cast<int>(next_query);
    table[batch * kVarlenFields + 1] = static_cast<int>(next_key);
  }
}

}  // namespace flashjit

// Merges the partial results of a split forward (attention_mma.cuh or
// attention_hopper.cuh with FJ_SPLIT): each split saw a span of the keys and wrote its normalised output
// O_s and its LSE_s (natural log, -inf where it saw no key). With
// M = max_s LSE_s and w_s = exp(LSE_s - M):
//   O = sum_s w_s O_s / sum_s w_s,   LSE = M + log(sum_s w_s).
// A row no split saw any key of gets O = 0 and LSE = -inf, as in the unsplit kernel;
// a NaN LSE of any split gives NaN O and LSE.
// A warp a (batch, head, query) row; the lanes stride over the value head dim.
#pragma once

namespace flashjit {

typedef FJ_ELEM elem_t;

extern "C" __global__ void __launch_bounds__(FJ_THREADS) fj_attention_forward_combine(const KernelParams p) {
  wait_for_previous_kernel();  // the split kernel's partials (launched while it runs, on sm_90)
  const long long rows = static_cast<long long>(p.batch) * p.heads_q * p.seqlen_q;
  const long long row = static_cast<long long>(blockIdx.x) * (FJ_THREADS / 32) + threadIdx.x / 32;
  if (row >= rows) return;
  const int lane = threadIdx.x % 32;
  const long long batch_head = row / p.seqlen_q;
  const long long i = row - batch_head * p.seqlen_q;
  const int b = static_cast<int>(batch_head / p.heads_q);
  const int h = static_cast<int>(batch_head - static_cast<long long>(b) * p.heads_q);

  // The largest LSE; a NaN one (a NaN score in its span) wins, so that O and LSE come out NaN.
  float top = negative_infinity<float>();
  for (int s = 0; s < p.num_splits; ++s) {
    const float x = p.split_lse[s * rows + row];
    top = x != x || x > top ? x : top;
  }
  elem_t* out = operand_row<elem_t>(p.o, b, h, i);
  float* lse = p.lse.data != nullptr ? operand_row<float>(p.lse, b, h, i) : nullptr;  // null: not asked for
  if (top == negative_infinity<float>()) {
    for (int d = lane; d < p.head_dim_v; d += 32) out[d] = from_float<elem_t>(0.0f);
    if (lane == 0 && lse != nullptr) *lse = top;
    return;
  }
  float total = 0.0f;
  for (int s = 0; s < p.num_splits; ++s) total += expf(p.split_lse[s * rows + row] - top);
  const float inverse = 1.0f / total;
  for (int d = lane; d < p.head_dim_v; d += 32) {
    float sum = 0.0f;
    for (int s = 0; s < p.num_splits; ++s) {
      const float weight = expf(p.split_lse[s * rows + row] - top);
      sum += weight * p.split_o[(s * rows + row) * p.head_dim_v + d];
    }
    out[d] = from_float<elem_t>(sum * inverse);
  }
  if (lane == 0 && lse != nullptr) *lse = top + logf(total);
}

}  // namespace flashjit

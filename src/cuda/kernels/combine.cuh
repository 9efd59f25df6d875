// Merges the partial results of a split forward (attention_mma.cuh or
// attention_hopper.cuh with FJ_SPLIT): each split saw a span of the keys and wrote its normalised output
// O_s and its LSE_s (natural log, -inf where it saw no key). With
// M = max_s LSE_s and w_s = exp(LSE_s - M):
//   O = sum_s w_s O_s / sum_s w_s,   LSE = M + log(sum_s w_s).
// A row no split saw any key of gets O = 0 and LSE = -inf, as in the unsplit kernel;
// a NaN LSE of any split gives NaN O and LSE.
// A warp a (batch, head, query) row. The lanes read the splits' LSEs 32 at a time (M and the sum
// by shuffles); then each lane sums its columns of O over the splits in split order, the weights
// handed round through shared memory (a shuffle there made ptxas spill), so that a lane has 8
// splits' 16-byte loads (where the partials allow; else 16 splits' 4-byte ones) in flight rather
// than one load a split after another. The sums' order is fixed: the same bits every run.
#pragma once

namespace flashjit {

typedef FJ_ELEM elem_t;

// The larger of two LSEs, a NaN winning.
FJ_DEVICE float combine_top(float a, float b) { return a != a || b != b ? a + b : fmaxf(a, b); }

// What a lane reads of a split's row at a time.
template <bool Vector>
struct CombineColumn {
  typedef float type;
};
template <>
struct CombineColumn<true> {
  typedef float4 type;
};

// `columns` of O (4 floats each when Vector, else 1) summed over the splits, weighted.
template <bool Vector>
FJ_DEVICE void combine_columns(const KernelParams& p, long long rows, long long row, int lane, float top,
                               float first_weight, float inverse, elem_t* out, float* weights) {
  constexpr int kWidth = Vector ? 4 : 1;
  constexpr int kBatch = Vector ? 8 : 16;  // loads in flight a lane
  typedef typename CombineColumn<Vector>::type Column;
  const int columns = p.head_dim_v / kWidth;
  for (int c = lane; c - lane < columns; c += 32) {  // every lane in every round (the __syncwarp)
    float sum[kWidth] = {};
    for (int base = 0; base < p.num_splits; base += 32) {
      const int s = base + lane;
      const float weight = base == 0 ? first_weight : s < p.num_splits ? expf(p.split_lse[s * rows + row] - top) : 0.0f;
      const int count = min(32, p.num_splits - base);
      __syncwarp();  // the warp's last chunk's weights read
      weights[lane] = weight;
      __syncwarp();
      // kBatch splits' loads issued together, then their weights and sums in split order.
      for (int j = 0; j < count; j += kBatch) {
        Column x[kBatch];
#pragma unroll
        for (int u = 0; u < kBatch; ++u) {
          if (c < columns && j + u < count) {
            x[u] = *reinterpret_cast<const Column*>(p.split_o + ((base + j + u) * rows + row) * p.head_dim_v +
                                                     c * kWidth);
          }
        }
#pragma unroll
        for (int u = 0; u < kBatch; ++u) {
          if (j + u < count) {
            const float w = weights[j + u];
            if constexpr (Vector) {
              sum[0] += w * x[u].x;
              sum[1] += w * x[u].y;
              sum[2] += w * x[u].z;
              sum[3] += w * x[u].w;
            } else {
              sum[0] += w * x[u];
            }
          }
        }
      }
    }
    if (c < columns) {
#pragma unroll
      for (int k = 0; k < kWidth; ++k) out[c * kWidth + k] = from_float<elem_t>(sum[k] * inverse);
    }
  }
}

extern "C" __global__ void __launch_bounds__(FJ_THREADS) fj_attention_forward_combine(const KernelParams p) {
  wait_for_previous_kernel();  // the split kernel's partials (launched while it runs, on sm_90)
  const long long rows = static_cast<long long>(p.batch) * p.heads_q * p.seqlen_q;
  const long long row = static_cast<long long>(blockIdx.x) * (FJ_THREADS / 32) + threadIdx.x / 32;
  if (row >= rows) return;  // the whole warp
  const int lane = threadIdx.x % 32;
  const long long batch_head = row / p.seqlen_q;
  const long long i = row - batch_head * p.seqlen_q;
  const int b = static_cast<int>(batch_head / p.heads_q);
  const int h = static_cast<int>(batch_head - static_cast<long long>(b) * p.heads_q);

  // The largest LSE (a NaN one wins, so that O and LSE come out NaN), then the weights' sum.
  // The first 32 splits' LSEs stay in a register (a split count above 32 reads the rest again).
  const float first = lane < p.num_splits ? p.split_lse[lane * rows + row] : negative_infinity<float>();
  float top = first;
  for (int s = lane + 32; s < p.num_splits; s += 32) top = combine_top(top, p.split_lse[s * rows + row]);
  for (int offset = 16; offset > 0; offset /= 2) top = combine_top(top, __shfl_xor_sync(0xffffffffu, top, offset));
  elem_t* out = operand_row<elem_t>(p.o, b, h, i);
  float* lse = p.lse.data != nullptr ? operand_row<float>(p.lse, b, h, i) : nullptr;  // null: not asked for
  if (top == negative_infinity<float>()) {
    for (int d = lane; d < p.head_dim_v; d += 32) out[d] = from_float<elem_t>(0.0f);
    if (lane == 0 && lse != nullptr) *lse = top;
    return;
  }
  const float first_weight = lane < p.num_splits ? expf(first - top) : 0.0f;
  float total = first_weight;
  for (int s = lane + 32; s < p.num_splits; s += 32) total += expf(p.split_lse[s * rows + row] - top);
  for (int offset = 16; offset > 0; offset /= 2) total += __shfl_xor_sync(0xffffffffu, total, offset);
  const float inverse = 1.0f / total;
  __shared__ float warp_weights[FJ_THREADS];  // a chunk of 32 splits' weights a warp
  float* weights = warp_weights + threadIdx.x / 32 * 32;
  const bool vector = p.head_dim_v % 4 == 0 && reinterpret_cast<unsigned long long>(p.split_o) % 16 == 0;
  if (vector) {
    combine_columns<true>(p, rows, row, lane, top, first_weight, inverse, out, weights);
  } else {
    combine_columns<false>(p, rows, row, lane, top, first_weight, inverse, out, weights);
  }
  if (lane == 0 && lse != nullptr) *lse = top + logf(total);
}

}  // namespace flashjit

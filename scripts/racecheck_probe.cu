// Does compute-sanitizer racecheck understand ordering through mbarriers?
//
// flashjit's sm_90a kernels hand shared memory between a producer thread and
// consumer warps with mbarriers only (no bar.sync between them). This probe
// runs that protocol in its two forms, each correct by the PTX memory model,
// and one planted race as the control, so that racecheck's verdict on the
// kernels can be read against its verdict here:
//
//   mode 0 (stores): the producer writes a slot with plain stores, then arrives
//     on the slot's "full" barrier; consumer warps wait on it, read, __syncwarp,
//     and lane 0 arrives on "empty"; the producer waits on "empty" before it
//     writes the slot again (flashjit's TileQueue).
//   mode 1 (bulk copies): as mode 0, but the slot is filled by a bulk async copy
//     from global memory completing on "full" (flashjit's TMA loads of LSE and
//     delta rows).
//   mode 2 (control): as mode 0, but the producer does not wait on "empty"
//     before writing again: a real race, which racecheck should report.
//
//   nvcc -arch=sm_90a -o racecheck_probe scripts/racecheck_probe.cu
//   compute-sanitizer --tool racecheck ./racecheck_probe 0   (then 1, 2)
#include <cstdio>
#include <cstdlib>

constexpr int kSlots = 2;
constexpr int kWords = 64;  // a slot: 256 bytes
constexpr int kRounds = 64;
constexpr int kConsumerWarps = 4;

__device__ unsigned smem_address(const void* p) { return static_cast<unsigned>(__cvta_generic_to_shared(p)); }
__device__ void barrier_init(unsigned long long* b, unsigned count) {
  asm volatile("mbarrier.init.shared::cta.b64 [%0], %1;\n" ::"r"(smem_address(b)), "r"(count));
}
__device__ void barrier_arrive(unsigned long long* b) {
  asm volatile("mbarrier.arrive.shared::cta.b64 _, [%0];\n" ::"r"(smem_address(b)) : "memory");
}
__device__ void barrier_expect(unsigned long long* b, unsigned bytes) {
  asm volatile("mbarrier.arrive.expect_tx.shared::cta.b64 _, [%0], %1;\n" ::"r"(smem_address(b)), "r"(bytes) : "memory");
}
__device__ void barrier_wait(unsigned long long* b, unsigned parity) {
  unsigned done = 0;
  do {
    asm volatile(
        "{\n.reg .pred p;\nmbarrier.try_wait.parity.shared::cta.b64 p, [%1], %2;\nselp.u32 %0, 1, 0, p;\n}\n"
        : "=r"(done)
        : "r"(smem_address(b)), "r"(parity)
        : "memory");
  } while (!done);
}
__device__ void bulk_copy(void* dst, const void* src, unsigned bytes, unsigned long long* b) {
  asm volatile(
      "cp.async.bulk.shared::cluster.global.mbarrier::complete_tx::bytes [%0], [%1], %2, [%3];\n" ::"r"(
          smem_address(dst)),
      "l"(src), "r"(bytes), "r"(smem_address(b))
      : "memory");
}

__global__ void probe(int mode, const unsigned* source, unsigned* sums) {
  __shared__ alignas(128) unsigned slots[kSlots][kWords];
  __shared__ unsigned long long full[kSlots], empty[kSlots];
  if (threadIdx.x == 0) {
    for (int s = 0; s < kSlots; ++s) {
      barrier_init(&full[s], 1);
      barrier_init(&empty[s], kConsumerWarps);
    }
    asm volatile("fence.mbarrier_init.release.cluster;\n" ::: "memory");
  }
  __syncthreads();
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  if (warp == 0) {
    if (lane != 0) return;
    for (int round = 0; round < kRounds; ++round) {
      const int s = round % kSlots;
      if (mode != 2) barrier_wait(&empty[s], ((round / kSlots) & 1) ^ 1);
      if (mode == 1) {
        barrier_expect(&full[s], kWords * sizeof(unsigned));
        bulk_copy(slots[s], source + round * kWords, kWords * sizeof(unsigned), &full[s]);
      } else {
        for (int w = 0; w < kWords; ++w) slots[s][w] = round * kWords + w;
        barrier_arrive(&full[s]);
      }
    }
    return;
  }
  unsigned sum = 0;
  for (int round = 0; round < kRounds; ++round) {
    const int s = round % kSlots;
    barrier_wait(&full[s], (round / kSlots) & 1);
    sum += slots[s][lane] + slots[s][lane + 32];
    __syncwarp();
    if (lane == 0) barrier_arrive(&empty[s]);
  }
  atomicAdd(sums, sum);
}

int main(int argc, char** argv) {
  const int mode = argc > 1 ? std::atoi(argv[1]) : 0;
  unsigned *source = nullptr, *sums = nullptr;
  const int words = kRounds * kWords;
  if (cudaMalloc(&source, words * sizeof(unsigned)) != cudaSuccess || cudaMalloc(&sums, sizeof(unsigned)) != cudaSuccess) {
    std::printf("cudaMalloc failed\n");
    return 2;
  }
  unsigned* host = new unsigned[words];
  for (int i = 0; i < words; ++i) host[i] = i;
  cudaMemcpy(source, host, words * sizeof(unsigned), cudaMemcpyHostToDevice);
  cudaMemset(sums, 0, sizeof(unsigned));
  probe<<<1, 32 * (1 + kConsumerWarps)>>>(mode, source, sums);
  const cudaError_t status = cudaDeviceSynchronize();
  unsigned sum = 0;
  cudaMemcpy(&sum, sums, sizeof sum, cudaMemcpyDeviceToHost);
  // Every consumer warp reads every word of every round once.
  const unsigned long long expected = static_cast<unsigned long long>(words) * (words - 1) / 2 * kConsumerWarps;
  std::printf("mode %d: %s, sum %u, expected %u\n", mode, cudaGetErrorString(status), sum,
              static_cast<unsigned>(expected));
  delete[] host;
  return status == cudaSuccess ? 0 : 1;
}

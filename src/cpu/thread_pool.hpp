// A small persistent thread pool: parallel_for over independent tasks. Tasks
// write disjoint outputs, so results do not depend on scheduling.
#pragma once

#include <cstdint>
#include <functional>

namespace flashjit::cpu {

// Threads used when a call asks for 0: $FLASHJIT_NUM_THREADS, else all cores.
int default_num_threads();

// Workers a call with `count` tasks and about `flops` of work uses: num_threads
// (0 = default), at most one per task and one per kMinFlopsPerWorker (waking a
// sleeping worker costs tens of microseconds), at least 1. Worker indices
// passed to tasks are below this.
inline constexpr double kMinFlopsPerWorker = 4e6;
int worker_count(int num_threads, int64_t count, double flops);

// Runs task(index, worker) for every index in [0, count) on up to workers_wanted
// workers (from worker_count; the caller is worker 0). Rethrows the first
// exception a task threw.
void parallel_for(int64_t count, int workers_wanted,
                  const std::function<void(int64_t index, int worker)>& task);

// Scratch memory of the calling thread, kept between calls so that small
// problems do not pay for allocating and zero-filling tile buffers each time.
// At least `bytes`, 64-byte aligned, uninitialised; a later call may move it.
char* thread_scratch_buffer(size_t bytes);

// A second such buffer of the calling thread for operands a call packs once and its
// tasks share (the AMX kernels' K and V); trim_thread_packing_buffer frees it when it
// holds more than kKeptPackingBytes, so that one long call does not keep its copy.
inline constexpr size_t kKeptPackingBytes = size_t(64) << 20;
char* thread_packing_buffer(size_t bytes);
void trim_thread_packing_buffer();

// Cuts typed, 64-byte aligned slices out of a buffer; with a null buffer it only
// counts the bytes needed.
class ScratchSlicer {
 public:
  explicit ScratchSlicer(char* base) : base_(base) {}
  template <typename T>
  T* take(int64_t count) {
    T* slice = base_ ? reinterpret_cast<T*>(base_ + used_) : nullptr;
    used_ += (size_t(count) * sizeof(T) + 63) / 64 * 64;
    return slice;
  }
  size_t used() const { return used_; }

 private:
  char* base_;
  size_t used_ = 0;
};

// Tile buffers of type Layout (which has carve(args..., ScratchSlicer&)) laid
// out in this thread's scratch memory. Uninitialised.
template <typename Layout, typename... Args>
Layout thread_scratch(const Args&... args) {
  Layout layout;
  ScratchSlicer sizing(nullptr);
  layout.carve(args..., sizing);
  ScratchSlicer slicer(thread_scratch_buffer(sizing.used()));
  layout.carve(args..., slicer);
  return layout;
}

}  // namespace flashjit::cpu

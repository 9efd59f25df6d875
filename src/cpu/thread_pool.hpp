// A small persistent thread pool: parallel_for over independent tasks. Tasks
// write disjoint outputs, so results do not depend on scheduling.
#pragma once

#include <cstdint>
#include <functional>

namespace flashjit::cpu {

// Threads used when a call asks for 0: $FLASHJIT_NUM_THREADS, else all cores.
int default_num_threads();

// Workers a call with `count` tasks uses: num_threads (0 = default), at most
// one per task, at least 1. Worker indices passed to tasks are below this.
int worker_count(int num_threads, int64_t count);

// Runs task(index, worker) for every index in [0, count) on up to num_threads
// workers (the caller is worker 0). Rethrows the first exception a task threw.
void parallel_for(int64_t count, int num_threads, const std::function<void(int64_t index, int worker)>& task);

}  // namespace flashjit::cpu

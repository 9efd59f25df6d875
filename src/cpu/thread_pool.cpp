#include "cpu/thread_pool.hpp"

#include <pthread.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <condition_variable>
#include <cstdlib>
#include <exception>
#include <memory>
#include <mutex>
#include <new>
#include <system_error>
#include <thread>
#include <vector>

#include "core/problem.hpp"

namespace flashjit::cpu {
namespace {

class ThreadPool {
 public:
  // Starts up to workers - 1 threads. If the system refuses one, the pool keeps
  // the threads it has: fewer workers, same results.
  explicit ThreadPool(int workers) : requested_(workers) {
    for (int w = 1; w < workers; ++w) {
      try {
        threads_.emplace_back([this, w] { worker_loop(w); });
      } catch (const std::system_error&) {
        break;
      }
    }
  }

  ~ThreadPool() {
    {
      std::lock_guard<std::mutex> lock(mutex_);
      stopping_ = true;
    }
    wake_.notify_all();
    for (std::thread& t : threads_) t.join();
  }

  int size() const { return int(threads_.size()) + 1; }
  int requested() const { return requested_; }

  void run(int64_t count, int workers, const std::function<void(int64_t, int)>& task) {
    {
      std::lock_guard<std::mutex> lock(mutex_);
      task_ = &task;
      count_ = count;
      next_.store(0);
      active_workers_ = workers;
      pending_ = workers - 1;
      error_ = nullptr;
      ++generation_;
    }
    wake_.notify_all();
    work(0);
    std::unique_lock<std::mutex> lock(mutex_);
    done_.wait(lock, [this] { return pending_ == 0; });
    task_ = nullptr;
    if (error_) std::rethrow_exception(error_);
  }

 private:
  void work(int worker) {
    for (;;) {
      const int64_t index = next_.fetch_add(1);
      if (index >= count_) return;
      try {
        (*task_)(index, worker);
      } catch (...) {
        std::lock_guard<std::mutex> lock(mutex_);
        if (!error_) error_ = std::current_exception();
        next_.store(count_);  // stop handing out tasks
      }
    }
  }

  void worker_loop(int worker) {
    uint64_t seen = 0;
    for (;;) {
      {
        std::unique_lock<std::mutex> lock(mutex_);
        wake_.wait(lock, [&] { return stopping_ || generation_ != seen; });
        if (stopping_) return;
        seen = generation_;
        if (worker >= active_workers_) continue;
      }
      work(worker);
      std::lock_guard<std::mutex> lock(mutex_);
      if (--pending_ == 0) done_.notify_one();
    }
  }

  int requested_ = 1;
  std::vector<std::thread> threads_;
  std::mutex mutex_;
  std::condition_variable wake_;
  std::condition_variable done_;
  const std::function<void(int64_t, int)>* task_ = nullptr;
  std::atomic<int64_t> next_{0};
  int64_t count_ = 0;
  int active_workers_ = 0;
  int pending_ = 0;
  uint64_t generation_ = 0;
  bool stopping_ = false;
  std::exception_ptr error_;
};

// One job at a time runs on the pool. The pool is never destroyed: at exit a
// thread the process does not wait for (a Python daemon thread) may still be
// inside a job, and destroying the pool under it would abort; its idle workers
// end with the process.
std::mutex g_pool_mutex;
ThreadPool* g_pool = nullptr;

// fork(): the parent holds g_pool_mutex across it, so that no job is running
// and the child's copy of the mutex is not left locked by a thread the child
// does not have; the child forgets the parent's pool (its threads do not exist
// there; the shell is leaked) and starts its own on first use.
void lock_pool_before_fork() { g_pool_mutex.lock(); }
void unlock_pool_in_parent() { g_pool_mutex.unlock(); }
void reset_pool_in_child() {
  g_pool = nullptr;
  g_pool_mutex.unlock();
}

// The pool for this process, grown to at least `workers`; the caller holds
// g_pool_mutex.
ThreadPool& pool(int workers) {
  if (g_pool == nullptr || g_pool->requested() < workers) {
    delete g_pool;  // no job runs: the caller holds the lock
    g_pool = nullptr;
    g_pool = new ThreadPool(workers);
  }
  return *g_pool;
}

}  // namespace

int default_num_threads() {
  // Read once: asking the system for the core count costs microseconds a call.
  static const int threads = [] {
    if (const char* env = std::getenv("FLASHJIT_NUM_THREADS")) {
      const int value = std::atoi(env);
      if (value > 0) return std::min(value, int(kMaxThreads));
    }
    const unsigned cores = std::thread::hardware_concurrency();
    return cores > 0 ? int(cores) : 1;
  }();
  return threads;
}

namespace {

struct AlignedDelete {
  void operator()(char* p) const { ::operator delete(p, std::align_val_t{64}); }
};

struct ThreadBuffer {
  std::unique_ptr<char, AlignedDelete> data;
  size_t capacity = 0;

  char* get(size_t bytes) {
    if (bytes > capacity) {
      const size_t grown = std::max(bytes, capacity * 2);
      data.reset();
      capacity = 0;
      data.reset(static_cast<char*>(::operator new(grown, std::align_val_t{64})));  // throws std::bad_alloc
      capacity = grown;
    }
    return data.get();
  }
};

thread_local ThreadBuffer scratch_buffer, packing_buffer;

}  // namespace

char* thread_scratch_buffer(size_t bytes) { return scratch_buffer.get(bytes); }

char* thread_packing_buffer(size_t bytes) { return packing_buffer.get(bytes); }

void trim_thread_packing_buffer() {
  if (packing_buffer.capacity > kKeptPackingBytes) {
    packing_buffer.data.reset();
    packing_buffer.capacity = 0;
  }
}

int worker_count(int num_threads, int64_t count, double flops) {
  const int64_t wanted = num_threads > 0 ? num_threads : default_num_threads();
  const int64_t by_work = int64_t(std::min(flops / kMinFlopsPerWorker, double(kMaxThreads)));
  return int(std::max<int64_t>(1, std::min({wanted, count, by_work})));
}

void parallel_for(int64_t count, int workers_wanted, const std::function<void(int64_t, int)>& task) {
  if (count <= 0) return;
  const int workers = int(std::min<int64_t>(std::max(workers_wanted, 1), count));
  if (workers <= 1) {
    for (int64_t i = 0; i < count; ++i) task(i, 0);
    return;
  }
  static const int fork_handlers =
      pthread_atfork(lock_pool_before_fork, unlock_pool_in_parent, reset_pool_in_child);
  (void)fork_handlers;  // registered once, before the first pool exists
  std::lock_guard<std::mutex> lock(g_pool_mutex);
  ThreadPool& threads = pool(workers);
  threads.run(count, std::min(workers, threads.size()), task);
}

}  // namespace flashjit::cpu

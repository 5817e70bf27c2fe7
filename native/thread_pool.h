// A small persistent pool of worker threads for the CPU kernels: one parallel-for at a time, the calling
// thread taking part 0. Threads are created once (not per call) because a step over many small tensors makes
// one call per batch, and creating threads costs tens of microseconds each.
#pragma once

#include <condition_variable>
#include <cstdint>
#include <mutex>
#include <thread>
#include <vector>

namespace offload::native {

class ThreadPool {
 public:
  // A part of a parallel loop: `fn(ctx, part)` for part in [0, nparts). Must not throw: the caller's `ctx`
  // lives on its stack and must outlive every part.
  using PartFn = void (*)(void* ctx, int part) noexcept;

  // `nthreads` >= 1 counts the calling thread, so nthreads - 1 workers are started. If a thread cannot be
  // created, the ones already started are stopped and the std::system_error propagates.
  explicit ThreadPool(int nthreads);
  ~ThreadPool();
  ThreadPool(const ThreadPool&) = delete;
  ThreadPool& operator=(const ThreadPool&) = delete;

  int size() const { return static_cast<int>(workers_.size()) + 1; }

  // Runs fn(ctx, part) for every part in [0, nparts), nparts <= size(), and returns when all have finished.
  // Part 0 runs on the calling thread. Callers must serialise run() calls (the dispatcher holds a mutex).
  void run(int nparts, PartFn fn, void* ctx);

 private:
  void worker_loop(int index);
  void stop_and_join();

  // Note [pool hand-off]: the job fields, the generation counter and `pending_` are only read or written
  // with `mutex_` held. The mutex gives the ordering: a worker sees the job the caller published before
  // bumping the generation, and the caller, when it sees pending_ == 0 under the mutex, also sees every write
  // the workers made to the buffers before they decremented it. No atomics are needed.
  std::mutex mutex_;
  std::condition_variable work_ready_;
  std::condition_variable work_done_;
  std::uint64_t generation_ = 0;
  int nparts_ = 0;
  PartFn fn_ = nullptr;
  void* ctx_ = nullptr;
  int pending_ = 0;
  bool stop_ = false;
  std::vector<std::thread> workers_;
};

// Default thread count: OFFLOAD_NUM_THREADS if set (std::invalid_argument if it is not 1..4096), else the
// number of CPUs this process may run on.
int default_num_threads();

}  // namespace offload::native

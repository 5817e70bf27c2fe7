#include "thread_pool.h"

#include <sched.h>

#include <cstdlib>
#include <stdexcept>
#include <string>

namespace offload::native {

ThreadPool::ThreadPool(int nthreads) {
  const int nworkers = nthreads > 1 ? nthreads - 1 : 0;
  workers_.reserve(static_cast<std::size_t>(nworkers));
  try {
    for (int i = 0; i < nworkers; ++i) {
      workers_.emplace_back([this, i] { worker_loop(i + 1); });
    }
  } catch (...) {  // e.g. the process hit its thread limit: stop the workers already started, then report
    stop_and_join();
    throw;
  }
}

ThreadPool::~ThreadPool() { stop_and_join(); }

void ThreadPool::stop_and_join() {
  {
    std::lock_guard<std::mutex> lock(mutex_);
    stop_ = true;
  }
  work_ready_.notify_all();
  for (auto& t : workers_) t.join();
  workers_.clear();
}

void ThreadPool::worker_loop(int index) {
  std::uint64_t seen = 0;
  std::unique_lock<std::mutex> lock(mutex_);
  for (;;) {
    work_ready_.wait(lock, [&] { return stop_ || generation_ != seen; });
    if (stop_) return;
    seen = generation_;
    if (index >= nparts_) continue;  // this job has fewer parts than the pool has threads
    PartFn fn = fn_;
    void* ctx = ctx_;
    lock.unlock();
    fn(ctx, index);
    lock.lock();
    if (--pending_ == 0) work_done_.notify_one();  // see Note [pool hand-off]
  }
}

void ThreadPool::run(int nparts, PartFn fn, void* ctx) {
  if (nparts <= 1 || workers_.empty()) {
    for (int part = 0; part < nparts; ++part) fn(ctx, part);
    return;
  }
  {
    std::lock_guard<std::mutex> lock(mutex_);
    nparts_ = nparts;
    fn_ = fn;
    ctx_ = ctx;
    pending_ = nparts - 1;
    ++generation_;
  }
  work_ready_.notify_all();
  fn(ctx, 0);
  std::unique_lock<std::mutex> lock(mutex_);
  work_done_.wait(lock, [&] { return pending_ == 0; });
}

int default_num_threads() {
  if (const char* env = std::getenv("OFFLOAD_NUM_THREADS"); env != nullptr && *env != '\0') {
    char* end = nullptr;
    const long n = std::strtol(env, &end, 10);
    if (end == env || *end != '\0' || n < 1 || n > 4096) {
      throw std::invalid_argument(std::string("OFFLOAD_NUM_THREADS='") + env +
                                  "' is not a thread count between 1 and 4096");
    }
    return static_cast<int>(n);
  }
  cpu_set_t set;
  CPU_ZERO(&set);
  if (sched_getaffinity(0, sizeof set, &set) == 0) {
    const int n = CPU_COUNT(&set);
    if (n >= 1) return n;
  }
  const unsigned hw = std::thread::hardware_concurrency();
  return hw > 0 ? static_cast<int>(hw) : 1;
}

}  // namespace offload::native

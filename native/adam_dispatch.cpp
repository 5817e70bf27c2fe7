// Splits one Adam step over the thread pool and calls the active SIMD variant.
#include <pthread.h>
#if defined(__x86_64__) || defined(_M_X64)
#include <xmmintrin.h>
#define OFFLOAD_HAVE_MXCSR 1
#endif

#include <algorithm>
#include <atomic>
#include <cmath>
#include <memory>
#include <mutex>
#include <vector>

#include "adam.h"
#include "cpu_features.h"
#include "runtime.h"
#include "thread_pool.h"

namespace offload::native {
namespace {

// Work is split into chunks whose boundaries are multiples of this many elements (256 B of fp32, 128 B of
// bf16), so two threads never write the same cache line of a buffer that starts line-aligned.
constexpr std::size_t kSplitGranule = 64;
// Chunk sizes in elements (Note [chunks taken as they come]): at most 256 KiB of each fp32 array per chunk, at
// least 16 KiB, and about 8 chunks per thread in between.
constexpr std::size_t kMaxChunk = 1 << 16;
constexpr std::size_t kMinChunk = 1 << 12;
constexpr std::size_t kChunksPerPart = 8;
// Below this many elements a step runs on the calling thread: waking workers would cost more than it saves.
constexpr std::size_t kMinElementsPerThread = 1 << 15;

// Guards the pool pointer and serialises parallel loops (the pool runs one at a time).
std::mutex g_pool_mutex;
std::unique_ptr<ThreadPool> g_pool;
int g_requested_threads = 0;  // 0: default_num_threads()

// fork() handlers. A fork waits for a running step (prepare takes the mutex), so the child starts with the
// mutex in a known state. The child has none of the parent's worker threads: it forgets the pool, and the next
// step there starts a new one.
void lock_pool_before_fork() { g_pool_mutex.lock(); }
void unlock_pool_in_parent() { g_pool_mutex.unlock(); }
void forget_pool_in_child() {
  // Leaked on purpose: destroying (or detaching) its std::thread objects would act on parent threads that do
  // not exist in the child. Only the handful of bytes of the pool object itself are lost.
  (void)g_pool.release();
  g_pool_mutex.unlock();
}

ThreadPool& pool_locked() {
  static const bool fork_handlers_installed =
      pthread_atfork(lock_pool_before_fork, unlock_pool_in_parent, forget_pool_in_child) == 0;
  (void)fork_handlers_installed;
  if (!g_pool) {
    g_pool = std::make_unique<ThreadPool>(g_requested_threads > 0 ? g_requested_threads : default_num_threads());
  }
  return *g_pool;
}

// The entry points of one SIMD variant.
struct VariantKernels {
  AdamRangeFn adam;
  AccumulateRangeFn accumulate;
};

VariantKernels kernels_for(SimdVariant variant) {
  switch (variant) {
#if defined(OFFLOAD_HAVE_X86_VARIANTS)
    case SimdVariant::kAvx512: return {&avx512::adam_range, &avx512::accumulate_range};
    case SimdVariant::kAvx2: return {&avx2::adam_range, &avx2::accumulate_range};
#endif
    default: return {&scalar::adam_range, &scalar::accumulate_range};
  }
}

// Parts of a parallel loop over `total` elements: the pool's threads, but none with fewer than
// kMinElementsPerThread elements (waking workers would cost more than it saves).
int parts_for(std::size_t total, const ThreadPool& pool) {
  const std::size_t useful = std::max<std::size_t>(1, total / kMinElementsPerThread);
  return static_cast<int>(std::min<std::size_t>(static_cast<std::size_t>(pool.size()), useful));
}

// Workers compute in the caller's floating-point mode (torch.set_flush_denormal sets FTZ/DAZ on the calling
// thread only), so that results do not depend on which thread computed an element: the caller reads it with
// caller_floating_point_mode(), every part but its own (part 0) adopts it.
unsigned caller_floating_point_mode() {
#if defined(OFFLOAD_HAVE_MXCSR)
  return _mm_getcsr();
#else
  return 0;
#endif
}

void adopt_floating_point_mode(unsigned mode, int part) {
#if defined(OFFLOAD_HAVE_MXCSR)
  if (part != 0) _mm_setcsr(mode);
#else
  (void)mode;
  (void)part;
#endif
}

struct StepJob {
  const AdamSpan* spans;
  std::size_t nspans;
  const std::size_t* span_starts;  // prefix sums: span k covers global elements [span_starts[k], span_starts[k+1])
  std::size_t total;
  int nparts;
  AdamRangeFn kernel;
  AdamConstants constants;
  bool adamw;
  GradDtype grad_dtype;
  LowpDtype lowp_dtype;
  unsigned floating_point_mode;  // the caller's MXCSR (flush-to-zero / denormals-are-zero), see run_part
  std::size_t chunk;             // elements per chunk, a multiple of kSplitGranule
  // The next chunk nobody has taken. Relaxed increments suffice: the counter only hands out disjoint ranges;
  // the caller sees the workers' writes to the buffers through the pool's mutex (Note [pool hand-off]).
  std::atomic<std::size_t> next_chunk{0};
};

// Note [chunks taken as they come]
// The step is cut into chunks that the parts take from a shared counter until none is left, instead of one
// fixed range per thread. On a machine whose cores are shared (the engine runs the update beside the
// forward's compute threads; a VM's vCPUs are preempted by the host), a fixed split makes the whole step wait
// for its slowest thread, while with chunks a thread that runs keeps taking the work of one that does not.
// A chunk is large enough (16-256 KiB of each array) that the counter and the restart of the hardware
// prefetcher cost nothing measurable, and small enough that the last chunks even the threads out. Which
// thread updates an element does not change its result (same code, same floating-point mode).

// Updates the global element range [lo, hi), which may cross span boundaries.
void update_range(const StepJob& job, std::size_t lo, std::size_t hi) noexcept {
  std::size_t k = static_cast<std::size_t>(
      std::upper_bound(job.span_starts, job.span_starts + job.nspans + 1, lo) - job.span_starts - 1);
  for (std::size_t pos = lo; pos < hi && k < job.nspans; ++k) {
    const std::size_t span_end = job.span_starts[k + 1];
    if (span_end <= pos) continue;  // empty span
    const std::size_t begin = pos - job.span_starts[k];
    const std::size_t end = std::min(hi, span_end) - job.span_starts[k];
    job.kernel(job.spans[k], begin, end, job.constants, job.adamw, job.grad_dtype, job.lowp_dtype);
    pos = job.span_starts[k] + end;
  }
}

// One part of the pool's loop: takes chunks until none is left (Note [chunks taken as they come]).
void run_part(void* ctx, int part) noexcept {
  auto& job = *static_cast<StepJob*>(ctx);
  adopt_floating_point_mode(job.floating_point_mode, part);
  for (;;) {
    const std::size_t lo = job.next_chunk.fetch_add(1, std::memory_order_relaxed) * job.chunk;
    if (lo >= job.total) return;
    update_range(job, lo, std::min(job.total, lo + job.chunk));
  }
}

// Elements per chunk for `total` elements over `nparts` parts.
std::size_t chunk_size(std::size_t total, int nparts) {
  const std::size_t wanted = total / (static_cast<std::size_t>(nparts) * kChunksPerPart);
  const std::size_t rounded = (wanted + kSplitGranule - 1) / kSplitGranule * kSplitGranule;
  return std::clamp(rounded, kMinChunk, kMaxChunk);
}

// Blocks per chunk of an accumulation (64 Ki elements: 256 KiB of fp32), taken as they come as in Adam.
constexpr std::size_t kAccumulateChunkBlocks = 64;

struct AccumulateJob {
  float* accum;
  const void* grad;
  std::size_t numel;
  std::size_t nblocks;
  double* block_sums;  // one per block, added in block order by the caller (Note [sum of squares in a fixed order])
  AccumulateRangeFn kernel;
  GradDtype grad_dtype;
  bool overwrite;
  unsigned floating_point_mode;
  std::atomic<std::size_t> next_chunk{0};  // relaxed: it only hands out disjoint chunks (as StepJob's)
};

void run_accumulate_part(void* ctx, int part) noexcept {
  auto& job = *static_cast<AccumulateJob*>(ctx);
  adopt_floating_point_mode(job.floating_point_mode, part);
  for (;;) {
    const std::size_t first = job.next_chunk.fetch_add(1, std::memory_order_relaxed) * kAccumulateChunkBlocks;
    if (first >= job.nblocks) return;
    job.kernel(job.accum, job.grad, job.numel, first, std::min(job.nblocks, first + kAccumulateChunkBlocks),
               job.block_sums, job.grad_dtype, job.overwrite);
  }
}

}  // namespace

double accumulate_grad(float* accum, const void* grad, std::size_t numel, GradDtype grad_dtype, bool overwrite) {
  if (numel == 0) return 0.0;
  const std::size_t nblocks = (numel + kAccumulateBlock - 1) / kAccumulateBlock;
  std::vector<double> block_sums(nblocks, 0.0);  // once per call, never inside the element loop
  AccumulateJob job{accum,      grad,      numel,
                    nblocks,    block_sums.data(), kernels_for(active_simd_variant()).accumulate,
                    grad_dtype, overwrite, caller_floating_point_mode()};
  {
    std::lock_guard<std::mutex> lock(g_pool_mutex);
    ThreadPool& pool = pool_locked();
    pool.run(parts_for(numel, pool), &run_accumulate_part, &job);
  }
  double sum = 0.0;
  for (double b : block_sums) sum += b;
  return sum;
}

AdamConstants make_adam_constants(const AdamHyper& h) {
  const double step = static_cast<double>(h.step);
  const double bias_correction1 = h.bias_correction ? 1.0 - std::pow(h.beta1, step) : 1.0;
  const double bias_correction2 = h.bias_correction ? 1.0 - std::pow(h.beta2, step) : 1.0;
  AdamConstants c;
  c.grad_scale = static_cast<float>(h.grad_scale);
  c.weight_decay = static_cast<float>(h.weight_decay);
  c.decay = static_cast<float>(1.0 - h.lr * h.weight_decay);
  c.beta2 = static_cast<float>(h.beta2);
  c.one_minus_beta1 = static_cast<float>(1.0 - h.beta1);
  c.one_minus_beta2 = static_cast<float>(1.0 - h.beta2);
  c.step_size = static_cast<float>(h.lr / bias_correction1);
  c.bias_correction2_sqrt = static_cast<float>(std::sqrt(bias_correction2));
  c.eps = static_cast<float>(h.eps);
  return c;
}

void adam_step(const AdamSpan* spans, std::size_t nspans, const AdamHyper& hyper, GradDtype grad_dtype,
               LowpDtype lowp_dtype) {
  // Allocated once per call, never inside the element loop.
  std::vector<std::size_t> span_starts(nspans + 1, 0);
  for (std::size_t k = 0; k < nspans; ++k) span_starts[k + 1] = span_starts[k] + spans[k].numel;
  const std::size_t total = span_starts[nspans];
  if (total == 0) return;

  StepJob job{spans,       nspans,     span_starts.data(), total,
              1,           kernels_for(active_simd_variant()).adam, make_adam_constants(hyper),
              hyper.adamw, grad_dtype, lowp_dtype,         caller_floating_point_mode(), 0};
  std::lock_guard<std::mutex> lock(g_pool_mutex);
  ThreadPool& pool = pool_locked();
  job.nparts = parts_for(total, pool);
  job.chunk = job.nparts == 1 ? total : chunk_size(total, job.nparts);
  pool.run(job.nparts, &run_part, &job);
}

int num_threads() {
  std::lock_guard<std::mutex> lock(g_pool_mutex);
  return pool_locked().size();
}

void set_num_threads(int nthreads) {
  std::lock_guard<std::mutex> lock(g_pool_mutex);
  g_requested_threads = nthreads;
  g_pool.reset();  // joins the old workers; the next step starts a pool of the new size
}

}  // namespace offload::native

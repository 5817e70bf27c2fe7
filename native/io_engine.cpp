#include "io_engine.h"

#include <unistd.h>

#include <cerrno>
#include <cstring>

namespace offload::native {
namespace {

// Test hook state (see inject_io_fault). The countdown is decremented by every transfer while a fault is armed;
// the transfer that takes it to zero gets the fault and disarms it. Relaxed ordering: tests arm it before
// submitting, and the submit's queue mutex orders that store before any worker's read.
std::atomic<int> g_fault{0};
std::atomic<std::uint64_t> g_fault_countdown{0};

}  // namespace

IoFault take_fault() {
  const int fault = g_fault.load(std::memory_order_relaxed);
  if (fault == 0) return IoFault::kNone;
  if (g_fault_countdown.fetch_sub(1, std::memory_order_relaxed) != 1) return IoFault::kNone;
  g_fault.store(0, std::memory_order_relaxed);
  return static_cast<IoFault>(fault);
}

std::size_t short_fault_length(std::size_t want) {
  const std::size_t half = (want / 2) & ~std::size_t{4095};
  return half > 0 ? half : want;
}

void inject_io_fault(IoFault fault, std::uint64_t after_transfers) {
  g_fault_countdown.store(after_transfers == 0 ? 1 : after_transfers, std::memory_order_relaxed);
  g_fault.store(static_cast<int>(fault), std::memory_order_relaxed);
}

void IoRequests::Request::finish_block(bool ok, int error_number_, std::uint64_t offset, const std::string& what) {
  std::lock_guard<std::mutex> lock(mutex);
  if (!ok && !failed) {  // keep the first failure
    failed = true;
    error_number = error_number_;
    error_offset = offset;
    error_what = what;
  }
  if (--blocks_left == 0) done.notify_all();
}

std::pair<std::uint64_t, std::shared_ptr<IoRequests::Request>> IoRequests::open_request(int fd, bool write,
                                                                                        std::string path,
                                                                                        std::size_t blocks) {
  auto request = std::make_shared<Request>();
  request->fd = fd;
  request->write = write;
  request->path = std::move(path);
  request->blocks_left = blocks;
  std::lock_guard<std::mutex> lock(mutex_);
  const std::uint64_t handle = next_handle_++;
  requests_.emplace(handle, request);
  return {handle, request};
}

std::string IoRequests::describe_failure(const Request& r, std::size_t length, std::uint64_t offset, int err,
                                         bool end_of_file) {
  return std::string(r.write ? "write" : "read") + " of " + std::to_string(length) + " bytes at offset " +
         std::to_string(offset) + " failed: " + (end_of_file ? "unexpected end of file" : std::strerror(err));
}

IoEngine::IoEngine(int threads, std::size_t block_size, int queue_depth)
    : block_size_(block_size), queue_depth_(static_cast<std::size_t>(queue_depth)) {
  if (threads < 1 || threads > 256) throw std::invalid_argument("IoEngine: threads must be between 1 and 256");
  if (block_size == 0 || block_size % 4096 != 0) {
    throw std::invalid_argument("IoEngine: block_size must be a positive multiple of 4096");
  }
  if (queue_depth < 1) throw std::invalid_argument("IoEngine: queue_depth must be >= 1");
  try {
    for (int i = 0; i < threads; ++i) workers_.emplace_back([this] { worker_loop(); });
  } catch (...) {  // e.g. the process hit its thread limit: stop the workers already started, then report
    stop_workers();
    throw;
  }
}

void IoEngine::stop_workers() {
  {
    std::lock_guard<std::mutex> lock(mutex_);
    stop_ = true;
  }
  queue_ready_.notify_all();
  for (auto& t : workers_) t.join();
  workers_.clear();
}

IoEngine::~IoEngine() {
  try {
    wait_all();
  } catch (const IoError&) {
    // Failures of requests nobody waited for are dropped here: the owner closed the engine without asking.
  }
  stop_workers();
}

std::uint64_t IoEngine::submit(int fd, bool write, void* buffer, std::uint64_t offset, std::size_t length,
                               std::string path) {
  auto [handle, request] = open_request(fd, write, std::move(path), (length + block_size_ - 1) / block_size_);
  std::unique_lock<std::mutex> lock(mutex_);
  for (std::size_t done = 0; done < length; done += block_size_) {
    // Back-pressure: see Note [io queue]. Waiting releases mutex_, so workers keep draining the queue.
    queue_space_.wait(lock, [&] { return queue_.size() < queue_depth_; });
    const std::size_t piece = length - done < block_size_ ? length - done : block_size_;
    queue_.push_back(Block{request, offset + done, static_cast<char*>(buffer) + done, piece});
    queue_ready_.notify_one();
  }
  return handle;
}

void IoEngine::worker_loop() {
  std::unique_lock<std::mutex> lock(mutex_);
  for (;;) {
    queue_ready_.wait(lock, [&] { return stop_ || !queue_.empty(); });
    if (queue_.empty()) return;  // stop_ and nothing left
    Block block = std::move(queue_.front());
    queue_.pop_front();
    queue_space_.notify_one();
    lock.unlock();
    transfer(block);
    lock.lock();
  }
}

void IoEngine::transfer(const Block& block) {
  Request& r = *block.request;
  std::size_t done = 0;
  while (done < block.length) {
    std::size_t want = block.length - done;
    const IoFault fault = take_fault();
    if (fault == IoFault::kShort) want = short_fault_length(want);
    ssize_t n;
    if (fault == IoFault::kEio) {
      n = -1;
      errno = EIO;
    } else if (r.write) {
      n = ::pwrite(r.fd, block.buffer + done, want, static_cast<off_t>(block.offset + done));
    } else {
      n = ::pread(r.fd, block.buffer + done, want, static_cast<off_t>(block.offset + done));
    }
    if (n < 0 && errno == EINTR) continue;
    if (n <= 0) {
      const int err = n < 0 ? errno : EIO;
      r.finish_block(false, err, block.offset + done,
                     describe_failure(r, block.length - done, block.offset + done, err, n == 0));
      return;
    }
    done += static_cast<std::size_t>(n);  // a short transfer continues from where it stopped
  }
  r.finish_block(true, 0, 0, {});
}

std::shared_ptr<IoRequests::Request> IoRequests::find(std::uint64_t handle) {
  std::lock_guard<std::mutex> lock(mutex_);
  auto it = requests_.find(handle);
  if (it == requests_.end()) {
    throw std::invalid_argument("IoEngine: unknown or already waited-for handle " + std::to_string(handle));
  }
  return it->second;
}

bool IoRequests::poll(std::uint64_t handle) {
  auto request = find(handle);
  std::lock_guard<std::mutex> lock(request->mutex);
  return request->blocks_left == 0;
}

void IoRequests::wait(std::uint64_t handle) {
  auto request = find(handle);
  {
    std::unique_lock<std::mutex> lock(request->mutex);
    request->done.wait(lock, [&] { return request->blocks_left == 0; });
  }
  {
    std::lock_guard<std::mutex> lock(mutex_);
    requests_.erase(handle);
  }
  if (request->failed) {
    throw IoError(request->error_number, request->path, request->error_offset, request->error_what);
  }
}

void IoRequests::wait_all() {
  std::vector<std::uint64_t> handles;
  {
    std::lock_guard<std::mutex> lock(mutex_);
    for (const auto& entry : requests_) handles.push_back(entry.first);
  }
  std::exception_ptr first;
  for (std::uint64_t handle : handles) {
    try {
      wait(handle);
    } catch (const std::invalid_argument&) {
      // waited for by another thread meanwhile
    } catch (const IoError&) {
      if (!first) first = std::current_exception();
    }
  }
  if (first) std::rethrow_exception(first);
}

}  // namespace offload::native

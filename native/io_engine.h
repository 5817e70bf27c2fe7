// Asynchronous file I/O for the swap store: submit a read or write of (fd, offset, buffer, length), get a
// handle, wait for it later. A request is split into blocks of `block_size` bytes that a pool of worker threads
// transfers with pread/pwrite (the file is typically opened with O_DIRECT, so buffer, offset and length must be
// aligned to the device's logical block; the caller's buffers come from the page-aligned host pool).
//
// Every transfer is checked: EINTR and short transfers are retried from where they stopped, and a failure is
// kept with its errno, path and file offset and raised by wait(). Nothing fails silently.
#pragma once

#include <atomic>
#include <condition_variable>
#include <cstddef>
#include <cstdint>
#include <deque>
#include <memory>
#include <mutex>
#include <stdexcept>
#include <string>
#include <thread>
#include <unordered_map>
#include <vector>

namespace offload::native {

// A failed transfer: errno (0 for an unexpected end of file), the file and the byte offset where it failed.
struct IoError : std::runtime_error {
  IoError(int error_number, std::string path, std::uint64_t offset, const std::string& what)
      : std::runtime_error(what), error_number(error_number), path(std::move(path)), offset(offset) {}
  int error_number;
  std::string path;
  std::uint64_t offset;
};

// Test hook: makes the n-th transfer from now fail (EIO) or come back short by half. Process-wide.
enum class IoFault { kNone = 0, kEio = 1, kShort = 2 };
void inject_io_fault(IoFault fault, std::uint64_t after_transfers);

class IoEngine {
 public:
  // `threads` workers (>= 1), each with one transfer in flight; requests are cut into `block_size` pieces
  // (> 0, a multiple of 4096), and at most `queue_depth` pieces wait in the queue (submit blocks beyond that).
  IoEngine(int threads, std::size_t block_size, int queue_depth);
  ~IoEngine();  // waits for every submitted request
  IoEngine(const IoEngine&) = delete;
  IoEngine& operator=(const IoEngine&) = delete;

  // Queues a transfer; returns its handle. `buffer` must stay valid and untouched until wait() returns.
  std::uint64_t submit(int fd, bool write, void* buffer, std::uint64_t offset, std::size_t length, std::string path);
  // Blocks until the request is complete; throws IoError for its first failure. Forgets the handle.
  void wait(std::uint64_t handle);
  // True when the request is complete (wait() then returns at once).
  bool poll(std::uint64_t handle);
  // Waits for every outstanding request; throws the first failure among them (all are waited for first).
  void wait_all();

  std::size_t block_size() const { return block_size_; }
  int threads() const { return static_cast<int>(workers_.size()); }

 private:
  struct Request;
  struct Block {
    std::shared_ptr<Request> request;
    std::uint64_t offset;
    char* buffer;
    std::size_t length;
  };

  void worker_loop();
  void transfer(const Block& block);
  void stop_workers();  // sets stop_, wakes every worker, joins them
  std::shared_ptr<Request> find(std::uint64_t handle);

  const std::size_t block_size_;
  const std::size_t queue_depth_;

  // Note [io queue]: `queue_`, `stop_` and `requests_` are guarded by `mutex_`. Workers wait on `queue_ready_`
  // for blocks; submitters wait on `queue_space_` while the queue holds queue_depth_ blocks. A request's own
  // completion state has its own mutex (Request::mutex), so waiting on one request never holds the queue lock.
  std::mutex mutex_;
  std::condition_variable queue_ready_;
  std::condition_variable queue_space_;
  std::deque<Block> queue_;
  bool stop_ = false;
  std::uint64_t next_handle_ = 1;
  std::unordered_map<std::uint64_t, std::shared_ptr<Request>> requests_;
  std::vector<std::thread> workers_;
};

}  // namespace offload::native

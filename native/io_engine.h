// Asynchronous file I/O for the swap store: submit a read or write of (fd, offset, buffer, length), get a
// handle, wait for it later. A request is split into blocks of `block_size` bytes that a pool of worker threads
// transfers with pread/pwrite (the file is typically opened with O_DIRECT, so buffer, offset and length must be
// aligned to the device's logical block; the caller's buffers come from the page-aligned host pool).
//
// Every transfer is checked: EINTR and short transfers are retried from where they stopped, and a failure is
// kept with its errno, path and file offset and raised by wait(). Nothing fails silently. Two engines keep
// this contract: IoEngine (worker threads) and UringIoEngine (one io_uring, io_uring_engine.cpp).
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

IoFault take_fault();  // the engines' side of the hook: the fault for this transfer, if one is armed
// What an injected kShort fault leaves of a transfer of `want` bytes: half, in whole 4 KiB pages (as O_DIRECT
// requires), and never nothing.
std::size_t short_fault_length(std::size_t want);

// The handle table both engines share. A request is cut into blocks; it is complete when every block is, and
// keeps its first failure. Note [io requests]: `mutex_` guards the table; each request's completion state has
// its own mutex (Request::mutex), so waiting on one request never holds the table lock or an engine's queue.
class IoRequests {
 public:
  // Blocks until the request is complete; throws IoError for its first failure. Forgets the handle.
  void wait(std::uint64_t handle);
  // True when the request is complete (wait() then returns at once).
  bool poll(std::uint64_t handle);
  // Waits for every outstanding request; throws the first failure among them (all are waited for first).
  void wait_all();

 protected:
  struct Request {
    int fd;
    bool write;
    std::string path;
    std::mutex mutex;  // guards everything below
    std::condition_variable done;
    std::size_t blocks_left = 0;
    bool failed = false;
    int error_number = 0;
    std::uint64_t error_offset = 0;
    std::string error_what;

    void finish_block(bool ok, int error_number, std::uint64_t offset, const std::string& what);
  };

  // A new request of `blocks` blocks, registered under a new handle.
  std::pair<std::uint64_t, std::shared_ptr<Request>> open_request(int fd, bool write, std::string path,
                                                                  std::size_t blocks);
  std::shared_ptr<Request> find(std::uint64_t handle);
  static std::string describe_failure(const Request& r, std::size_t length, std::uint64_t offset, int err,
                                      bool end_of_file);

 private:
  std::mutex mutex_;
  std::uint64_t next_handle_ = 1;
  std::unordered_map<std::uint64_t, std::shared_ptr<Request>> requests_;
};

class IoEngine : public IoRequests {
 public:
  // `threads` workers (>= 1), each with one transfer in flight; requests are cut into `block_size` pieces
  // (> 0, a multiple of 4096), and at most `queue_depth` pieces wait in the queue (submit blocks beyond that).
  IoEngine(int threads, std::size_t block_size, int queue_depth);
  ~IoEngine();  // waits for every submitted request
  IoEngine(const IoEngine&) = delete;
  IoEngine& operator=(const IoEngine&) = delete;

  // Queues a transfer; returns its handle. `buffer` must stay valid and untouched until wait() returns.
  std::uint64_t submit(int fd, bool write, void* buffer, std::uint64_t offset, std::size_t length, std::string path);

  std::size_t block_size() const { return block_size_; }
  int threads() const { return static_cast<int>(workers_.size()); }

 private:
  struct Block {
    std::shared_ptr<Request> request;
    std::uint64_t offset;
    char* buffer;
    std::size_t length;
  };

  void worker_loop();
  void transfer(const Block& block);
  void stop_workers();  // sets stop_, wakes every worker, joins them

  const std::size_t block_size_;
  const std::size_t queue_depth_;

  // Note [io queue]: `queue_` and `stop_` are guarded by `mutex_`. Workers wait on `queue_ready_` for blocks;
  // submitters wait on `queue_space_` while the queue holds queue_depth_ blocks.
  std::mutex mutex_;
  std::condition_variable queue_ready_;
  std::condition_variable queue_space_;
  std::deque<Block> queue_;
  bool stop_ = false;
  std::vector<std::thread> workers_;
};

// The same contract through one io_uring instance (raw system calls; no liburing): blocks become read/write
// operations on the ring, `queue_depth` of them in flight at once, and one completion thread finishes them.
// No worker thread per transfer, so on few cores the per-block cost is one ring entry, not a thread wake-up.
// Constructing it throws std::system_error where the kernel refuses io_uring (then use IoEngine).
class UringIoEngine : public IoRequests {
 public:
  UringIoEngine(std::size_t block_size, int queue_depth);
  ~UringIoEngine();  // waits for every submitted request
  UringIoEngine(const UringIoEngine&) = delete;
  UringIoEngine& operator=(const UringIoEngine&) = delete;

  std::uint64_t submit(int fd, bool write, void* buffer, std::uint64_t offset, std::size_t length, std::string path);

  std::size_t block_size() const { return block_size_; }
  int queue_depth() const;

 private:
  struct Ring;
  const std::size_t block_size_;
  std::unique_ptr<Ring> ring_;
};

// Whether this kernel lets the process use io_uring with plain read/write operations (Linux 5.6 and later,
// not disabled by sysctl or a seccomp filter): a ring is set up and torn down to find out.
bool uring_available();

}  // namespace offload::native

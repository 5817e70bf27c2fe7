// UringIoEngine: the I/O engine's contract (io_engine.h) on one io_uring, through raw system calls.
//
// Note [ring]: the kernel shares three arrays with us: the submission queue (SQ: an index array and the
// entries it points at), the completion queue (CQ) and their head/tail counters. We produce SQ entries and
// advance the SQ tail; the kernel consumes them when we call io_uring_enter. The kernel produces CQ entries
// and advances the CQ tail; we consume them and advance the CQ head. Each counter has one writer, so a
// release store of it after writing the entries it covers, and an acquire load of the other side's counter
// before reading entries, is all the ordering needed.
//
// Threads: any thread may submit (the training thread, the optimizer's background step), under `sq_mutex`;
// one completion thread waits in io_uring_enter(GETEVENTS) and is the only reader of the CQ. A transfer that
// comes back short, or with EINTR/EAGAIN, is resubmitted for its remainder by the completion thread, which
// keeps its slot. At most `depth` operations are in flight: each holds one of `depth` preallocated slots
// (no allocation per block), and a submitter that finds none free waits on `slot_free`, after handing the
// kernel what it has queued so far (otherwise the completions it waits for could never come).
#include <linux/io_uring.h>
#include <sys/mman.h>
#include <sys/syscall.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <cstring>
#include <system_error>

#include "io_engine.h"

namespace offload::native {
namespace {

int sys_setup(unsigned entries, io_uring_params* p) {
  return static_cast<int>(::syscall(__NR_io_uring_setup, entries, p));
}

int sys_enter(int fd, unsigned to_submit, unsigned min_complete, unsigned flags) {
  return static_cast<int>(::syscall(__NR_io_uring_enter, fd, to_submit, min_complete, flags, nullptr, 0));
}

constexpr std::uint64_t kWakeUp = ~std::uint64_t{0};  // user_data of the no-op that stops the completion thread

}  // namespace

struct UringIoEngine::Ring {
  struct Op {  // one block in flight; `slot` index + 1 is its user_data
    std::shared_ptr<Request> request;
    char* buffer = nullptr;
    std::uint64_t offset = 0;
    std::size_t length = 0;
    std::size_t done = 0;  // bytes transferred so far
  };

  int fd = -1;
  unsigned depth = 0;
  void* sq_map = MAP_FAILED;
  std::size_t sq_map_size = 0;
  void* cq_map = MAP_FAILED;
  std::size_t cq_map_size = 0;
  io_uring_sqe* sqes = static_cast<io_uring_sqe*>(MAP_FAILED);
  std::size_t sqes_size = 0;
  unsigned* sq_tail = nullptr;
  unsigned* sq_mask = nullptr;
  unsigned* sq_array = nullptr;
  unsigned* cq_head = nullptr;
  unsigned* cq_tail = nullptr;
  unsigned* cq_mask = nullptr;
  io_uring_cqe* cqes = nullptr;

  std::mutex sq_mutex;  // guards the SQ, `unsubmitted`, `ops`, `free_slots`, `broken`
  std::condition_variable slot_free;
  unsigned unsubmitted = 0;  // entries queued in the SQ and not yet handed to the kernel
  std::vector<Op> ops;
  std::vector<unsigned> free_slots;
  int broken = 0;  // errno with which waiting for completions failed; the ring takes no more work then
  std::thread completer;

  explicit Ring(unsigned entries) {
    io_uring_params p{};
    fd = sys_setup(entries, &p);
    if (fd < 0) throw std::system_error(errno, std::generic_category(), "io_uring_setup");
    try {
      if (!(p.features & IORING_FEAT_RW_CUR_POS)) {  // (5.6, the release that added IORING_OP_READ/WRITE)
        throw std::system_error(ENOSYS, std::generic_category(), "io_uring without IORING_OP_READ/WRITE");
      }
      depth = p.sq_entries;
      sq_map_size = p.sq_off.array + p.sq_entries * sizeof(unsigned);
      cq_map_size = p.cq_off.cqes + p.cq_entries * sizeof(io_uring_cqe);
      sq_map = ::mmap(nullptr, sq_map_size, PROT_READ | PROT_WRITE, MAP_SHARED | MAP_POPULATE, fd, IORING_OFF_SQ_RING);
      if (sq_map == MAP_FAILED) throw std::system_error(errno, std::generic_category(), "mmap of the io_uring SQ");
      cq_map = ::mmap(nullptr, cq_map_size, PROT_READ | PROT_WRITE, MAP_SHARED | MAP_POPULATE, fd, IORING_OFF_CQ_RING);
      if (cq_map == MAP_FAILED) throw std::system_error(errno, std::generic_category(), "mmap of the io_uring CQ");
      sqes_size = p.sq_entries * sizeof(io_uring_sqe);
      sqes = static_cast<io_uring_sqe*>(
          ::mmap(nullptr, sqes_size, PROT_READ | PROT_WRITE, MAP_SHARED | MAP_POPULATE, fd, IORING_OFF_SQES));
      if (sqes == MAP_FAILED) throw std::system_error(errno, std::generic_category(), "mmap of the io_uring SQEs");
      char* sq = static_cast<char*>(sq_map);
      char* cq = static_cast<char*>(cq_map);
      sq_tail = reinterpret_cast<unsigned*>(sq + p.sq_off.tail);
      sq_mask = reinterpret_cast<unsigned*>(sq + p.sq_off.ring_mask);
      sq_array = reinterpret_cast<unsigned*>(sq + p.sq_off.array);
      cq_head = reinterpret_cast<unsigned*>(cq + p.cq_off.head);
      cq_tail = reinterpret_cast<unsigned*>(cq + p.cq_off.tail);
      cq_mask = reinterpret_cast<unsigned*>(cq + p.cq_off.ring_mask);
      cqes = reinterpret_cast<io_uring_cqe*>(cq + p.cq_off.cqes);
      // The CQ holds 2 x depth entries and at most depth operations (plus the wake-up no-op) are ever in
      // flight, so completions can never overflow it.
      ops.resize(depth);
      for (unsigned i = depth; i > 0; --i) free_slots.push_back(i - 1);
    } catch (...) {
      unmap();
      throw;
    }
  }

  ~Ring() { unmap(); }

  void unmap() {
    if (sqes != MAP_FAILED) ::munmap(sqes, sqes_size);
    if (cq_map != MAP_FAILED) ::munmap(cq_map, cq_map_size);
    if (sq_map != MAP_FAILED) ::munmap(sq_map, sq_map_size);
    if (fd >= 0) ::close(fd);
    sqes = static_cast<io_uring_sqe*>(MAP_FAILED);
    cq_map = sq_map = MAP_FAILED;
    fd = -1;
  }

  // Queues one SQ entry (caller holds sq_mutex). The SQ has `depth` entries and at most `depth` operations are
  // in flight, and entries are handed to the kernel before a submitter waits, so there is always room.
  void push(std::uint8_t opcode, int file, char* buffer, std::size_t length, std::uint64_t offset,
            std::uint64_t user_data) {
    const unsigned tail = *sq_tail;  // only we write it (under sq_mutex)
    const unsigned index = tail & *sq_mask;
    io_uring_sqe& sqe = sqes[index];
    std::memset(&sqe, 0, sizeof(sqe));
    sqe.opcode = opcode;
    sqe.fd = file;
    sqe.addr = reinterpret_cast<std::uint64_t>(buffer);
    sqe.len = static_cast<unsigned>(length);
    sqe.off = offset;
    sqe.user_data = user_data;
    sq_array[index] = index;
    __atomic_store_n(sq_tail, tail + 1, __ATOMIC_RELEASE);  // the entry is complete before the kernel sees it
    ++unsubmitted;
  }

  // Hands the queued entries to the kernel (caller holds sq_mutex).
  void flush() {
    while (unsubmitted > 0) {
      const int n = sys_enter(fd, unsubmitted, 0, 0);
      if (n < 0) {
        if (errno == EINTR || errno == EAGAIN || errno == EBUSY) continue;  // retry (EBUSY: CQ backlog)
        throw std::system_error(errno, std::generic_category(), "io_uring_enter (submit)");
      }
      unsubmitted -= static_cast<unsigned>(n);
    }
  }

  // Queues the rest of slot `s`'s block, or fails it (and frees the slot) on an injected fault (caller holds
  // sq_mutex).
  void queue_rest(unsigned s) {
    Op& op = ops[s];
    // (one entry's length is 32 bits, and Linux moves at most 0x7ffff000 bytes per call anyway)
    std::size_t want = std::min<std::size_t>(op.length - op.done, std::size_t{1} << 30);
    const IoFault fault = take_fault();
    if (fault == IoFault::kEio) {
      finish(s, false, EIO, false);
      return;
    }
    if (fault == IoFault::kShort) want = short_fault_length(want);
    push(op.request->write ? IORING_OP_WRITE : IORING_OP_READ, op.request->fd, op.buffer + op.done, want,
         op.offset + op.done, s + 1);
  }

  // Slot `s`'s block is done (ok) or failed; frees the slot (caller holds sq_mutex).
  void finish(unsigned s, bool ok, int err, bool end_of_file) {
    Op& op = ops[s];
    if (ok) {
      op.request->finish_block(true, 0, 0, {});
    } else {
      op.request->finish_block(false, err, op.offset + op.done,
                               describe_failure(*op.request, op.length - op.done, op.offset + op.done, err,
                                                end_of_file));
    }
    op.request.reset();
    free_slots.push_back(s);
    slot_free.notify_one();
  }

  void complete_loop() {
    for (;;) {
      const int n = sys_enter(fd, 0, 1, IORING_ENTER_GETEVENTS);
      if (n < 0 && errno != EINTR && errno != EAGAIN && errno != EBUSY) {
        // Cannot wait for completions any more: fail what is in flight so that no waiter hangs.
        const int err = errno;
        std::lock_guard<std::mutex> lock(sq_mutex);
        broken = err;
        for (unsigned s = 0; s < depth; ++s) {
          if (ops[s].request) finish(s, false, err, false);
        }
        return;
      }
      unsigned head = *cq_head;  // only this thread writes it
      const unsigned tail = __atomic_load_n(cq_tail, __ATOMIC_ACQUIRE);  // entries up to tail are written
      if (head == tail) continue;
      bool stop = false;
      {
        std::lock_guard<std::mutex> lock(sq_mutex);
        for (; head != tail; ++head) {
          const io_uring_cqe& cqe = cqes[head & *cq_mask];
          if (cqe.user_data == kWakeUp) {
            stop = true;
            continue;
          }
          const unsigned s = static_cast<unsigned>(cqe.user_data - 1);
          Op& op = ops[s];
          if (cqe.res == -EINTR || cqe.res == -EAGAIN) {
            queue_rest(s);
          } else if (cqe.res < 0) {
            finish(s, false, -cqe.res, false);
          } else if (cqe.res == 0) {
            finish(s, false, EIO, true);
          } else {
            op.done += static_cast<std::size_t>(cqe.res);  // a short transfer continues from where it stopped
            if (op.done < op.length) {
              queue_rest(s);
            } else {
              finish(s, true, 0, false);
            }
          }
        }
        __atomic_store_n(cq_head, head, __ATOMIC_RELEASE);  // the entries are read before the kernel reuses them
        try {
          flush();  // resubmitted remainders
        } catch (const std::system_error&) {
          // Left queued: the next submit's flush raises it to its caller.
        }
      }
      if (stop) return;
    }
  }
};

UringIoEngine::UringIoEngine(std::size_t block_size, int queue_depth) : block_size_(block_size) {
  if (block_size == 0 || block_size % 4096 != 0) {
    throw std::invalid_argument("UringIoEngine: block_size must be a positive multiple of 4096");
  }
  if (queue_depth < 1 || queue_depth > 4096) {
    throw std::invalid_argument("UringIoEngine: queue_depth must be between 1 and 4096");
  }
  ring_ = std::make_unique<Ring>(static_cast<unsigned>(queue_depth));
  Ring* ring = ring_.get();
  ring_->completer = std::thread([ring] { ring->complete_loop(); });
}

UringIoEngine::~UringIoEngine() {
  try {
    wait_all();
  } catch (const IoError&) {
    // Failures of requests nobody waited for are dropped here: the owner closed the engine without asking.
  }
  {
    std::unique_lock<std::mutex> lock(ring_->sq_mutex);
    ring_->slot_free.wait(lock, [&] { return ring_->free_slots.size() == ring_->depth; });
    if (ring_->broken == 0) {  // (else the completion thread has returned already)
      ring_->push(IORING_OP_NOP, -1, nullptr, 0, 0, kWakeUp);
      try {
        ring_->flush();
      } catch (const std::system_error&) {
        ring_->completer.detach();  // cannot be woken; it holds nothing of ours but the ring, leaked with it
        ring_.release();
        return;
      }
    }
  }
  ring_->completer.join();
}

int UringIoEngine::queue_depth() const { return static_cast<int>(ring_->depth); }

std::uint64_t UringIoEngine::submit(int fd, bool write, void* buffer, std::uint64_t offset, std::size_t length,
                                    std::string path) {
  Ring& ring = *ring_;
  std::unique_lock<std::mutex> lock(ring.sq_mutex);  // (lock order: sq_mutex, then the request table's)
  if (ring.broken != 0) {
    throw std::system_error(ring.broken, std::generic_category(), "io_uring stopped delivering completions");
  }
  auto [handle, request] = open_request(fd, write, std::move(path), (length + block_size_ - 1) / block_size_);
  // Blocks not queued when submitting stops early count as failed, so that waiting for the request ends.
  auto fail_rest = [&, request = request](std::size_t from, int err, const char* why) {
    for (std::size_t at = from; at < length; at += block_size_) request->finish_block(false, err, offset + at, why);
  };
  for (std::size_t done = 0; done < length; done += block_size_) {
    if (ring.free_slots.empty()) {
      try {
        ring.flush();  // the kernel must have what is queued before we wait for completions
      } catch (const std::system_error& e) {
        fail_rest(done, e.code().value(), "io_uring_enter failed");
        throw;
      }
      ring.slot_free.wait(lock, [&] { return !ring.free_slots.empty(); });
      if (ring.broken != 0) {
        fail_rest(done, ring.broken, "io_uring stopped delivering completions");
        return handle;
      }
    }
    const unsigned s = ring.free_slots.back();
    ring.free_slots.pop_back();
    Ring::Op& op = ring.ops[s];
    op.request = request;
    op.buffer = static_cast<char*>(buffer) + done;
    op.offset = offset + done;
    op.length = length - done < block_size_ ? length - done : block_size_;
    op.done = 0;
    ring.queue_rest(s);
  }
  ring.flush();
  return handle;
}

bool uring_available() {
  try {
    UringIoEngine probe(4096, 1);
    return true;
  } catch (const std::system_error&) {
    return false;
  }
}

}  // namespace offload::native

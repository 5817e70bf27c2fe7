// Python bindings of the I/O engine (part of offload._C; registered by bind_io from bindings.cpp).
#include <nanobind/nanobind.h>
#include <nanobind/ndarray.h>
#include <nanobind/stl/string.h>

#include <sys/mman.h>
#include <unistd.h>

#include <cerrno>
#include <cstring>
#include <string>

#include "buffer_checks.h"
#include "io_engine.h"

namespace nb = nanobind;
using namespace nb::literals;

namespace offload::native {
namespace {

using namespace checks;

// IoError becomes OSError(errno, message, path): Python picks the subclass from errno (PermissionError for
// EACCES, ...), and the message carries the operation, size and file offset.
void translate_io_error(const std::exception_ptr& p, void*) {
  try {
    std::rethrow_exception(p);
  } catch (const IoError& e) {
    PyObject* args = Py_BuildValue("(iss)", e.error_number, e.what(), e.path.c_str());
    if (args != nullptr) {
      PyErr_SetObject(PyExc_OSError, args);
      Py_DECREF(args);
    }
  }
}

// Reads fill `buffer`, so they take a writable array; writes only read it.
template <class E, class A>
std::uint64_t submit(E& engine, int fd, bool write, const A& buffer, std::uint64_t offset, const std::string& path) {
  const char* where = write ? "IoEngine.write" : "IoEngine.read";
  if (fd < 0) throw nb::value_error((std::string(where) + ": fd must be an open file descriptor").c_str());
  const Buffer b = check_buffer(where, buffer, "buffer");
  nb::gil_scoped_release no_gil;  // submit may wait for queue space
  return engine.submit(fd, write, b.data, offset, b.numel * b.itemsize, path);
}

template <class E>
void bind_engine(nb::class_<E>& cls) {
  cls.def("read", [](E& e, int fd, const Array& buffer, std::uint64_t offset,
                     const std::string& path) { return submit(e, fd, false, buffer, offset, path); },
          "fd"_a, "buffer"_a, "offset"_a, "path"_a,
          "Queue a read of len(buffer) bytes at `offset` into `buffer`; returns a handle. The buffer must stay "
          "alive and untouched until wait(handle).")
      .def("write", [](E& e, int fd, const ReadOnlyArray& buffer, std::uint64_t offset,
                       const std::string& path) { return submit(e, fd, true, buffer, offset, path); },
           "fd"_a, "buffer"_a, "offset"_a, "path"_a, "Queue a write of `buffer` at `offset`; returns a handle.")
      .def("wait", [](E& e, std::uint64_t handle) { e.wait(handle); }, "handle"_a,
           nb::call_guard<nb::gil_scoped_release>(),
           "Block until the request is done; raises OSError(errno, message, path) for its first failure.")
      .def("poll", [](E& e, std::uint64_t handle) { return e.poll(handle); }, "handle"_a,
           "True when the request is done.")
      .def("wait_all", [](E& e) { e.wait_all(); }, nb::call_guard<nb::gil_scoped_release>(),
           "Wait for every outstanding request; raises the first failure after all have finished.")
      .def_prop_ro("block_size", [](const E& e) { return e.block_size(); });
}

}  // namespace

void bind_io(nb::module_& m) {
  nb::register_exception_translator(&translate_io_error);

  nb::class_<IoEngine> threads(m, "IoEngine",
                               "Worker threads doing pread/pwrite in blocks; submit returns a handle, wait raises "
                               "OSError.");
  threads.def(nb::init<int, std::size_t, int>(), "threads"_a, "block_size"_a, "queue_depth"_a)
      .def_prop_ro("threads", &IoEngine::threads);
  bind_engine(threads);
  nb::class_<UringIoEngine> uring(m, "UringIoEngine",
                                  "The same contract on one io_uring: queue_depth blocks in flight, one completion "
                                  "thread.");
  uring.def(nb::init<std::size_t, int>(), "block_size"_a, "queue_depth"_a)
      .def_prop_ro("queue_depth", &UringIoEngine::queue_depth);
  bind_engine(uring);
  m.def("uring_available", &uring_available,
        "Whether this kernel lets the process use io_uring read/write operations (a ring is set up to find out).");

  m.def("protect_pages", [](std::uintptr_t address, std::size_t nbytes, bool writable) {
        // Note [CPU device pages] in offload/schedule/device_storage.py: a released group's pages become
        // inaccessible, a claimed group's readable and writable again.
        const auto page = static_cast<std::uintptr_t>(sysconf(_SC_PAGESIZE));
        if (address == 0 || address % page != 0 || nbytes % page != 0) {
          throw nb::value_error(("protect_pages: address " + std::to_string(address) + " and nbytes " +
                                 std::to_string(nbytes) + " must be non-zero multiples of the page size (" +
                                 std::to_string(page) + ")").c_str());
        }
        if (mprotect(reinterpret_cast<void*>(address), nbytes, writable ? PROT_READ | PROT_WRITE : PROT_NONE) != 0) {
          const int err = errno;
          PyErr_SetObject(PyExc_OSError, Py_BuildValue("(is)", err, ("mprotect of " + std::to_string(nbytes) +
                                                                     " bytes: " + std::strerror(err)).c_str()));
          throw nb::python_error();
        }
      }, "address"_a, "nbytes"_a, "writable"_a,
      "mprotect a page-aligned range to PROT_READ|PROT_WRITE (writable) or PROT_NONE; OSError on failure.");

  m.def("inject_io_fault", [](const std::string& kind, std::uint64_t after) {
        IoFault fault;
        if (kind == "eio") fault = IoFault::kEio;
        else if (kind == "short") fault = IoFault::kShort;
        else if (kind == "none") fault = IoFault::kNone;
        else throw nb::value_error(("inject_io_fault: kind '" + kind + "' is not one of: none, eio, short").c_str());
        inject_io_fault(fault, after);
      }, "kind"_a, "after"_a = 1,
      "Test hook: the `after`-th transfer from now fails with EIO ('eio') or comes back half done ('short').");
}

}  // namespace offload::native

// Checks shared by the bindings: what a buffer handed in from Python must satisfy before native code may use
// it, with messages that name the argument. Only for the binding units (never the ISA-flagged kernel units).
#pragma once

#include <nanobind/nanobind.h>
#include <nanobind/ndarray.h>

#include <cstddef>
#include <cstdint>
#include <string>

namespace offload::native::checks {

namespace nb = nanobind;

using Array = nb::ndarray<>;
using ReadOnlyArray = nb::ndarray<nb::ro>;  // gradients are only read: read-only arrays are fine

// A checked buffer. Its name for messages is role[index] (or just role when index is kNoIndex); it is only
// formatted on failure, since a step over thousands of tensors checks tens of thousands of buffers.
constexpr std::size_t kNoIndex = ~std::size_t{0};

struct Buffer {
  void* data;
  std::size_t numel;
  std::size_t itemsize;
  const char* role;
  std::size_t index;

  std::string name() const {
    return index == kNoIndex ? std::string(role) : std::string(role) + "[" + std::to_string(index) + "]";
  }
};

inline bool is_dtype(const nb::dlpack::dtype& d, nb::dlpack::dtype_code code, int bits) {
  return d.code == static_cast<std::uint8_t>(code) && d.bits == bits && d.lanes == 1;
}

inline std::string dtype_name(const nb::dlpack::dtype& d) {
  if (is_dtype(d, nb::dlpack::dtype_code::Float, 32)) return "float32";
  if (is_dtype(d, nb::dlpack::dtype_code::Float, 16)) return "float16";
  if (is_dtype(d, nb::dlpack::dtype_code::Bfloat, 16)) return "bfloat16";
  if (is_dtype(d, nb::dlpack::dtype_code::Float, 64)) return "float64";
  return "dtype(code=" + std::to_string(d.code) + ", bits=" + std::to_string(d.bits) + ")";
}

template <class A>
inline std::string shape_string(const A& a, bool strides) {
  std::string s = "(";
  for (std::size_t i = 0; i < a.ndim(); ++i) {
    if (i) s += ", ";
    s += std::to_string(strides ? a.stride(i) : static_cast<std::int64_t>(a.shape(i)));
  }
  if (a.ndim() == 1) s += ",";
  return s + ")";
}

[[noreturn]] inline void fail(const std::string& where, const std::string& name, const std::string& what) {
  throw nb::value_error((where + ": '" + name + "' " + what).c_str());
}

// Checks device, contiguity and alignment (to the element size) and returns the buffer. Dtypes are checked by
// the callers, which know which ones each role accepts.
template <class A>
inline Buffer check_buffer(const char* where, const A& a, const char* name) {
  if (a.device_type() != nb::device::cpu::value) fail(where, name, "must be a CPU buffer");
  std::size_t numel = 1;
  std::int64_t expected_stride = 1;
  bool contiguous = true;
  for (std::size_t i = a.ndim(); i-- > 0;) {
    const std::size_t extent = a.shape(i);
    if (extent != 1 && a.stride(i) != expected_stride) contiguous = false;
    expected_stride *= static_cast<std::int64_t>(extent);
    numel *= extent;
  }
  if (!contiguous && numel > 0) {
    fail(where, name, "must be C-contiguous; got shape " + shape_string(a, false) + " strides " +
                          shape_string(a, true) + " (elements)");
  }
  const std::size_t itemsize = a.dtype().bits / 8;
  if (reinterpret_cast<std::uintptr_t>(a.data()) % itemsize != 0) {
    fail(where, name, "data pointer is not aligned to its " + std::to_string(itemsize) + "-byte element size");
  }
  // const_cast: read-only arrays (gradients) go into Buffer only for the checks; the kernel never writes them.
  return Buffer{const_cast<void*>(static_cast<const void*>(a.data())), numel, itemsize, name, kNoIndex};
}

}  // namespace offload::native::checks

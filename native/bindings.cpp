// Python bindings of the native core (`offload._C`). This is the boundary: every buffer is checked here
// (device, dtype, contiguity, alignment, length, overlap) and rejected with a message naming the argument;
// nothing is ever copied or converted. The kernels behind it trust their input and run without the GIL.
#include <nanobind/nanobind.h>
#include <nanobind/ndarray.h>
#include <nanobind/stl/optional.h>
#include <nanobind/stl/string.h>
#include <nanobind/stl/vector.h>


#include <algorithm>
#include <cmath>
#include <cstdint>
#include <optional>
#include <string>
#include <utility>
#include <vector>

#include "adam.h"
#include "buffer_checks.h"
#include "cpu_features.h"
#include "runtime.h"

namespace nb = nanobind;
using namespace nb::literals;

namespace offload::native {
namespace {

using namespace checks;

void require_f32(const char* where, const Array& a, const std::string& name) {
  if (!is_dtype(a.dtype(), nb::dlpack::dtype_code::Float, 32)) {
    fail(where, name, "must be float32; got " + dtype_name(a.dtype()));
  }
}

GradDtype grad_dtype_of(const char* where, const ReadOnlyArray& a, const std::string& name) {
  const auto d = a.dtype();
  if (is_dtype(d, nb::dlpack::dtype_code::Float, 32)) return GradDtype::kF32;
  if (is_dtype(d, nb::dlpack::dtype_code::Bfloat, 16)) return GradDtype::kBF16;
  if (is_dtype(d, nb::dlpack::dtype_code::Float, 16)) return GradDtype::kF16;
  fail(where, name, "must be float32, bfloat16 or float16; got " + dtype_name(d));
}

LowpDtype lowp_dtype_of(const char* where, const Array& a, const std::string& name) {
  const auto d = a.dtype();
  if (is_dtype(d, nb::dlpack::dtype_code::Bfloat, 16)) return LowpDtype::kBF16;
  if (is_dtype(d, nb::dlpack::dtype_code::Float, 16)) return LowpDtype::kF16;
  fail(where, name, "must be bfloat16 or float16; got " + dtype_name(d));
}

// True when [address, address + numel * itemsize) is representable: a bogus length from a caller must not wrap
// around and slip past the overlap check.
bool byte_extent_ok(std::uintptr_t address, std::size_t numel, std::size_t itemsize) {
  if (numel > SIZE_MAX / itemsize) return false;
  return address <= UINTPTR_MAX - numel * itemsize;
}

// Rejects any two buffers sharing a byte: every buffer but the gradient is written, so an overlap is either a
// caller bug (a state buffer passed twice) or a data race between threads. Sorting keeps this O(n log n).
void check_disjoint(const char* where, const std::vector<Buffer>& buffers) {
  std::vector<std::size_t> order(buffers.size());
  for (std::size_t i = 0; i < order.size(); ++i) order[i] = i;
  auto start = [&](std::size_t i) { return reinterpret_cast<std::uintptr_t>(buffers[i].data); };
  std::sort(order.begin(), order.end(), [&](std::size_t a, std::size_t b) { return start(a) < start(b); });
  std::size_t reach_owner = buffers.size();  // the buffer that extends furthest among those seen so far
  std::uintptr_t reach = 0;
  for (std::size_t i : order) {
    const std::size_t bytes = buffers[i].numel * buffers[i].itemsize;  // no overflow: see byte_extent_ok
    if (bytes == 0) continue;
    if (reach_owner != buffers.size() && start(i) < reach) {
      fail(where, buffers[i].name(), "overlaps '" + buffers[reach_owner].name() + "' in memory");
    }
    if (start(i) + bytes > reach) {
      reach = start(i) + bytes;
      reach_owner = i;
    }
  }
}

AdamHyper make_hyper(const char* where, std::int64_t step, double lr, double beta1, double beta2, double eps,
                     double weight_decay, bool adamw, bool bias_correction, double grad_scale) {
  auto bad = [&](const std::string& field, const std::string& why) {
    throw nb::value_error((std::string(where) + ": " + field + " " + why).c_str());
  };
  if (step < 1) bad("step", "must be >= 1 (the first update is step 1); got " + std::to_string(step));
  if (!std::isfinite(lr) || lr < 0) bad("lr", "must be finite and >= 0; got " + std::to_string(lr));
  if (!(beta1 >= 0 && beta1 < 1)) bad("beta1", "must be in [0, 1); got " + std::to_string(beta1));
  if (!(beta2 >= 0 && beta2 < 1)) bad("beta2", "must be in [0, 1); got " + std::to_string(beta2));
  if (!std::isfinite(eps) || eps < 0) bad("eps", "must be finite and >= 0; got " + std::to_string(eps));
  if (!std::isfinite(weight_decay) || weight_decay < 0) {
    bad("weight_decay", "must be finite and >= 0; got " + std::to_string(weight_decay));
  }
  if (!std::isfinite(grad_scale)) bad("grad_scale", "must be finite; got " + std::to_string(grad_scale));
  return AdamHyper{lr, beta1, beta2, eps, weight_decay, step, adamw, bias_correction, grad_scale};
}

void adam_step_one(const Array& param, const ReadOnlyArray& grad, const Array& exp_avg, const Array& exp_avg_sq,
                   const std::optional<Array>& param_lowp, std::int64_t step, double lr, double beta1, double beta2,
                   double eps, double weight_decay, bool adamw, bool bias_correction, double grad_scale) {
  const char* where = "adam_step";
  const AdamHyper hyper =
      make_hyper(where, step, lr, beta1, beta2, eps, weight_decay, adamw, bias_correction, grad_scale);
  require_f32(where, param, "param");
  require_f32(where, exp_avg, "exp_avg");
  require_f32(where, exp_avg_sq, "exp_avg_sq");
  const GradDtype grad_dtype = grad_dtype_of(where, grad, "grad");
  const LowpDtype lowp_dtype = param_lowp ? lowp_dtype_of(where, *param_lowp, "param_lowp") : LowpDtype::kNone;
  std::vector<Buffer> buffers{check_buffer(where, param, "param"), check_buffer(where, grad, "grad"),
                              check_buffer(where, exp_avg, "exp_avg"), check_buffer(where, exp_avg_sq, "exp_avg_sq")};
  if (param_lowp) buffers.push_back(check_buffer(where, *param_lowp, "param_lowp"));
  for (const Buffer& b : buffers) {
    if (b.numel != buffers[0].numel) {
      fail(where, b.name(),
           "has " + std::to_string(b.numel) + " elements but 'param' has " + std::to_string(buffers[0].numel));
    }
  }
  check_disjoint(where, buffers);
  const AdamSpan span{static_cast<float*>(buffers[0].data), buffers[1].data, static_cast<float*>(buffers[2].data),
                      static_cast<float*>(buffers[3].data), param_lowp ? buffers[4].data : nullptr,
                      buffers[0].numel};
  nb::gil_scoped_release no_gil;
  adam_step(&span, 1, hyper, grad_dtype, lowp_dtype);
}

std::size_t grad_itemsize(GradDtype d) { return d == GradDtype::kF32 ? 4 : 2; }

GradDtype parse_grad_dtype(const std::string& name) {
  if (name == "float32") return GradDtype::kF32;
  if (name == "bfloat16") return GradDtype::kBF16;
  if (name == "float16") return GradDtype::kF16;
  throw nb::value_error(("adam_step_ptrs: grad_dtype '" + name + "' is not one of: float32, bfloat16, float16").c_str());
}

LowpDtype parse_lowp_dtype(const std::string& name) {
  if (name == "none") return LowpDtype::kNone;
  if (name == "bfloat16") return LowpDtype::kBF16;
  if (name == "float16") return LowpDtype::kF16;
  throw nb::value_error(("adam_step_ptrs: lowp_dtype '" + name + "' is not one of: none, bfloat16, float16").c_str());
}

// Many tensors in one call, given as addresses: converting thousands of tensors through DLPack costs ~2 us
// each, as much as updating a 100k-element tensor. The caller (offload.optim.cpu_adam) has checked device,
// dtype, contiguity and shape of every tensor; this still checks what addresses allow: counts, null pointers,
// alignment and overlap between any two buffers.
void adam_step_ptrs(const std::vector<std::uintptr_t>& params, const std::vector<std::uintptr_t>& grads,
                    const std::vector<std::uintptr_t>& exp_avgs, const std::vector<std::uintptr_t>& exp_avg_sqs,
                    const std::vector<std::uintptr_t>& param_lowps, const std::vector<std::size_t>& numels,
                    const std::string& grad_dtype_name, const std::string& lowp_dtype_name, std::int64_t step,
                    double lr, double beta1, double beta2, double eps, double weight_decay, bool adamw,
                    bool bias_correction, double grad_scale) {
  const char* where = "adam_step_ptrs";
  const AdamHyper hyper =
      make_hyper(where, step, lr, beta1, beta2, eps, weight_decay, adamw, bias_correction, grad_scale);
  const GradDtype grad_dtype = parse_grad_dtype(grad_dtype_name);
  const LowpDtype lowp_dtype = parse_lowp_dtype(lowp_dtype_name);
  const std::size_t n = numels.size();
  auto check_len = [&](std::size_t len, const char* name) {
    if (len != n) {
      throw nb::value_error((std::string(where) + ": '" + name + "' has " + std::to_string(len) +
                             " entries but 'numels' has " + std::to_string(n))
                                .c_str());
    }
  };
  check_len(params.size(), "params");
  check_len(grads.size(), "grads");
  check_len(exp_avgs.size(), "exp_avgs");
  check_len(exp_avg_sqs.size(), "exp_avg_sqs");
  if (lowp_dtype != LowpDtype::kNone) check_len(param_lowps.size(), "param_lowps");
  std::vector<Buffer> buffers;
  buffers.reserve(5 * n);
  std::vector<AdamSpan> spans;
  spans.reserve(n);
  auto add = [&](std::uintptr_t address, std::size_t numel, std::size_t itemsize, const char* role, std::size_t i) {
    buffers.push_back(Buffer{reinterpret_cast<void*>(address), numel, itemsize, role, i});
    if (numel > 0 && address == 0) fail(where, buffers.back().name(), "is a null pointer");
    if (!byte_extent_ok(address, numel, itemsize)) {
      fail(where, buffers.back().name(), "with " + std::to_string(numel) + " elements overflows the address space");
    }
    if (address % itemsize != 0) {
      fail(where, buffers.back().name(), "is not aligned to its " + std::to_string(itemsize) + "-byte element size");
    }
    return reinterpret_cast<void*>(address);
  };
  for (std::size_t i = 0; i < n; ++i) {
    AdamSpan span{};
    span.numel = numels[i];
    span.param = static_cast<float*>(add(params[i], numels[i], 4, "params", i));
    span.grad = add(grads[i], numels[i], grad_itemsize(grad_dtype), "grads", i);
    span.exp_avg = static_cast<float*>(add(exp_avgs[i], numels[i], 4, "exp_avgs", i));
    span.exp_avg_sq = static_cast<float*>(add(exp_avg_sqs[i], numels[i], 4, "exp_avg_sqs", i));
    if (lowp_dtype != LowpDtype::kNone) span.param_lowp = add(param_lowps[i], numels[i], 2, "param_lowps", i);
    spans.push_back(span);
  }
  check_disjoint(where, buffers);
  nb::gil_scoped_release no_gil;
  adam_step(spans.data(), spans.size(), hyper, grad_dtype, lowp_dtype);
}

double accumulate_grad_checked(const Array& accum, const ReadOnlyArray& grad, bool overwrite) {
  const char* where = "accumulate_grad";
  require_f32(where, accum, "accum");
  const GradDtype grad_dtype = grad_dtype_of(where, grad, "grad");
  std::vector<Buffer> buffers{check_buffer(where, accum, "accum"), check_buffer(where, grad, "grad")};
  if (buffers[1].numel != buffers[0].numel) {
    fail(where, "grad", "has " + std::to_string(buffers[1].numel) + " elements but 'accum' has " +
                            std::to_string(buffers[0].numel));
  }
  check_disjoint(where, buffers);
  nb::gil_scoped_release no_gil;
  return accumulate_grad(static_cast<float*>(buffers[0].data), buffers[1].data, buffers[0].numel, grad_dtype,
                         overwrite);
}

std::vector<std::string> supported_variants() {
  std::vector<std::string> names;
  for (SimdVariant v : {SimdVariant::kScalar, SimdVariant::kAvx2, SimdVariant::kAvx512}) {
    if (simd_variant_supported(v)) names.emplace_back(simd_variant_name(v));
  }
  return names;
}

}  // namespace

void bind_io(nb::module_& m);  // bindings_io.cpp

}  // namespace offload::native

NB_MODULE(_C, m) {
  using namespace offload::native;
  m.doc() = "offload native core: SIMD Adam/AdamW kernels and the I/O engine (private; see offload.*).";
  bind_io(m);

  m.def("adam_step", &adam_step_one, "param"_a, "grad"_a, "exp_avg"_a, "exp_avg_sq"_a,
        "param_lowp"_a = nb::none(), nb::kw_only(), "step"_a, "lr"_a, "beta1"_a, "beta2"_a, "eps"_a,
        "weight_decay"_a, "adamw"_a = true, "bias_correction"_a = true, "grad_scale"_a = 1.0,
        "One Adam/AdamW update of one contiguous span, in place; blocks until done, without the GIL.");
  m.def("adam_step_ptrs", &adam_step_ptrs, "params"_a, "grads"_a, "exp_avgs"_a, "exp_avg_sqs"_a, "param_lowps"_a,
        "numels"_a, "grad_dtype"_a, "lowp_dtype"_a, nb::kw_only(), "step"_a, "lr"_a, "beta1"_a, "beta2"_a, "eps"_a,
        "weight_decay"_a, "adamw"_a = true, "bias_correction"_a = true, "grad_scale"_a = 1.0,
        "Adam/AdamW over many tensors given by address (trusted caller: dtypes and contiguity already checked).");

  m.def("accumulate_grad", &accumulate_grad_checked, "accum"_a, "grad"_a, nb::kw_only(), "overwrite"_a = false,
        "accum (fp32) = grad if overwrite else accum + grad (grad fp32, bf16 or fp16), in place; returns the sum of "
        "squares of the new accum (double, the same for every SIMD variant and thread count). Without the GIL.");

  m.def("simd_variant", [] { return std::string(simd_variant_name(active_simd_variant())); },
        "The SIMD variant the kernels use now: 'scalar', 'avx2' or 'avx512'.");
  m.def("supported_simd_variants", &supported_variants, "The variants this CPU and build can run.");
  m.def("force_simd_variant", [](const std::string& name) { force_simd_variant(parse_simd_variant(name)); },
        "name"_a, "Use this variant for every later call; raises if it is not supported here.");
  // Both wait for a running step (they take the pool mutex), so they release the GIL meanwhile.
  m.def("num_threads", &num_threads, nb::call_guard<nb::gil_scoped_release>(),
        "Threads (including the caller) each kernel call may use.");
  m.def("set_num_threads", [](int n) {
        if (n < 1 || n > 4096) {
          throw nb::value_error(("set_num_threads: nthreads must be between 1 and 4096; got " + std::to_string(n)).c_str());
        }
        nb::gil_scoped_release no_gil;
        set_num_threads(n);
      }, "nthreads"_a, "Set the kernel thread count (1..4096), including the calling thread.");
}

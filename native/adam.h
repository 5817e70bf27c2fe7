// Adam/AdamW over fp32 state on the CPU: the types shared by the kernels, the dispatcher and the bindings.
//
// The kernels are stateless: every call gets pointers, lengths and hyper-parameters, and nothing survives it.
// Each ISA variant (scalar, AVX2, AVX-512) is compiled in its own translation unit with its own flags and
// exposes one entry point, `adam_range`, with the signature below; `adam_dispatch.cpp` picks one at run time.
#pragma once

#include <cstddef>
#include <cstdint>

namespace offload::native {

// Element type of the gradient buffer. Master weights, m and v are always fp32.
enum class GradDtype : std::uint8_t { kF32 = 0, kBF16 = 1, kF16 = 2 };

// Element type of the optional low-precision copy of the updated parameters (written in the same pass).
enum class LowpDtype : std::uint8_t { kNone = 0, kBF16 = 1, kF16 = 2 };

// One contiguous run of parameters. `grad` holds GradDtype elements and `param_lowp` LowpDtype elements
// (or is null when LowpDtype::kNone). All five buffers hold `numel` elements and do not overlap; the
// bindings check this, the kernels trust it.
struct AdamSpan {
  float* param;
  const void* grad;
  float* exp_avg;
  float* exp_avg_sq;
  void* param_lowp;
  std::size_t numel;
};

// Hyper-parameters of one step, as the user gives them.
struct AdamHyper {
  double lr;
  double beta1;
  double beta2;
  double eps;
  double weight_decay;
  std::int64_t step;      // 1 for the first update
  bool adamw;             // true: decoupled weight decay (AdamW); false: L2 added to the gradient (Adam)
  bool bias_correction;
  double grad_scale;      // every gradient is multiplied by this first (unscaling, clipping, maximize = -1)
};

// The per-step constants the kernels use, derived once per call in double precision and rounded to fp32.
// Every variant evaluates the same fp32 expression with the same explicit FMAs (see Note [bit-identical
// variants] in adam_kernel.inc), so all variants produce identical bits.
struct AdamConstants {
  float grad_scale;
  float weight_decay;             // Adam (L2) mode: g += weight_decay * p
  float decay;                    // AdamW mode: p *= 1 - lr * weight_decay
  float beta2;
  float one_minus_beta1;
  float one_minus_beta2;
  float step_size;                // lr / (1 - beta1^step)
  float bias_correction2_sqrt;    // sqrt(1 - beta2^step)
  float eps;
};

AdamConstants make_adam_constants(const AdamHyper& hyper);

// Updates elements [begin, end) of `span`. The signature every ISA variant exports.
using AdamRangeFn = void (*)(const AdamSpan& span, std::size_t begin, std::size_t end, const AdamConstants& c,
                             bool adamw, GradDtype grad_dtype, LowpDtype lowp_dtype);

namespace scalar {
void adam_range(const AdamSpan& span, std::size_t begin, std::size_t end, const AdamConstants& c, bool adamw,
                GradDtype grad_dtype, LowpDtype lowp_dtype);
}
#if defined(OFFLOAD_HAVE_X86_VARIANTS)
namespace avx2 {
void adam_range(const AdamSpan& span, std::size_t begin, std::size_t end, const AdamConstants& c, bool adamw,
                GradDtype grad_dtype, LowpDtype lowp_dtype);
}
namespace avx512 {
void adam_range(const AdamSpan& span, std::size_t begin, std::size_t end, const AdamConstants& c, bool adamw,
                GradDtype grad_dtype, LowpDtype lowp_dtype);
}
#endif

// Gradient accumulation (Note [sum of squares in a fixed order] in adam_kernel.inc): blocks
// [first_block, end_block) of kAccumulateBlock elements of an `numel`-element range get accum = [accum +] grad
// (`grad` holds GradDtype elements), and block b's sum of squares of the result goes to sums[b].
constexpr std::size_t kAccumulateBlock = 1024;
using AccumulateRangeFn = void (*)(float* accum, const void* grad, std::size_t numel, std::size_t first_block,
                                   std::size_t end_block, double* sums, GradDtype grad_dtype, bool overwrite);

namespace scalar {
void accumulate_range(float* accum, const void* grad, std::size_t numel, std::size_t first_block,
                      std::size_t end_block, double* sums, GradDtype grad_dtype, bool overwrite);
}
#if defined(OFFLOAD_HAVE_X86_VARIANTS)
namespace avx2 {
void accumulate_range(float* accum, const void* grad, std::size_t numel, std::size_t first_block,
                      std::size_t end_block, double* sums, GradDtype grad_dtype, bool overwrite);
}
namespace avx512 {
void accumulate_range(float* accum, const void* grad, std::size_t numel, std::size_t first_block,
                      std::size_t end_block, double* sums, GradDtype grad_dtype, bool overwrite);
}
#endif

// accum (fp32, `numel` elements) = grad if `overwrite`, else accum + grad, split across the thread pool;
// returns the sum of squares of the new accum, the same bits for every variant and thread count. Blocking; the
// caller releases the GIL. The buffers must not overlap.
double accumulate_grad(float* accum, const void* grad, std::size_t numel, GradDtype grad_dtype, bool overwrite);

// Runs one Adam step over `nspans` spans, split across the thread pool. Blocking; the caller releases the
// GIL. All spans share `grad_dtype`, `lowp_dtype` and the hyper-parameters.
void adam_step(const AdamSpan* spans, std::size_t nspans, const AdamHyper& hyper, GradDtype grad_dtype,
               LowpDtype lowp_dtype);

}  // namespace offload::native

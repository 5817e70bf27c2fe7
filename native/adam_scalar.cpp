// Portable scalar Adam: the reference every SIMD variant is tested against, and the fallback on CPUs without
// AVX2. Compiled without ISA flags (see CMakeLists.txt).

#include "adam.h"

namespace offload::native::scalar {
namespace {

#include "adam_kernel.inc"

}  // namespace

void adam_range(const AdamSpan& span, std::size_t begin, std::size_t end, const AdamConstants& c, bool adamw,
                GradDtype grad_dtype, LowpDtype lowp_dtype) {
  adam_range_impl<Scalar>(span, begin, end, c, adamw, grad_dtype, lowp_dtype);
}

void accumulate_range(float* accum, const void* grad, std::size_t numel, std::size_t first_block,
                      std::size_t end_block, double* sums, GradDtype grad_dtype, bool overwrite) {
  accumulate_range_impl<Scalar>(accum, grad, numel, first_block, end_block, sums, grad_dtype, overwrite);
}

}  // namespace offload::native::scalar

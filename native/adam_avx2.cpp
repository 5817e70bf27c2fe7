// AVX2 + FMA + F16C Adam (8 lanes). Compiled with -mavx2 -mfma -mf16c only in this unit; called only after
// cpu_features.cpp has seen all three on the running CPU.
#include <immintrin.h>


#include "adam.h"

namespace offload::native::avx2 {
namespace {

#include "adam_kernel.inc"

struct Vec {
  using F = __m256;
  static constexpr std::size_t kLanes = 8;
  static F load(const float* x) { return _mm256_loadu_ps(x); }
  static void store(float* x, F a) { _mm256_storeu_ps(x, a); }
  static F set1(float a) { return _mm256_set1_ps(a); }
  static F add(F a, F b) { return _mm256_add_ps(a, b); }
  static F sub(F a, F b) { return _mm256_sub_ps(a, b); }
  static F mul(F a, F b) { return _mm256_mul_ps(a, b); }
  static F div(F a, F b) { return _mm256_div_ps(a, b); }
  static F sqrt(F a) { return _mm256_sqrt_ps(a); }
  static F fmadd(F a, F b, F c) { return _mm256_fmadd_ps(a, b, c); }
  static F fnmadd(F a, F b, F c) { return _mm256_fnmadd_ps(a, b, c); }

  static F load_bf16(const std::uint16_t* x) {
    const __m256i wide = _mm256_cvtepu16_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(x)));
    return _mm256_castsi256_ps(_mm256_slli_epi32(wide, 16));
  }
  static F load_f16(const std::uint16_t* x) {
    return _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(x)));
  }
  // Integer round-to-nearest-even, as Scalar::store_bf16 (vcvtneps2bf16 would flush subnormals to zero).
  static __m128i to_bf16(F a) {
    const __m256i u = _mm256_castps_si256(a);
    const __m256i lsb = _mm256_and_si256(_mm256_srli_epi32(u, 16), _mm256_set1_epi32(1));
    __m256i rounded = _mm256_srli_epi32(_mm256_add_epi32(u, _mm256_add_epi32(lsb, _mm256_set1_epi32(0x7FFF))), 16);
    const __m256i is_nan = _mm256_castps_si256(_mm256_cmp_ps(a, a, _CMP_UNORD_Q));
    rounded = _mm256_blendv_epi8(rounded, _mm256_set1_epi32(0x7FC0), is_nan);
    // packus works per 128-bit lane: [r0..r3 r0..r3 | r4..r7 r4..r7]; gather qwords 0 and 2 into the low half.
    return _mm256_castsi256_si128(_mm256_permute4x64_epi64(_mm256_packus_epi32(rounded, rounded), 0x08));
  }
  static __m128i to_f16(F a) { return _mm256_cvtps_ph(a, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC); }
  static void store_bf16(std::uint16_t* x, F a) { _mm_storeu_si128(reinterpret_cast<__m128i*>(x), to_bf16(a)); }
  static void store_f16(std::uint16_t* x, F a) { _mm_storeu_si128(reinterpret_cast<__m128i*>(x), to_f16(a)); }

  // Note [streaming the low-precision copy] in adam_kernel.inc.
  static constexpr std::size_t kStreamAlign = 16;
  static void stream_bf16(std::uint16_t* x, F a) { _mm_stream_si128(reinterpret_cast<__m128i*>(x), to_bf16(a)); }
  static void stream_f16(std::uint16_t* x, F a) { _mm_stream_si128(reinterpret_cast<__m128i*>(x), to_f16(a)); }
  static void stream_fence() { _mm_sfence(); }
};

}  // namespace

void adam_range(const AdamSpan& span, std::size_t begin, std::size_t end, const AdamConstants& c, bool adamw,
                GradDtype grad_dtype, LowpDtype lowp_dtype) {
  adam_range_impl<Vec>(span, begin, end, c, adamw, grad_dtype, lowp_dtype);
}

void accumulate_range(float* accum, const void* grad, std::size_t numel, std::size_t first_block,
                      std::size_t end_block, double* sums, GradDtype grad_dtype, bool overwrite) {
  accumulate_range_impl<Vec>(accum, grad, numel, first_block, end_block, sums, grad_dtype, overwrite);
}

}  // namespace offload::native::avx2

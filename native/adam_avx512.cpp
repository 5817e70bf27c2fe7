// AVX-512 (F + BW + VL) Adam (16 lanes). Compiled with AVX-512 flags only in this unit; called only after
// cpu_features.cpp has seen the features and the OS's ZMM state support on the running CPU.
#include <immintrin.h>


#include "adam.h"

namespace offload::native::avx512 {
namespace {

#include "adam_kernel.inc"

struct Vec {
  using F = __m512;
  static constexpr std::size_t kLanes = 16;
  static F load(const float* x) { return _mm512_loadu_ps(x); }
  static void store(float* x, F a) { _mm512_storeu_ps(x, a); }
  static F set1(float a) { return _mm512_set1_ps(a); }
  static F add(F a, F b) { return _mm512_add_ps(a, b); }
  static F sub(F a, F b) { return _mm512_sub_ps(a, b); }
  static F mul(F a, F b) { return _mm512_mul_ps(a, b); }
  static F div(F a, F b) { return _mm512_div_ps(a, b); }
  static F sqrt(F a) { return _mm512_sqrt_ps(a); }
  static F fmadd(F a, F b, F c) { return _mm512_fmadd_ps(a, b, c); }
  static F fnmadd(F a, F b, F c) { return _mm512_fnmadd_ps(a, b, c); }

  static F load_bf16(const std::uint16_t* x) {
    const __m512i wide = _mm512_cvtepu16_epi32(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(x)));
    return _mm512_castsi512_ps(_mm512_slli_epi32(wide, 16));
  }
  static F load_f16(const std::uint16_t* x) {
    return _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(x)));
  }
  // Integer round-to-nearest-even, as Scalar::store_bf16 (vcvtneps2bf16 would flush subnormals to zero).
  static __m256i to_bf16(F a) {
    const __m512i u = _mm512_castps_si512(a);
    const __m512i lsb = _mm512_and_si512(_mm512_srli_epi32(u, 16), _mm512_set1_epi32(1));
    __m512i rounded = _mm512_srli_epi32(_mm512_add_epi32(u, _mm512_add_epi32(lsb, _mm512_set1_epi32(0x7FFF))), 16);
    const __mmask16 is_nan = _mm512_cmp_ps_mask(a, a, _CMP_UNORD_Q);
    rounded = _mm512_mask_blend_epi32(is_nan, rounded, _mm512_set1_epi32(0x7FC0));
    return _mm512_cvtepi32_epi16(rounded);
  }
  static __m256i to_f16(F a) { return _mm512_cvtps_ph(a, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC); }
  static void store_bf16(std::uint16_t* x, F a) { _mm256_storeu_si256(reinterpret_cast<__m256i*>(x), to_bf16(a)); }
  static void store_f16(std::uint16_t* x, F a) { _mm256_storeu_si256(reinterpret_cast<__m256i*>(x), to_f16(a)); }

  // Note [streaming the low-precision copy] in adam_kernel.inc.
  static constexpr std::size_t kStreamAlign = 32;
  static void stream_bf16(std::uint16_t* x, F a) { _mm256_stream_si256(reinterpret_cast<__m256i*>(x), to_bf16(a)); }
  static void stream_f16(std::uint16_t* x, F a) { _mm256_stream_si256(reinterpret_cast<__m256i*>(x), to_f16(a)); }
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

}  // namespace offload::native::avx512

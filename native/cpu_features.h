// Which SIMD variant of the kernels runs: detected once from CPUID (and the OS's saved vector state), or forced
// by the OFFLOAD_SIMD environment variable or force_simd_variant() for tests and benchmarks.
#pragma once

#include <string>

namespace offload::native {

enum class SimdVariant { kScalar = 0, kAvx2 = 1, kAvx512 = 2 };

const char* simd_variant_name(SimdVariant variant);

// Parses "scalar" / "avx2" / "avx512"; throws std::invalid_argument naming the accepted values otherwise.
SimdVariant parse_simd_variant(const std::string& name);

// True when this build contains the variant and the running CPU and OS can execute it.
bool simd_variant_supported(SimdVariant variant);

// The variant the kernels use now. On first call reads OFFLOAD_SIMD (if set) and otherwise picks the widest
// supported variant. Throws std::invalid_argument / std::runtime_error for a bad or unsupported OFFLOAD_SIMD.
SimdVariant active_simd_variant();

// Makes every later kernel call use `variant`; throws std::runtime_error if it is not supported here.
void force_simd_variant(SimdVariant variant);

}  // namespace offload::native

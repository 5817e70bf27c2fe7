#include "cpu_features.h"

#include <atomic>
#include <cstdlib>
#include <mutex>
#include <stdexcept>

namespace offload::native {
namespace {

// -1 until the first active_simd_variant() call settles it; then a SimdVariant value. Relaxed ordering is
// enough: the value is a plain choice between functions that are all valid to call, with no data attached.
std::atomic<int> g_active_variant{-1};
std::once_flag g_init_once;

bool cpu_has(SimdVariant variant) {
#if defined(OFFLOAD_HAVE_X86_VARIANTS)
  // libgcc's __builtin_cpu_supports also checks XCR0, i.e. that the OS saves YMM / ZMM state.
  __builtin_cpu_init();
  switch (variant) {
    case SimdVariant::kScalar: return true;
    case SimdVariant::kAvx2:
      return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") && __builtin_cpu_supports("f16c");
    case SimdVariant::kAvx512:
      return cpu_has(SimdVariant::kAvx2) && __builtin_cpu_supports("avx512f") &&
             __builtin_cpu_supports("avx512bw") && __builtin_cpu_supports("avx512vl");
  }
  return false;
#else
  return variant == SimdVariant::kScalar;
#endif
}

SimdVariant best_variant() {
  if (cpu_has(SimdVariant::kAvx512)) return SimdVariant::kAvx512;
  if (cpu_has(SimdVariant::kAvx2)) return SimdVariant::kAvx2;
  return SimdVariant::kScalar;
}

}  // namespace

const char* simd_variant_name(SimdVariant variant) {
  switch (variant) {
    case SimdVariant::kScalar: return "scalar";
    case SimdVariant::kAvx2: return "avx2";
    case SimdVariant::kAvx512: return "avx512";
  }
  return "unknown";
}

SimdVariant parse_simd_variant(const std::string& name) {
  for (SimdVariant v : {SimdVariant::kScalar, SimdVariant::kAvx2, SimdVariant::kAvx512}) {
    if (name == simd_variant_name(v)) return v;
  }
  throw std::invalid_argument("SIMD variant '" + name + "' is not one of: scalar, avx2, avx512");
}

bool simd_variant_supported(SimdVariant variant) { return cpu_has(variant); }

namespace {

void store_if_supported(SimdVariant variant) {
  if (!cpu_has(variant)) {
    throw std::runtime_error(std::string("SIMD variant '") + simd_variant_name(variant) +
                             "' is not supported by this CPU or build; best available: " +
                             simd_variant_name(best_variant()));
  }
  g_active_variant.store(static_cast<int>(variant), std::memory_order_relaxed);
}

}  // namespace

SimdVariant active_simd_variant() {
  std::call_once(g_init_once, [] {
    const char* forced = std::getenv("OFFLOAD_SIMD");
    if (forced != nullptr && *forced != '\0') {
      SimdVariant v;
      try {
        v = parse_simd_variant(forced);
      } catch (const std::invalid_argument&) {
        throw std::invalid_argument(std::string("OFFLOAD_SIMD='") + forced +
                                    "' is not one of: scalar, avx2, avx512");
      }
      store_if_supported(v);  // throws if unsupported; call_once then retries on the next call
    } else {
      g_active_variant.store(static_cast<int>(best_variant()), std::memory_order_relaxed);
    }
  });
  return static_cast<SimdVariant>(g_active_variant.load(std::memory_order_relaxed));
}

void force_simd_variant(SimdVariant variant) {
  active_simd_variant();  // settle OFFLOAD_SIMD first, so that it cannot override this explicit choice later
  store_if_supported(variant);
}

}  // namespace offload::native

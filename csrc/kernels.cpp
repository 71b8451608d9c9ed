// Instantiates the filter kernels twice: for the compiler's default target and, on x86-64 with GCC or
// Clang, for AVX2 (without FMA, so rounding is unchanged); picks one at run time.
#include "kernels.h"

#include <cstdint>

#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC diagnostic ignored "-Wpsabi"  // 32-byte vector types inside the kernels only
#endif
#if (defined(__x86_64__) || defined(__i386__)) && (defined(__GNUC__) || defined(__clang__))
#include <immintrin.h>
#endif

#define RLOSS_KNS rloss_kernels_base
#include "kernels_impl.h"
#undef RLOSS_KNS

#if (defined(__x86_64__) || defined(__i386__)) && (defined(__GNUC__) || defined(__clang__))
#define RLOSS_HAVE_AVX2_KERNELS 1
#pragma GCC push_options
#pragma GCC target("avx2")
#define RLOSS_KNS rloss_kernels_avx2
#define RLOSS_KERNELS_AVX2 1
#include "kernels_impl.h"
#undef RLOSS_KERNELS_AVX2
#undef RLOSS_KNS
#pragma GCC pop_options
#endif

namespace rloss {
namespace detail {

static bool use_avx2() {
#ifdef RLOSS_HAVE_AVX2_KERNELS
  static const bool ok = __builtin_cpu_supports("avx2");
  return ok;
#else
  return false;
#endif
}

KernelSet kernels_for(int kp) {
#ifdef RLOSS_HAVE_AVX2_KERNELS
  if (use_avx2()) return rloss_kernels_avx2::kernel_set(kp);
#endif
  return rloss_kernels_base::kernel_set(kp);
}

EmbedFn embed_kernel(int d) {
#ifdef RLOSS_HAVE_AVX2_KERNELS
  if (use_avx2()) return rloss_kernels_avx2::embed_fn(d);
#endif
  return rloss_kernels_base::embed_fn(d);
}

const char* kernels_isa() { return use_avx2() ? "avx2" : "baseline"; }

}  // namespace detail
}  // namespace rloss

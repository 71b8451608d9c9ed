// Function-pointer table of the filter kernels (kernels_impl.h), chosen for the running CPU.
#pragma once

#include <cstdint>

#include "lattice.h"

namespace rloss {
namespace detail {

struct KernelSet {
  bool (*stage)(const float* in, bool planar, int64_t n, int k, int kp, const float* mask, float* X,
                int64_t p0, int64_t p1) = nullptr;
  void (*splat)(const int32_t* start, const SplatEntry* ent, const float* X, float* V, int32_t m0,
                int32_t m1, int kp) = nullptr;
  void (*blur)(const float* Vin, float* Vout, const int32_t* nb, int32_t m0, int32_t m1, int kp) = nullptr;
  void (*slice)(const int32_t* offset, const float* bary, int dp1, const float* V, float alpha, int64_t n,
                int k, int kp, bool planar, const float* mask, float* out, int64_t p0, int64_t p1) = nullptr;
};

// Channel stride used inside the lattice: K itself for K <= 4, else K rounded up to a multiple of 8
// (whole SIMD vectors; padding lanes stay zero and are never written out).
inline int padded_channels(int k) { return k <= 4 ? k : (k + 7) / 8 * 8; }

// Kernels for a padded channel count, for the best instruction set this CPU supports.
KernelSet kernels_for(int kp);
const char* kernels_isa();

}  // namespace detail
}  // namespace rloss

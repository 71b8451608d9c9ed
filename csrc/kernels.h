// Function-pointer table of the SIMD kernels (kernels_impl.h), chosen for the running CPU.
#pragma once

#include <cstdint>

#include "common.h"

namespace rloss {
namespace detail {

// Embeds kEmbedLanes = 8 points at once, as the original embeds one. f is [d][8] (feature-major); rem0
// (remainder-0 point after the sum fix) and rank are written as [(d+1)][8]; the barycentric weights
// b[0..d] of the first nb points go to bary[nb][d+1] (point-major). With key_bits > 0 the simplex
// vertex keys packed into uint64 (key_bits bits per coordinate, biased by 2^(key_bits-1)) of the
// first nb points go to keys[nb][d+1] (valid only when the returned max |rem0| fits the fields).
// Returns max |rem0| over all coordinates and lanes, or -1 when a coordinate is NaN/Inf or beyond
// the supported range.
using EmbedFn = int32_t (*)(int d, const float* scale, const float* f, int nb, int32_t* rem0, int32_t* rank,
                            float* bary, int key_bits, uint64_t* keys);

struct KernelSet {
  // Splat of points [p0, p1) in point order: V[offset] += w * x[p], x[p] = values of point p (read from
  // `in`, planar (K, N) or pixel-major (N, K), times mask[p] when given). scratch: 8 * kp floats.
  // Returns false when a value read is NaN or infinite.
  bool (*splat)(const float* in, bool planar, int64_t n, int k, const float* mask, const int32_t* offset,
                const float* bary, int dp1, float* V, int64_t p0, int64_t p1, float* scratch, int kp) = nullptr;
  // V[s] += W[s] for slots [s0, s1).
  void (*add)(float* V, const float* W, int32_t s0, int32_t s1, int kp) = nullptr;
  void (*blur)(const float* Vin, float* Vout, const int32_t* nb, int32_t m0, int32_t m1, int kp) = nullptr;
  // Returns false when an output is NaN or infinite (it overflowed).
  bool (*slice)(const int32_t* offset, const float* bary, int dp1, const float* V, float alpha, int64_t n,
                int k, int kp, bool planar, const float* mask, float scale, float* out, int64_t p0, int64_t p1,
                float* scratch /* 8 * kp floats */) = nullptr;
};

// Channel stride used inside the lattice: K itself for K <= 4, else K rounded up to a multiple of 8
// (whole SIMD vectors; padding lanes stay zero and are never written out).
inline int padded_channels(int k) { return k <= 4 ? k : (k + 7) / 8 * 8; }

// Kernels for a padded channel count, for the best instruction set this CPU supports.
KernelSet kernels_for(int kp);
EmbedFn embed_kernel(int d);
const char* kernels_isa();

}  // namespace detail
}  // namespace rloss

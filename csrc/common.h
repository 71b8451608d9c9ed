// Definitions every part of the lattice shares: the error type, size limits, value layouts.
#pragma once

#include <stdexcept>

namespace rloss {

// Bad arguments (shapes, sizes, values); the bindings turn it into Python's ValueError.
struct InvalidArgument : std::invalid_argument {
  using std::invalid_argument::invalid_argument;
};

// Values to filter that hold NaN or Inf, and finite values so large that the filtered values
// overflow float32 (callers that know what the values are say so).
struct NonFiniteValues : InvalidArgument {
  NonFiniteValues() : InvalidArgument("lattice: values contain NaN or Inf") {}
};
struct FilterOverflow : InvalidArgument {
  FilterOverflow() : InvalidArgument("lattice: the filtered values overflow float32 (the values are too large)") {}
};

// Largest feature dimension supported (per-pixel scratch lives on the stack).
constexpr int kMaxDim = 32;
// Points embedded together by the SIMD embedding kernel.
constexpr int kEmbedLanes = 8;
// Most pixel chunks a splat sums separately (Lattice::splat_chunks).
constexpr int kMaxSplatChunks = 4;

// Layout of value arrays: pixel-major (N, K) or planar (K, N).
enum class Layout { kPixelMajor, kPlanar };

}  // namespace rloss

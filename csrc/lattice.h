// Permutohedral lattice (Adams et al. 2010, in the variant used by the DeepLab/rloss Caffe fork),
// re-implemented so that one lattice filters all K channels of an image in a single pass.
//
// Numerics follow the original exactly: the same elevation, half-to-even rounding, rank/tie rule,
// sum fix, barycentric weights, canonical simplex vertices keyed on the first d coordinates,
// (1/2, 1, 1/2) blur over axes 0..d, slice constant 1/(1+2^-d), self term included, no
// normalisation. Per output element the float operations run in the original's order (splat
// accumulates in point order, slice in vertex order), so the K-at-once filter is bit-identical to
// K single-channel filterings. One exception, at the rounding level: from 2^15 points the splat sums
// fixed chunks of the points separately and then adds them (Lattice::splat_chunks), so that threads
// can share it; results never depend on the thread count.
//
// No Python or torch types here: raw float32 buffers in and out.
#pragma once

#include <cmath>
#include <cstddef>
#include <cstdint>
#include <mutex>
#include <utility>
#include <vector>

#include "common.h"
#include "pixel_features.h"
#include "hash_tables.h"

namespace rloss {

// The slice's constant: the original scales the sliced values by 1 / (1 + 2^-d).
inline double slice_constant(int d) { return 1.0 / (1.0 + std::pow(2.0, -d)); }

class Lattice {
 public:
  // Builds the lattice of N points (lattice_build.cpp). num_threads > 1 parallelises inside this
  // one lattice. sse_pad: like the original SSE build, when N is not a multiple of 4 also insert the
  // simplex vertices of the all-zero feature vector (its padding lanes); they act as blur relays and
  // change results measurably near the feature origin (up to ~1% of the gradient on the golden
  // cases). force_generic_keys: use the int32-key hash table even when packed 64-bit keys would fit.
  void build(const FeatureSource& src, int num_threads, bool sse_pad = true, bool force_generic_keys = false);

  // Filtering (lattice_filter.cpp). out = A * in for K channels at once. mask (N floats, may be
  // null) multiplies the input per pixel (and, when mask_output, the output too). in/out use the
  // same layout. Equals spread() then slice().
  void filter(const float* in, float* out, int k, Layout layout, const float* mask, bool mask_output,
              int num_threads);
  // The first half of filter(): splat x = in * mask (mask may be null) and blur; the blurred values
  // stay in the lattice for slice(). Planar values of many channels go through in cache-sized
  // channel groups (same results: channels never mix). dots (K doubles, may be null) receives
  // <x_c, (A x)_c> per channel, computed on the lattice points (the slice is the splat's transpose,
  // so <x, A x> = alpha <P x, B P x>) without touching the N x K output.
  void spread(const float* in, int k, Layout layout, const float* mask, int num_threads, double* dots);
  // The second half: out = (A x) [* mask] * scale for the K channels of the last spread(). Throws
  // FilterOverflow when an output overflows float32.
  void slice(float* out, Layout layout, const float* mask, float scale, int num_threads);

  int dim() const { return d_; }
  int64_t num_points() const { return n_; }
  int32_t lattice_size() const { return m_; }  // M, number of lattice points
  bool packed_keys() const { return packed_; }
  std::size_t memory_bytes() const;
  // A lattice is not safe for concurrent use; the Python bindings hold this lock around calls.
  std::mutex& mutex() { return mu_; }

  // Read-only views (tests, and the benchmark's one-channel-at-a-time baseline).
  const std::vector<int32_t>& offsets() const { return offset_; }    // N*(d+1) lattice indices
  const std::vector<float>& barycentric() const { return bary_; }    // N*(d+1)
  // (d+1) x M x 2: slots (lattice index + 1, 0 = missing) of the two blur neighbours along each axis.
  const std::vector<int32_t>& neighbours() const { return neigh_; }
  void key(int32_t m, int32_t* out) const;                           // d coordinates of lattice point m

 private:
  template <class Keys>
  bool build_with(const FeatureSource& src, int nt, bool sse_pad, Keys& keys);
  int team_threads(int num_threads) const;  // threads worth using inside this lattice
  int channels_per_pass(int k) const;
  void spread_group(const float* in, int k, Layout layout, const float* mask, int num_threads, double* dots);
  static int splat_chunks(int64_t n);

  std::mutex mu_;
  int d_ = 0;
  int64_t n_ = 0;
  int32_t m_ = 0;
  bool packed_ = false;
  std::vector<float> bary_;           // N x (d+1)
  std::vector<int32_t> offset_;       // N x (d+1): lattice index of each simplex vertex
  std::vector<int32_t> neigh_;        // (d+1) x M x 2 slots
  std::vector<PackedTable> ptables_;  // per-thread tables during build; [0] is the lattice's
  std::vector<KeyTable> gtables_;     // same for the generic int32 keys
  std::vector<std::vector<int32_t>> remap_;  // per thread: local index -> global index
  std::vector<int64_t> chunk_;        // pixel chunk boundaries of the build
  // filter buffers (reused between calls)
  std::vector<std::vector<float>> vbuf_;     // (M+1) x Kp each: splatted, two blur buffers, chunk sums
  std::vector<std::vector<float>> blurred_;  // per channel group: the blurred values slice() reads
  std::vector<std::pair<int, int>> groups_;  // channel groups of the last spread (none: nothing to slice)
  std::vector<float> scratch_;        // threads x 8 x Kp (splat and slice tiles)
  std::vector<double> dot_scratch_;   // threads x K (dot product partial sums)
};

}  // namespace rloss

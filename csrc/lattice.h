// Permutohedral lattice (Adams et al. 2010, in the variant used by the DeepLab/rloss Caffe fork),
// re-implemented so that one lattice filters all K channels of an image in a single pass.
//
// Numerics follow the original exactly (see spec 7.3): same elevation, half-to-even rounding,
// rank/tie rule, sum fix, barycentric weights, canonical simplex vertices keyed on the first d
// coordinates, (1/2, 1, 1/2) blur over axes 0..d, slice constant 1/(1+2^-d), self term included,
// no normalisation.  Per output element the floating point operations are performed in the same
// order as the original (splat accumulates in pixel order, slice in vertex order), so the K-at-once
// filter is bit-identical to K single-channel filterings. One exception, at the rounding level:
// from 2^15 points the splat sums fixed chunks of the points separately and then adds them
// (Lattice::splat_chunks), so that threads can share it; results never depend on the thread count.
//
// No Python or torch types here: raw float32 buffers in and out.
#pragma once

#include <atomic>
#include <mutex>
#include <cstddef>
#include <cstdint>
#include <memory>
#include <stdexcept>
#include <string>
#include <utility>
#include <vector>

namespace rloss {

// Bad arguments (shapes, sizes, values); the bindings turn it into Python's ValueError.
struct InvalidArgument : std::invalid_argument {
  using std::invalid_argument::invalid_argument;
};

// Largest feature dimension supported (per-pixel scratch lives on the stack).
constexpr int kMaxDim = 32;
// Points embedded together by the SIMD embedding kernel.
constexpr int kEmbedLanes = 8;
// Most pixel chunks a splat sums separately (Lattice::splat_chunks).
constexpr int kMaxSplatChunks = 4;

// Where per-pixel features come from: either an (N, d) row-major array, or an image
// (C planes of H x W) turned on the fly into (x/s_xy, y/s_xy, c_0/s_rgb, ..., c_{C-1}/s_rgb).
struct FeatureSource {
  const float* features = nullptr;  // (N, d) when not null
  const float* image = nullptr;     // (C, H, W) when features is null
  int64_t height = 0, width = 0;
  int channels = 0;
  float sigma_xy = 1.f, sigma_rgb = 1.f;
  float* roi = nullptr;  // image sources: when set, build() writes the image's caffe_roi_mask here (N floats)
  int dim = 0;
  int64_t count = 0;  // N

  static FeatureSource from_array(const float* f, int64_t n, int d);
  static FeatureSource from_image(const float* img, int channels, int64_t h, int64_t w, float sigma_xy,
                                  float sigma_rgb);
};

// Optional timing counters (nanoseconds, summed over calls; thread-time when images run in parallel).
enum TimerId { kTEmbed = 0, kTMerge, kTIndex, kTSplat, kTBlur, kTSlice, kNumTimers };
struct Timers {
  std::atomic<bool> enabled{false};
  std::atomic<int64_t> ns[kNumTimers];
  Timers() { reset(); }
  void reset() {
    for (auto& v : ns) v.store(0);
  }
};
Timers& timers();
const char* timer_name(int id);

// Open-addressing hash table over int32 keys of fixed length; entries are numbered in insertion order.
class KeyTable {
 public:
  void reset(int key_len, std::size_t expected);
  int32_t find_or_insert(const int32_t* key, uint64_t h);
  int32_t find(const int32_t* key, uint64_t h) const;  // -1 when absent
  int32_t size() const { return count_; }
  const int32_t* key(int32_t i) const { return keys_.data() + static_cast<std::size_t>(i) * key_len_; }
  uint64_t hash(int32_t i) const { return hashes_[static_cast<std::size_t>(i)]; }
  std::size_t memory_bytes() const;
  void release();

 private:
  void grow();
  struct Slot {
    uint32_t tag;
    int32_t index;  // -1 = empty
  };
  int key_len_ = 0;
  int32_t count_ = 0;
  int shift_ = 64;
  std::vector<Slot> slots_;
  std::vector<int32_t> keys_;
  std::vector<uint64_t> hashes_;
};

// Open-addressing hash table over keys packed into one uint64 (fields of `bits` bits per coordinate,
// biased to be positive; 0 never occurs as a key and marks empty slots). The fast path.
class PackedTable {
 public:
  void reset(std::size_t expected);
  int32_t find_or_insert(uint64_t key);
  int32_t find(uint64_t key) const;  // -1 when absent
  // Finds or inserts keys[0..count) in order (first slots prefetched first), writes their indices to out.
  void insert_batch(const uint64_t* keys, int count, int32_t* out);
  int32_t size() const { return count_; }
  uint64_t key(int32_t i) const { return keys_[static_cast<std::size_t>(i)]; }
  std::size_t memory_bytes() const;
  void release();

 private:
  void grow();
  struct Slot {
    uint64_t key;   // 0 = empty
    int32_t index;
    int32_t pad;
  };
  int32_t count_ = 0;
  int shift_ = 64;
  std::vector<Slot> slots_;
  std::vector<uint64_t> keys_;
};

// Layout of value arrays handed to filter(): pixel-major (N, K) or planar (K, N).
enum class Layout { kPixelMajor, kPlanar };

class Lattice {
 public:
  // Builds the lattice of N points. num_threads > 1 parallelises inside this one lattice.
  // sse_pad: like the original SSE build, when N is not a multiple of 4 also insert the simplex
  // vertices of the all-zero feature vector (its padding lanes); they act as blur relays and change
  // results measurably near the feature origin (up to ~1% of the gradient on the golden cases).
  // force_generic_keys: use the int32-key hash table even when packed 64-bit keys would fit (tests).
  void build(const FeatureSource& src, int num_threads, bool sse_pad = true, bool force_generic_keys = false);

  // out = A * in for K channels at once. mask (N floats, may be null) multiplies the input per pixel
  // (and, when mask_output, the output too). in/out may use either layout (the same for both).
  // Equals spread() then slice().
  void filter(const float* in, float* out, int k, Layout layout, const float* mask, bool mask_output,
              int num_threads);
  // The first half of filter(): splat x = in * mask (mask may be null) and blur; the blurred values
  // stay in the lattice for slice(). Planar values of many channels go through in cache-sized
  // channel groups (same results: channels never mix). dots (K doubles, may be null) receives <x_c, (A x)_c> per
  // channel, computed on the lattice points (the slice is the splat's transpose, so
  // <x, A x> = alpha <P x, B P x>) without touching the N x K output.
  void spread(const float* in, int k, Layout layout, const float* mask, int num_threads, double* dots);
  // The second half: out = (A x) [* mask] * scale for the K channels of the last spread().
  void slice(float* out, Layout layout, const float* mask, float scale, int num_threads);

  // The original's way, kept as a benchmark baseline: one channel at a time with value size 1,
  // scatter splat, fresh zeroed buffers per channel, single thread. Planar (K, N) in and out.
  void filter_per_channel(const float* in, float* out, int k, const float* mask);

  int dim() const { return d_; }
  int64_t num_points() const { return n_; }
  int32_t lattice_size() const { return m_; }  // M, number of lattice points
  bool packed_keys() const { return packed_; }
  std::size_t memory_bytes() const;
  void release();  // frees all buffers (the object can be rebuilt afterwards)
  // A lattice is not safe for concurrent use; the Python bindings hold this lock around calls.
  std::mutex& mutex() { return mu_; }

  // Read-only views, for tests.
  const std::vector<int32_t>& offsets() const { return offset_; }  // N*(d+1) lattice indices
  const std::vector<float>& barycentric() const { return bary_; }  // N*(d+1)
  void key(int32_t m, int32_t* out) const;                         // d coordinates of lattice point m

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
  std::vector<std::vector<float>> vbuf_;  // (M+1) x Kp each: splatted, two blur buffers, chunk sums
  std::vector<std::vector<float>> blurred_;  // per channel group: the blurred values slice() reads
  std::vector<std::pair<int, int>> groups_;  // channel groups of the last spread (none: nothing to slice)
  std::vector<float> scratch_;        // threads x 8 x Kp (splat and slice tiles)
  std::vector<double> dot_scratch_;   // threads x K (dot product partial sums)
};

// Lattices borrowed from a process-wide pool (repeated calls reuse their buffers), returned to it
// when the lease ends.
class LatticeLease {
 public:
  explicit LatticeLease(int64_t count);
  ~LatticeLease();
  LatticeLease(const LatticeLease&) = delete;
  LatticeLease& operator=(const LatticeLease&) = delete;
  Lattice& operator[](int64_t i) { return *items_[static_cast<std::size_t>(i)]; }
  std::size_t size() const { return items_.size(); }

 private:
  std::vector<std::unique_ptr<Lattice>> items_;
};

// The DenseCRF loss of a batch (spec 2.15) in the two halves autograd calls. forward() builds one
// lattice per image, spreads x = m S and returns <x_c, (A x)_c> per image and class (the loss is
// -sum / B); the lattices and their blurred values stay until backward(), which slices them straight
// into the gradient scale * (A x) m. No N x K intermediate is ever written.
class DenseCRFLossBatch {
 public:
  // image (B, C, H, W), seg (B, K, H, W) planar; mask (B, H, W), or null for each image's
  // caffe_roi_mask; dots (B x K) out.
  void forward(const float* image, int64_t b, int c, int64_t h, int64_t w, const float* seg, int k,
               float sigma_xy, float sigma_rgb, const float* mask, int num_threads, bool sse_pad, double* dots);
  // grad (B, K, H, W) = scale * (A x) m for the last forward().
  void backward(float* grad, float scale, int num_threads);
  int64_t batch() const { return b_; }
  int channels() const { return k_; }
  int64_t pixels() const { return n_; }
  // Not safe for concurrent use; the Python bindings hold this lock around calls.
  std::mutex& mutex() { return mu_; }

 private:
  std::mutex mu_;
  std::unique_ptr<LatticeLease> lattices_;
  std::vector<float> masks_;  // B x N
  int64_t b_ = 0, n_ = 0;
  int k_ = 0;
  bool spread_ = false;
};

// Batched bilateral / spatial filtering of B images: image (B, C, H, W), values (B, K, H, W),
// out (B, K, H, W), optional mask (B, H, W). Parallel over images and inside images.
// roi_from_image: use the DenseCRFLoss ROI mask of each image (caffe_roi_mask) instead of `mask`.
void filter_image_batch(const float* image, int64_t b, int c, int64_t h, int64_t w, const float* values,
                        int k, float* out, float sigma_xy, float sigma_rgb, const float* mask,
                        bool mask_output, int num_threads, bool sse_pad, bool roi_from_image = false);


// Same for explicit features: features (B, N, d), values/out (B, K, N) planar.
void filter_feature_batch(const float* features, int64_t b, int64_t n, int d, const float* values, int k,
                          float* out, int num_threads, bool sse_pad);

// The baseline batch: images in parallel (one thread each), one channel at a time.
void filter_image_batch_per_channel(const float* image, int64_t b, int c, int64_t h, int64_t w,
                                    const float* values, int k, float* out, float sigma_xy,
                                    float sigma_rgb, const float* mask, int num_threads, bool sse_pad);

// Frees the lattices cached for the batched functions.
void release_workspaces();
std::size_t workspace_bytes();

bool have_openmp();
int max_threads();
const char* kernel_isa();  // "avx2" or "baseline"

}  // namespace rloss

// Permutohedral lattice: construction (embedding, hash tables, neighbours) and the
// K-channel filter orchestration. The arithmetic of the embedding follows spec 7.3 step by step.
#include "lattice.h"

#include <algorithm>
#include <chrono>
#include <climits>
#include <cmath>
#include <cstring>
#include <exception>
#include <memory>
#include <mutex>

#ifdef _OPENMP
#include <omp.h>
#endif

#include "kernels.h"

namespace rloss {

// ------------------------------------------------------------------------------------------------
// small helpers

namespace {

using Clock = std::chrono::steady_clock;

inline int64_t elapsed_ns(Clock::time_point t0) {
  return std::chrono::duration_cast<std::chrono::nanoseconds>(Clock::now() - t0).count();
}

inline void add_time(TimerId id, Clock::time_point t0) {
  Timers& t = timers();
  if (t.enabled.load(std::memory_order_relaxed)) t.ns[id].fetch_add(elapsed_ns(t0), std::memory_order_relaxed);
}

inline int thread_id() {
#ifdef _OPENMP
  return omp_get_thread_num();
#else
  return 0;
#endif
}

inline int team_size() {
#ifdef _OPENMP
  return omp_get_num_threads();
#else
  return 1;
#endif
}

// Runs f(v) for every v in [0, nv) on up to nv threads (each v exactly once, whatever team size the
// runtime grants). Exceptions thrown by f are carried out of the parallel region and rethrown.
template <class F>
void parallel_each(int nv, F&& f) {
  if (nv <= 1) {
    if (nv == 1) f(0);
    return;
  }
#ifdef _OPENMP
  std::exception_ptr err = nullptr;
#pragma omp parallel num_threads(nv)
  {
    const int tid = thread_id(), nth = team_size();
    for (int v = tid; v < nv; v += nth) {
      try {
        f(v);
      } catch (...) {
#pragma omp critical(rloss_lattice_error)
        {
          if (!err) err = std::current_exception();
        }
      }
    }
  }
  if (err) std::rethrow_exception(err);
#else
  for (int v = 0; v < nv; ++v) f(v);
#endif
}

inline uint64_t hash_key(const int32_t* k, int len) {
  uint64_t h = 0;
  for (int i = 0; i < len; ++i) h = (h + static_cast<uint32_t>(k[i])) * 0x9E3779B97F4A7C15ull;
  return h ^ (h >> 29);
}

}  // namespace

Timers& timers() {
  static Timers t;
  return t;
}

const char* timer_name(int id) {
  static const char* names[kNumTimers] = {"embed+hash", "merge", "slots+neighbours", "splat", "blur", "slice"};
  return (id >= 0 && id < kNumTimers) ? names[id] : "?";
}

bool have_openmp() {
#ifdef _OPENMP
  return true;
#else
  return false;
#endif
}

int max_threads() {
#ifdef _OPENMP
  return omp_get_max_threads();
#else
  return 1;
#endif
}

const char* kernel_isa() { return detail::kernels_isa(); }

FeatureSource FeatureSource::from_array(const float* f, int64_t n, int d) {
  FeatureSource s;
  s.features = f;
  s.count = n;
  s.dim = d;
  return s;
}

FeatureSource FeatureSource::from_image(const float* img, int channels, int64_t h, int64_t w, float sigma_xy,
                                        float sigma_rgb) {
  FeatureSource s;
  s.image = img;
  s.channels = channels;
  s.height = h;
  s.width = w;
  s.sigma_xy = sigma_xy;
  s.sigma_rgb = sigma_rgb;
  s.dim = 2 + channels;
  s.count = h * w;
  return s;
}

// ------------------------------------------------------------------------------------------------
// KeyTable

namespace {
// Open-addressing geometry for `expected` keys: a power-of-two capacity of at least twice that
// (16 at least) and the shift that maps a 64-bit multiplicative hash onto it.
std::size_t table_capacity(std::size_t expected, int* shift) {
  std::size_t cap = 16;
  while (cap < 2 * expected) cap *= 2;
  int bits = 0;
  while ((std::size_t{1} << bits) < cap) ++bits;
  *shift = 64 - bits;
  return cap;
}
}  // namespace

void KeyTable::reset(int key_len, std::size_t expected) {
  key_len_ = key_len;
  count_ = 0;
  slots_.assign(table_capacity(expected, &shift_), Slot{0, -1});
  keys_.clear();
  hashes_.clear();
  keys_.reserve(expected * key_len);
  hashes_.reserve(expected);
}

void KeyTable::grow() {
  const std::size_t cap = slots_.size() * 2;
  shift_ -= 1;
  slots_.assign(cap, Slot{0, -1});
  const std::size_t mask = cap - 1;
  for (int32_t i = 0; i < count_; ++i) {
    const uint64_t h = hashes_[i];
    std::size_t s = static_cast<std::size_t>(h >> shift_);
    while (slots_[s].index >= 0) s = (s + 1) & mask;
    slots_[s] = Slot{static_cast<uint32_t>(h), i};
  }
}

int32_t KeyTable::find_or_insert(const int32_t* key, uint64_t h) {
  if (2 * static_cast<std::size_t>(count_) + 2 >= slots_.size()) grow();
  const std::size_t mask = slots_.size() - 1;
  const uint32_t tag = static_cast<uint32_t>(h);
  std::size_t s = static_cast<std::size_t>(h >> shift_);
  for (;;) {
    const Slot sl = slots_[s];
    if (sl.index < 0) break;
    if (sl.tag == tag && std::memcmp(keys_.data() + static_cast<std::size_t>(sl.index) * key_len_, key,
                                     sizeof(int32_t) * key_len_) == 0)
      return sl.index;
    s = (s + 1) & mask;
  }
  if (count_ == INT32_MAX) throw InvalidArgument("lattice: too many lattice points for int32 indices");
  const int32_t idx = count_++;
  slots_[s] = Slot{tag, idx};
  keys_.insert(keys_.end(), key, key + key_len_);
  hashes_.push_back(h);
  return idx;
}

int32_t KeyTable::find(const int32_t* key, uint64_t h) const {
  const std::size_t mask = slots_.size() - 1;
  const uint32_t tag = static_cast<uint32_t>(h);
  std::size_t s = static_cast<std::size_t>(h >> shift_);
  for (;;) {
    const Slot sl = slots_[s];
    if (sl.index < 0) return -1;
    if (sl.tag == tag && std::memcmp(keys_.data() + static_cast<std::size_t>(sl.index) * key_len_, key,
                                     sizeof(int32_t) * key_len_) == 0)
      return sl.index;
    s = (s + 1) & mask;
  }
}

std::size_t KeyTable::memory_bytes() const {
  return slots_.capacity() * sizeof(Slot) + keys_.capacity() * sizeof(int32_t) +
         hashes_.capacity() * sizeof(uint64_t);
}

void KeyTable::release() {
  std::vector<Slot>().swap(slots_);
  std::vector<int32_t>().swap(keys_);
  std::vector<uint64_t>().swap(hashes_);
  count_ = 0;
}

// ------------------------------------------------------------------------------------------------
// PackedTable

namespace {
constexpr uint64_t kHashMul = 0x9E3779B97F4A7C15ull;
}

void PackedTable::reset(std::size_t expected) {
  count_ = 0;
  slots_.assign(table_capacity(expected, &shift_), Slot{0, -1, 0});
  keys_.resize(expected);
}

void PackedTable::grow() {
  const std::size_t cap = slots_.size() * 2;
  shift_ -= 1;
  slots_.assign(cap, Slot{0, -1, 0});
  const std::size_t mask = cap - 1;
  for (int32_t i = 0; i < count_; ++i) {
    const uint64_t k = keys_[i];
    std::size_t s = static_cast<std::size_t>((k * kHashMul) >> shift_);
    while (slots_[s].key != 0) s = (s + 1) & mask;
    slots_[s] = Slot{k, i, 0};
  }
}

int32_t PackedTable::find_or_insert(uint64_t key) {
  int32_t idx;
  insert_batch(&key, 1, &idx);
  return idx;
}

void PackedTable::insert_batch(const uint64_t* keys, int count, int32_t* out) {
  while (2 * (static_cast<std::size_t>(count_) + count) + 2 >= slots_.size()) grow();
  if (keys_.size() < static_cast<std::size_t>(count_) + count) {
    const std::size_t want = std::max<std::size_t>(2 * keys_.size(), static_cast<std::size_t>(count_) + count);
    if (want > static_cast<std::size_t>(INT32_MAX)) throw InvalidArgument("lattice: too many lattice points");
    keys_.resize(want);
  }
  Slot* const slots = slots_.data();
  uint64_t* const kstore = keys_.data();
  const std::size_t mask = slots_.size() - 1;
  const int sh = shift_;
  std::size_t home[64];
  int32_t n = count_;
  for (int b0 = 0; b0 < count; b0 += 64) {
    const int b1 = std::min(count, b0 + 64);
    for (int i = b0; i < b1; ++i) {
      home[i - b0] = static_cast<std::size_t>((keys[i] * kHashMul) >> sh);
      __builtin_prefetch(slots + home[i - b0]);
    }
    for (int i = b0; i < b1; ++i) {
      const uint64_t key = keys[i];
      std::size_t s = home[i - b0];
      int32_t idx;
      for (;;) {
        const uint64_t k = slots[s].key;
        if (k == key) {
          idx = slots[s].index;
          break;
        }
        if (k == 0) {
          idx = n++;
          slots[s].key = key;
          slots[s].index = idx;
          kstore[idx] = key;
          break;
        }
        s = (s + 1) & mask;
      }
      out[i] = idx;
    }
  }
  count_ = n;
}

int32_t PackedTable::find(uint64_t key) const {
  const std::size_t mask = slots_.size() - 1;
  std::size_t s = static_cast<std::size_t>((key * kHashMul) >> shift_);
  for (;;) {
    const uint64_t k = slots_[s].key;
    if (k == key) return slots_[s].index;
    if (k == 0) return -1;
    s = (s + 1) & mask;
  }
}

std::size_t PackedTable::memory_bytes() const {
  return slots_.capacity() * sizeof(Slot) + keys_.capacity() * sizeof(uint64_t);
}

void PackedTable::release() {
  std::vector<Slot>().swap(slots_);
  std::vector<uint64_t>().swap(keys_);
  count_ = 0;
}

// ------------------------------------------------------------------------------------------------
// Key policies: how the d+1 vertex keys of a point are formed, stored and looked up.

namespace {

constexpr int L = kEmbedLanes;

// Keys packed into one uint64: d fields of `bits` bits, each coordinate + 2^(bits-1). Every field
// stays inside [1, 2^bits - 2] (checked via max |rem0|), so field-wise +-1 / +-(d+1) steps can be
// done on the packed word without carries between fields, and 0 never occurs as a key.
struct PackedKeys {
  using Table = PackedTable;
  int d, bits;
  uint64_t ones = 0;
  int64_t bias;
  int32_t limit;
  explicit PackedKeys(int dim) : d(dim), bits(std::min(32, 64 / dim)) {
    bias = int64_t{1} << (bits - 1);
    limit = static_cast<int32_t>(bias - 2 * (dim + 1) - 2);
    for (int i = 0; i < dim; ++i) ones |= uint64_t{1} << (bits * i);
  }
  static bool usable(int dim) { return dim <= 8; }
  void reset(Table& t, std::size_t expected) const { t.reset(expected); }
  bool fits(int32_t max_abs_rem0) const { return max_abs_rem0 <= limit; }
  uint64_t field(int i, uint64_t v) const { return v << (bits * i); }

  int key_bits() const { return bits; }
  // Inserts the vertices of a block's nb points (point order, then r); keys come from the embedding
  // kernel. Writes local indices to out.
  void insert_block(Table& tab, const int32_t*, const int32_t*, const uint64_t* keys, int nb, int32_t* out) const {
    tab.insert_batch(keys, nb * (d + 1), out);
  }
  // Neighbour n1 of lattice point m along axis j: k - 1 everywhere, k_j + d at j (j < d).
  int32_t find_n1(const Table& g, int32_t m, int j) const {
    uint64_t key = g.key(m) - ones;
    if (j < d) key += field(j, static_cast<uint64_t>(d + 1));
    return g.find(key);
  }
  int32_t merge(Table& g, const Table& t, int32_t i) const { return g.find_or_insert(t.key(i)); }
  void unpack(const Table& g, int32_t m, int32_t* out) const {
    const uint64_t k = g.key(m);
    const uint64_t mask = bits == 64 ? ~uint64_t{0} : ((uint64_t{1} << bits) - 1);
    for (int i = 0; i < d; ++i) out[i] = static_cast<int32_t>(static_cast<int64_t>((k >> (bits * i)) & mask) - bias);
  }
};

// Keys as d int32 coordinates (any range the float embedding supports).
struct GenericKeys {
  using Table = KeyTable;
  int d;
  explicit GenericKeys(int dim) : d(dim) {}
  void reset(Table& t, std::size_t expected) const { t.reset(d, expected); }
  bool fits(int32_t) const { return true; }
  int key_bits() const { return 0; }
  void insert_block(Table& tab, const int32_t* rem0, const int32_t* rank, const uint64_t*, int nb,
                    int32_t* out) const {
    int32_t key[kMaxDim];
    for (int l = 0; l < nb; ++l)
      for (int r = 0; r <= d; ++r) {
        for (int i = 0; i < d; ++i) key[i] = rem0[i * L + l] + (rank[i * L + l] <= d - r ? r : r - (d + 1));
        *out++ = tab.find_or_insert(key, hash_key(key, d));
      }
  }
  int32_t find_n1(const Table& g, int32_t m, int j) const {
    int32_t key[kMaxDim];
    const int32_t* k = g.key(m);
    for (int i = 0; i < d; ++i) key[i] = k[i] - 1;
    if (j < d) key[j] = k[j] + d;
    return g.find(key, hash_key(key, d));
  }
  int32_t merge(Table& g, const Table& t, int32_t i) const { return g.find_or_insert(t.key(i), t.hash(i)); }
  void unpack(const Table& g, int32_t m, int32_t* out) const {
    const int32_t* k = g.key(m);
    for (int i = 0; i < d; ++i) out[i] = k[i];
  }
};

template <class T>
std::vector<T>& tables_of(std::vector<PackedTable>& p, std::vector<KeyTable>& g);
template <>
std::vector<PackedTable>& tables_of<PackedTable>(std::vector<PackedTable>& p, std::vector<KeyTable>&) {
  return p;
}
template <>
std::vector<KeyTable>& tables_of<KeyTable>(std::vector<PackedTable>&, std::vector<KeyTable>& g) {
  return g;
}

// Spec 2.15 step 1: mask[p] = 0 when every channel of the mean-subtracted image truncates to 0
// (|v| < 1), else 1, for pixels [0, count) of an image of c planes `plane` floats apart.
void caffe_roi_mask(const float* image, int c, int64_t plane, int64_t count, float* mask) {
  for (int64_t p = 0; p < count; ++p) mask[p] = 0.f;
  for (int ch = 0; ch < c; ++ch) {
    const float* src = image + ch * plane;
    // (int)v != 0  <=>  |v| >= 1 (truncation toward zero); NaN counts as inside.
    for (int64_t p = 0; p < count; ++p) mask[p] = (mask[p] != 0.f || !(std::fabs(src[p]) < 1.f)) ? 1.f : 0.f;
  }
}

// Fills the feature block f[d][L] of points [p0, p0 + nb); lanes >= nb get zeros.
struct BlockFeatures {
  const FeatureSource& s;
  std::vector<float> xs, ys;  // x / sigma_xy per column, y / sigma_xy per row
  explicit BlockFeatures(const FeatureSource& src) : s(src) {
    if (!s.features) {
      xs.resize(s.width);
      ys.resize(s.height);
      for (int64_t x = 0; x < s.width; ++x) xs[x] = static_cast<float>(x) / s.sigma_xy;
      for (int64_t y = 0; y < s.height; ++y) ys[y] = static_cast<float>(y) / s.sigma_xy;
    }
  }
  void fill(int64_t p0, int nb, float* f) const {
    const int d = s.dim;
    if (nb < L)
      for (int j = 0; j < d; ++j)
        for (int l = nb; l < L; ++l) f[j * L + l] = 0.f;
    if (s.features) {
      for (int l = 0; l < nb; ++l)
        for (int j = 0; j < d; ++j) f[j * L + l] = s.features[(p0 + l) * d + j];
      return;
    }
    int64_t y = p0 / s.width, x = p0 % s.width;
    for (int l = 0; l < nb; ++l) {
      f[l] = xs[x];
      f[L + l] = ys[y];
      if (++x == s.width) {
        x = 0;
        ++y;
      }
    }
    const int64_t plane = s.height * s.width;
    const float sr = s.sigma_rgb;
    for (int c = 0; c < s.channels; ++c) {
      const float* src = s.image + c * plane + p0;
      float* dst = f + (2 + c) * L;
      for (int l = 0; l < nb; ++l) dst[l] = src[l] / sr;
    }
    if (s.roi) caffe_roi_mask(s.image + p0, s.channels, plane, nb, s.roi + p0);
  }
};

}  // namespace

// ------------------------------------------------------------------------------------------------
// Lattice construction

void Lattice::build(const FeatureSource& src, int num_threads, bool sse_pad, bool force_generic_keys) {
  const int d = src.dim;
  const int64_t n = src.count;
  if (d < 1 || d > kMaxDim)
    throw InvalidArgument("lattice: feature dimension must be in [1, " + std::to_string(kMaxDim) + "], got " +
                          std::to_string(d));
  if (n < 1) throw InvalidArgument("lattice: need at least one point");
  if (n > (static_cast<int64_t>(INT32_MAX) - 64) / (d + 1))
    throw InvalidArgument("lattice: too many points (" + std::to_string(n) + ") for feature dimension " +
                          std::to_string(d) + ": N*(d+1) must stay below 2^31");
  if (!src.features && !(src.sigma_xy > 0.f && src.sigma_rgb > 0.f))
    throw InvalidArgument("lattice: sigmas must be > 0");
  // Small lattices are not worth splitting.
  const int nt = std::max(1, std::min<int>(num_threads, static_cast<int>(std::max<int64_t>(1, n / 4096))));
  try {
    if (!force_generic_keys && PackedKeys::usable(d)) {
      PackedKeys keys(d);
      if (build_with(src, nt, sse_pad, keys)) {
        packed_ = true;
        return;
      }
    }
    GenericKeys keys(d);
    build_with(src, nt, sse_pad, keys);
    packed_ = false;
  } catch (...) {
    n_ = 0;  // a failed build leaves no usable lattice (filter() refuses)
    m_ = 0;
    throw;
  }
}

template <class Keys>
bool Lattice::build_with(const FeatureSource& src, int nt, bool sse_pad, Keys& keys) {
  using Table = typename Keys::Table;
  std::vector<Table>& tables = tables_of<Table>(ptables_, gtables_);
  const int d = src.dim;
  const int64_t n = src.count;
  const int dp1 = d + 1;
  const int32_t prev_m = m_;
  const int64_t prev_n = n_;
  d_ = d;
  n_ = n;
  m_ = 0;
  groups_.clear();

  float scale[kMaxDim];
  {
    const double inv_std = std::sqrt(2.0 / 3.0) * (d + 1);
    for (int i = 0; i < d; ++i) scale[i] = static_cast<float>(inv_std / std::sqrt(static_cast<double>(i + 1) * (i + 2)));
  }
  const detail::EmbedFn embed = detail::embed_kernel(d);

  auto t0 = Clock::now();
  bary_.resize(static_cast<std::size_t>(n) * dp1);
  offset_.resize(static_cast<std::size_t>(n) * dp1);
  if (static_cast<int>(tables.size()) < nt) tables.resize(nt);
  if (static_cast<int>(remap_.size()) < nt) remap_.resize(nt);
  chunk_.assign(nt + 1, 0);
  for (int t = 0; t <= nt; ++t) chunk_[t] = n * t / nt / L * L;  // block-aligned chunks
  chunk_[nt] = n;
  const BlockFeatures features(src);

  // Expected number of lattice points per chunk (the previous build is a good guess).
  const std::size_t guess =
      prev_m > 0 && prev_n > 0 ? static_cast<std::size_t>(static_cast<double>(prev_m) * n / prev_n / nt * 1.25)
                               : static_cast<std::size_t>(n / nt / 8);
  const bool pad = sse_pad && (n % 4) != 0;

  // Phase A: embed blocks of points (SIMD) and insert their simplex vertices into a per-chunk table,
  // numbered in first-insertion order inside the chunk.
  std::atomic<bool> bad_feature{false}, out_of_range{false};
  parallel_each(nt, [&](int t) {
    Table& tab = tables[t];
    keys.reset(tab, std::max<std::size_t>(guess, 64));
    alignas(64) float f[kMaxDim * L];
    alignas(64) int32_t rem0[(kMaxDim + 1) * L], rank[(kMaxDim + 1) * L];
    alignas(64) uint64_t kb[(kMaxDim + 1) * L];
    const int key_bits = keys.key_bits();
    for (int64_t p0 = chunk_[t]; p0 < chunk_[t + 1]; p0 += L) {
      const int nb = static_cast<int>(std::min<int64_t>(L, chunk_[t + 1] - p0));
      features.fill(p0, nb, f);
      const int32_t mx = embed(d, scale, f, nb, rem0, rank, bary_.data() + p0 * dp1, key_bits, kb);
      if (mx < 0) {
        bad_feature.store(true);
        return;
      }
      if (!keys.fits(mx)) {
        out_of_range.store(true);
        return;
      }
      keys.insert_block(tab, rem0, rank, kb, nb, offset_.data() + p0 * dp1);
    }
    if (pad && t == nt - 1) {
      // The original's padding lanes: vertices of the all-zero feature vector, inserted last.
      for (int i = 0; i < d * L; ++i) f[i] = 0.f;
      float b[kMaxDim + 1];
      embed(d, scale, f, 1, rem0, rank, b, key_bits, kb);
      int32_t dummy[kMaxDim + 1];
      keys.insert_block(tab, rem0, rank, kb, 1, dummy);
    }
  });
  if (bad_feature.load())
    throw InvalidArgument(
        "lattice: features contain NaN/Inf, or are so large that lattice coordinates exceed 2^22 "
        "(use larger sigmas)");
  if (out_of_range.load()) return false;
  add_time(kTEmbed, t0);

  // Merge the chunk tables in chunk order: global first-insertion order over all points.
  t0 = Clock::now();
  Table& g = tables[0];
  for (int t = 1; t < nt; ++t) {
    const Table& tab = tables[t];
    std::vector<int32_t>& map = remap_[t];
    map.resize(tab.size());
    for (int32_t i = 0; i < tab.size(); ++i) map[i] = keys.merge(g, tab, i);
  }
  m_ = g.size();
  const int32_t M = m_;
  neigh_.assign(static_cast<std::size_t>(dp1) * M * 2, 0);
  add_time(kTMerge, t0);

  // Phase B: global indices and neighbours. Along axis j the n1 neighbour of key k is
  // k + (-1, ..., -1, +d at j, -1, ...) and the n2 neighbour of that point is k again; k -> n1(k) is
  // one-to-one, so writing n2 of the found point never collides between threads.
  t0 = Clock::now();
  parallel_each(nt, [&](int t) {
    if (t > 0) {  // chunk 0's table is the global one
      const int32_t* map = remap_[t].data();
      int32_t* const oe = offset_.data() + chunk_[t + 1] * dp1;
      for (int32_t* op = offset_.data() + chunk_[t] * dp1; op < oe; ++op) *op = map[*op];
    }
    const int64_t m0 = static_cast<int64_t>(M) * t / nt, m1 = static_cast<int64_t>(M) * (t + 1) / nt;
    for (int64_t m = m0; m < m1; ++m) {
      for (int j = 0; j < dp1; ++j) {
        const int32_t q = keys.find_n1(g, static_cast<int32_t>(m), j);
        int32_t* nb = neigh_.data() + static_cast<std::size_t>(j) * M * 2;
        nb[2 * m] = q + 1;  // 0 when missing
        if (q >= 0) nb[2 * static_cast<int64_t>(q) + 1] = static_cast<int32_t>(m) + 1;
      }
    }
  });
  add_time(kTIndex, t0);
  return true;
}

void Lattice::key(int32_t m, int32_t* out) const {
  if (m < 0 || m >= m_) throw InvalidArgument("lattice: key index out of range");
  if (packed_) {
    PackedKeys(d_).unpack(ptables_[0], m, out);
  } else {
    GenericKeys(d_).unpack(gtables_[0], m, out);
  }
}

// ------------------------------------------------------------------------------------------------
// Filtering: spread (splat + blur), then slice

namespace {

// The slice's constant 1 / (1 + 2^-d) (spec 7.3).
double slice_constant(int d) { return 1.0 / (1.0 + std::pow(2.0, -d)); }

// Runs body(tid, nth, barrier) on a team of nt threads, or inline when nt == 1. barrier() waits for
// the whole team.
template <class F>
void run_team(int nt, F&& body) {
  auto no_barrier = []() {};
  if (nt == 1) {
    body(0, 1, no_barrier);
    return;
  }
#ifdef _OPENMP
#pragma omp parallel num_threads(nt)
  body(thread_id(), team_size(), []() {
#pragma omp barrier
  });
#else
  body(0, 1, no_barrier);
#endif
}

// Accumulates the elapsed time of consecutive phases of thread 0 into the timing counters.
struct PhaseClock {
  bool on;
  Clock::time_point ts = Clock::now();
  explicit PhaseClock(int tid) : on(tid == 0 && timers().enabled.load(std::memory_order_relaxed)) {}
  void lap(TimerId id) {
    if (!on) return;
    timers().ns[id].fetch_add(elapsed_ns(ts), std::memory_order_relaxed);
    ts = Clock::now();
  }
};

}  // namespace

// Pixel chunks the splat sums separately before adding the chunk sums in order: fixed by the pixel
// count alone, so that results do not depend on the thread count. One chunk (the original's
// sequential sums, bit for bit) below 2^15 pixels, two below 2^16, four above, so that up to four
// threads share the splat of one image (the sums then differ from the original's by float rounding,
// about 1e-7 relative). Every chunk costs a zeroed (M+1) x Kp buffer and one add.
int Lattice::splat_chunks(int64_t n) {
  if (n < (int64_t{1} << 15)) return 1;
  return n < (int64_t{1} << 16) ? 2 : kMaxSplatChunks;
}

int Lattice::team_threads(int num_threads) const {
  return std::max(1, std::min<int>(num_threads, static_cast<int>(std::max<int64_t>(1, n_ / 2048))));
}

// Channels splatted, blurred and sliced together: all K, unless the lattice values of that many
// channels, (M+1) x Kp floats, would outgrow about 1.5 MB (most of a 2 MB L2 cache) while groups of
// 24 or more channels would fit; then the fewest equal groups that fit. Every group reads the
// points' weights again, which only pays off for wide groups (measured: K=60 at 513^2 22% faster;
// three groups of 7 channels at 1025^2 were 35% slower than one pass).
int Lattice::channels_per_pass(int k) const {
  const std::size_t budget = (std::size_t{3} << 19) / sizeof(float) / (static_cast<std::size_t>(m_) + 1);
  if (static_cast<std::size_t>(detail::padded_channels(k)) <= budget || budget < 24) return k;
  const int cap = static_cast<int>(budget / 8 * 8);
  const int groups = (k + cap - 1) / cap;
  return (k + groups - 1) / groups;
}

void Lattice::spread(const float* in, int k, Layout layout, const float* mask, int num_threads, double* dots) {
  if (n_ < 1) throw InvalidArgument("lattice: filter called before build");
  if (k < 1) throw InvalidArgument("lattice: need at least one value channel");
  groups_.clear();  // nothing to slice until every group is spread
  std::vector<std::pair<int, int>> groups;
  // Planar rows of a channel group are contiguous, so groups are just offsets into in/out.
  const int per = layout == Layout::kPlanar ? channels_per_pass(k) : k;
  for (int c0 = 0; c0 < k; c0 += per) {
    const int kg = std::min(per, k - c0);
    spread_group(in + c0 * n_, kg, layout, mask, num_threads, dots ? dots + c0 : nullptr);
    const std::size_t g = groups.size();
    if (blurred_.size() <= g) blurred_.resize(g + 1);
    std::swap(blurred_[g], vbuf_[1 + (d_ & 1)]);  // keep this group's blurred values for slice()
    groups.push_back({c0, kg});
  }
  groups_ = std::move(groups);
}

void Lattice::spread_group(const float* in, int k, Layout layout, const float* mask, int num_threads,
                           double* dots) {
  const int kp = detail::padded_channels(k);
  const detail::KernelSet ks = detail::kernels_for(kp);
  const int dp1 = d_ + 1;
  const int32_t M = m_;
  const int64_t n = n_;
  const bool planar = layout == Layout::kPlanar;
  const int nt = team_threads(num_threads);

  const int chunks = splat_chunks(n);
  const std::size_t vsize = (static_cast<std::size_t>(M) + 1) * kp;
  if (static_cast<int>(vbuf_.size()) < 2 + chunks) vbuf_.resize(2 + chunks);
  for (int i = 0; i < 2 + chunks; ++i) vbuf_[i].resize(vsize);
  scratch_.resize(static_cast<std::size_t>(nt) * 8 * kp);
  if (dots) dot_scratch_.assign(static_cast<std::size_t>(nt) * k, 0.0);
  // V[0]: the splatted values (pixel chunk 0, then the sum of all chunks); blur axis 0 reads V[0],
  // then V[1] and V[2] alternate, so the splatted values survive for the dot products.
  // V[3..]: the sums of pixel chunks 1, 2, ...
  float* V[2 + kMaxSplatChunks];
  for (int i = 0; i < 2 + chunks; ++i) V[i] = vbuf_[i].data();
  auto chunk_sums = [&](int c) { return c == 0 ? V[0] : V[2 + c]; };
  const int32_t* nbs = neigh_.data();
  const int32_t* offs = offset_.data();
  const float* bars = bary_.data();
  // Small blurs run on one thread: not worth d+1 barriers (which hurt a lot on a busy machine).
  const bool serial_blur = static_cast<int64_t>(M) * kp * dp1 <= (int64_t{1} << 18);
  auto blur_axis = [&](int j, int32_t m0, int32_t m1) {
    const float* src = j == 0 ? V[0] : V[1 + ((j - 1) & 1)];
    ks.blur(src, V[1 + (j & 1)], nbs + static_cast<std::size_t>(j) * M * 2, m0, m1, kp);
  };
  std::atomic<bool> finite{true};

  run_team(nt, [&](int tid, int nth, auto barrier) {
    PhaseClock clock(tid);
    float* scratch = scratch_.data() + static_cast<std::size_t>(tid % nt) * 8 * kp;
    const int32_t m0 = static_cast<int32_t>(static_cast<int64_t>(M) * tid / nth);
    const int32_t m1 = static_cast<int32_t>(static_cast<int64_t>(M) * (tid + 1) / nth);
    // Splat: each pixel chunk into its own rows, in pixel order; then the chunk sums in chunk order.
    if (tid == 0)  // slot 0: the zero row for missing neighbours
      for (int i = 0; i < 2 + chunks; ++i) std::fill(V[i], V[i] + kp, 0.f);
    for (int c = tid; c < chunks; c += nth) {
      float* v = chunk_sums(c);
      std::fill(v + kp, v + vsize, 0.f);
      const int64_t p0 = n * c / chunks / 8 * 8, p1 = c + 1 == chunks ? n : n * (c + 1) / chunks / 8 * 8;
      if (!ks.splat(in, planar, n, k, mask, offs, bars, dp1, v + kp, p0, p1, scratch, kp))
        finite.store(false);
    }
    if (chunks > 1) {
      barrier();
      for (int c = 1; c < chunks; ++c) ks.add(V[0], chunk_sums(c), m0 + 1, m1 + 1, kp);
    }
    barrier();
    clock.lap(kTSplat);
    // Blur, axes 0..d.
    if (serial_blur) {
      if (tid == 0)
        for (int j = 0; j < dp1; ++j) blur_axis(j, 0, M);
      barrier();
    } else {
      for (int j = 0; j < dp1; ++j) {
        blur_axis(j, m0, m1);
        barrier();
      }
    }
    clock.lap(kTBlur);
    if (dots) {
      // <x, A x> = alpha <P x, B P x>: the slice is the splat's transpose (same weights).
      const float* vs = V[0];
      const float* vb = V[1 + (d_ & 1)];
      double* acc = dot_scratch_.data() + static_cast<std::size_t>(tid) * k;
      for (int64_t m = static_cast<int64_t>(m0) + 1; m <= m1; ++m)
        for (int c = 0; c < k; ++c)
          acc[c] += static_cast<double>(vs[m * kp + c]) * static_cast<double>(vb[m * kp + c]);
    }
  });
  if (!finite.load()) throw InvalidArgument("lattice: values contain NaN or Inf");
  if (dots) {
    const double alpha = slice_constant(d_);
    for (int c = 0; c < k; ++c) {
      double sum = 0.0;
      for (int t = 0; t < nt; ++t) sum += dot_scratch_[static_cast<std::size_t>(t) * k + c];
      dots[c] = alpha * sum;
    }
  }
}

void Lattice::slice(float* out, Layout layout, const float* mask, float scale, int num_threads) {
  if (groups_.empty()) throw InvalidArgument("lattice: slice called before spread");
  const int dp1 = d_ + 1;
  const int64_t n = n_;
  const float alpha = static_cast<float>(slice_constant(d_));
  const int nt = team_threads(num_threads);
  for (std::size_t g = 0; g < groups_.size(); ++g) {
    const auto [c0, k] = groups_[g];
    const int kp = detail::padded_channels(k);
    const detail::KernelSet ks = detail::kernels_for(kp);
    scratch_.resize(static_cast<std::size_t>(nt) * 8 * kp);
    const float* vb = blurred_[g].data() + kp;  // row of lattice point m (slot m + 1)
    float* o = out + static_cast<int64_t>(c0) * n;  // planar; pixel-major has one group (c0 = 0)
    run_team(nt, [&](int tid, int nth, auto) {
      PhaseClock clock(tid);
      ks.slice(offset_.data(), bary_.data(), dp1, vb, alpha, n, k, kp, layout == Layout::kPlanar, mask, scale, o,
               n * tid / nth, n * (tid + 1) / nth, scratch_.data() + static_cast<std::size_t>(tid % nt) * 8 * kp);
      clock.lap(kTSlice);
    });
  }
}

void Lattice::filter(const float* in, float* out, int k, Layout layout, const float* mask, bool mask_output,
                     int num_threads) {
  spread(in, k, layout, mask, num_threads, nullptr);
  slice(out, layout, mask_output ? mask : nullptr, 1.f, num_threads);
}

void Lattice::filter_per_channel(const float* in, float* out, int k, const float* mask) {
  if (n_ < 1) throw InvalidArgument("lattice: filter called before build");
  const int dp1 = d_ + 1;
  const int32_t M = m_;
  const int64_t n = n_;
  const float alpha = static_cast<float>(slice_constant(d_));
  for (int c = 0; c < k; ++c) {
    const float* x = in + static_cast<int64_t>(c) * n;
    float* y = out + static_cast<int64_t>(c) * n;
    // Like the original: fresh zeroed buffers for every call, scatter splat in pixel order.
    std::vector<float> a(static_cast<std::size_t>(M) + 2, 0.f), bbuf(static_cast<std::size_t>(M) + 2, 0.f);
    for (int64_t p = 0; p < n; ++p) {
      const float v = mask ? x[p] * mask[p] : x[p];
      for (int r = 0; r < dp1; ++r) a[offset_[p * dp1 + r] + 1] += bary_[p * dp1 + r] * v;
    }
    float* cur = a.data();
    float* nxt = bbuf.data();
    for (int j = 0; j < dp1; ++j) {
      const int32_t* nb = neigh_.data() + static_cast<std::size_t>(j) * M * 2;
      for (int32_t m = 0; m < M; ++m) nxt[m + 1] = cur[m + 1] + 0.5f * (cur[nb[2 * m]] + cur[nb[2 * m + 1]]);
      std::swap(cur, nxt);
    }
    for (int64_t p = 0; p < n; ++p) {
      float acc = 0.f;
      for (int r = 0; r < dp1; ++r) acc += (bary_[p * dp1 + r] * alpha) * cur[offset_[p * dp1 + r] + 1];
      y[p] = acc;
    }
  }
}

std::size_t Lattice::memory_bytes() const {
  std::size_t s = bary_.capacity() * sizeof(float) + offset_.capacity() * sizeof(int32_t) +
                  neigh_.capacity() * sizeof(int32_t) +
                  scratch_.capacity() * sizeof(float) + dot_scratch_.capacity() * sizeof(double);
  for (const auto& v : vbuf_) s += v.capacity() * sizeof(float);
  for (const auto& v : blurred_) s += v.capacity() * sizeof(float);
  for (const auto& t : ptables_) s += t.memory_bytes();
  for (const auto& t : gtables_) s += t.memory_bytes();
  for (const auto& r : remap_) s += r.capacity() * sizeof(int32_t);
  return s;
}

void Lattice::release() {
  std::vector<float>().swap(bary_);
  std::vector<int32_t>().swap(offset_);
  std::vector<int32_t>().swap(neigh_);
  std::vector<PackedTable>().swap(ptables_);
  std::vector<KeyTable>().swap(gtables_);
  std::vector<std::vector<int32_t>>().swap(remap_);
  std::vector<std::vector<float>>().swap(vbuf_);
  std::vector<std::vector<float>>().swap(blurred_);
  groups_.clear();
  std::vector<float>().swap(scratch_);
  std::vector<double>().swap(dot_scratch_);
  n_ = 0;
  m_ = 0;
}

// ------------------------------------------------------------------------------------------------
// Batched entry points

namespace {

std::mutex g_pool_mutex;
std::vector<std::unique_ptr<Lattice>> g_pool;

// Slots (lattices) run_batch uses: one per thread when images run in parallel, else one.
int batch_slots(int64_t b, int num_threads) {
  return static_cast<int>(std::max<int64_t>(1, std::min<int64_t>(std::max(1, num_threads), b)));
}

// Runs work(image, slot, threads_inside) for all b images: groups of `threads` images run in
// parallel with one thread each (slot = thread, < batch_slots), the remaining images one after the
// other with all threads (slot 0).
template <class F>
void run_batch(int64_t b, int num_threads, F&& work) {
  const int nt = std::max(1, num_threads);
  const int64_t outer = nt > 1 && b >= nt ? (b / nt) * nt : 0;
  if (outer > 0) {
#ifdef _OPENMP
    std::exception_ptr err = nullptr;
#pragma omp parallel num_threads(nt)
    {
      const int slot = thread_id();
#pragma omp for schedule(dynamic, 1)
      for (int64_t i = 0; i < outer; ++i) {
        try {
          work(i, slot, 1);
        } catch (...) {
#pragma omp critical(rloss_lattice_error)
          {
            if (!err) err = std::current_exception();
          }
        }
      }
    }
    if (err) std::rethrow_exception(err);
#else
    for (int64_t i = 0; i < outer; ++i) work(i, 0, 1);
#endif
  }
  for (int64_t i = outer; i < b; ++i) work(i, 0, nt);
}

}  // namespace

LatticeLease::LatticeLease(int64_t count) {
  std::lock_guard<std::mutex> lock(g_pool_mutex);
  for (int64_t i = 0; i < count; ++i) {
    if (!g_pool.empty()) {
      items_.push_back(std::move(g_pool.back()));
      g_pool.pop_back();
    } else {
      items_.push_back(std::make_unique<Lattice>());
    }
  }
}

LatticeLease::~LatticeLease() {
  std::lock_guard<std::mutex> lock(g_pool_mutex);
  for (auto& l : items_) g_pool.push_back(std::move(l));
}


void filter_image_batch(const float* image, int64_t b, int c, int64_t h, int64_t w, const float* values, int k,
                        float* out, float sigma_xy, float sigma_rgb, const float* mask, bool mask_output,
                        int num_threads, bool sse_pad, bool roi_from_image) {
  const int64_t n = h * w;
  LatticeLease lease(batch_slots(b, num_threads));
  run_batch(b, num_threads, [&](int64_t i, int slot, int threads) {
    Lattice& lat = lease[slot];
    FeatureSource src = FeatureSource::from_image(image + i * c * n, c, h, w, sigma_xy, sigma_rgb);
    const float* mk = mask ? mask + i * n : nullptr;
    thread_local std::vector<float> roi;
    if (roi_from_image) {  // filled while building
      roi.resize(static_cast<std::size_t>(n));
      src.roi = roi.data();
      mk = roi.data();
    }
    lat.build(src, threads, sse_pad);
    lat.filter(values + i * k * n, out + i * k * n, k, Layout::kPlanar, mk, mask_output, threads);
  });
}

void DenseCRFLossBatch::forward(const float* image, int64_t b, int c, int64_t h, int64_t w, const float* seg,
                                int k, float sigma_xy, float sigma_rgb, const float* mask, int num_threads,
                                bool sse_pad, double* dots) {
  const int64_t n = h * w;
  spread_ = false;
  if (!lattices_ || static_cast<int64_t>(lattices_->size()) != b) lattices_ = std::make_unique<LatticeLease>(b);
  // The mask is kept for backward (the caller's array may be gone by then).
  masks_.resize(static_cast<std::size_t>(b * n));
  if (mask) std::copy(mask, mask + b * n, masks_.begin());
  run_batch(b, num_threads, [&](int64_t i, int, int threads) {
    Lattice& lat = (*lattices_)[i];
    float* mk = masks_.data() + i * n;
    FeatureSource src = FeatureSource::from_image(image + i * c * n, c, h, w, sigma_xy, sigma_rgb);
    if (!mask) src.roi = mk;  // the image's ROI mask, filled while building
    lat.build(src, threads, sse_pad);
    lat.spread(seg + i * k * n, k, Layout::kPlanar, mk, threads, dots + i * k);
  });
  b_ = b;
  n_ = n;
  k_ = k;
  spread_ = true;
}

void DenseCRFLossBatch::backward(float* grad, float scale, int num_threads) {
  if (!spread_) throw InvalidArgument("DenseCRF loss: backward called before forward");
  run_batch(b_, num_threads, [&](int64_t i, int, int threads) {
    (*lattices_)[i].slice(grad + i * k_ * n_, Layout::kPlanar, masks_.data() + i * n_, scale, threads);
  });
}

void filter_feature_batch(const float* features, int64_t b, int64_t n, int d, const float* values, int k,
                          float* out, int num_threads, bool sse_pad) {
  LatticeLease lease(batch_slots(b, num_threads));
  run_batch(b, num_threads, [&](int64_t i, int slot, int threads) {
    Lattice& lat = lease[slot];
    lat.build(FeatureSource::from_array(features + i * n * d, n, d), threads, sse_pad);
    lat.filter(values + i * k * n, out + i * k * n, k, Layout::kPlanar, nullptr, false, threads);
  });
}

void filter_image_batch_per_channel(const float* image, int64_t b, int c, int64_t h, int64_t w,
                                    const float* values, int k, float* out, float sigma_xy, float sigma_rgb,
                                    const float* mask, int num_threads, bool sse_pad) {
  const int64_t n = h * w;
  // One thread per image (the original's OpenMP over images), capped by the batch size.
  const int nt = static_cast<int>(std::max<int64_t>(1, std::min<int64_t>(num_threads, b)));
  LatticeLease lease(nt);
  std::exception_ptr err = nullptr;
#ifdef _OPENMP
#pragma omp parallel for num_threads(nt) schedule(static, 1)
#endif
  for (int64_t i = 0; i < b; ++i) {
    try {
      Lattice& lat = lease[thread_id()];
      lat.build(FeatureSource::from_image(image + i * c * n, c, h, w, sigma_xy, sigma_rgb), 1, sse_pad);
      lat.filter_per_channel(values + i * k * n, out + i * k * n, k, mask ? mask + i * n : nullptr);
    } catch (...) {
#ifdef _OPENMP
#pragma omp critical(rloss_lattice_error)
#endif
      {
        if (!err) err = std::current_exception();
      }
    }
  }
  if (err) std::rethrow_exception(err);
}

void release_workspaces() {
  std::lock_guard<std::mutex> lock(g_pool_mutex);
  g_pool.clear();
}

std::size_t workspace_bytes() {
  std::lock_guard<std::mutex> lock(g_pool_mutex);
  std::size_t s = 0;
  for (const auto& l : g_pool) s += l->memory_bytes();
  return s;
}

}  // namespace rloss

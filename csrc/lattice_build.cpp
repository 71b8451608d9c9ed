// Lattice construction: embedding of the features, simplex vertices numbered in first-insertion
// order (per-thread tables merged in chunk order), blur neighbours along every axis.
#include <algorithm>
#include <atomic>
#include <climits>
#include <cmath>
#include <string>

#include "kernels.h"
#include "lattice.h"
#include "parallel.h"
#include "timing.h"

namespace rloss {

namespace {

constexpr int L = kEmbedLanes;

// Key policies: how the d+1 vertex keys of a point are formed, stored and looked up.

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

}  // namespace

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

  // The original's elevation scale: sqrt(2/3) (d+1) / sqrt((i+1)(i+2)) for feature i.
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

}  // namespace rloss

// Filtering on a built lattice: splat the values onto the lattice points, blur along every axis,
// slice back at the points (K channels at once, threads sharing one image).
#include <algorithm>
#include <atomic>

#include "kernels.h"
#include "lattice.h"
#include "parallel.h"
#include "timing.h"

namespace rloss {

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
  if (!finite.load()) throw NonFiniteValues();
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
  std::atomic<bool> finite{true};
  for (std::size_t g = 0; g < groups_.size(); ++g) {
    const auto [c0, k] = groups_[g];
    const int kp = detail::padded_channels(k);
    const detail::KernelSet ks = detail::kernels_for(kp);
    scratch_.resize(static_cast<std::size_t>(nt) * 8 * kp);
    const float* vb = blurred_[g].data() + kp;  // row of lattice point m (slot m + 1)
    float* o = out + static_cast<int64_t>(c0) * n;  // planar; pixel-major has one group (c0 = 0)
    run_team(nt, [&](int tid, int nth, auto) {
      PhaseClock clock(tid);
      if (!ks.slice(offset_.data(), bary_.data(), dp1, vb, alpha, n, k, kp, layout == Layout::kPlanar, mask, scale,
                    o, n * tid / nth, n * (tid + 1) / nth,
                    scratch_.data() + static_cast<std::size_t>(tid % nt) * 8 * kp))
        finite.store(false);
      clock.lap(kTSlice);
    });
  }
  if (!finite.load()) throw FilterOverflow();
}

void Lattice::filter(const float* in, float* out, int k, Layout layout, const float* mask, bool mask_output,
                     int num_threads) {
  spread(in, k, layout, mask, num_threads, nullptr);
  slice(out, layout, mask_output ? mask : nullptr, 1.f, num_threads);
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

}  // namespace rloss

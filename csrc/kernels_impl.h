// Hot loops of the lattice filter. This file is included twice by kernels.cpp, each time inside a
// different namespace (RLOSS_KNS): once with the default target and once compiled for AVX2, and the
// faster one is picked at run time. Only raw pointers here (no STL), so that no inline library code
// is ever compiled for a wider instruction set than the caller's.
//
// Floating point: no FMA contraction is enabled for either target, and every output element sees
// exactly the same sequence of float operations as the original's scalar formulation:
//   splat  V[m]  = ((0 + w_1 x_1) + w_2 x_2) + ...     (contributions in pixel order)
//   blur   V'[m] = V[m] + 0.5 * (V[n1] + V[n2])
//   slice  y[p]  = ((0 + (w_0 a) V_0) + (w_1 a) V_1) + ...   (vertices in order r = 0..d)
// so results do not depend on K, on the thread count or on the instruction set.

// NOLINTBEGIN
namespace RLOSS_KNS {

constexpr int kTile = 16;  // pixels per slice tile

// Copies values into the pixel-major staging buffer X (N x kp, padding lanes zeroed), multiplying by
// mask when given. Returns false when a value is NaN or infinite.
template <int KP>
static bool stage_range(const float* in, bool planar, int64_t n, int k, int kp_rt, const float* mask,
                        float* X, int64_t p0, int64_t p1) {
  const int kp = KP > 0 ? KP : kp_rt;
  float nanprobe = 0.f;
  if (planar) {
    for (int64_t b0 = p0; b0 < p1; b0 += kTile) {
      const int64_t b1 = b0 + kTile < p1 ? b0 + kTile : p1;
      for (int c = 0; c < k; ++c) {
        const float* src = in + static_cast<int64_t>(c) * n;
        for (int64_t p = b0; p < b1; ++p) {
          const float v = src[p];
          nanprobe += v * 0.f;
          X[p * kp + c] = mask ? v * mask[p] : v;
        }
      }
      for (int64_t p = b0; p < b1; ++p)
        for (int c = k; c < kp; ++c) X[p * kp + c] = 0.f;
    }
  } else {
    for (int64_t p = p0; p < p1; ++p) {
      const float* src = in + p * k;
      float* dst = X + p * kp;
      const float mk = mask ? mask[p] : 1.f;
      for (int c = 0; c < k; ++c) {
        nanprobe += src[c] * 0.f;
        dst[c] = mask ? src[c] * mk : src[c];
      }
      for (int c = k; c < kp; ++c) dst[c] = 0.f;
    }
  }
  return nanprobe == 0.f;
}

// V[m+1] = sum over the splat entries of lattice point m (pixel order) of w * X[pixel].
template <int KP>
static void splat_range(const int32_t* start, const rloss::SplatEntry* ent, const float* X, float* V,
                        int32_t m0, int32_t m1, int kp_rt) {
  if constexpr (KP > 0) {
    for (int32_t m = m0; m < m1; ++m) {
      float acc[KP];
      for (int c = 0; c < KP; ++c) acc[c] = 0.f;
      for (int32_t e = start[m]; e < start[m + 1]; ++e) {
        const float w = ent[e].weight;
        const float* x = X + static_cast<int64_t>(ent[e].pixel) * KP;
        for (int c = 0; c < KP; ++c) acc[c] += w * x[c];
      }
      float* v = V + (static_cast<int64_t>(m) + 1) * KP;
      for (int c = 0; c < KP; ++c) v[c] = acc[c];
    }
  } else {
    const int kp = kp_rt;
    for (int32_t m = m0; m < m1; ++m) {
      float* v = V + (static_cast<int64_t>(m) + 1) * kp;
      for (int c = 0; c < kp; ++c) v[c] = 0.f;
      for (int32_t e = start[m]; e < start[m + 1]; ++e) {
        const float w = ent[e].weight;
        const float* x = X + static_cast<int64_t>(ent[e].pixel) * kp;
        for (int c = 0; c < kp; ++c) v[c] += w * x[c];
      }
    }
  }
}

// One blur axis for lattice points [m0, m1): out = in + 0.5 * (in[n1] + in[n2]).
template <int KP>
static void blur_range(const float* Vin, float* Vout, const int32_t* nb, int32_t m0, int32_t m1, int kp_rt) {
  const int kp = KP > 0 ? KP : kp_rt;
  for (int32_t m = m0; m < m1; ++m) {
    const float* c0 = Vin + (static_cast<int64_t>(m) + 1) * kp;
    const float* a = Vin + static_cast<int64_t>(nb[2 * static_cast<int64_t>(m)]) * kp;
    const float* b = Vin + static_cast<int64_t>(nb[2 * static_cast<int64_t>(m) + 1]) * kp;
    float* o = Vout + (static_cast<int64_t>(m) + 1) * kp;
    for (int c = 0; c < kp; ++c) o[c] = c0[c] + 0.5f * (a[c] + b[c]);
  }
}

// Slice pixels [p0, p1): y[p] = sum_r (b_r * alpha) * V[offset_r]; written pixel-major (N x k) or
// planar (k x N), optionally times mask[p].
template <int KP>
static void slice_range(const int32_t* offset, const float* bary, int dp1, const float* V, float alpha,
                        int64_t n, int k, int kp_rt, bool planar, const float* mask, float* out,
                        int64_t p0, int64_t p1) {
  constexpr int kChunk = KP > 0 ? KP : 64;
  const int kp = KP > 0 ? KP : kp_rt;
  float tile[kTile][kChunk];
  for (int64_t b0 = p0; b0 < p1; b0 += kTile) {
    const int64_t b1 = b0 + kTile < p1 ? b0 + kTile : p1;
    for (int c0 = 0; c0 < kp; c0 += kChunk) {
      const int cw = kp - c0 < kChunk ? kp - c0 : kChunk;  // == KP when templated
      for (int64_t p = b0; p < b1; ++p) {
        float* acc = tile[p - b0];
        if constexpr (KP > 0) {
          for (int c = 0; c < KP; ++c) acc[c] = 0.f;
        } else {
          for (int c = 0; c < cw; ++c) acc[c] = 0.f;
        }
        const int32_t* o = offset + p * dp1;
        const float* w = bary + p * dp1;
        for (int r = 0; r < dp1; ++r) {
          const float wr = w[r] * alpha;
          const float* v = V + static_cast<int64_t>(o[r]) * kp + c0;
          if constexpr (KP > 0) {
            for (int c = 0; c < KP; ++c) acc[c] += wr * v[c];
          } else {
            for (int c = 0; c < cw; ++c) acc[c] += wr * v[c];
          }
        }
      }
      const int cend = c0 + cw < k ? c0 + cw : k;
      if (planar) {
        for (int c = c0; c < cend; ++c) {
          float* dst = out + static_cast<int64_t>(c) * n;
          if (mask) {
            for (int64_t p = b0; p < b1; ++p) dst[p] = tile[p - b0][c - c0] * mask[p];
          } else {
            for (int64_t p = b0; p < b1; ++p) dst[p] = tile[p - b0][c - c0];
          }
        }
      } else {
        for (int64_t p = b0; p < b1; ++p) {
          float* dst = out + p * k;
          const float mk = mask ? mask[p] : 1.f;
          for (int c = c0; c < cend; ++c) dst[c] = mask ? tile[p - b0][c - c0] * mk : tile[p - b0][c - c0];
        }
      }
    }
  }
}

template <int KP>
static void fill_set(rloss::detail::KernelSet& s) {
  s.stage = &stage_range<KP>;
  s.splat = &splat_range<KP>;
  s.blur = &blur_range<KP>;
  s.slice = &slice_range<KP>;
}

// Kernels for a padded channel count kp (see rloss::detail::padded_channels).
static rloss::detail::KernelSet kernel_set(int kp) {
  rloss::detail::KernelSet s;
  switch (kp) {
    case 1: fill_set<1>(s); break;
    case 2: fill_set<2>(s); break;
    case 3: fill_set<3>(s); break;
    case 4: fill_set<4>(s); break;
    case 8: fill_set<8>(s); break;
    case 16: fill_set<16>(s); break;
    case 24: fill_set<24>(s); break;
    case 32: fill_set<32>(s); break;
    case 40: fill_set<40>(s); break;
    case 48: fill_set<48>(s); break;
    case 56: fill_set<56>(s); break;
    case 64: fill_set<64>(s); break;
    default: fill_set<0>(s); break;
  }
  return s;
}

}  // namespace RLOSS_KNS
// NOLINTEND

// Hot loops of the lattice. This file is included twice by kernels.cpp, each time inside a different
// namespace (RLOSS_KNS): once for the default target and once compiled for AVX2, and the faster one
// is picked at run time. Only raw pointers here (no STL), so that no inline library code is ever
// compiled for a wider instruction set than the caller's.
//
// Floating point: FMA contraction is never enabled, and every output element sees exactly the same
// sequence of float operations as the original's scalar formulation:
//   embed  spec 7.3 step by step (vectorised across points, not across an element's operations)
//   splat  V[m]  = ((0 + w_1 x_1) + w_2 x_2) + ...     (contributions in point order)
//   blur   V'[m] = V[m] + 0.5 * (V[n1] + V[n2])
//   slice  y[p]  = ((0 + (w_0 a) V_0) + (w_1 a) V_1) + ...   (vertices in order r = 0..d)
// so results do not depend on K, on the thread count or on the instruction set.

namespace RLOSS_KNS {

constexpr int kTile = 16;  // points per staging / slice tile

// |elevated coordinate| limit. Below 2^22 the float "magic number" rounding below is exact
// half-to-even; far beyond anything the sigmas in use produce (the original's int16 keys alias
// above 2^15).
constexpr float kCoordLimit = 4194304.f;
constexpr float kRoundMagic = 12582912.f;  // 1.5 * 2^23

template <int L>
static int32_t embed_block(int d, const float* scale, const float* f, int32_t* rem0, int32_t* rank,
                           float* bary) {
  float E[(rloss::kMaxDim + 1) * L];
  float R[(rloss::kMaxDim + 1) * L];  // rem0 as float, like the original
  float U[(rloss::kMaxDim + 1) * L];
  float sm[L];
  int32_t sum[L], ok[L], mx[L];
  for (int l = 0; l < L; ++l) {
    sm[l] = 0.f;
    sum[l] = 0;
    ok[l] = 1;
    mx[l] = 0;
  }
  // Elevate: sum-zero coordinates, j = d .. 1, then E[0].
  for (int j = d; j > 0; --j) {
    const float sc = scale[j - 1];
    const float jf = static_cast<float>(j);
    const float* fj = f + (j - 1) * L;
    float* Ej = E + j * L;
    for (int l = 0; l < L; ++l) {
      const float cf = fj[l] * sc;
      Ej[l] = sm[l] - jf * cf;
      sm[l] += cf;
    }
  }
  for (int l = 0; l < L; ++l) E[l] = sm[l];
  // Nearest remainder-0 point: round half to even of E / (d+1).
  const float dp1f = static_cast<float>(d + 1);
  for (int i = 0; i <= d; ++i) {
    float* Ei = E + i * L;
    float* Ri = R + i * L;
    for (int l = 0; l < L; ++l) {
      const float e = Ei[l];
      const int32_t good = (e <= kCoordLimit) & (e >= -kCoordLimit);  // false for NaN
      ok[l] &= good;
      const float v = (good ? e : 0.f) / dp1f;
      const float r = (v + kRoundMagic) - kRoundMagic;
      Ri[l] = r * dp1f;
      sum[l] += static_cast<int32_t>(r);
    }
  }
  // Rank by comparing the remainders (ties count for the later coordinate).
  for (int i = 0; i <= d; ++i)
    for (int l = 0; l < L; ++l) rank[i * L + l] = 0;
  for (int i = 0; i <= d; ++i)
    for (int l = 0; l < L; ++l) U[i * L + l] = E[i * L + l] - R[i * L + l];
  for (int i = 0; i < d; ++i) {
    const float* Di = U + i * L;
    int32_t* ri = rank + i * L;
    for (int j = i + 1; j <= d; ++j) {
      const float* Dj = U + j * L;
      int32_t* rj = rank + j * L;
      for (int l = 0; l < L; ++l) {
        const int32_t c = Di[l] < Dj[l];
        ri[l] += c;
        rj[l] += 1 - c;
      }
    }
  }
  // Bring the point back onto the plane (sum fix).
  const int32_t dp1 = d + 1;
  for (int i = 0; i <= d; ++i) {
    int32_t* ri = rank + i * L;
    float* Ri = R + i * L;
    int32_t* qi = rem0 + i * L;
    for (int l = 0; l < L; ++l) {
      const int32_t rk = ri[l] + sum[l];
      const int32_t shift = (rk < 0 ? dp1 : 0) - (rk > d ? dp1 : 0);
      ri[l] = rk + shift;
      const float rf = Ri[l] + static_cast<float>(shift);
      Ri[l] = rf;
      const int32_t q = static_cast<int32_t>(rf);
      qi[l] = q;
      const int32_t aq = q < 0 ? -q : q;
      mx[l] = mx[l] > aq ? mx[l] : aq;
    }
  }
  // Barycentric weights. With v_i = (E_i - rem0_i)/(d+1) and u[q] = v of the coordinate of rank q
  // (ranks are a permutation of 0..d), the original's scatter b[d-rank]+=v, b[d-rank+1]-=v,
  // b[0] += 1 + b[d+1] yields exactly b[s] = u[d-s] - u[d-s+1] (s = 1..d), b[0] = u[d] + (1 - u[0]).
  for (int i = 0; i <= d; ++i) {
    float* Ui = U + i * L;  // reuse U for v
    const float* Ei = E + i * L;
    const float* Ri = R + i * L;
    for (int l = 0; l < L; ++l) Ui[l] = (Ei[l] - Ri[l]) / dp1f;
  }
  float* uq = E;  // E no longer needed: u[q] goes here
  for (int q = 0; q <= d; ++q) {
    float* uqq = uq + q * L;
    for (int l = 0; l < L; ++l) uqq[l] = 0.f;
    for (int i = 0; i <= d; ++i) {
      const int32_t* ri = rank + i * L;
      const float* vi = U + i * L;
      for (int l = 0; l < L; ++l) uqq[l] = ri[l] == q ? vi[l] : uqq[l];
    }
  }
  for (int s = 1; s <= d; ++s) {
    const float* a = uq + (d - s) * L;
    const float* b = uq + (d - s + 1) * L;
    float* o = bary + s * L;
    for (int l = 0; l < L; ++l) o[l] = a[l] - b[l];
  }
  {
    const float* ud = uq + d * L;
    const float* u0 = uq;
    for (int l = 0; l < L; ++l) bary[l] = ud[l] + (1.f + (-u0[l]));
  }
  int32_t all_ok = 1, m = 0;
  for (int l = 0; l < L; ++l) {
    all_ok &= ok[l];
    m = m > mx[l] ? m : mx[l];
  }
  return all_ok ? m : -1;
}

// Copies values into the pixel-major staging buffer X (N x kp, padding lanes zeroed), multiplying by
// mask when given. Returns false when a value is NaN or infinite.
template <int KP>
static bool stage_range(const float* in, bool planar, int64_t n, int k, int kp_rt, const float* mask,
                        float* X, int64_t p0, int64_t p1) {
  const int kp = KP > 0 ? KP : kp_rt;
  float probe[kTile];
  for (int l = 0; l < kTile; ++l) probe[l] = 0.f;
  if (planar) {
    for (int64_t b0 = p0; b0 < p1; b0 += kTile) {
      const int nb = b0 + kTile <= p1 ? kTile : static_cast<int>(p1 - b0);
      float mk[kTile];
      for (int l = 0; l < nb; ++l) mk[l] = mask ? mask[b0 + l] : 1.f;
      float* xb = X + b0 * kp;
      if (nb == kTile) {
        for (int c = 0; c < k; ++c) {
          const float* src = in + static_cast<int64_t>(c) * n + b0;
          float t[kTile];
          for (int l = 0; l < kTile; ++l) {
            probe[l] += src[l] * 0.f;
            t[l] = mask ? src[l] * mk[l] : src[l];
          }
          for (int l = 0; l < kTile; ++l) xb[l * kp + c] = t[l];
        }
      } else {
        for (int c = 0; c < k; ++c) {
          const float* src = in + static_cast<int64_t>(c) * n + b0;
          for (int l = 0; l < nb; ++l) {
            probe[l] += src[l] * 0.f;
            xb[l * kp + c] = mask ? src[l] * mk[l] : src[l];
          }
        }
      }
      for (int l = 0; l < nb; ++l)
        for (int c = k; c < kp; ++c) xb[l * kp + c] = 0.f;
    }
  } else {
    for (int64_t p = p0; p < p1; ++p) {
      const float* src = in + p * k;
      float* dst = X + p * kp;
      const float m = mask ? mask[p] : 1.f;
      for (int c = 0; c < k; ++c) {
        probe[c % kTile] += src[c] * 0.f;
        dst[c] = mask ? src[c] * m : src[c];
      }
      for (int c = k; c < kp; ++c) dst[c] = 0.f;
    }
  }
  float all = 0.f;
  for (int l = 0; l < kTile; ++l) all += probe[l];
  return all == 0.f;
}

// Scatter splat in point order (so each lattice point sums its contributions in the original's order).
template <int KP>
static void splat_range(const int32_t* __restrict offset, const float* __restrict bary, int dp1,
                        const float* __restrict X, float* __restrict V, int64_t p0, int64_t p1, int32_t lo,
                        int32_t hi, const int32_t* pix_lo, const int32_t* pix_hi, int kp_rt) {
  const int kp = KP > 0 ? KP : kp_rt;
  if (!pix_lo) {
    for (int64_t p = p0; p < p1; ++p) {
      const float* x = X + p * kp;
      const int32_t* o = offset + p * dp1;
      const float* w = bary + p * dp1;
      for (int r = 0; r < dp1; ++r) {
        float* v = V + static_cast<int64_t>(o[r]) * kp;
        const float wr = w[r];
        for (int c = 0; c < kp; ++c) v[c] += wr * x[c];
      }
    }
    return;
  }
  for (int64_t p = p0; p < p1; ++p) {
    if (pix_hi[p] < lo || pix_lo[p] >= hi) continue;
    const float* x = X + p * kp;
    const int32_t* o = offset + p * dp1;
    const float* w = bary + p * dp1;
    for (int r = 0; r < dp1; ++r) {
      const int32_t s = o[r];
      if (s < lo || s >= hi) continue;
      float* v = V + static_cast<int64_t>(s) * kp;
      const float wr = w[r];
      for (int c = 0; c < kp; ++c) v[c] += wr * x[c];
    }
  }
}

// One blur axis for lattice points [m0, m1): out = in + 0.5 * (in[n1] + in[n2]).
template <int KP>
static void blur_range(const float* __restrict Vin, float* __restrict Vout, const int32_t* __restrict nb,
                       int32_t m0, int32_t m1, int kp_rt) {
  const int kp = KP > 0 ? KP : kp_rt;
  for (int32_t m = m0; m < m1; ++m) {
    const float* c0 = Vin + (static_cast<int64_t>(m) + 1) * kp;
    const float* a = Vin + static_cast<int64_t>(nb[2 * static_cast<int64_t>(m)]) * kp;
    const float* b = Vin + static_cast<int64_t>(nb[2 * static_cast<int64_t>(m) + 1]) * kp;
    float* o = Vout + (static_cast<int64_t>(m) + 1) * kp;
    for (int c = 0; c < kp; ++c) o[c] = c0[c] + 0.5f * (a[c] + b[c]);
  }
}

// Slice points [p0, p1): y[p] = sum_r (b_r * alpha) * V[offset_r]; written pixel-major (N x k) or
// planar (k x N), optionally times mask[p].
template <int KP>
static void slice_range(const int32_t* __restrict offset, const float* __restrict bary, int dp1,
                        const float* __restrict V, float alpha, int64_t n, int k, int kp_rt, bool planar,
                        const float* mask, float* __restrict out, int64_t p0, int64_t p1) {
  constexpr int kChunk = KP > 0 ? KP : 64;
  const int kp = KP > 0 ? KP : kp_rt;
  float tile[kTile][kChunk];
  for (int64_t b0 = p0; b0 < p1; b0 += kTile) {
    const int nb = b0 + kTile <= p1 ? kTile : static_cast<int>(p1 - b0);
    for (int c0 = 0; c0 < kp; c0 += kChunk) {
      const int cw = kp - c0 < kChunk ? kp - c0 : kChunk;  // == KP when templated
      for (int l = 0; l < nb; ++l) {
        const int64_t p = b0 + l;
        float* acc = tile[l];
        const int32_t* o = offset + p * dp1;
        const float* w = bary + p * dp1;
        if constexpr (KP > 0) {
          float a[KP];
          for (int c = 0; c < KP; ++c) a[c] = 0.f;
          for (int r = 0; r < dp1; ++r) {
            const float wr = w[r] * alpha;
            const float* v = V + static_cast<int64_t>(o[r]) * KP;
            for (int c = 0; c < KP; ++c) a[c] += wr * v[c];
          }
          for (int c = 0; c < KP; ++c) acc[c] = a[c];
        } else {
          for (int c = 0; c < cw; ++c) acc[c] = 0.f;
          for (int r = 0; r < dp1; ++r) {
            const float wr = w[r] * alpha;
            const float* v = V + static_cast<int64_t>(o[r]) * kp + c0;
            for (int c = 0; c < cw; ++c) acc[c] += wr * v[c];
          }
        }
      }
      const int cend = c0 + cw < k ? c0 + cw : k;
      if (planar) {
        if (nb == kTile) {
          for (int c = c0; c < cend; ++c) {
            float* dst = out + static_cast<int64_t>(c) * n + b0;
            float t[kTile];
            for (int l = 0; l < kTile; ++l) t[l] = tile[l][c - c0];
            if (mask) {
              for (int l = 0; l < kTile; ++l) dst[l] = t[l] * mask[b0 + l];
            } else {
              for (int l = 0; l < kTile; ++l) dst[l] = t[l];
            }
          }
        } else {
          for (int c = c0; c < cend; ++c) {
            float* dst = out + static_cast<int64_t>(c) * n + b0;
            for (int l = 0; l < nb; ++l) dst[l] = mask ? tile[l][c - c0] * mask[b0 + l] : tile[l][c - c0];
          }
        }
      } else {
        for (int l = 0; l < nb; ++l) {
          float* dst = out + (b0 + l) * k;
          const float m = mask ? mask[b0 + l] : 1.f;
          for (int c = c0; c < cend; ++c) dst[c] = mask ? tile[l][c - c0] * m : tile[l][c - c0];
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

static rloss::detail::EmbedFn embed_fn() { return &embed_block<rloss::kEmbedLanes>; }

}  // namespace RLOSS_KNS

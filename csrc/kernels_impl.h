// Hot loops of the lattice. This file is included twice by kernels.cpp, each time inside a different
// namespace (RLOSS_KNS): once for the default target and once compiled for AVX2 (RLOSS_KERNELS_AVX2
// defined: 8x8 register transposes with intrinsics), and the faster one is picked at run time. Only
// raw pointers here (no STL), so that no inline library code is ever compiled for a wider instruction
// set than the caller's. Eight-lane float math uses GCC/Clang vector extensions.
//
// Floating point: FMA contraction is never enabled, and every output element sees exactly the same
// sequence of float operations as the original's scalar formulation:
//   embed  the original's steps in its order (vectorised across points, not across an element's operations)
//   splat  V[m]  = ((0 + w_1 x_1) + w_2 x_2) + ...     (contributions in point order)
//   blur   V'[m] = V[m] + 0.5 * (V[n1] + V[n2])
//   slice  y[p]  = ((0 + (w_0 a) V_0) + (w_1 a) V_1) + ...   (vertices in order r = 0..d)
// so results do not depend on K, on the thread count or on the instruction set.

namespace RLOSS_KNS {

typedef float vf8 __attribute__((vector_size(32), aligned(4), may_alias));
typedef int32_t vi8 __attribute__((vector_size(32), aligned(4), may_alias));
typedef int32_t vi4 __attribute__((vector_size(16), aligned(4), may_alias));
typedef int64_t vl4 __attribute__((vector_size(32), aligned(8), may_alias));
typedef uint64_t vu4 __attribute__((vector_size(32), aligned(8), may_alias));

static inline vf8 ld(const float* p) { return *reinterpret_cast<const vf8*>(p); }
static inline void st(float* p, vf8 v) { *reinterpret_cast<vf8*>(p) = v; }
static inline vi8 ldi(const int32_t* p) { return *reinterpret_cast<const vi8*>(p); }
static inline void sti(int32_t* p, vi8 v) { *reinterpret_cast<vi8*>(p) = v; }
static inline vf8 bc(float x) { return vf8{x, x, x, x, x, x, x, x}; }
static inline vi8 bci(int32_t x) { return vi8{x, x, x, x, x, x, x, x}; }

static_assert(rloss::kEmbedLanes == 8, "the embedding kernel works on 8 lanes");

// |elevated coordinate| limit. Below 2^22 the float "magic number" rounding below is exact
// half-to-even; far beyond anything the sigmas in use produce (the original's int16 keys alias
// above 2^15).
constexpr float kCoordLimit = 4194304.f;
constexpr float kRoundMagic = 12582912.f;  // 1.5 * 2^23

// The original's embedding of 8 points (see rloss::detail::EmbedFn): elevate onto the hyperplane
// sum = 0, round to the nearest remainder-0 point, rank the remainders, fix the sum, barycentric
// weights. D > 0: compile-time dimension.
template <int D>
static int32_t embed_block(int d_rt, const float* scale, const float* f, int nb, int32_t* rem0, int32_t* rank,
                           float* bary, int key_bits, uint64_t* keys) {
  const int d = D > 0 ? D : d_rt;
  vf8 E[rloss::kMaxDim + 1], R[rloss::kMaxDim + 1], U[rloss::kMaxDim + 1];
  vi8 rk[rloss::kMaxDim + 1];
  // Elevate: sum-zero coordinates, j = d .. 1, then E[0].
  vf8 sm = bc(0.f);
  for (int j = d; j > 0; --j) {
    const vf8 cf = ld(f + (j - 1) * 8) * bc(scale[j - 1]);
    E[j] = sm - bc(static_cast<float>(j)) * cf;
    sm += cf;
  }
  E[0] = sm;
  // Nearest remainder-0 point: round half to even of E / (d+1).
  const vf8 dp1f = bc(static_cast<float>(d + 1));
  const vf8 magic = bc(kRoundMagic);
  vi8 ok = bci(-1), sum = bci(0);
  for (int i = 0; i <= d; ++i) {
    const vi8 good = (E[i] <= bc(kCoordLimit)) & (E[i] >= bc(-kCoordLimit));  // false for NaN
    ok &= good;
    const vf8 e = good ? E[i] : bc(0.f);
    E[i] = e;
    const vf8 r = ((e / dp1f) + magic) - magic;
    R[i] = r * dp1f;
    sum += __builtin_convertvector(r, vi8);
  }
  // Rank by comparing the remainders (ties count for the later coordinate).
  for (int i = 0; i <= d; ++i) {
    rk[i] = bci(0);
    U[i] = E[i] - R[i];
  }
  for (int i = 0; i < d; ++i)
    for (int j = i + 1; j <= d; ++j) {
      const vi8 c = U[i] < U[j];  // -1 where true
      rk[i] -= c;
      rk[j] += bci(1) + c;
    }
  // Bring the point back onto the plane (sum fix).
  const vi8 dp1 = bci(d + 1);
  vi8 mx = bci(0);
  for (int i = 0; i <= d; ++i) {
    const vi8 r = rk[i] + sum;
    const vi8 shift = ((r < bci(0)) & dp1) - ((r > bci(d)) & dp1);
    rk[i] = r + shift;
    R[i] += __builtin_convertvector(shift, vf8);
    const vi8 q = __builtin_convertvector(R[i], vi8);
    sti(rem0 + i * 8, q);
    sti(rank + i * 8, rk[i]);
    const vi8 aq = q < bci(0) ? -q : q;
    mx = aq > mx ? aq : mx;
  }
  // Barycentric weights. With v_i = (E_i - rem0_i)/(d+1) and u[q] = v of the coordinate of rank q
  // (ranks are a permutation of 0..d), the original's scatter b[d-rank]+=v, b[d-rank+1]-=v,
  // b[0] += 1 + b[d+1] yields exactly b[s] = u[d-s] - u[d-s+1] (s = 1..d), b[0] = u[d] + (1 - u[0]).
  for (int i = 0; i <= d; ++i) U[i] = (E[i] - R[i]) / dp1f;
  vf8* u = E;  // E is no longer needed
  for (int q = 0; q <= d; ++q) {
    vf8 a = bc(0.f);
    for (int i = 0; i <= d; ++i) a = rk[i] == bci(q) ? U[i] : a;
    u[q] = a;
  }
  const int dp1i = d + 1;
  {
    float bs[8];
    st(bs, u[d] + (bc(1.f) + (-u[0])));
    for (int l = 0; l < nb; ++l) bary[l * dp1i] = bs[l];
    for (int s = 1; s <= d; ++s) {
      st(bs, u[d - s] - u[d - s + 1]);
      for (int l = 0; l < nb; ++l) bary[l * dp1i + s] = bs[l];
    }
  }
  // Vertex keys: vertex r has coordinates rem0_i + r - (d+1)[rank_i > d-r] (canonical simplex).
  if (key_bits > 0) {
    const int64_t bias = int64_t{1} << (key_bits - 1);
    uint64_t ones = 0;
    for (int i = 0; i < d; ++i) ones |= uint64_t{1} << (key_bits * i);
    for (int h = 0; h < 2; ++h) {
      vu4 base = {0, 0, 0, 0};
      vl4 rk4[rloss::kMaxDim];
      for (int i = 0; i < d; ++i) {
        const vi4 q = *reinterpret_cast<const vi4*>(rem0 + i * 8 + 4 * h);
        const vi4 rr = *reinterpret_cast<const vi4*>(rank + i * 8 + 4 * h);
        base += reinterpret_cast<vu4>(__builtin_convertvector(q, vl4) + bias) << (key_bits * i);
        rk4[i] = __builtin_convertvector(rr, vl4);
      }
      for (int r = 0; r <= d; ++r) {
        vu4 key = base + static_cast<uint64_t>(r) * ones;
        const int64_t lim = d - r;
        for (int i = 0; i < d; ++i)
          key -= reinterpret_cast<vu4>(rk4[i] > lim) & (static_cast<uint64_t>(d + 1) << (key_bits * i));
        for (int j = 0; j < 4; ++j) {
          const int l = 4 * h + j;
          if (l < nb) keys[l * dp1i + r] = key[j];
        }
      }
    }
  }
  int32_t all_ok = -1, m = 0;
  for (int l = 0; l < 8; ++l) {
    all_ok &= ok[l];
    m = m > mx[l] ? m : mx[l];
  }
  return all_ok ? m : -1;
}

#ifdef RLOSS_KERNELS_AVX2
// In-register transpose of 8 rows of 8 floats.
static inline void transpose8(__m256& r0, __m256& r1, __m256& r2, __m256& r3, __m256& r4, __m256& r5,
                              __m256& r6, __m256& r7) {
  const __m256 t0 = _mm256_unpacklo_ps(r0, r1), t1 = _mm256_unpackhi_ps(r0, r1);
  const __m256 t2 = _mm256_unpacklo_ps(r2, r3), t3 = _mm256_unpackhi_ps(r2, r3);
  const __m256 t4 = _mm256_unpacklo_ps(r4, r5), t5 = _mm256_unpackhi_ps(r4, r5);
  const __m256 t6 = _mm256_unpacklo_ps(r6, r7), t7 = _mm256_unpackhi_ps(r6, r7);
  const __m256 s0 = _mm256_shuffle_ps(t0, t2, 0x44), s1 = _mm256_shuffle_ps(t0, t2, 0xEE);
  const __m256 s2 = _mm256_shuffle_ps(t1, t3, 0x44), s3 = _mm256_shuffle_ps(t1, t3, 0xEE);
  const __m256 s4 = _mm256_shuffle_ps(t4, t6, 0x44), s5 = _mm256_shuffle_ps(t4, t6, 0xEE);
  const __m256 s6 = _mm256_shuffle_ps(t5, t7, 0x44), s7 = _mm256_shuffle_ps(t5, t7, 0xEE);
  r0 = _mm256_permute2f128_ps(s0, s4, 0x20);
  r1 = _mm256_permute2f128_ps(s1, s5, 0x20);
  r2 = _mm256_permute2f128_ps(s2, s6, 0x20);
  r3 = _mm256_permute2f128_ps(s3, s7, 0x20);
  r4 = _mm256_permute2f128_ps(s0, s4, 0x31);
  r5 = _mm256_permute2f128_ps(s1, s5, 0x31);
  r6 = _mm256_permute2f128_ps(s2, s6, 0x31);
  r7 = _mm256_permute2f128_ps(s3, s7, 0x31);
}
#endif

// v[0..kp) += w * x[0..kp)
template <int KP>
static inline void axpy(float* __restrict v, float w, const float* __restrict x, int kp_rt) {
  if constexpr (KP > 0 && KP % 8 == 0) {
    const vf8 wv = bc(w);
    for (int q = 0; q < KP; q += 8) st(v + q, ld(v + q) + wv * ld(x + q));
  } else {
    const int kp = KP > 0 ? KP : kp_rt;
    for (int c = 0; c < kp; ++c) v[c] += w * x[c];
  }
}

// Loads the values of points [p, p + nb) (nb <= 8) into xs[8][kp] (padding lanes 0), times mask.
// probe accumulates x * 0 (NaN exactly when some x is NaN or infinite).
template <int KP>
static inline void load_block(const float* in, bool planar, int64_t n, int k, int kp, const float* mask,
                              int64_t p, int nb, float* __restrict xs, float& probe) {
#ifdef RLOSS_KERNELS_AVX2
  if (planar && nb == 8 && kp % 8 == 0) {
    const __m256 zero = _mm256_setzero_ps();
    const __m256 mk = mask ? _mm256_loadu_ps(mask + p) : _mm256_set1_ps(1.f);
    __m256 pr = zero;
    for (int c = 0; c < kp; c += 8) {
      __m256 r[8];
      for (int i = 0; i < 8; ++i) {
        if (c + i < k) {
          const __m256 v = _mm256_loadu_ps(in + static_cast<int64_t>(c + i) * n + p);
          pr = _mm256_add_ps(pr, _mm256_mul_ps(v, zero));
          r[i] = mask ? _mm256_mul_ps(v, mk) : v;
        } else {
          r[i] = zero;
        }
      }
      transpose8(r[0], r[1], r[2], r[3], r[4], r[5], r[6], r[7]);
      for (int i = 0; i < 8; ++i) _mm256_storeu_ps(xs + i * kp + c, r[i]);
    }
    alignas(32) float tmp[8];
    _mm256_store_ps(tmp, pr);
    probe += ((tmp[0] + tmp[1]) + (tmp[2] + tmp[3])) + ((tmp[4] + tmp[5]) + (tmp[6] + tmp[7]));
    return;
  }
#endif
  for (int l = 0; l < nb; ++l) {
    const float m = mask ? mask[p + l] : 1.f;
    float* x = xs + l * kp;
    if (planar) {
      for (int c = 0; c < k; ++c) {
        const float v = in[static_cast<int64_t>(c) * n + p + l];
        probe += v * 0.f;
        x[c] = mask ? v * m : v;
      }
    } else {
      const float* src = in + (p + l) * k;
      for (int c = 0; c < k; ++c) {
        probe += src[c] * 0.f;
        x[c] = mask ? src[c] * m : src[c];
      }
    }
    for (int c = k; c < kp; ++c) x[c] = 0.f;
  }
}

// Scatter splat in point order (so each lattice point sums its contributions in the original's order).
template <int KP>
static bool splat_range(const float* in, bool planar, int64_t n, int k, const float* mask,
                        const int32_t* __restrict offset, const float* __restrict bary, int dp1,
                        float* __restrict V, int64_t p0, int64_t p1, float* __restrict xs, int kp_rt) {
  const int kp = KP > 0 ? KP : kp_rt;
  float probe = 0.f;
  for (int64_t p = p0; p < p1; p += 8) {
    const int nb = p + 8 <= p1 ? 8 : static_cast<int>(p1 - p);
    const int32_t* o = offset + p * dp1;
    const float* w = bary + p * dp1;
    load_block<KP>(in, planar, n, k, kp, mask, p, nb, xs, probe);
    for (int l = 0; l < nb; ++l) {
      const float* x = xs + l * kp;
      for (int r = 0; r < dp1; ++r) {
        const int32_t sl = o[l * dp1 + r];
        axpy<KP>(V + static_cast<int64_t>(sl) * kp, w[l * dp1 + r], x, kp);
      }
    }
  }
  return probe == 0.f;
}

// V[s] += W[s] for slots [s0, s1) (the splat's chunk sums).
template <int KP>
static void add_range(float* __restrict V, const float* __restrict W, int32_t s0, int32_t s1, int kp_rt) {
  const int kp = KP > 0 ? KP : kp_rt;
  const int64_t e = static_cast<int64_t>(s1) * kp;
  for (int64_t i = static_cast<int64_t>(s0) * kp; i < e; ++i) V[i] += W[i];
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
    if constexpr (KP > 0 && KP % 8 == 0) {
      const vf8 half = bc(0.5f);
      for (int q = 0; q < KP; q += 8) st(o + q, ld(c0 + q) + half * (ld(a + q) + ld(b + q)));
    } else {
      for (int c = 0; c < kp; ++c) o[c] = c0[c] + 0.5f * (a[c] + b[c]);
    }
  }
}

// acc[0..kp) = sum_r (w_r * alpha) * V[o_r][0..kp), r = 0..d in order.
template <int KP>
static inline void gather_point(const int32_t* o, const float* w, int dp1, const float* V, float alpha,
                                float* __restrict acc, int kp_rt) {
  if constexpr (KP > 0 && KP % 8 == 0) {
    vf8 a[KP / 8];
    for (int q = 0; q < KP / 8; ++q) a[q] = bc(0.f);
    for (int r = 0; r < dp1; ++r) {
      const vf8 wr = bc(w[r] * alpha);
      const float* v = V + static_cast<int64_t>(o[r]) * KP;
      for (int q = 0; q < KP / 8; ++q) a[q] += wr * ld(v + 8 * q);
    }
    for (int q = 0; q < KP / 8; ++q) st(acc + 8 * q, a[q]);
  } else {
    const int kp = KP > 0 ? KP : kp_rt;
    for (int c = 0; c < kp; ++c) acc[c] = 0.f;
    for (int r = 0; r < dp1; ++r) {
      const float wr = w[r] * alpha;
      const float* v = V + static_cast<int64_t>(o[r]) * kp;
      for (int c = 0; c < kp; ++c) acc[c] += wr * v[c];
    }
  }
}

// Slice points [p0, p1): y[p] = sum_r (b_r * alpha) * V[offset_r]; written pixel-major (N x k) or
// planar (k x N), optionally times mask[p], then times scale (skipped when 1). acc is scratch of
// 8 * kp floats. Returns false when an output overflowed (probe: the sum of y * 0, NaN exactly then).
template <int KP>
static bool slice_range(const int32_t* __restrict offset, const float* __restrict bary, int dp1,
                        const float* __restrict V, float alpha, int64_t n, int k, int kp_rt, bool planar,
                        const float* mask, float scale, float* __restrict out, int64_t p0, int64_t p1,
                        float* acc) {
  const int kp = KP > 0 ? KP : kp_rt;
  int64_t p = p0;
  float probe = 0.f;
#ifdef RLOSS_KERNELS_AVX2
  if (planar && kp % 8 == 0) {
    const __m256 zero = _mm256_setzero_ps();
    __m256 pr = zero;
    for (; p + 8 <= p1; p += 8) {
      for (int i = 0; i < 8; ++i)
        gather_point<KP>(offset + (p + i) * dp1, bary + (p + i) * dp1, dp1, V, alpha, acc + i * kp, kp);
      const __m256 mk = mask ? _mm256_loadu_ps(mask + p) : _mm256_set1_ps(1.f);
      const __m256 sc = _mm256_set1_ps(scale);
      for (int c = 0; c < k; c += 8) {
        __m256 r[8];
        for (int i = 0; i < 8; ++i) r[i] = _mm256_loadu_ps(acc + i * kp + c);
        transpose8(r[0], r[1], r[2], r[3], r[4], r[5], r[6], r[7]);
        const int ce = c + 8 < k ? 8 : k - c;
        for (int i = 0; i < ce; ++i) {
          __m256 y = mask ? _mm256_mul_ps(r[i], mk) : r[i];
          if (scale != 1.f) y = _mm256_mul_ps(y, sc);
          pr = _mm256_add_ps(pr, _mm256_mul_ps(y, zero));
          _mm256_storeu_ps(out + static_cast<int64_t>(c + i) * n + p, y);
        }
      }
    }
    alignas(32) float tmp[8];
    _mm256_store_ps(tmp, pr);
    probe += ((tmp[0] + tmp[1]) + (tmp[2] + tmp[3])) + ((tmp[4] + tmp[5]) + (tmp[6] + tmp[7]));
  }
#endif
  for (; p < p1; ++p) {
    gather_point<KP>(offset + p * dp1, bary + p * dp1, dp1, V, alpha, acc, kp);
    const float m = mask ? mask[p] : 1.f;
    for (int c = 0; c < k; ++c) {
      float y = mask ? acc[c] * m : acc[c];
      if (scale != 1.f) y *= scale;
      probe += y * 0.f;
      out[planar ? static_cast<int64_t>(c) * n + p : p * k + c] = y;
    }
  }
  return probe == 0.f;
}

template <int KP>
static void fill_set(rloss::detail::KernelSet& s) {
  s.splat = &splat_range<KP>;
  s.add = &add_range<KP>;
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

static rloss::detail::EmbedFn embed_fn(int d) {
  switch (d) {
    case 2: return &embed_block<2>;
    case 3: return &embed_block<3>;
    case 5: return &embed_block<5>;
    default: return &embed_block<0>;
  }
}

}  // namespace RLOSS_KNS

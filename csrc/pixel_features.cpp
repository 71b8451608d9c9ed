#include "pixel_features.h"

#include <cmath>

namespace rloss {

namespace {
constexpr int L = kEmbedLanes;
}

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

void caffe_roi_mask(const float* image, int c, int64_t plane, int64_t count, float* mask) {
  for (int64_t p = 0; p < count; ++p) mask[p] = 0.f;
  for (int ch = 0; ch < c; ++ch) {
    const float* src = image + ch * plane;
    // (int)v != 0  <=>  |v| >= 1 (truncation toward zero); NaN counts as inside.
    for (int64_t p = 0; p < count; ++p) mask[p] = (mask[p] != 0.f || !(std::fabs(src[p]) < 1.f)) ? 1.f : 0.f;
  }
}

BlockFeatures::BlockFeatures(const FeatureSource& src) : s_(src) {
  if (!s_.features) {
    xs_.resize(s_.width);
    ys_.resize(s_.height);
    for (int64_t x = 0; x < s_.width; ++x) xs_[x] = static_cast<float>(x) / s_.sigma_xy;
    for (int64_t y = 0; y < s_.height; ++y) ys_[y] = static_cast<float>(y) / s_.sigma_xy;
  }
}

void BlockFeatures::fill(int64_t p0, int nb, float* f) const {
  const int d = s_.dim;
  if (nb < L)
    for (int j = 0; j < d; ++j)
      for (int l = nb; l < L; ++l) f[j * L + l] = 0.f;
  if (s_.features) {
    for (int l = 0; l < nb; ++l)
      for (int j = 0; j < d; ++j) f[j * L + l] = s_.features[(p0 + l) * d + j];
    return;
  }
  int64_t y = p0 / s_.width, x = p0 % s_.width;
  for (int l = 0; l < nb; ++l) {
    f[l] = xs_[x];
    f[L + l] = ys_[y];
    if (++x == s_.width) {
      x = 0;
      ++y;
    }
  }
  const int64_t plane = s_.height * s_.width;
  const float sr = s_.sigma_rgb;
  for (int c = 0; c < s_.channels; ++c) {
    const float* src = s_.image + c * plane + p0;
    float* dst = f + (2 + c) * L;
    for (int l = 0; l < nb; ++l) dst[l] = src[l] / sr;
  }
  if (s_.roi) caffe_roi_mask(s_.image + p0, s_.channels, plane, nb, s_.roi + p0);
}

}  // namespace rloss

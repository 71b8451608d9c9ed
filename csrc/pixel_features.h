// The per-pixel features the lattice is built on, and the loss's region-of-interest mask: the one
// place where both are computed (the Python side calls in here).
#pragma once

#include <cstdint>
#include <vector>

#include "common.h"

namespace rloss {

// Where per-pixel features come from: either an (N, d) row-major array, or an image
// (C planes of H x W) turned on the fly into (x/s_xy, y/s_xy, c_0/s_rgb, ..., c_{C-1}/s_rgb)
// with x the column and y the row, each a float32 division.
struct FeatureSource {
  const float* features = nullptr;  // (N, d) when not null
  const float* image = nullptr;     // (C, H, W) when features is null
  int64_t height = 0, width = 0;
  int channels = 0;
  float sigma_xy = 1.f, sigma_rgb = 1.f;
  float* roi = nullptr;  // image sources: when set, the build writes the image's caffe_roi_mask here (N floats)
  int dim = 0;
  int64_t count = 0;  // N

  static FeatureSource from_array(const float* f, int64_t n, int d);
  static FeatureSource from_image(const float* img, int channels, int64_t h, int64_t w, float sigma_xy,
                                  float sigma_rgb);
};

// The DenseCRF loss's region of interest, as the Caffe layer computes it: mask[p] = 0 when every
// channel of the mean-subtracted image truncates to integer 0 (|v| < 1: crop padding), else 1; NaN
// counts as inside. Pixels [0, count) of an image of c planes `plane` floats apart.
void caffe_roi_mask(const float* image, int c, int64_t plane, int64_t count, float* mask);

// Fills the feature block f[d][kEmbedLanes] of points [p0, p0 + nb); lanes >= nb get zeros. For
// image sources with a roi, also writes the ROI mask of those points.
class BlockFeatures {
 public:
  explicit BlockFeatures(const FeatureSource& src);
  void fill(int64_t p0, int nb, float* f) const;

 private:
  const FeatureSource& s_;
  std::vector<float> xs_, ys_;  // x / sigma_xy per column, y / sigma_xy per row
};

}  // namespace rloss

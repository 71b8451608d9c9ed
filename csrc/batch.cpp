#include "batch.h"

#include <algorithm>
#include <cstdio>
#include <exception>
#include <string>

#include "parallel.h"

namespace rloss {

namespace {

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
    try {
      lat.spread(seg + i * k * n, k, Layout::kPlanar, mk, threads, dots + i * k);
    } catch (const NonFiniteValues&) {
      throw InvalidArgument("the segmentation of image " + std::to_string(i) + " (of " + std::to_string(b) +
                            ") contains NaN or Inf");
    }
  });
  b_ = b;
  n_ = n;
  k_ = k;
  spread_ = true;
}

void DenseCRFLossBatch::backward(float* grad, float scale, int num_threads) {
  if (!spread_) throw InvalidArgument("DenseCRF loss: backward called before forward");
  run_batch(b_, num_threads, [&](int64_t i, int, int threads) {
    try {
      (*lattices_)[i].slice(grad + i * k_ * n_, Layout::kPlanar, masks_.data() + i * n_, scale, threads);
    } catch (const FilterOverflow&) {
      char factor[32];
      std::snprintf(factor, sizeof factor, "%.3g", static_cast<double>(scale));
      throw InvalidArgument("the gradient of image " + std::to_string(i) + " (of " + std::to_string(b_) +
                            ") overflows float32: the gradient arriving on the loss (times -2/N: " + factor +
                            ") or the segmentation's values are too large");
    }
  });
}

}  // namespace rloss

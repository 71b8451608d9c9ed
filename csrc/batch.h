// The batched entry points: one lattice per image, images in parallel and threads inside images.
#pragma once

#include <cstdint>
#include <memory>
#include <mutex>
#include <vector>

#include "workspace_pool.h"

namespace rloss {

// The DenseCRF loss of a batch in the two halves autograd calls: loss = -(1/B) sum_{b,c}
// <m S_c, A (m S_c)>, gradient -(2/B) A(m S) m, with m the ROI mask. forward() builds one lattice per
// image, spreads x = m S and returns <x_c, (A x)_c> per image and class; the lattices and their
// blurred values stay until backward(), which slices them straight into the gradient
// scale * (A x) m. No N x K intermediate is ever written.
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
// roi_from_image: use the DenseCRF loss's ROI mask of each image (caffe_roi_mask) instead of `mask`.
void filter_image_batch(const float* image, int64_t b, int c, int64_t h, int64_t w, const float* values,
                        int k, float* out, float sigma_xy, float sigma_rgb, const float* mask,
                        bool mask_output, int num_threads, bool sse_pad, bool roi_from_image);

}  // namespace rloss

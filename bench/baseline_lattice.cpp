// The benchmark's baseline, "our lattice used the original's way": per image a lattice built on one
// thread (images in parallel, as the original's OpenMP over images), then one channel at a time
// with value size 1, scatter splat and fresh zeroed buffers per channel. Bench only: compiled by
// bench/bench_lattice.py at run time together with the production lattice sources (csrc/), never
// part of rloss._lattice.
#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>

#include <algorithm>
#include <cstdint>
#include <exception>
#include <string>
#include <utility>
#include <vector>

#include "lattice.h"
#include "parallel.h"
#include "workspace_pool.h"

namespace py = pybind11;

namespace {

// out = A in for planar (K, N) values, one channel at a time; mask (N floats, may be null) multiplies the input.
void filter_per_channel(const rloss::Lattice& lat, const float* in, float* out, int k, const float* mask) {
  const int dp1 = lat.dim() + 1;
  const int32_t M = lat.lattice_size();
  const int64_t n = lat.num_points();
  const int32_t* offset = lat.offsets().data();
  const float* bary = lat.barycentric().data();
  const int32_t* neigh = lat.neighbours().data();
  const float alpha = static_cast<float>(rloss::slice_constant(lat.dim()));
  for (int c = 0; c < k; ++c) {
    const float* x = in + static_cast<int64_t>(c) * n;
    float* y = out + static_cast<int64_t>(c) * n;
    std::vector<float> a(static_cast<std::size_t>(M) + 2, 0.f), bbuf(static_cast<std::size_t>(M) + 2, 0.f);
    for (int64_t p = 0; p < n; ++p) {
      const float v = mask ? x[p] * mask[p] : x[p];
      for (int r = 0; r < dp1; ++r) a[offset[p * dp1 + r] + 1] += bary[p * dp1 + r] * v;
    }
    float* cur = a.data();
    float* nxt = bbuf.data();
    for (int j = 0; j < dp1; ++j) {
      const int32_t* nb = neigh + static_cast<std::size_t>(j) * M * 2;
      for (int32_t m = 0; m < M; ++m) nxt[m + 1] = cur[m + 1] + 0.5f * (cur[nb[2 * m]] + cur[nb[2 * m + 1]]);
      std::swap(cur, nxt);
    }
    for (int64_t p = 0; p < n; ++p) {
      float acc = 0.f;
      for (int r = 0; r < dp1; ++r) acc += (bary[p * dp1 + r] * alpha) * cur[offset[p * dp1 + r] + 1];
      y[p] = acc;
    }
  }
}

using Floats = py::array_t<float, py::array::c_style | py::array::forcecast>;

// image (B, C, H, W), values (B, K, H, W), mask (B, H, W) or None -> (B, K, H, W).
Floats filter_image_batch_per_channel(const Floats& image, const Floats& values, float sigma_xy, float sigma_rgb,
                                      const py::object& mask_arg, int num_threads, bool sse_pad) {
  if (image.ndim() != 4 || values.ndim() != 4 || values.shape(0) != image.shape(0) ||
      values.shape(2) != image.shape(2) || values.shape(3) != image.shape(3))
    throw std::invalid_argument("need image (B, C, H, W) and values (B, K, H, W)");
  const int64_t b = image.shape(0), h = image.shape(2), w = image.shape(3), n = h * w;
  const int c = static_cast<int>(image.shape(1)), k = static_cast<int>(values.shape(1));
  Floats mask_arr;
  const float* mask = nullptr;
  if (!mask_arg.is_none()) {
    mask_arr = mask_arg.cast<Floats>();
    if (mask_arr.size() != b * n) throw std::invalid_argument("mask must be (B, H, W)");
    mask = mask_arr.data();
  }
  Floats result({b, static_cast<int64_t>(k), h, w});
  const float* img = image.data();
  const float* val = values.data();
  float* out = result.mutable_data();
  std::exception_ptr err = nullptr;
  {
    py::gil_scoped_release release;
    const int nt = static_cast<int>(std::max<int64_t>(1, std::min<int64_t>(num_threads, b)));
    rloss::LatticeLease lease(nt);
#ifdef _OPENMP
#pragma omp parallel for num_threads(nt) schedule(static, 1)
#endif
    for (int64_t i = 0; i < b; ++i) {
      try {
        rloss::Lattice& lat = lease[rloss::thread_id()];
        lat.build(rloss::FeatureSource::from_image(img + i * c * n, c, h, w, sigma_xy, sigma_rgb), 1, sse_pad);
        filter_per_channel(lat, val + i * k * n, out + i * k * n, k, mask ? mask + i * n : nullptr);
      } catch (...) {
#ifdef _OPENMP
#pragma omp critical(rloss_baseline_error)
#endif
        {
          if (!err) err = std::current_exception();
        }
      }
    }
  }
  if (err) std::rethrow_exception(err);
  return result;
}

}  // namespace

PYBIND11_MODULE(rloss_bench_baseline, m) {
  m.doc() = "Benchmark baseline: our lattice used the original's way (one channel at a time).";
  m.def("filter_image_batch_per_channel", &filter_image_batch_per_channel, py::arg("image"), py::arg("values"),
        py::arg("sigma_xy"), py::arg("sigma_rgb"), py::arg("mask") = py::none(), py::arg("num_threads") = 1,
        py::arg("sse_pad") = true);
}

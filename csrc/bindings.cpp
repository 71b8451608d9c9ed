// pybind11 bindings of the permutohedral lattice (module rloss._lattice).
// Arrays must be C-contiguous float32 (the Python layer converts); shapes are checked here and bad
// input raises ValueError. The GIL is released while computing.
#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>

#include <cstdint>
#include <mutex>
#include <string>
#include <vector>

#include "lattice.h"

namespace py = pybind11;
using rloss::InvalidArgument;

namespace {

std::string shape_str(const py::array& a) {
  std::string s = "(";
  for (py::ssize_t i = 0; i < a.ndim(); ++i) s += (i ? ", " : "") + std::to_string(a.shape(i));
  return s + (a.ndim() == 1 ? ",)" : ")");
}

// Checks dtype float32, C order and the number of dimensions; returns the data pointer.
const float* checked(const py::array& a, const char* name, int ndim, int may_be_empty_axis = -1) {
  if (!a.dtype().is(py::dtype::of<float>()))
    throw InvalidArgument(std::string(name) + " must be float32, got dtype " + std::string(py::str(a.dtype())));
  if (!(a.flags() & py::array::c_style)) throw InvalidArgument(std::string(name) + " must be C-contiguous");
  if (a.ndim() != ndim)
    throw InvalidArgument(std::string(name) + " must have " + std::to_string(ndim) + " dimensions, got shape " +
                          shape_str(a));
  for (py::ssize_t i = 0; i < a.ndim(); ++i)
    if (a.shape(i) == 0 && i != may_be_empty_axis) throw InvalidArgument(std::string(name) + " must not be empty, got shape " + shape_str(a));
  return static_cast<const float*>(a.data());
}

float* checked_out(py::array& a, const char* name, const std::vector<py::ssize_t>& shape) {
  checked(a, name, static_cast<int>(shape.size()));
  if (!a.writeable()) throw InvalidArgument(std::string(name) + " must be writeable");
  for (std::size_t i = 0; i < shape.size(); ++i)
    if (a.shape(i) != shape[i]) throw InvalidArgument(std::string(name) + " has the wrong shape " + shape_str(a));
  return static_cast<float*>(a.mutable_data());
}

int to_int_channels(py::ssize_t k, const char* what) {
  if (k > (1 << 24)) throw InvalidArgument(std::string("too many ") + what + ": " + std::to_string(k));
  return static_cast<int>(k);
}

py::array_t<float> make_or_check_out(py::object out, const std::vector<py::ssize_t>& shape) {
  if (out.is_none()) return py::array_t<float>(shape);
  py::array arr = py::reinterpret_borrow<py::array>(out);
  checked_out(arr, "out", shape);
  return py::reinterpret_borrow<py::array_t<float>>(arr);
}

// Checked arguments of the batched image functions: image (B, C, H, W), values (B, K, H, W),
// mask (B, H, W) or None.
struct ImageBatch {
  const float* image = nullptr;
  const float* values = nullptr;
  const float* mask = nullptr;
  py::ssize_t b = 0, c = 0, h = 0, w = 0;
  int k = 0;

  ImageBatch(const py::array& img, const py::array& val, float sigma_xy, float sigma_rgb, const py::object& mk,
             bool roi_from_image) {
    image = checked(img, "image", 4, /*channels may be 0: spatial features only*/ 1);
    values = checked(val, "values", 4);
    b = img.shape(0), c = img.shape(1), h = img.shape(2), w = img.shape(3);
    if (val.shape(0) != b || val.shape(2) != h || val.shape(3) != w)
      throw InvalidArgument("values " + shape_str(val) + " do not match image " + shape_str(img) +
                            " (need (B, K, H, W) with the image's B, H, W)");
    if (c + 2 > rloss::kMaxDim) throw InvalidArgument("image has too many channels: " + std::to_string(c));
    if (!(sigma_xy > 0.f) || !(sigma_rgb > 0.f)) throw InvalidArgument("sigmas must be > 0");
    if (!mk.is_none()) {
      const py::array arr = py::reinterpret_borrow<py::array>(mk);
      mask = checked(arr, "mask", 3);
      if (arr.shape(0) != b || arr.shape(1) != h || arr.shape(2) != w)
        throw InvalidArgument("mask " + shape_str(arr) + " must have shape (B, H, W) of image " + shape_str(img));
    }
    if (roi_from_image && mask) throw InvalidArgument("give either mask or roi_from_image, not both");
    k = to_int_channels(val.shape(1), "value channels");
  }
  std::vector<py::ssize_t> values_shape() const { return {b, k, h, w}; }
};

py::array_t<float> image_batch(const py::array& image, const py::array& values, float sigma_xy, float sigma_rgb,
                               py::object mask, bool mask_output, int num_threads, bool sse_pad,
                               py::object out, bool per_channel, bool roi_from_image) {
  const ImageBatch a(image, values, sigma_xy, sigma_rgb, mask, roi_from_image);
  py::array_t<float> result = make_or_check_out(out, a.values_shape());
  float* o = result.mutable_data();
  {
    py::gil_scoped_release release;
    if (per_channel)
      rloss::filter_image_batch_per_channel(a.image, a.b, static_cast<int>(a.c), a.h, a.w, a.values, a.k, o,
                                            sigma_xy, sigma_rgb, a.mask, num_threads, sse_pad);
    else
      rloss::filter_image_batch(a.image, a.b, static_cast<int>(a.c), a.h, a.w, a.values, a.k, o, sigma_xy,
                                sigma_rgb, a.mask, mask_output, num_threads, sse_pad, roi_from_image);
  }
  return result;
}

}  // namespace

PYBIND11_MODULE(_lattice, m) {
  m.doc() = "Permutohedral lattice (Caffe DeepLab/rloss numerics), K channels per pass, OpenMP.";

  py::class_<rloss::Lattice>(m, "Lattice",
                             "Lattice built once from (N, d) float32 features; filters any number of channels.")
      .def(py::init([](const py::array& features, int num_threads, bool sse_pad, bool force_generic_keys) {
             const float* f = checked(features, "features", 2);
             if (features.shape(1) > rloss::kMaxDim)
               throw InvalidArgument("features: dimension " + std::to_string(features.shape(1)) +
                                     " exceeds the maximum " + std::to_string(rloss::kMaxDim));
             auto lat = std::make_unique<rloss::Lattice>();
             const auto src = rloss::FeatureSource::from_array(f, features.shape(0),
                                                               static_cast<int>(features.shape(1)));
             {
               py::gil_scoped_release release;
               lat->build(src, num_threads, sse_pad, force_generic_keys);
             }
             return lat;
           }),
           py::arg("features"), py::arg("num_threads") = 1, py::arg("sse_pad") = true,
           py::arg("force_generic_keys") = false)
      .def(
          "filter",
          [](rloss::Lattice& lat, const py::array& values, int num_threads, bool planar, py::object out) {
            checked(values, "values", 2);
            const py::ssize_t n = planar ? values.shape(1) : values.shape(0);
            const py::ssize_t k = planar ? values.shape(0) : values.shape(1);
            if (n != lat.num_points())
              throw InvalidArgument("values " + shape_str(values) + " do not match the lattice's " +
                                    std::to_string(lat.num_points()) + " points" +
                                    (planar ? " (planar layout: (K, N))" : " (layout: (N, K))"));
            const int kk = to_int_channels(k, "value channels");
            py::array_t<float> result = make_or_check_out(out, {values.shape(0), values.shape(1)});
            const float* in = static_cast<const float*>(values.data());
            float* o = result.mutable_data();
            {
              py::gil_scoped_release release;
              std::lock_guard<std::mutex> lock(lat.mutex());
              lat.filter(in, o, kk, planar ? rloss::Layout::kPlanar : rloss::Layout::kPixelMajor, nullptr, false,
                         num_threads);
            }
            return result;
          },
          py::arg("values"), py::arg("num_threads") = 1, py::arg("planar") = false, py::arg("out") = py::none(),
          "out = A values; values (N, K), or (K, N) with planar=True.")
      .def(
          "filter_per_channel",
          [](rloss::Lattice& lat, const py::array& values) {
            checked(values, "values", 2);
            if (values.shape(1) != lat.num_points())
              throw InvalidArgument("values " + shape_str(values) + " must be (K, N) with N = " +
                                    std::to_string(lat.num_points()));
            const int kk = to_int_channels(values.shape(0), "value channels");
            py::array_t<float> result({values.shape(0), values.shape(1)});
            const float* in = static_cast<const float*>(values.data());
            float* o = result.mutable_data();
            {
              py::gil_scoped_release release;
              std::lock_guard<std::mutex> lock(lat.mutex());
              lat.filter_per_channel(in, o, kk, nullptr);
            }
            return result;
          },
          py::arg("values"), "The original's way (baseline): planar (K, N), one channel at a time, one thread.")
      .def_property_readonly("num_points", &rloss::Lattice::num_points)
      .def_property_readonly("dim", &rloss::Lattice::dim)
      .def_property_readonly("lattice_size", &rloss::Lattice::lattice_size)
      .def_property_readonly("memory_bytes", &rloss::Lattice::memory_bytes)
      .def_property_readonly("packed_keys", &rloss::Lattice::packed_keys)
      .def("offsets",
           [](const rloss::Lattice& lat) {
             py::array_t<int32_t> a({static_cast<py::ssize_t>(lat.num_points()), static_cast<py::ssize_t>(lat.dim() + 1)});
             std::copy(lat.offsets().begin(), lat.offsets().end(), a.mutable_data());
             return a;
           },
           "(N, d+1) lattice indices of each point's simplex vertices (first-insertion order).")
      .def("barycentric",
           [](const rloss::Lattice& lat) {
             py::array_t<float> a({static_cast<py::ssize_t>(lat.num_points()), static_cast<py::ssize_t>(lat.dim() + 1)});
             std::copy(lat.barycentric().begin(), lat.barycentric().end(), a.mutable_data());
             return a;
           })
      .def("keys", [](const rloss::Lattice& lat) {
        py::array_t<int32_t> a({static_cast<py::ssize_t>(lat.lattice_size()), static_cast<py::ssize_t>(lat.dim())});
        int32_t* p = a.mutable_data();
        for (int32_t i = 0; i < lat.lattice_size(); ++i) lat.key(i, p + static_cast<std::size_t>(i) * lat.dim());
        return a;
      }, "(M, d) lattice point keys in index order.");

  m.def(
      "filter_image_batch",
      [](const py::array& image, const py::array& values, float sigma_xy, float sigma_rgb, py::object mask,
         bool mask_output, int num_threads, bool sse_pad, py::object out, bool roi_from_image) {
        return image_batch(image, values, sigma_xy, sigma_rgb, mask, mask_output, num_threads, sse_pad, out, false,
                           roi_from_image);
      },
      py::arg("image"), py::arg("values"), py::arg("sigma_xy"), py::arg("sigma_rgb"), py::arg("mask") = py::none(),
      py::arg("mask_output") = false, py::arg("num_threads") = 1, py::arg("sse_pad") = true,
      py::arg("out") = py::none(), py::arg("roi_from_image") = false,
      "Per image: lattice over (x/sxy, y/sxy, c/srgb...), then all K channels filtered in one pass.");
  py::class_<rloss::DenseCRFLossBatch>(
      m, "DenseCRFLossBatch",
      "The DenseCRF loss of a batch in two halves: forward keeps one lattice per image for backward.")
      .def(py::init<>())
      .def(
          "forward",
          [](rloss::DenseCRFLossBatch& self, const py::array& image, const py::array& segmentation, float sigma_xy,
             float sigma_rgb, py::object mask, int num_threads, bool sse_pad) {
            const ImageBatch a(image, segmentation, sigma_xy, sigma_rgb, mask, false);
            py::array_t<double> dots({a.b, static_cast<py::ssize_t>(a.k)});
            double* d = dots.mutable_data();
            {
              py::gil_scoped_release release;
              std::lock_guard<std::mutex> lock(self.mutex());
              self.forward(a.image, a.b, static_cast<int>(a.c), a.h, a.w, a.values, a.k, sigma_xy, sigma_rgb,
                           a.mask, num_threads, sse_pad, d);
            }
            return dots;
          },
          py::arg("image"), py::arg("segmentation"), py::arg("sigma_xy"), py::arg("sigma_rgb"),
          py::arg("mask") = py::none(), py::arg("num_threads") = 1, py::arg("sse_pad") = true,
          "<m S_c, A(m S)_c> per image and class, (B, K) float64; mask None = the image's ROI mask.")
      .def(
          "backward",
          [](rloss::DenseCRFLossBatch& self, float scale, int num_threads, py::object out) {
            py::array_t<float> result = make_or_check_out(
                out, {static_cast<py::ssize_t>(self.batch()), static_cast<py::ssize_t>(self.channels()),
                      static_cast<py::ssize_t>(self.pixels())});
            float* o = result.mutable_data();
            {
              py::gil_scoped_release release;
              std::lock_guard<std::mutex> lock(self.mutex());
              self.backward(o, scale, num_threads);
            }
            return result;
          },
          py::arg("scale"), py::arg("num_threads") = 1, py::arg("out") = py::none(),
          "scale * A(m S) m as (B, K, H*W) float32, from the lattices kept by forward.");
  m.def(
      "filter_image_batch_per_channel",
      [](const py::array& image, const py::array& values, float sigma_xy, float sigma_rgb, py::object mask,
         int num_threads, bool sse_pad) {
        return image_batch(image, values, sigma_xy, sigma_rgb, mask, false, num_threads, sse_pad, py::none(), true,
                           false);
      },
      py::arg("image"), py::arg("values"), py::arg("sigma_xy"), py::arg("sigma_rgb"), py::arg("mask") = py::none(),
      py::arg("num_threads") = 1, py::arg("sse_pad") = true,
      "Baseline: the original's way (one thread per image, one channel at a time).");
  m.def(
      "filter_feature_batch",
      [](const py::array& features, const py::array& values, int num_threads, bool sse_pad, py::object out) {
        const float* f = checked(features, "features", 3);
        const float* v = checked(values, "values", 3);
        const py::ssize_t b = features.shape(0), n = features.shape(1), d = features.shape(2);
        if (d > rloss::kMaxDim) throw InvalidArgument("features: dimension too large: " + std::to_string(d));
        if (values.shape(0) != b || values.shape(2) != n)
          throw InvalidArgument("values " + shape_str(values) + " must be (B, K, N) for features " +
                                shape_str(features));
        const int k = to_int_channels(values.shape(1), "value channels");
        py::array_t<float> result = make_or_check_out(out, {b, values.shape(1), n});
        float* o = result.mutable_data();
        {
          py::gil_scoped_release release;
          rloss::filter_feature_batch(f, b, n, static_cast<int>(d), v, k, o, num_threads, sse_pad);
        }
        return result;
      },
      py::arg("features"), py::arg("values"), py::arg("num_threads") = 1, py::arg("sse_pad") = true,
      py::arg("out") = py::none(), "features (B, N, d), values (B, K, N) -> (B, K, N).");

  m.def("set_timing", [](bool on) { rloss::timers().enabled.store(on); }, py::arg("enabled"));
  m.def("reset_timers", []() { rloss::timers().reset(); });
  m.def("timers", []() {
    py::dict dct;
    for (int i = 0; i < rloss::kNumTimers; ++i)
      dct[rloss::timer_name(i)] = static_cast<double>(rloss::timers().ns[i].load()) * 1e-9;
    return dct;
  }, "Accumulated seconds per phase (when set_timing(True)).");
  m.def("release_workspaces", &rloss::release_workspaces, "Frees the buffers cached by the batched functions.");
  m.def("workspace_bytes", &rloss::workspace_bytes);
  m.def("have_openmp", &rloss::have_openmp);
  m.def("max_threads", &rloss::max_threads);
  m.def("kernel_isa", &rloss::kernel_isa);
}

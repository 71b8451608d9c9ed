// pybind11 bindings of the permutohedral lattice (module rloss._lattice).
// Arrays must be C-contiguous float32 (the Python layer converts); shapes are checked here and bad
// input raises ValueError. The GIL is released while computing.
#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>

#include <cstdint>
#include <memory>
#include <mutex>
#include <string>
#include <vector>

#include "batch.h"
#include "kernels.h"
#include "lattice.h"
#include "parallel.h"
#include "timing.h"

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
    if (a.shape(i) == 0 && i != may_be_empty_axis)
      throw InvalidArgument(std::string(name) + " must not be empty, got shape " + shape_str(a));
  return static_cast<const float*>(a.data());
}

int to_int_channels(py::ssize_t k, const char* what) {
  if (k > (1 << 24)) throw InvalidArgument(std::string("too many ") + what + ": " + std::to_string(k));
  return static_cast<int>(k);
}

py::array_t<float> make_or_check_out(py::object out, const std::vector<py::ssize_t>& shape) {
  if (out.is_none()) return py::array_t<float>(shape);
  py::array arr = py::reinterpret_borrow<py::array>(out);
  checked(arr, "out", static_cast<int>(shape.size()));
  if (!arr.writeable()) throw InvalidArgument("out must be writeable");
  for (std::size_t i = 0; i < shape.size(); ++i)
    if (arr.shape(i) != shape[i]) throw InvalidArgument("out has the wrong shape " + shape_str(arr));
  return py::reinterpret_borrow<py::array_t<float>>(arr);
}

void check_image_channels(py::ssize_t c) {
  if (c + 2 > rloss::kMaxDim) throw InvalidArgument("image has too many channels: " + std::to_string(c));
}

void check_sigmas(float sigma_xy, float sigma_rgb) {
  if (!(sigma_xy > 0.f) || !(sigma_rgb > 0.f)) throw InvalidArgument("sigmas must be > 0");
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
    check_image_channels(c);
    check_sigmas(sigma_xy, sigma_rgb);
    if (!mk.is_none()) {
      const py::array arr = py::reinterpret_borrow<py::array>(mk);
      mask = checked(arr, "mask", 3);
      if (arr.shape(0) != b || arr.shape(1) != h || arr.shape(2) != w)
        throw InvalidArgument("mask " + shape_str(arr) + " must have shape (B, H, W) of image " + shape_str(img));
    }
    if (roi_from_image && mask) throw InvalidArgument("give either mask or roi_from_image, not both");
    k = to_int_channels(val.shape(1), "value channels");
  }
};

std::unique_ptr<rloss::Lattice> built(const rloss::FeatureSource& src, int num_threads, bool sse_pad,
                                      bool force_generic_keys) {
  auto lat = std::make_unique<rloss::Lattice>();
  py::gil_scoped_release release;
  lat->build(src, num_threads, sse_pad, force_generic_keys);
  return lat;
}

}  // namespace

PYBIND11_MODULE(_lattice, m) {
  m.doc() = "Permutohedral lattice (Caffe DeepLab/rloss numerics), K channels per pass, OpenMP.";

  py::class_<rloss::Lattice>(m, "Lattice", "Lattice built once over N points; filters any number of channels.")
      .def(py::init([](const py::array& features, int num_threads, bool sse_pad, bool force_generic_keys) {
             const float* f = checked(features, "features", 2);
             if (features.shape(1) > rloss::kMaxDim)
               throw InvalidArgument("features: dimension " + std::to_string(features.shape(1)) +
                                     " exceeds the maximum " + std::to_string(rloss::kMaxDim));
             const auto src =
                 rloss::FeatureSource::from_array(f, features.shape(0), static_cast<int>(features.shape(1)));
             return built(src, num_threads, sse_pad, force_generic_keys);
           }),
           py::arg("features"), py::arg("num_threads") = 1, py::arg("sse_pad") = true,
           py::arg("force_generic_keys") = false, "Lattice over (N, d) float32 features.")
      .def_static(
          "from_image",
          [](const py::array& image, float sigma_xy, float sigma_rgb, int num_threads, bool sse_pad) {
            const float* img = checked(image, "image", 3, /*channels may be 0: spatial features only*/ 0);
            check_image_channels(image.shape(0));
            check_sigmas(sigma_xy, sigma_rgb);
            const auto src = rloss::FeatureSource::from_image(img, static_cast<int>(image.shape(0)), image.shape(1),
                                                              image.shape(2), sigma_xy, sigma_rgb);
            return built(src, num_threads, sse_pad, false);
          },
          py::arg("image"), py::arg("sigma_xy"), py::arg("sigma_rgb"), py::arg("num_threads") = 1,
          py::arg("sse_pad") = true,
          "Lattice over the pixels of image (C, H, W): features (x/sigma_xy, y/sigma_xy, c/sigma_rgb...).")
      .def(
          "filter",
          [](rloss::Lattice& lat, const py::array& values, int num_threads) {
            checked(values, "values", 2);
            if (values.shape(0) != lat.num_points())
              throw InvalidArgument("values " + shape_str(values) + " do not match the lattice's " +
                                    std::to_string(lat.num_points()) + " points (layout: (N, K))");
            const int k = to_int_channels(values.shape(1), "value channels");
            py::array_t<float> result({values.shape(0), values.shape(1)});
            const float* in = static_cast<const float*>(values.data());
            float* o = result.mutable_data();
            {
              py::gil_scoped_release release;
              std::lock_guard<std::mutex> lock(lat.mutex());
              lat.filter(in, o, k, rloss::Layout::kPixelMajor, nullptr, false, num_threads);
            }
            return result;
          },
          py::arg("values"), py::arg("num_threads") = 1, "out = A values for values (N, K).")
      .def_property_readonly("num_points", &rloss::Lattice::num_points)
      .def_property_readonly("dim", &rloss::Lattice::dim)
      .def_property_readonly("lattice_size", &rloss::Lattice::lattice_size)
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
        const ImageBatch a(image, values, sigma_xy, sigma_rgb, mask, roi_from_image);
        py::array_t<float> result = make_or_check_out(out, {a.b, a.k, a.h, a.w});
        float* o = result.mutable_data();
        {
          py::gil_scoped_release release;
          rloss::filter_image_batch(a.image, a.b, static_cast<int>(a.c), a.h, a.w, a.values, a.k, o, sigma_xy,
                                    sigma_rgb, a.mask, mask_output, num_threads, sse_pad, roi_from_image);
        }
        return result;
      },
      py::arg("image"), py::arg("values"), py::arg("sigma_xy"), py::arg("sigma_rgb"), py::arg("mask") = py::none(),
      py::arg("mask_output") = false, py::arg("num_threads") = 1, py::arg("sse_pad") = true,
      py::arg("out") = py::none(), py::arg("roi_from_image") = false,
      "Per image: lattice over (x/sxy, y/sxy, c/srgb...), then all K channels filtered in one pass.");

  m.def(
      "roi_mask",
      [](const py::array& image) {
        const float* img = checked(image, "image", 4, /*channels may be 0*/ 1);
        const py::ssize_t b = image.shape(0), c = image.shape(1), n = image.shape(2) * image.shape(3);
        py::array_t<float> result({b, image.shape(2), image.shape(3)});
        float* o = result.mutable_data();
        {
          py::gil_scoped_release release;
          for (py::ssize_t i = 0; i < b; ++i) rloss::caffe_roi_mask(img + i * c * n, static_cast<int>(c), n, n, o + i * n);
        }
        return result;
      },
      py::arg("image"), "The DenseCRF loss's ROI mask (B, H, W) of image (B, C, H, W): 0 where all channels are in (-1, 1).");

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
          [](rloss::DenseCRFLossBatch& self, float scale, int num_threads) {
            py::array_t<float> result({static_cast<py::ssize_t>(self.batch()), static_cast<py::ssize_t>(self.channels()),
                                       static_cast<py::ssize_t>(self.pixels())});
            float* o = result.mutable_data();
            {
              py::gil_scoped_release release;
              std::lock_guard<std::mutex> lock(self.mutex());
              self.backward(o, scale, num_threads);
            }
            return result;
          },
          py::arg("scale"), py::arg("num_threads") = 1,
          "scale * A(m S) m as (B, K, H*W) float32, from the lattices kept by forward.");

  m.def("set_timing", [](bool on) { rloss::timers().enabled.store(on); }, py::arg("enabled"));
  m.def("reset_timers", []() { rloss::timers().reset(); });
  m.def("timers", []() {
    py::dict dct;
    for (int i = 0; i < rloss::kNumTimers; ++i)
      dct[rloss::timer_name(i)] = static_cast<double>(rloss::timers().ns[i].load()) * 1e-9;
    return dct;
  }, "Accumulated seconds per phase (when set_timing(True)).");
  m.def("workspace_bytes", &rloss::workspace_bytes, "Bytes held by the lattices the batched functions keep for reuse.");
  m.def("have_openmp", &rloss::have_openmp);
  m.def("kernel_isa", &rloss::detail::kernels_isa, "\"avx2\" or \"baseline\": the kernels picked for this CPU.");
}

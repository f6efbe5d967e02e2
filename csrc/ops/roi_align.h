#pragma once

// Index math shared by the CPU and CUDA roi_align kernels: the sampling grid of a RoI's bins and
// the bilinear taps of one sample point. The formulas are torchvision's, step for step, so that
// results match it to rounding.
//
// A RoI (x1, y1, x2, y2), scaled by spatial_scale (and shifted by -0.5 when aligned), is cut into
// pooled_height x pooled_width bins; each bin averages grid_h x grid_w sample points
// (sampling_ratio of them per side, or ceil(bin size) when sampling_ratio <= 0), each read by
// bilinear interpolation of the 4 pixels around it. Points more than one pixel outside the map
// read 0.

#include <cstdint>

#include "host_device.h"

namespace cnnops {

template <typename T>
struct RoiGeometry {
  T start_h, start_w;  // top-left corner, in feature-map pixels
  T bin_h, bin_w;      // bin size
  int64_t grid_h, grid_w;  // sample points per bin, per side
  T count;             // sample points per bin (the average's divisor), at least 1
};

// Ceiling of a value, as an integer (std::ceil is not constexpr-friendly on the GPU path and
// this keeps the same rounding). Values past +-2^40, infinities and NaN (as +2^40) are clamped
// first, which the callers' grid-size checks then reject, instead of an undefined conversion.
template <typename T>
CNNOPS_HOST_DEVICE int64_t ceil_to_int(T v) {
  const T limit = T(1099511627776.0);  // 2^40
  if (!(v < limit)) v = limit;
  if (v < -limit) v = -limit;
  const int64_t i = static_cast<int64_t>(v);
  return static_cast<T>(i) < v ? i + 1 : i;
}

template <typename T>
CNNOPS_HOST_DEVICE RoiGeometry<T> roi_align_geometry(const T* roi, T spatial_scale,
                                                      int64_t pooled_h, int64_t pooled_w,
                                                      int64_t sampling_ratio, bool aligned) {
  const T offset = aligned ? T(0.5) : T(0);
  RoiGeometry<T> g;
  g.start_w = roi[1] * spatial_scale - offset;
  g.start_h = roi[2] * spatial_scale - offset;
  const T end_w = roi[3] * spatial_scale - offset;
  const T end_h = roi[4] * spatial_scale - offset;
  T width = end_w - g.start_w;
  T height = end_h - g.start_h;
  if (!aligned) {  // torchvision's legacy behaviour: RoIs at least 1 x 1
    width = width > T(1) ? width : T(1);
    height = height > T(1) ? height : T(1);
  }
  g.bin_h = height / static_cast<T>(pooled_h);
  g.bin_w = width / static_cast<T>(pooled_w);
  g.grid_h = sampling_ratio > 0 ? sampling_ratio : ceil_to_int(height / static_cast<T>(pooled_h));
  g.grid_w = sampling_ratio > 0 ? sampling_ratio : ceil_to_int(width / static_cast<T>(pooled_w));
  const int64_t count = g.grid_h * g.grid_w;
  g.count = static_cast<T>(count > 1 ? count : 1);
  return g;
}

// The 4 pixels around a sample point and their weights; all weights 0 (and indices 0) for a point
// outside the map by more than one pixel.
template <typename T>
struct BilinearTaps {
  int64_t y_low, y_high, x_low, x_high;
  T w_ll, w_lh, w_hl, w_hh;  // weights of (y_low, x_low), (y_low, x_high), (y_high, x_low), ...
};

template <typename T>
CNNOPS_HOST_DEVICE BilinearTaps<T> bilinear_taps(T y, T x, int64_t height, int64_t width) {
  BilinearTaps<T> t{0, 0, 0, 0, T(0), T(0), T(0), T(0)};
  if (y < T(-1) || y > static_cast<T>(height) || x < T(-1) || x > static_cast<T>(width)) return t;
  if (y <= T(0)) y = T(0);
  if (x <= T(0)) x = T(0);
  t.y_low = static_cast<int64_t>(y);
  t.x_low = static_cast<int64_t>(x);
  if (t.y_low >= height - 1) {
    t.y_high = t.y_low = height - 1;
    y = static_cast<T>(t.y_low);
  } else {
    t.y_high = t.y_low + 1;
  }
  if (t.x_low >= width - 1) {
    t.x_high = t.x_low = width - 1;
    x = static_cast<T>(t.x_low);
  } else {
    t.x_high = t.x_low + 1;
  }
  const T ly = y - static_cast<T>(t.y_low), lx = x - static_cast<T>(t.x_low);
  const T hy = T(1) - ly, hx = T(1) - lx;
  t.w_ll = hy * hx;
  t.w_lh = hy * lx;
  t.w_hl = ly * hx;
  t.w_hh = ly * lx;
  return t;
}

}  // namespace cnnops

// ---- Host-only: argument checks shared by the C++ backends of roi_align and roi_pool (defined
// in roi_align.cpp). `op` names the op in the messages. ----
#include <ATen/core/Tensor.h>

namespace cnnops {

void check_roi_args(const char* op, const at::Tensor& input, const at::Tensor& rois,
                    double spatial_scale, int64_t pooled_h, int64_t pooled_w);

// Raises on a RoI that cannot be pooled: a non-finite coordinate, or a batch index that is not
// an integer in [0, batch_size). torchvision reads out of bounds (or crashes) on these. `rois`
// must be on the CPU: the CUDA backends copy their [K, 5] RoIs to the host for this one check.
void check_roi_boxes(const char* op, const at::Tensor& rois, int64_t batch_size);

}  // namespace cnnops

#pragma once

// Index math shared by the CPU and CUDA roi_pool kernels: the pixels of one bin. The formulas are
// torchvision's (Fast R-CNN's), step for step, so that results match it exactly.
//
// A RoI (x1, y1, x2, y2), scaled by spatial_scale and rounded to whole pixels (half away from
// zero), spans (x2 - x1 + 1) x (y2 - y1 + 1) pixels, at least 1 x 1. It is cut into
// pooled_height x pooled_width bins of real-valued size; bin (ph, pw) takes the pixels from the
// floor of its start to the ceiling of its end, clipped to the map. A bin's output is the largest
// of its pixels (0 for a bin with none), and its argmax the offset y * W + x of that pixel (-1
// for none), which the backward pass routes the gradient to.

#include <cmath>
#include <cstdint>

#include "host_device.h"

namespace cnnops {

template <typename T>
struct RoiPoolWindow {
  int64_t start_h, start_w;  // top-left pixel of the rounded RoI
  T bin_h, bin_w;            // bin size, in pixels
};

// C's round() (half away from zero), as torchvision rounds. Coordinates are clamped first so
// that a huge (finite) one cannot overflow the integer; a RoI 2^40 pixels from the map covers
// none of it either way.
template <typename T>
CNNOPS_HOST_DEVICE int64_t round_to_pixel(T v) {
  const T limit = T(1099511627776.0);  // 2^40
  v = v < -limit ? -limit : (v > limit ? limit : v);
  return static_cast<int64_t>(::round(v));
}

template <typename T>
CNNOPS_HOST_DEVICE RoiPoolWindow<T> roi_pool_window(const T* roi, T spatial_scale,
                                                     int64_t pooled_h, int64_t pooled_w) {
  const int64_t start_w = round_to_pixel(roi[1] * spatial_scale);
  const int64_t start_h = round_to_pixel(roi[2] * spatial_scale);
  const int64_t end_w = round_to_pixel(roi[3] * spatial_scale);
  const int64_t end_h = round_to_pixel(roi[4] * spatial_scale);
  const int64_t width = end_w - start_w + 1 > 1 ? end_w - start_w + 1 : 1;  // malformed: 1 x 1
  const int64_t height = end_h - start_h + 1 > 1 ? end_h - start_h + 1 : 1;
  RoiPoolWindow<T> w;
  w.start_h = start_h;
  w.start_w = start_w;
  w.bin_h = static_cast<T>(height) / static_cast<T>(pooled_h);
  w.bin_w = static_cast<T>(width) / static_cast<T>(pooled_w);
  return w;
}

// Pixels [begin, end) of bin `p` of a RoI starting at `start` with bins of size `bin`, clipped to
// [0, size). begin >= end for a bin with no pixels.
struct PixelRange {
  int64_t begin, end;
};

template <typename T>
CNNOPS_HOST_DEVICE PixelRange roi_pool_bin_range(int64_t p, int64_t start, T bin, int64_t size) {
  const T lo = static_cast<T>(p) * bin, hi = static_cast<T>(p + 1) * bin;
  int64_t begin = static_cast<int64_t>(lo);  // floor: lo >= 0
  int64_t end = static_cast<int64_t>(hi);
  if (static_cast<T>(end) < hi) ++end;  // ceil
  begin += start;
  end += start;
  begin = begin < 0 ? 0 : (begin > size ? size : begin);
  end = end < 0 ? 0 : (end > size ? size : end);
  return PixelRange{begin, end};
}

}  // namespace cnnops

#pragma once

// Box arithmetic shared by the CPU and CUDA kernels of nms, batched_nms and box_iou.
//
// Boxes are (x1, y1, x2, y2). The formulas are torchvision's, operation for operation, so that
// results match it bit for bit at the threshold: area = (x2 - x1) * (y2 - y1); the intersection
// is the clamped overlap of the two boxes; IoU = inter / (area_a + area_b - inter). Two empty
// boxes give 0 / 0 = NaN, as in torchvision, and NaN is never above a threshold.

#include <cmath>
#include <cstdint>
#include <limits>

#include "host_device.h"

namespace cnnops {

template <typename T>
CNNOPS_HOST_DEVICE T box_area(T x1, T y1, T x2, T y2) {
  return (x2 - x1) * (y2 - y1);
}

// IoU of box a (with its area) and box b (with its area), in T (the accumulation type).
template <typename T>
CNNOPS_HOST_DEVICE T box_iou_pair(T ax1, T ay1, T ax2, T ay2, T area_a, T bx1, T by1, T bx2,
                                  T by2, T area_b) {
  const T w = (ax2 < bx2 ? ax2 : bx2) - (ax1 > bx1 ? ax1 : bx1);
  const T h = (ay2 < by2 ? ay2 : by2) - (ay1 > by1 ? ay1 : by1);
  const T inter = (w > T(0) ? w : T(0)) * (h > T(0) ? h : T(0));
  return inter / (area_a + area_b - inter);
}

// torchvision compares a float IoU with a double threshold (`iou > threshold`). For a float x,
// x > t holds exactly when x > (the largest float <= t): no float lies strictly between the two.
// Kernels that compare in float use this threshold.
inline float float_threshold_below(double threshold) {
  const float f = static_cast<float>(threshold);
  if (static_cast<double>(f) <= threshold || std::isnan(threshold)) return f;
  return std::nextafter(f, -std::numeric_limits<float>::infinity());
}

}  // namespace cnnops

// ---- Host-only: argument checks shared by the C++ backends (defined in nms.cpp). ----
#include <ATen/core/Tensor.h>

namespace cnnops {

// boxes [N, 4] floating point, scores [N] of its dtype and device, idxs (if defined) [N] integer.
void check_nms_args(const at::Tensor& boxes, const at::Tensor& scores,
                    const std::optional<at::Tensor>& idxs, std::optional<int64_t> max_output);
void check_box_iou_args(const at::Tensor& boxes1, const at::Tensor& boxes2);

}  // namespace cnnops

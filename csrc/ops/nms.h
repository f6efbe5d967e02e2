#pragma once

// Box arithmetic shared by the CPU and CUDA kernels of nms, batched_nms, soft_nms and box_iou.
//
// Boxes are (x1, y1, x2, y2). The formulas are torchvision's, operation for operation, so that
// results match it bit for bit at the threshold: area = (x2 - x1) * (y2 - y1); the intersection
// is the clamped overlap of the two boxes; IoU = inter / (area_a + area_b - inter). Two empty
// boxes give 0 / 0 = NaN, as in torchvision, and NaN is never above a threshold.

#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <type_traits>

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

// ---- soft_nms: the decay weight ----------------------------------------------------------------
//
// exp(x) for x <= 0, branch-free, so that the CPU decay loop, which calls it for every surviving
// box at every pick, stays one SIMD loop (libm's exp is a call, which stops GCC vectorising it),
// and so that the CPU, CUDA and Triton kernels compute the weight by the same formula (GCC's
// AVX-512 variant, nvcc and Triton contract the polynomial into FMAs, the baseline ISA cannot:
// the last bit may differ between them). Cody-Waite: x = n ln2 + r with
// n = round(x / ln2) (adding and subtracting 1.5 * 2^23, resp. 2^52, rounds to an integer: no
// floor, which the baseline x86-64 ISA lacks), ln2 split into a short high part (n * hi is exact)
// and a low part, so |r| <= ln2 / 2; exp(r) by its Taylor polynomial to r^7 (float) or r^13
// (double): within 1.2 ulp (float) and 1 ulp (double) of exp, measured over [-87, 0] and
// [-708, 0]; exp(0) = 1 exactly. 2^n is built in the exponent bits. Below -87 (float) or -708
// (double) it returns 0: a weight under about 1.6e-38 (float) or 3e-308 (double) becomes 0
// rather than subnormal. x must not be NaN (soft_nms_weight's never is).
//
// The ?: arms here and below are plain values, the arithmetic and comparisons are done before:
// GCC (with its default -ftrapping-math) will not speculate a float operation that it has moved
// into a branch, and a branch in the loop body stops the vectoriser.
template <typename T>
CNNOPS_HOST_DEVICE T exp_nonpositive(T x) {
  if constexpr (std::is_same_v<T, float>) {
    const bool underflow = x < -87.0f;
    x = underflow ? 0.0f : x;
    const float shifter = 12582912.0f;  // 1.5 * 2^23
    const float n = (x * 1.44269504088896341f + shifter) - shifter;
    const float r = (x - n * 0.693359375f) - n * -2.12194440e-4f;
    float p = 1.0f / 5040;
    p = p * r + 1.0f / 720;
    p = p * r + 1.0f / 120;
    p = p * r + 1.0f / 24;
    p = p * r + 1.0f / 6;
    p = p * r + 0.5f;
    p = p * r + 1.0f;
    p = p * r + 1.0f;
    const int32_t bits = underflow ? 0 : (static_cast<int32_t>(n) + 127) << 23;
    float scale;  // 2^n, or 0
    memcpy(&scale, &bits, sizeof(scale));
    return p * scale;
  } else {
    const bool underflow = x < -708.0;
    x = underflow ? 0.0 : x;
    const double shifter = 6755399441055744.0;  // 1.5 * 2^52
    const double n = (x * 1.4426950408889634 + shifter) - shifter;
    const double r = (x - n * 6.93145751953125e-1) - n * 1.42860682030941723212e-6;
    double p = 1.0 / 6227020800.0;  // 1 / 13!
    p = p * r + 1.0 / 479001600.0;
    p = p * r + 1.0 / 39916800.0;
    p = p * r + 1.0 / 3628800.0;
    p = p * r + 1.0 / 362880.0;
    p = p * r + 1.0 / 40320.0;
    p = p * r + 1.0 / 5040.0;
    p = p * r + 1.0 / 720.0;
    p = p * r + 1.0 / 120.0;
    p = p * r + 1.0 / 24.0;
    p = p * r + 1.0 / 6.0;
    p = p * r + 0.5;
    p = p * r + 1.0;
    p = p * r + 1.0;
    const int64_t bits = underflow ? 0 : (static_cast<int64_t>(n) + 1023) << 52;
    double scale;  // 2^n, or 0
    memcpy(&scale, &bits, sizeof(scale));
    return p * scale;
  }
}

// The factor by which soft_nms multiplies the score of a surviving box whose IoU with the picked
// box is `iou` (box_iou_pair): gaussian exp(-IoU^2 / sigma) (iou_threshold unused, as in mmcv),
// linear 1 - IoU where IoU > iou_threshold, else 1. The IoU is first clamped to [0, 1]: NaN (two
// empty boxes, 0 / 0, or NaN coordinates) counts as no overlap, and inverted boxes (x2 < x1),
// whose "IoU" can leave [0, 1], can neither raise a score nor make it negative. So the weight is
// in [0, 1] and never NaN. sigma must be > 0 in T (the kernels raise a float sigma that rounds
// to 0 to the least positive float; +inf is fine: weight 1).
template <bool kGaussian, typename T>
CNNOPS_HOST_DEVICE T soft_nms_weight(T iou, T sigma, T iou_threshold) {
  const T at_most_one = iou < T(1) ? iou : T(1);
  const T overlap = iou > T(0) ? at_most_one : T(0);
  if constexpr (kGaussian) {
    return exp_nonpositive(-(overlap * overlap) / sigma);
  } else {
    return T(1) - (overlap > iou_threshold ? overlap : T(0));
  }
}

// torchvision compares a float IoU with a double threshold (`iou > threshold`). For a float x,
// x > t holds exactly when x > (the largest float <= t): no float lies strictly between the two.
// Kernels that compare in float use this threshold.
inline float float_threshold_below(double threshold) {
  const float f = static_cast<float>(threshold);
  if (static_cast<double>(f) <= threshold || std::isnan(threshold)) return f;
  return std::nextafter(f, -std::numeric_limits<float>::infinity());
}

// For `x >= threshold` (soft_nms's score_threshold): the smallest float >= threshold.
inline float float_threshold_at_or_above(double threshold) {
  return -float_threshold_below(-threshold);
}

// soft_nms's sigma (> 0, finite) in T, still > 0 (soft_nms_weight divides by it): a float sigma
// under the least positive float becomes that (every overlap then weighs 0, as it would), one
// over the largest float becomes +inf (every weight then is 1, as it would be to float precision).
template <typename T>
T soft_nms_sigma(double sigma) {
  if (sigma > static_cast<double>(std::numeric_limits<T>::max())) {
    return std::numeric_limits<T>::infinity();
  }
  const T rounded = static_cast<T>(sigma);
  return rounded > T(0) ? rounded : std::numeric_limits<T>::denorm_min();
}

}  // namespace cnnops

// ---- Host-only: argument checks shared by the C++ backends (defined in nms.cpp). ----
#include <ATen/core/Tensor.h>

namespace cnnops {

// boxes [N, 4] floating point, scores [N] of its dtype and device, idxs (if defined) [N] integer.
void check_nms_args(const at::Tensor& boxes, const at::Tensor& scores,
                    const std::optional<at::Tensor>& idxs, std::optional<int64_t> max_output);
void check_box_iou_args(const at::Tensor& boxes1, const at::Tensor& boxes2);
// boxes [N, 4] floating point, scores [N] of its dtype and device; sigma > 0 and finite;
// thresholds not NaN; method "gaussian" or "linear". Returns whether the method is gaussian.
bool check_soft_nms_args(const at::Tensor& boxes, const at::Tensor& scores, double sigma,
                         double iou_threshold, double score_threshold, c10::string_view method);

}  // namespace cnnops

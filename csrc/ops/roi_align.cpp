// roi_align schemas, and the argument checks shared by every C++ backend of roi_align and
// roi_pool. The Python function
// (cnnops/ops/roi_align.py) checks the same before it calls the op; these repeat them because
// torch.ops.cnnops.roi_align can be called directly and must raise rather than read out of bounds.

#include "roi_align.h"

#include <ATen/ATen.h>
#include <torch/library.h>

#include <ATen/Dispatch.h>

#include <cmath>

namespace cnnops {

void check_roi_args(const char* op, const at::Tensor& input, const at::Tensor& rois,
                    double spatial_scale, int64_t pooled_h, int64_t pooled_w) {
  TORCH_CHECK(input.dim() == 4, op, ": input must be 4-D (N, C, H, W), got shape ",
              input.sizes());
  TORCH_CHECK(at::isFloatingType(input.scalar_type()),
              op, ": input must be floating point, got ", input.scalar_type());
  TORCH_CHECK(rois.dim() == 2 && rois.size(1) == 5,
              op, ": rois must be a [K, 5] tensor of (batch index, x1, y1, x2, y2), got shape ",
              rois.sizes());
  TORCH_CHECK(rois.scalar_type() == input.scalar_type(), op, ": rois dtype ",
              rois.scalar_type(), " does not match input dtype ", input.scalar_type());
  TORCH_CHECK(rois.device() == input.device(), op, ": rois are on ", rois.device(),
              " but input is on ", input.device());
  TORCH_CHECK(input.size(2) > 0 && input.size(3) > 0,
              op, ": input must have non-zero height and width, got shape ", input.sizes());
  TORCH_CHECK(pooled_h > 0 && pooled_w > 0, op, ": output_size must be positive, got (",
              pooled_h, ", ", pooled_w, ")");
  TORCH_CHECK(spatial_scale > 0 && std::isfinite(spatial_scale),
              op, ": spatial_scale must be a positive finite number, got ", spatial_scale);
}

void check_roi_boxes(const char* op, const at::Tensor& rois, int64_t batch_size) {
  TORCH_CHECK(rois.device().is_cpu(), op, ": check_roi_boxes needs CPU rois");
  const at::Tensor r = rois.contiguous();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, r.scalar_type(), "check_roi_boxes", [&] {
    const scalar_t* p = r.const_data_ptr<scalar_t>();
    for (int64_t k = 0; k < r.size(0); ++k) {
      const double b = static_cast<double>(p[5 * k]), x1 = static_cast<double>(p[5 * k + 1]),
                   y1 = static_cast<double>(p[5 * k + 2]), x2 = static_cast<double>(p[5 * k + 3]),
                   y2 = static_cast<double>(p[5 * k + 4]);
      TORCH_CHECK(std::isfinite(x1) && std::isfinite(y1) && std::isfinite(x2) && std::isfinite(y2),
                  op, ": rois[", k, "] has a non-finite coordinate (", x1, ", ", y1, ", ", x2,
                  ", ", y2, ")");
      TORCH_CHECK(b >= 0 && b < static_cast<double>(batch_size) && b == std::floor(b), op,
                  ": rois[", k, "] has batch index ", b, ", expected an integer in [0, ",
                  batch_size, ")");
    }
  });
}

}  // namespace cnnops

TORCH_LIBRARY_FRAGMENT(cnnops, m) {
  m.def(
      "roi_align(Tensor input, Tensor rois, float spatial_scale, int pooled_height, "
      "int pooled_width, int sampling_ratio, bool aligned) -> Tensor");
  // grad input of roi_align, shaped like the input (batch_size, channels, height, width).
  m.def(
      "_roi_align_backward(Tensor grad, Tensor rois, float spatial_scale, int pooled_height, "
      "int pooled_width, int batch_size, int channels, int height, int width, "
      "int sampling_ratio, bool aligned) -> Tensor");
}

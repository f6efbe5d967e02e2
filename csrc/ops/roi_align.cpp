// roi_align schemas and the argument checks shared by every C++ backend. The Python function
// (cnnops/ops/roi_align.py) checks the same before it calls the op; these repeat them because
// torch.ops.cnnops.roi_align can be called directly and must raise rather than read out of bounds.

#include "roi_align.h"

#include <ATen/ATen.h>
#include <torch/library.h>

#include <cmath>

namespace cnnops {

void check_roi_align_args(const at::Tensor& input, const at::Tensor& rois, double spatial_scale,
                          int64_t pooled_h, int64_t pooled_w) {
  TORCH_CHECK(input.dim() == 4, "roi_align: input must be 4-D (N, C, H, W), got shape ",
              input.sizes());
  TORCH_CHECK(at::isFloatingType(input.scalar_type()),
              "roi_align: input must be floating point, got ", input.scalar_type());
  TORCH_CHECK(rois.dim() == 2 && rois.size(1) == 5,
              "roi_align: rois must be a [K, 5] tensor of (batch index, x1, y1, x2, y2), got shape ",
              rois.sizes());
  TORCH_CHECK(rois.scalar_type() == input.scalar_type(), "roi_align: rois dtype ",
              rois.scalar_type(), " does not match input dtype ", input.scalar_type());
  TORCH_CHECK(rois.device() == input.device(), "roi_align: rois are on ", rois.device(),
              " but input is on ", input.device());
  TORCH_CHECK(input.size(2) > 0 && input.size(3) > 0,
              "roi_align: input must have non-zero height and width, got shape ", input.sizes());
  TORCH_CHECK(pooled_h > 0 && pooled_w > 0, "roi_align: output_size must be positive, got (",
              pooled_h, ", ", pooled_w, ")");
  TORCH_CHECK(spatial_scale > 0 && std::isfinite(spatial_scale),
              "roi_align: spatial_scale must be a positive finite number, got ", spatial_scale);
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

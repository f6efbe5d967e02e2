// Schemas of the box ops (nms with optional class ids for batched_nms, soft_nms, box_iou) and
// the argument checks shared by every C++ backend. The checks repeat the Python ones
// (cnnops/ops/nms.py) on purpose: torch.ops.cnnops.nms can be called directly, and it must raise
// rather than read out of bounds.

#include "nms.h"

#include <torch/library.h>

#include <cmath>
#include <cstdint>
#include <limits>

namespace cnnops {

namespace {

void check_boxes(const at::Tensor& boxes, const char* name) {
  TORCH_CHECK(boxes.dim() == 2 && boxes.size(1) == 4, "box ops: ", name,
              " must be a [N, 4] tensor of (x1, y1, x2, y2), got shape ", boxes.sizes());
  TORCH_CHECK(at::isFloatingType(boxes.scalar_type()), "box ops: ", name,
              " must be floating point, got ", boxes.scalar_type());
}

}  // namespace

void check_nms_args(const at::Tensor& boxes, const at::Tensor& scores,
                    const std::optional<at::Tensor>& idxs, std::optional<int64_t> max_output) {
  check_boxes(boxes, "boxes");
  TORCH_CHECK(scores.dim() == 1 && scores.size(0) == boxes.size(0),
              "nms: scores must be a [N] tensor with one score per box (N = ", boxes.size(0),
              "), got shape ", scores.sizes());
  TORCH_CHECK(scores.scalar_type() == boxes.scalar_type(), "nms: scores dtype ",
              scores.scalar_type(), " does not match boxes dtype ", boxes.scalar_type());
  TORCH_CHECK(scores.device() == boxes.device(), "nms: scores are on ", scores.device(),
              " but boxes are on ", boxes.device());
  if (idxs.has_value()) {
    TORCH_CHECK(idxs->dim() == 1 && idxs->size(0) == boxes.size(0),
                "batched_nms: idxs must be a [N] tensor with one class index per box (N = ",
                boxes.size(0), "), got shape ", idxs->sizes());
    TORCH_CHECK(at::isIntegralType(idxs->scalar_type(), /*includeBool=*/false),
                "batched_nms: idxs must be an integer tensor, got ", idxs->scalar_type());
    TORCH_CHECK(idxs->device() == boxes.device(), "batched_nms: idxs are on ", idxs->device(),
                " but boxes are on ", boxes.device());
  }
  TORCH_CHECK(!max_output.has_value() || *max_output >= 0, "nms: max_output must be >= 0, got ",
              max_output.value_or(0));
}

void check_box_iou_args(const at::Tensor& boxes1, const at::Tensor& boxes2) {
  check_boxes(boxes1, "boxes1");
  check_boxes(boxes2, "boxes2");
  TORCH_CHECK(boxes1.scalar_type() == boxes2.scalar_type(), "box_iou: boxes1 dtype ",
              boxes1.scalar_type(), " does not match boxes2 dtype ", boxes2.scalar_type());
  TORCH_CHECK(boxes1.device() == boxes2.device(), "box_iou: boxes1 are on ", boxes1.device(),
              " but boxes2 are on ", boxes2.device());
}

bool check_soft_nms_args(const at::Tensor& boxes, const at::Tensor& scores, double sigma,
                         double iou_threshold, double score_threshold, c10::string_view method) {
  check_boxes(boxes, "boxes");
  TORCH_CHECK(scores.dim() == 1 && scores.size(0) == boxes.size(0),
              "soft_nms: scores must be a [N] tensor with one score per box (N = ", boxes.size(0),
              "), got shape ", scores.sizes());
  TORCH_CHECK(scores.scalar_type() == boxes.scalar_type(), "soft_nms: scores dtype ",
              scores.scalar_type(), " does not match boxes dtype ", boxes.scalar_type());
  TORCH_CHECK(scores.device() == boxes.device(), "soft_nms: scores are on ", scores.device(),
              " but boxes are on ", boxes.device());
  TORCH_CHECK(std::isfinite(sigma) && sigma > 0, "soft_nms: sigma must be > 0 and finite, got ",
              sigma);
  TORCH_CHECK(!std::isnan(iou_threshold), "soft_nms: iou_threshold must not be NaN");
  TORCH_CHECK(!std::isnan(score_threshold), "soft_nms: score_threshold must not be NaN");
  TORCH_CHECK(method == "gaussian" || method == "linear",
              "soft_nms: method must be \"gaussian\" or \"linear\", got \"", method, "\"");
  // The kernels keep box positions in 32 bits.
  TORCH_CHECK(boxes.size(0) <= std::numeric_limits<int32_t>::max(),
              "soft_nms: at most 2^31 - 1 boxes, got ", boxes.size(0));
  return method == "gaussian";
}

}  // namespace cnnops

TORCH_LIBRARY_FRAGMENT(cnnops, m) {
  // Indices of the kept boxes, by descending score (ties: the lower index first). With idxs,
  // only boxes of the same class suppress each other (batched_nms). Boxes scoring at or below
  // score_threshold are dropped first; with max_output, only the first that many are kept.
  m.def(
      "nms(Tensor boxes, Tensor scores, Tensor? idxs, float iou_threshold, "
      "float? score_threshold, int? max_output) -> Tensor");
  // Soft-NMS (Bodla et al. 2017): repeatedly picks the surviving box of highest current score
  // (ties: the lower index), then multiplies every other survivor's score by a weight of its IoU
  // with the picked box (soft_nms_weight in nms.h); a box leaves once its score is below
  // score_threshold (or NaN). Returns the picked indices and their scores at the pick, in pick
  // order.
  m.def(
      "soft_nms(Tensor boxes, Tensor scores, float sigma, float iou_threshold, "
      "float score_threshold, str method) -> (Tensor, Tensor)");
  // [N, M] IoU of every pair.
  m.def("box_iou(Tensor boxes1, Tensor boxes2) -> Tensor");
}

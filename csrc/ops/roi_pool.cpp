// roi_pool schemas. The argument checks are roi_align's (check_roi_args, check_roi_boxes in
// roi_align.cpp), shared by both ops.

#include <torch/library.h>

TORCH_LIBRARY_FRAGMENT(cnnops, m) {
  // (output, argmax): argmax[k, c, ph, pw] is the offset y * W + x, in RoI k's image, of the
  // pixel that won bin (ph, pw) of channel c, or -1 for a bin with no pixels. int32, as
  // torchvision's: argmax is as large as the output, and int64 would double what the op writes.
  m.def(
      "roi_pool(Tensor input, Tensor rois, float spatial_scale, int pooled_height, "
      "int pooled_width) -> (Tensor, Tensor)");
  // grad input of roi_pool, shaped like the input (batch_size, channels, height, width): each
  // bin's gradient goes to its argmax pixel.
  m.def(
      "_roi_pool_backward(Tensor grad, Tensor rois, Tensor argmax, int batch_size, int channels, "
      "int height, int width) -> Tensor");
}

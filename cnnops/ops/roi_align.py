"""cnnops.roi_align: the public function (torchvision.ops.roi_align's signature), its fake
kernels and its autograd formula. The kernels are the C++ ops `cnnops::roi_align` and
`cnnops::_roi_align_backward` (csrc/ops/roi_align.cpp)."""

import math

import torch

from cnnops.ops._backend import resolve_backend


def rois_from_boxes(boxes, op):
    """A [K, 5] (batch index, x1, y1, x2, y2) tensor from `boxes`: such a tensor already, or a
    list of [L_i, 4] tensors, one per image (torchvision's two forms)."""
    if isinstance(boxes, torch.Tensor):
        if boxes.dim() != 2 or boxes.shape[1] != 5:
            raise ValueError(
                f"{op}: boxes must be a [K, 5] tensor (batch index, x1, y1, x2, y2) or a list of "
                f"[L, 4] tensors, got a tensor of shape {tuple(boxes.shape)}"
            )
        return boxes
    if not isinstance(boxes, (list, tuple)) or not all(isinstance(b, torch.Tensor) for b in boxes):
        raise TypeError(
            f"{op}: boxes must be a [K, 5] tensor or a list of [L, 4] tensors, got "
            f"{type(boxes).__name__}"
        )
    if not boxes:
        raise ValueError(f"{op}: boxes is an empty list; pass one [L, 4] tensor per image")
    for i, b in enumerate(boxes):
        if b.dim() != 2 or b.shape[1] != 4:
            raise ValueError(
                f"{op}: boxes[{i}] must be a [L, 4] tensor, got shape {tuple(b.shape)}"
            )
    ids = [torch.full_like(b[:, :1], i) for i, b in enumerate(boxes)]
    return torch.cat([torch.cat(ids), torch.cat(list(boxes))], dim=1)


def output_size_pair(output_size, op):
    if isinstance(output_size, int) and not isinstance(output_size, bool):
        output_size = (output_size, output_size)
    if (
        not isinstance(output_size, (tuple, list))
        or len(output_size) != 2
        or not all(isinstance(v, int) and not isinstance(v, bool) for v in output_size)
    ):
        raise TypeError(f"{op}: output_size must be an int or a pair of ints, got {output_size!r}")
    if min(output_size) <= 0:
        raise ValueError(f"{op}: output_size must be positive, got {tuple(output_size)}")
    return tuple(output_size)


def check_roi_input(input, rois, spatial_scale, op):
    if not isinstance(input, torch.Tensor):
        raise TypeError(f"{op}: input must be a Tensor, got {type(input).__name__}")
    if input.dim() != 4:
        raise ValueError(f"{op}: input must be 4-D (N, C, H, W), got shape {tuple(input.shape)}")
    if not input.is_floating_point():
        raise TypeError(f"{op}: input must be floating point, got {input.dtype}")
    if rois.dtype != input.dtype:
        raise TypeError(f"{op}: boxes dtype {rois.dtype} does not match input dtype {input.dtype}")
    if rois.device != input.device:
        raise ValueError(f"{op}: boxes are on {rois.device} but input is on {input.device}")
    if (
        isinstance(spatial_scale, bool)
        or not isinstance(spatial_scale, (int, float))
        or not math.isfinite(spatial_scale)
        or spatial_scale <= 0
    ):
        raise ValueError(f"{op}: spatial_scale must be a positive number, got {spatial_scale!r}")


def roi_align(
    input, boxes, output_size, spatial_scale=1.0, sampling_ratio=-1, aligned=False, *, backend=None
):
    """torchvision.ops.roi_align: [K, C, output_size] features of the K boxes.

    boxes: a [K, 5] tensor (batch index, x1, y1, x2, y2) or a list of [L, 4] tensors, one per
        image. RoIs with a non-finite coordinate or a batch index outside the batch raise.
    backend: None (see cnnops.use_backend), "cpu", "cuda" or "triton".
    """
    rois = rois_from_boxes(boxes, "roi_align")
    check_roi_input(input, rois, spatial_scale, "roi_align")
    pooled_h, pooled_w = output_size_pair(output_size, "roi_align")
    if isinstance(sampling_ratio, bool) or not isinstance(sampling_ratio, int):
        raise TypeError(f"roi_align: sampling_ratio must be an int, got {sampling_ratio!r}")
    resolve_backend("roi_align", input.device, backend)
    return torch.ops.cnnops.roi_align(
        input, rois, float(spatial_scale), pooled_h, pooled_w, sampling_ratio, bool(aligned)
    )


def roi_memory_format(input):
    """The layout RoI outputs take: channels_last for a channels_last input, else contiguous."""
    if input.is_contiguous(memory_format=torch.channels_last) and not input.is_contiguous():
        return torch.channels_last
    return torch.contiguous_format


@torch.library.register_fake("cnnops::roi_align")
def _roi_align_fake(input, rois, spatial_scale, pooled_height, pooled_width, sampling_ratio,
                    aligned):  # fmt: skip
    shape = (rois.shape[0], input.shape[1], pooled_height, pooled_width)
    return input.new_empty(shape).contiguous(memory_format=roi_memory_format(input))


@torch.library.register_fake("cnnops::_roi_align_backward")
def _roi_align_backward_fake(grad, rois, spatial_scale, pooled_height, pooled_width, batch_size,
                             channels, height, width, sampling_ratio, aligned):  # fmt: skip
    out = grad.new_empty((batch_size, channels, height, width))
    return out.contiguous(memory_format=roi_memory_format(grad))


def _setup_context(ctx, inputs, output):
    input, rois, *args = inputs
    ctx.save_for_backward(rois)
    ctx.args = args
    ctx.input_shape = tuple(input.shape)


def _roi_align_autograd(ctx, grad):
    (rois,) = ctx.saved_tensors
    spatial_scale, pooled_h, pooled_w, sampling_ratio, aligned = ctx.args
    n, c, h, w = ctx.input_shape
    grad_input = torch.ops.cnnops._roi_align_backward(
        grad, rois, spatial_scale, pooled_h, pooled_w, n, c, h, w, sampling_ratio, aligned
    )
    return grad_input, None, None, None, None, None, None


torch.library.register_autograd(
    "cnnops::roi_align", _roi_align_autograd, setup_context=_setup_context
)

"""cnnops.roi_pool: the public function (torchvision.ops.roi_pool's signature), its fake kernels
and its autograd formula. The kernels are the C++ ops `cnnops::roi_pool` and
`cnnops::_roi_pool_backward` (csrc/ops/roi_pool.cpp); roi_pool returns the winning pixel of each
bin (argmax) next to its output, and the backward pass routes each bin's gradient there."""

import torch

from cnnops.ops._backend import resolve_backend
from cnnops.ops.roi_align import (
    check_roi_input,
    output_size_pair,
    roi_memory_format,
    rois_from_boxes,
)


def roi_pool(input, boxes, output_size, spatial_scale=1.0, *, backend=None):
    """torchvision.ops.roi_pool: [K, C, output_size] max-pooled features of the K boxes.

    boxes: a [K, 5] tensor (batch index, x1, y1, x2, y2) or a list of [L, 4] tensors, one per
        image. RoIs with a non-finite coordinate or a batch index outside the batch raise.
    backend: None (see cnnops.use_backend), "cpu", "cuda" or "triton".
    """
    rois = rois_from_boxes(boxes, "roi_pool")
    check_roi_input(input, rois, spatial_scale, "roi_pool")
    pooled_h, pooled_w = output_size_pair(output_size, "roi_pool")
    resolve_backend("roi_pool", input.device, backend)
    output, _ = torch.ops.cnnops.roi_pool(input, rois, float(spatial_scale), pooled_h, pooled_w)
    return output


@torch.library.register_fake("cnnops::roi_pool")
def _roi_pool_fake(input, rois, spatial_scale, pooled_height, pooled_width):
    shape = (rois.shape[0], input.shape[1], pooled_height, pooled_width)
    output = input.new_empty(shape).contiguous(memory_format=roi_memory_format(input))
    return output, torch.empty_like(output, dtype=torch.int32)


@torch.library.register_fake("cnnops::_roi_pool_backward")
def _roi_pool_backward_fake(grad, rois, argmax, batch_size, channels, height, width):
    out = grad.new_empty((batch_size, channels, height, width))
    return out.contiguous(memory_format=roi_memory_format(grad))


def _setup_context(ctx, inputs, output):
    input, rois, *_ = inputs
    _, argmax = output
    ctx.mark_non_differentiable(argmax)
    ctx.save_for_backward(rois, argmax)
    ctx.input_shape = tuple(input.shape)


def _roi_pool_autograd(ctx, grad, _grad_argmax):
    rois, argmax = ctx.saved_tensors
    grad_input = torch.ops.cnnops._roi_pool_backward(grad, rois, argmax, *ctx.input_shape)
    return grad_input, None, None, None, None


torch.library.register_autograd(
    "cnnops::roi_pool", _roi_pool_autograd, setup_context=_setup_context
)

"""cnnops.roi_pool: the public function (torchvision.ops.roi_pool's signature), its fake kernels
and its autograd formula. The kernels are the C++ ops `cnnops::roi_pool` and
`cnnops::_roi_pool_backward` (csrc/ops/roi_pool.cpp), and for the triton backend the ops
`cnnops::roi_pool_triton` and `cnnops::_roi_pool_backward_triton` defined here (their kernels are
in cnnops.kernels.roi_pool); roi_pool returns the winning pixel of each bin (argmax) next to its
output, and the backward pass routes each bin's gradient there."""

import torch

from cnnops.ops._backend import resolve_backend
from cnnops.ops.roi_align import (
    channel_blocks,
    check_roi_boxes,
    check_roi_input,
    check_triton_grad,
    check_triton_roi_args,
    output_size_pair,
    roi_grid,
    roi_memory_format,
    rois_from_boxes,
    scale_bits,
    triton_config,
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
    args = (input, rois, float(spatial_scale), pooled_h, pooled_w)
    if resolve_backend("roi_pool", input.device, backend) == "triton":
        output, _ = torch.ops.cnnops.roi_pool_triton(*args)
    else:
        output, _ = torch.ops.cnnops.roi_pool(*args)
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


def _autograd_formula(backward_op):
    """The backward of roi_pool through `backward_op` (the C++ or the triton backward op)."""

    def backward(ctx, grad, _grad_argmax):
        rois, argmax = ctx.saved_tensors
        grad_input = backward_op(grad, rois, argmax, *ctx.input_shape)
        return grad_input, None, None, None, None

    return backward


torch.library.register_autograd(
    "cnnops::roi_pool",
    _autograd_formula(torch.ops.cnnops._roi_pool_backward),
    setup_context=_setup_context,
)


# ---------------------------------------------------------------------------------------------
# The triton backend: its own ops, made with triton_op so that torch.compile sees the kernels.
# The kernels live in cnnops.kernels.roi_pool; the argument and RoI checks are roi_align's.

# Launch configurations, kept as data (tests/kernels/aot_compile.py compiles each); the tiling is
# roi_align's (see TRITON_CONFIGS in cnnops/ops/roi_align.py).
# - roi_pool_fwd, roi_pool_bwd (atomic): one RoI's BLOCK_BINS bins x BLOCK_C channels a program,
#   one config per layout of the result.
# - roi_pool_bin_boxes: one RoI a program, its argmax read BLOCK_BINS bins x BLOCK_C channels at
#   a time; roi_pool_bwd_deterministic: one pixel x BLOCK_C channels a program, walking every
#   RoI, the bins of a RoI that holds the pixel checked BLOCK_BINS at a time.
# The interpreter's blocks hold all of a test's 5 channels and 7 x 7 bins (the tests run smaller
# blocks too).
TRITON_CONFIGS = {
    "roi_pool_fwd": {
        "gpu": {
            "channels_last": dict(BLOCK_BINS=8, BLOCK_C=64, num_warps=4),
            "nchw": dict(BLOCK_BINS=64, BLOCK_C=16, num_warps=8),
        },
        "interpreter": {
            "channels_last": dict(BLOCK_BINS=64, BLOCK_C=8),
            "nchw": dict(BLOCK_BINS=64, BLOCK_C=8),
        },
    },
    "roi_pool_bwd": {
        "gpu": {
            "channels_last": dict(BLOCK_BINS=8, BLOCK_C=64, num_warps=4),
            "nchw": dict(BLOCK_BINS=64, BLOCK_C=16, num_warps=8),
        },
        "interpreter": {
            "channels_last": dict(BLOCK_BINS=64, BLOCK_C=8),
            "nchw": dict(BLOCK_BINS=64, BLOCK_C=8),
        },
    },
    "roi_pool_bin_boxes": {
        "gpu": dict(BLOCK_BINS=16, BLOCK_C=64, num_warps=4),
        "interpreter": dict(BLOCK_BINS=32, BLOCK_C=8),
    },
    "roi_pool_bwd_deterministic": {
        "gpu": dict(BLOCK_BINS=8, BLOCK_C=128, num_warps=4),
        "interpreter": dict(BLOCK_BINS=32, BLOCK_C=8),
    },
}

_PLANE_LIMIT = 2**31  # argmax is an int32 offset y * W + x


def _check_plane(op, height, width):
    if height * width >= _PLANE_LIMIT:
        raise ValueError(
            f"{op}: height * width must be below 2^31 (argmax is an int32), got {height} x {width}"
        )


def _layout(memory_format):
    return "channels_last" if memory_format == torch.channels_last else "nchw"


@torch.library.triton_op("cnnops::roi_pool_triton", mutates_args=())
def _roi_pool_triton(
    input: torch.Tensor,
    rois: torch.Tensor,
    spatial_scale: float,
    pooled_height: int,
    pooled_width: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    if input.dim() != 4:
        raise ValueError(
            f"roi_pool: input must be 4-D (N, C, H, W), got shape {tuple(input.shape)}"
        )
    check_triton_roi_args("roi_pool", tuple(input.shape), input.dtype, input.device, rois,
                          spatial_scale, pooled_height, pooled_width)  # fmt: skip
    n, c, h, w = input.shape
    _check_plane("roi_pool", h, w)
    k = rois.shape[0]
    memory_format = roi_memory_format(input)
    shape = (k, c, pooled_height, pooled_width)
    out = torch.empty(shape, dtype=input.dtype, device=input.device, memory_format=memory_format)
    argmax = torch.empty(shape, dtype=torch.int32, device=input.device, memory_format=memory_format)
    check_roi_boxes("roi_pool", rois, n)
    if out.numel() == 0:
        return out, argmax
    from cnnops.kernels import roi_pool as kernels

    layout = _layout(memory_format)
    config = triton_config(TRITON_CONFIGS, "roi_pool_fwd", layout)
    grid = roi_grid("roi_pool", k, pooled_height * pooled_width, c, config)
    torch.library.wrap_triton(kernels._roi_pool_fwd_kernel)[grid](
        input, rois, out, argmax,
        n, c, h, w, pooled_height, pooled_width, scale_bits(spatial_scale, input.dtype),
        *input.stride(), *rois.stride(), *out.stride(),
        FP64=input.dtype == torch.float64, CHANNELS_FAST=layout == "channels_last", **config,
    )  # fmt: skip
    return out, argmax


@torch.library.triton_op("cnnops::_roi_pool_backward_triton", mutates_args=())
def _roi_pool_backward_triton(
    grad: torch.Tensor,
    rois: torch.Tensor,
    argmax: torch.Tensor,
    batch_size: int,
    channels: int,
    height: int,
    width: int,
) -> torch.Tensor:
    pooled = (grad.shape[2], grad.shape[3]) if grad.dim() == 4 else (1, 1)
    check_triton_grad("roi_pool", grad, rois, batch_size, channels, *pooled)
    if argmax.shape != grad.shape or argmax.dtype not in (torch.int32, torch.int64):
        raise ValueError(
            f"roi_pool backward: argmax must be an int32 (or int64) tensor shaped like grad "
            f"{tuple(grad.shape)}, got {argmax.dtype} {tuple(argmax.shape)}"
        )
    if argmax.device != grad.device:
        raise ValueError(
            f"roi_pool backward: argmax is on {argmax.device} but grad is on {grad.device}"
        )
    check_triton_roi_args("roi_pool", (batch_size, channels, height, width), grad.dtype,
                          grad.device, rois, 1.0, *pooled)  # fmt: skip
    _check_plane("roi_pool", height, width)
    # argmax's range is read in the RoI check's host sync, as the C++ backends check it.
    extremes = torch.stack(torch.aminmax(argmax)) if argmax.numel() > 0 else None
    extremes = check_roi_boxes("roi_pool", rois, batch_size, extremes)
    if extremes is not None and (extremes[0] < -1 or extremes[1] >= height * width):
        raise ValueError(
            f"roi_pool backward: argmax values must be -1 or pixel offsets in "
            f"[0, {height * width}), got values in [{extremes[0]}, {extremes[1]}]"
        )
    from cnnops.kernels import roi_pool as kernels

    # The result takes grad's layout (channels_last in, channels_last out). An argmax of -1 (an
    # empty bin) routes nothing; the kernels skip any value outside the plane.
    memory_format = roi_memory_format(grad)
    shape = (batch_size, channels, height, width)
    k = rois.shape[0]
    fp64 = grad.dtype == torch.float64
    strides = (*grad.stride(), *argmax.stride(), *rois.stride())
    if torch.are_deterministic_algorithms_enabled():
        grad_input = torch.empty(
            shape, dtype=grad.dtype, device=grad.device, memory_format=memory_format
        )
        if grad_input.numel() == 0:
            return grad_input
        if k == 0:
            return grad_input.zero_()
        # Each bin's box of pixels, from its argmaxes (the op has no spatial scale to find
        # its window from the RoI); then the pixels gather.
        boxes = torch.empty(
            (k, pooled[0] * pooled[1] + 1, 4), dtype=torch.int32, device=grad.device
        )
        torch.library.wrap_triton(kernels._roi_pool_bin_boxes_kernel)[(k,)](
            argmax, boxes, channels, height, width, *pooled, *argmax.stride(),
            **triton_config(TRITON_CONFIGS, "roi_pool_bin_boxes"),
        )  # fmt: skip
        config = triton_config(TRITON_CONFIGS, "roi_pool_bwd_deterministic")
        grid = (batch_size * height * width, channel_blocks("roi_pool", channels, config))
        torch.library.wrap_triton(kernels._roi_pool_bwd_deterministic_kernel)[grid](
            grad, argmax, rois, boxes, grad_input,
            k, batch_size, channels, height, width, *pooled,
            *strides, *grad_input.stride(),
            FP64=fp64, **config,
        )  # fmt: skip
        return grad_input
    # Atomic adds into a float32 buffer (float64 for float64), cast at the end.
    buffer = torch.empty(
        shape, dtype=torch.float64 if fp64 else torch.float32, device=grad.device,
        memory_format=memory_format,
    ).zero_()  # fmt: skip
    if buffer.numel() > 0 and grad.numel() > 0:
        layout = _layout(memory_format)
        config = triton_config(TRITON_CONFIGS, "roi_pool_bwd", layout)
        grid = roi_grid("roi_pool", k, pooled[0] * pooled[1], channels, config)
        torch.library.wrap_triton(kernels._roi_pool_bwd_kernel)[grid](
            grad, argmax, rois, buffer,
            batch_size, channels, height, width, *pooled,
            *strides, *buffer.stride(),
            FP64=fp64, CHANNELS_FAST=layout == "channels_last", **config,
        )  # fmt: skip
    return buffer if buffer.dtype == grad.dtype else buffer.to(grad.dtype)


# Explicit fake kernels: triton_op would trace the function itself, but in Triton's interpreter
# (no GPU) the kernel launches would then touch fake tensors' data.
torch.library.register_fake("cnnops::roi_pool_triton")(_roi_pool_fake)
torch.library.register_fake("cnnops::_roi_pool_backward_triton")(_roi_pool_backward_fake)
torch.library.register_autograd(
    "cnnops::roi_pool_triton",
    _autograd_formula(torch.ops.cnnops._roi_pool_backward_triton),
    setup_context=_setup_context,
)

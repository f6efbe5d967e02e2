"""cnnops.roi_align: the public function (torchvision.ops.roi_align's signature), its fake
kernels and its autograd formula. The kernels are the C++ ops `cnnops::roi_align` and
`cnnops::_roi_align_backward` (csrc/ops/roi_align.cpp), one implementation per backend, and for
the triton backend the ops `cnnops::roi_align_triton` and `cnnops::_roi_align_backward_triton`
defined here (their kernels are in cnnops.kernels.roi_align)."""

import math
import os
import struct

import torch

from cnnops.ops._backend import autocast_unifies, resolve_backend


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
    if rois.dtype != input.dtype and not autocast_unifies(input, rois):
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
    args = (input, rois, float(spatial_scale), pooled_h, pooled_w, sampling_ratio, bool(aligned))
    if resolve_backend("roi_align", input.device, backend) == "triton":
        return torch.ops.cnnops.roi_align_triton(*args)
    return torch.ops.cnnops.roi_align(*args)


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


def _autograd_formula(backward_op):
    """The backward of roi_align through `backward_op` (the C++ or the triton backward op)."""

    def backward(ctx, grad):
        (rois,) = ctx.saved_tensors
        spatial_scale, pooled_h, pooled_w, sampling_ratio, aligned = ctx.args
        n, c, h, w = ctx.input_shape
        grad_input = backward_op(
            grad, rois, spatial_scale, pooled_h, pooled_w, n, c, h, w, sampling_ratio, aligned
        )
        return grad_input, None, None, None, None, None, None

    return backward


torch.library.register_autograd(
    "cnnops::roi_align",
    _autograd_formula(torch.ops.cnnops._roi_align_backward),
    setup_context=_setup_context,
)


# ---------------------------------------------------------------------------------------------
# The triton backend: its own ops, made with triton_op so that torch.compile sees the kernels.
# The kernels live in cnnops.kernels.roi_align; roi_pool's triton ops share the argument and RoI
# checks below.

# Launch configurations, kept as data (tests/kernels/aot_compile.py compiles each).
# - roi_check: one program, BLOCK RoIs a step (the RoIs' values, and roi_align's sampling grids).
# - roi_align_fwd, roi_align_bwd (atomic): a program owns one RoI's BLOCK_BINS bins x BLOCK_C
#   channels, one config per layout of the result. channels_last: the channels across a warp
#   (16 threads x 4 contiguous values), 8 bins (7 x 7 bins in 7 programs); NCHW: the bins across
#   a warp (a RoI's 49 bins in one program), 16 channels. 4 values per thread: at 8, ptxas (which
#   caps the registers of a fixed-size block) spills a few bytes in some dtypes.
# - roi_align_bwd_deterministic: a program owns one pixel x BLOCK_C channels and walks every
#   RoI, its candidate samples BLOCK_Y rows x BLOCK_X columns at a time (2 programs a pixel for
#   256 channels; a [4, 4, 64] tile in 4 warps spills in float32 channels_last).
# Triton's interpreter (no GPU) runs programs one at a time, each op costing microseconds: its
# blocks hold all of a test's 5 channels and 7 x 7 bins, one program per RoI (the tests run
# smaller blocks too, to cover several blocks per RoI).
TRITON_CONFIGS = {
    "roi_check": {
        "gpu": dict(BLOCK=1024, num_warps=4),
        "interpreter": dict(BLOCK=8),
    },
    "roi_align_fwd": {
        "gpu": {
            "channels_last": dict(BLOCK_BINS=8, BLOCK_C=64, num_warps=4),
            "nchw": dict(BLOCK_BINS=64, BLOCK_C=16, num_warps=8),
        },
        "interpreter": {
            "channels_last": dict(BLOCK_BINS=64, BLOCK_C=8),
            "nchw": dict(BLOCK_BINS=64, BLOCK_C=8),
        },
    },
    "roi_align_bwd": {
        "gpu": {
            "channels_last": dict(BLOCK_BINS=8, BLOCK_C=64, num_warps=4),
            "nchw": dict(BLOCK_BINS=64, BLOCK_C=16, num_warps=8),
        },
        "interpreter": {
            "channels_last": dict(BLOCK_BINS=64, BLOCK_C=8),
            "nchw": dict(BLOCK_BINS=64, BLOCK_C=8),
        },
    },
    "roi_align_bwd_deterministic": {
        "gpu": dict(BLOCK_Y=4, BLOCK_X=4, BLOCK_C=128, num_warps=8),
        "interpreter": dict(BLOCK_Y=4, BLOCK_X=4, BLOCK_C=8),
    },
}

# Triton's limit on the second and third grid dimensions; the channel blocks go there.
_MAX_GRID_Y = 65535
_INT32_LIMIT = 2**31 - 1


def _interpreting():
    return os.environ.get("TRITON_INTERPRET") == "1"


def triton_config(configs, kernel, layout=None):
    """The launch configuration of `kernel` (for `layout`, "channels_last" or "nchw", when it
    has one per layout) on this machine's side: the GPU's or the interpreter's."""
    config = configs[kernel]["interpreter" if _interpreting() else "gpu"]
    return dict(config[layout] if layout is not None else config)


def scale_bits(spatial_scale, dtype):
    """The bits of spatial_scale as the kernels' compute type holds it: a float64 (an int64)
    for float64 tensors, else a float32 (an int32), rounded as C++'s static_cast<float>."""
    if dtype == torch.float64:
        return struct.unpack("<q", struct.pack("<d", spatial_scale))[0]
    try:
        single = struct.pack("<f", spatial_scale)
    except OverflowError:  # rounds past the largest float32: infinity, as in C++
        return 0x7F800000
    return struct.unpack("<i", single)[0]


def cdiv(a, b):
    return -(-a // b)


def check_triton_roi_args(op, shape, dtype, device, rois, spatial_scale, pooled_h, pooled_w):
    """check_roi_args (csrc/ops/roi_align.cpp) for the triton ops, which can be called
    directly, on an input of `shape`, `dtype` and `device`; plus the limits of the kernels'
    32-bit index math."""
    if not dtype.is_floating_point:
        raise TypeError(f"{op}: input must be floating point, got {dtype}")
    if rois.dim() != 2 or rois.shape[1] != 5:
        raise ValueError(
            f"{op}: rois must be a [K, 5] tensor of (batch index, x1, y1, x2, y2), got shape "
            f"{tuple(rois.shape)}"
        )
    if rois.dtype != dtype:
        raise TypeError(f"{op}: rois dtype {rois.dtype} does not match input dtype {dtype}")
    if rois.device != device:
        raise ValueError(f"{op}: rois are on {rois.device} but input is on {device}")
    n, _, h, w = shape
    if h <= 0 or w <= 0:
        raise ValueError(f"{op}: input must have non-zero height and width, got shape {shape}")
    if pooled_h <= 0 or pooled_w <= 0:
        raise ValueError(f"{op}: output_size must be positive, got ({pooled_h}, {pooled_w})")
    if not (math.isfinite(spatial_scale) and spatial_scale > 0):
        raise ValueError(
            f"{op}: spatial_scale must be a positive finite number, got {spatial_scale}"
        )
    bins = pooled_h * pooled_w
    if n * h * w > _INT32_LIMIT or rois.shape[0] * bins > _INT32_LIMIT:
        raise ValueError(
            f"{op}: the triton backend takes batch * height * width and rois * pooled_height * "
            f"pooled_width below 2^31, got input {shape}, {rois.shape[0]} rois, output_size "
            f"({pooled_h}, {pooled_w})"
        )


def channel_blocks(op, channels, config):
    """The channel blocks of a launch: the grid's second dimension."""
    blocks = cdiv(channels, config["BLOCK_C"])
    if blocks > _MAX_GRID_Y:
        raise ValueError(
            f"{op}: the triton backend takes at most {_MAX_GRID_Y * config['BLOCK_C']} "
            f"channels, got {channels}"
        )
    return blocks


def _check_sampling(pooled_h, pooled_w, sampling_ratio):
    """The sampling grids the roi_align kernels take (kernels/roi_align.py: MAX_GRID): the
    RoIs' own are checked with their coordinates (check_roi_boxes)."""
    from cnnops.kernels.roi_align import MAX_GRID

    if sampling_ratio > MAX_GRID.value:
        raise RuntimeError(
            f"roi_align: sampling_ratio {sampling_ratio} asks for a {sampling_ratio} x "
            f"{sampling_ratio} sampling grid in each bin, more than the triton backend takes "
            f"({MAX_GRID.value} points a side)"
        )
    if max(pooled_h, pooled_w) * MAX_GRID.value > _INT32_LIMIT:
        raise ValueError(
            f"roi_align: the triton backend takes output sizes below 32768, got "
            f"({pooled_h}, {pooled_w})"
        )


def _grid_message(op, index, roi, grid):
    """check_roi_boxes' message for a RoI whose sampling grid is too large (the kernel found
    it; this recomputes its size, in float64, to say how large)."""
    from cnnops.kernels.roi_align import MAX_GRID, MAX_ROI_SAMPLES

    spatial_scale, pooled_h, pooled_w, sampling_ratio, aligned = grid
    offset = 0.5 if aligned else 0.0
    _, x1, y1, x2, y2 = (v * spatial_scale - offset for v in roi)
    width, height = x2 - x1, y2 - y1
    if not aligned:
        width, height = max(width, 1.0), max(height, 1.0)
    sides = [
        float(sampling_ratio) if sampling_ratio > 0 else max(size / pooled, 0.0)
        for size, pooled in ((height, pooled_h), (width, pooled_w))
    ]
    sides = [math.ceil(v) if math.isfinite(v) else v for v in sides]
    return (
        f"{op}: rois[{index}] needs a {sides[0]:.0f} x {sides[1]:.0f} sampling grid in each of its "
        f"{pooled_h} x {pooled_w} bins, more than the triton backend takes "
        f"({MAX_GRID.value} points a side, {MAX_ROI_SAMPLES.value} in all)"
    )


def _is_traced(t):
    """Whether `t` is a tracing stand-in (fake or meta) rather than data."""
    from torch._subclasses.fake_tensor import is_fake

    return t.device.type == "meta" or is_fake(t)


def check_roi_boxes(op, rois, batch_size, extra=None, grid=None):
    """check_roi_boxes (csrc/ops/roi_align.cpp) for the triton ops: one kernel finds the first
    RoI with a non-finite coordinate or a batch index that is not an integer in
    [0, batch_size), and with `grid` (roi_align's spatial_scale, pooled_h, pooled_w,
    sampling_ratio, aligned) the first whose sampling grid is larger than the kernels take;
    one host sync reads both, before any other kernel runs. `extra`, an integer tensor of a few
    values on the RoIs' device, is read in the same sync and returned as a list. (When
    torch.compile traces an op into its kernels the check is left out, and None returned: the
    kernels clamp every index and grid, so bad RoIs then give wrong values, never out-of-bounds
    reads.)"""
    k = rois.shape[0]
    if _is_traced(rois):
        return None
    if k == 0:
        return None if extra is None else extra.tolist()
    from cnnops.kernels import roi_align as kernels

    result = torch.empty((2,), dtype=torch.int32, device=rois.device)
    spatial_scale, pooled_h, pooled_w, sampling_ratio, aligned = grid or (1.0, 1, 1, 1, False)
    fp64 = rois.dtype == torch.float64
    torch.library.wrap_triton(kernels.roi_check_kernel)[(1,)](
        rois, result, k, batch_size, *rois.stride(),
        scale_bits(spatial_scale, rois.dtype), pooled_h, pooled_w, sampling_ratio,
        FP64=fp64, CHECK_GRID=grid is not None, ALIGNED=aligned,
        **triton_config(TRITON_CONFIGS, "roi_check"),
    )  # fmt: skip
    if extra is not None:
        result = torch.cat([result.to(extra.dtype), extra])
    bad_box, bad_grid, *values = result.tolist()
    if bad_box < k:
        index, x1, y1, x2, y2 = rois[bad_box].double().tolist()
        if not all(math.isfinite(v) for v in (x1, y1, x2, y2)):
            raise RuntimeError(
                f"{op}: rois[{bad_box}] has a non-finite coordinate ({x1:g}, {y1:g}, {x2:g}, "
                f"{y2:g})"
            )
        raise RuntimeError(
            f"{op}: rois[{bad_box}] has batch index {index:g}, expected an integer in "
            f"[0, {batch_size})"
        )
    if bad_grid < k:
        raise RuntimeError(_grid_message(op, bad_grid, rois[bad_grid].double().tolist(), grid))
    return values if extra is not None else None


def _layout(memory_format):
    return "channels_last" if memory_format == torch.channels_last else "nchw"


def roi_grid(op, k, bins, channels, config):
    """(RoIs x bin blocks, channel blocks): the grid of the per-RoI kernels."""
    return (k * cdiv(bins, config["BLOCK_BINS"]), channel_blocks(op, channels, config))


@torch.library.triton_op("cnnops::roi_align_triton", mutates_args=())
def _roi_align_triton(
    input: torch.Tensor,
    rois: torch.Tensor,
    spatial_scale: float,
    pooled_height: int,
    pooled_width: int,
    sampling_ratio: int,
    aligned: bool,
) -> torch.Tensor:
    if input.dim() != 4:
        raise ValueError(
            f"roi_align: input must be 4-D (N, C, H, W), got shape {tuple(input.shape)}"
        )
    check_triton_roi_args("roi_align", tuple(input.shape), input.dtype, input.device, rois,
                          spatial_scale, pooled_height, pooled_width)  # fmt: skip
    n, c, h, w = input.shape
    k = rois.shape[0]
    memory_format = roi_memory_format(input)
    out = torch.empty(
        (k, c, pooled_height, pooled_width), dtype=input.dtype, device=input.device,
        memory_format=memory_format,
    )  # fmt: skip
    _check_sampling(pooled_height, pooled_width, sampling_ratio)
    sampling = (spatial_scale, pooled_height, pooled_width, sampling_ratio, aligned)
    check_roi_boxes("roi_align", rois, n, grid=sampling)
    if out.numel() == 0:
        return out
    from cnnops.kernels import roi_align as kernels

    layout = _layout(memory_format)
    config = triton_config(TRITON_CONFIGS, "roi_align_fwd", layout)
    fp64 = input.dtype == torch.float64
    grid = roi_grid("roi_align", k, pooled_height * pooled_width, c, config)
    torch.library.wrap_triton(kernels._roi_align_fwd_kernel)[grid](
        input, rois, out,
        n, c, h, w, pooled_height, pooled_width, sampling_ratio,
        scale_bits(spatial_scale, input.dtype),
        *input.stride(), *rois.stride(), *out.stride(),
        ALIGNED=aligned, FP64=fp64, CHANNELS_FAST=layout == "channels_last", **config,
    )  # fmt: skip
    return out


def check_triton_grad(op, grad, rois, batch_size, channels, pooled_h, pooled_w):
    """The backward ops' own checks: grad shaped (K, C, pooled_h, pooled_w)."""
    if (
        grad.dim() != 4
        or grad.shape[0] != rois.shape[0]
        or grad.shape[1] != channels
        or grad.shape[2] != pooled_h
        or grad.shape[3] != pooled_w
    ):
        raise ValueError(
            f"{op} backward: grad must be (K, C, pooled_height, pooled_width) = "
            f"({rois.shape[0]}, {channels}, {pooled_h}, {pooled_w}), got {tuple(grad.shape)}"
        )
    if batch_size < 0 or channels < 0:
        raise ValueError(f"{op} backward: batch_size and channels must be >= 0")


@torch.library.triton_op("cnnops::_roi_align_backward_triton", mutates_args=())
def _roi_align_backward_triton(
    grad: torch.Tensor,
    rois: torch.Tensor,
    spatial_scale: float,
    pooled_height: int,
    pooled_width: int,
    batch_size: int,
    channels: int,
    height: int,
    width: int,
    sampling_ratio: int,
    aligned: bool,
) -> torch.Tensor:
    pooled = (pooled_height, pooled_width)
    check_triton_grad("roi_align", grad, rois, batch_size, channels, *pooled)
    shape = (batch_size, channels, height, width)
    check_triton_roi_args("roi_align", shape, grad.dtype, grad.device, rois, spatial_scale,
                          *pooled)  # fmt: skip
    _check_sampling(pooled_height, pooled_width, sampling_ratio)
    sampling = (spatial_scale, pooled_height, pooled_width, sampling_ratio, aligned)
    check_roi_boxes("roi_align", rois, batch_size, grid=sampling)
    from cnnops.kernels import roi_align as kernels

    # The result takes grad's layout (channels_last in, channels_last out).
    memory_format = roi_memory_format(grad)
    k = rois.shape[0]
    fp64 = grad.dtype == torch.float64
    common = (
        pooled_height, pooled_width, sampling_ratio, scale_bits(spatial_scale, grad.dtype),
        *grad.stride(), *rois.stride(),
    )  # fmt: skip
    if torch.are_deterministic_algorithms_enabled():
        grad_input = torch.empty(
            shape, dtype=grad.dtype, device=grad.device, memory_format=memory_format
        )
        if grad_input.numel() == 0:
            return grad_input
        if k == 0:
            return grad_input.zero_()
        config = triton_config(TRITON_CONFIGS, "roi_align_bwd_deterministic")
        grid = (batch_size * height * width, channel_blocks("roi_align", channels, config))
        torch.library.wrap_triton(kernels._roi_align_bwd_deterministic_kernel)[grid](
            grad, rois, grad_input,
            k, batch_size, channels, height, width, *common, *grad_input.stride(),
            ALIGNED=aligned, FP64=fp64, **config,
        )  # fmt: skip
        return grad_input
    # Atomic adds into a float32 buffer (float64 for float64), cast at the end.
    buffer = torch.empty(
        shape, dtype=torch.float64 if fp64 else torch.float32, device=grad.device,
        memory_format=memory_format,
    ).zero_()  # fmt: skip
    if buffer.numel() > 0 and grad.numel() > 0:
        layout = _layout(memory_format)
        config = triton_config(TRITON_CONFIGS, "roi_align_bwd", layout)
        grid = roi_grid("roi_align", k, pooled_height * pooled_width, channels, config)
        torch.library.wrap_triton(kernels._roi_align_bwd_kernel)[grid](
            grad, rois, buffer,
            batch_size, channels, height, width, *common, *buffer.stride(),
            ALIGNED=aligned, FP64=fp64, CHANNELS_FAST=layout == "channels_last", **config,
        )  # fmt: skip
    return buffer if buffer.dtype == grad.dtype else buffer.to(grad.dtype)


# Explicit fake kernels: triton_op would trace the function itself, but in Triton's interpreter
# (no GPU) the kernel launches would then touch fake tensors' data.
torch.library.register_fake("cnnops::roi_align_triton")(_roi_align_fake)
torch.library.register_fake("cnnops::_roi_align_backward_triton")(_roi_align_backward_fake)
torch.library.register_autograd(
    "cnnops::roi_align_triton",
    _autograd_formula(torch.ops.cnnops._roi_align_backward_triton),
    setup_context=_setup_context,
)

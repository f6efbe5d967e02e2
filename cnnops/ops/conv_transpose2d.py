"""cnnops.conv_transpose2d: the public function, its fake kernels and its autograd formula.

A transposed convolution is conv2d's grad input: conv_transpose2d(x, weight) is the gradient,
with respect to its input, of the conv2d (same weight, stride, padding, dilation, groups) whose
input has the transposed output's size, given x as that conv2d's grad output. Its kernels are
conv2d's grad-input kernels on every backend (`cnnops::conv_transpose2d` in csrc/ops, and the
triton op below), and its gradients are conv2d's other two computations:
- grad x = conv2d(grad y, weight), the conv2d forward;
- grad weight = conv2d's grad weight with the roles of grad output and input exchanged (x is
  the grad output, grad y the input);
- grad bias = grad y summed over (N, H, W).
"""

import torch

from cnnops.ops._backend import resolve_backend
from cnnops.ops.conv2d import (
    ALGOS,
    BACKEND_ALGOS,
    _check_tensors,
    _is_depthwise,
    _needs_autograd,
    _pair,
    _triton_algo,
    conv2d_memory_format,
    triton_grad_input,
)

OP = "conv_transpose2d"


def conv_transpose2d_output_shape(
    input_shape, weight_shape, stride, padding, output_padding, dilation, groups
):
    """Checks a conv_transpose2d problem's sizes and returns the output shape (N, C_out, H, W).

    The C++ kernels run the same checks (csrc/ops/conv2d.cpp: conv_transpose2d_shape); this copy
    lets the public function and the fake kernels raise before any kernel is reached.
    """
    if len(input_shape) != 4:
        raise ValueError(f"{OP}: input must be 4-D (N, C, H, W), got shape {tuple(input_shape)}")
    if len(weight_shape) != 4:
        raise ValueError(
            f"{OP}: weight must be 4-D (C_in, C_out/groups, kH, kW), got shape "
            f"{tuple(weight_shape)}"
        )
    for name, pair, low in (
        ("stride", stride, 1),
        ("padding", padding, 0),
        ("output_padding", output_padding, 0),
        ("dilation", dilation, 1),
    ):
        if any(v < low for v in pair):
            raise ValueError(f"{OP}: {name} must be >= {low}, got {tuple(pair)}")
    for op, s, d in zip(output_padding, stride, dilation, strict=True):
        # torch's rule: the extra rows/columns must be ones that stride or dilation leaves unread.
        if op >= s and op >= d:
            raise ValueError(
                f"{OP}: output_padding must be smaller than stride or dilation, got "
                f"output_padding {tuple(output_padding)}, stride {tuple(stride)}, "
                f"dilation {tuple(dilation)}"
            )
    if groups < 1:
        raise ValueError(f"{OP}: groups must be >= 1, got {groups}")
    n, c_in, h, w = input_shape
    wc_in, c_out_per_group, r, s = weight_shape
    if wc_in != c_in:
        raise ValueError(f"{OP}: weight.size(0) ({wc_in}) must equal the input channels ({c_in})")
    if c_in % groups:
        raise ValueError(f"{OP}: groups ({groups}) must divide the input channels ({c_in})")
    if min(c_out_per_group, r, s) == 0:
        raise ValueError(
            f"{OP}: weight must have no zero-sized dimension, got {tuple(weight_shape)}"
        )
    if min(c_in, h, w) == 0:
        raise ValueError(
            f"{OP}: input must have non-zero channels, height and width, got {tuple(input_shape)}"
        )
    out_h, out_w = (
        (i - 1) * st - 2 * p + d * (k - 1) + op + 1
        for i, st, p, d, k, op in zip(
            (h, w), stride, padding, dilation, (r, s), output_padding, strict=True
        )
    )
    if out_h <= 0 or out_w <= 0:
        raise ValueError(
            f"{OP}: the output size ({out_h} x {out_w}) must be positive; padding "
            f"{tuple(padding)} is too large"
        )
    return (n, c_out_per_group * groups, out_h, out_w)


def _extra_rows(output_padding, stride):
    """How many rows and columns the conv2d over the transposed output has beyond the input's:
    output_padding // stride, nonzero only when output_padding >= stride (then dilation is
    larger). Its taps reach the last output rows from input rows past the end, which count as
    zeros."""
    return tuple(op // s for op, s in zip(output_padding, stride, strict=True))


def _not_depthwise_message(in_channels, out_channels, groups):
    return (
        f"{OP}: algo 'depthwise' needs a depthwise layer (groups == output channels, input "
        f"channels a multiple of them); got groups={groups}, {in_channels} input and "
        f"{out_channels} output channels"
    )


def _check_algo(algo, backend, input, weight, groups):
    if algo != "auto" and algo not in ALGOS:
        raise ValueError(f"{OP}: unknown algo {algo!r}; expected 'auto' or one of {ALGOS}")
    if algo != "auto" and algo not in BACKEND_ALGOS[backend]:
        raise ValueError(
            f"{OP}: algo {algo!r} is not available on the {backend} backend "
            f"(it has: {', '.join(BACKEND_ALGOS[backend])})"
        )
    # Depthwise as the conv2d whose grad input this is sees it: that conv2d's input channels
    # are our output channels.
    c_out = weight.shape[1] * groups
    if algo == "depthwise" and not _is_depthwise(c_out, input.shape[1], groups):
        raise ValueError(_not_depthwise_message(input.shape[1], c_out, groups))


def conv_transpose2d(
    input,
    weight,
    bias=None,
    stride=1,
    padding=0,
    output_padding=0,
    groups=1,
    dilation=1,
    *,
    algo="auto",
    backend=None,
):
    """2-D transposed convolution with the signature of torch.nn.functional.conv_transpose2d
    (weight (C_in, C_out/groups, kH, kW)).

    algo: "auto", "direct", "im2col", "implicit_gemm" or "depthwise" (groups == output channels,
        input channels a multiple of them), where the backend has it (cnnops.conv2d's
        BACKEND_ALGOS): the algorithm of conv2d's grad input, which computes this.
    backend: None (see cnnops.use_backend), "cpu", "cuda" or "triton".
    An explicit algo or backend that cannot serve the call raises.
    """
    _check_tensors(input, weight, bias, OP)
    if isinstance(groups, bool) or not isinstance(groups, int):
        raise TypeError(f"{OP}: groups must be an int, got {groups!r}")
    stride = _pair(stride, "stride", OP)
    padding = _pair(padding, "padding", OP)
    output_padding = _pair(output_padding, "output_padding", OP)
    dilation = _pair(dilation, "dilation", OP)
    shape = conv_transpose2d_output_shape(
        input.shape, weight.shape, stride, padding, output_padding, dilation, groups
    )
    if bias is not None and tuple(bias.shape) != (shape[1],):
        raise ValueError(f"{OP}: bias must have shape ({shape[1]},), got {tuple(bias.shape)}")

    backend = resolve_backend(OP, input.device, backend)
    _check_algo(algo, backend, input, weight, groups)
    args = (input, weight, bias, stride, padding, output_padding, dilation, groups, algo)
    if backend == "triton":
        return torch.ops.cnnops.conv_transpose2d_triton.default(*args)
    if _needs_autograd(input, weight, bias):
        return torch.ops.cnnops.conv_transpose2d.default(*args)
    # No gradient can flow: skip the Python autograd kernel (see cnnops.conv2d).
    with torch._C._AutoDispatchBelowAutograd():
        return torch.ops.cnnops.conv_transpose2d.default(*args)


@torch.library.register_fake("cnnops::conv_transpose2d")
def _conv_transpose2d_fake(
    input, weight, bias, stride, padding, output_padding, dilation, groups, algo
):
    shape = conv_transpose2d_output_shape(
        input.shape, weight.shape, stride, padding, output_padding, dilation, groups
    )
    return input.new_empty(shape).contiguous(memory_format=conv2d_memory_format(input))


def _setup_context(ctx, inputs, output):
    input, weight, bias, stride, padding, output_padding, dilation, groups, algo = inputs
    ctx.save_for_backward(input, weight)
    ctx.conv_args = (stride, padding, dilation, groups, algo)
    ctx.extra = _extra_rows(output_padding, stride)
    ctx.has_bias = bias is not None


def _autograd_formula(conv_op, conv_backward_op):
    """The backward of a conv_transpose2d op through the conv2d ops of its backend (the module
    docstring has the formulas); only the gradients that are needed are computed."""

    def backward(ctx, grad_output):
        input, weight = ctx.saved_tensors
        extra_h, extra_w = ctx.extra
        grad_input = grad_weight = grad_bias = None
        if ctx.needs_input_grad[0]:
            grad_input = conv_op(grad_output, weight, None, *ctx.conv_args)
            if extra_h or extra_w:
                # The conv2d's extra output rows/columns belong to no input pixel.
                grad_input = grad_input[:, :, : input.shape[2], : input.shape[3]]
        if ctx.needs_input_grad[1]:
            if extra_h or extra_w:
                input = torch.nn.functional.pad(input, [0, extra_w, 0, extra_h])
            _, grad_weight, _ = conv_backward_op(
                input, grad_output, weight, *ctx.conv_args, [False, True, False]
            )
        if ctx.has_bias and ctx.needs_input_grad[2]:
            grad_bias = grad_output.sum((0, 2, 3))
        # stride, padding, output_padding, dilation, groups, algo
        return (grad_input, grad_weight, grad_bias) + (None,) * 6

    return backward


torch.library.register_autograd(
    "cnnops::conv_transpose2d",
    _autograd_formula(torch.ops.cnnops.conv2d.default, torch.ops.cnnops._conv2d_backward.default),
    setup_context=_setup_context,
)


# ---------------------------------------------------------------------------------------------
# The triton backend: conv2d's grad-input kernels (cnnops.ops.conv2d.triton_grad_input) as an
# op of its own, made with triton_op so that torch.compile sees the kernels.


@torch.library.triton_op("cnnops::conv_transpose2d_triton", mutates_args=())
def _conv_transpose2d_triton(
    input: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    stride: list[int],
    padding: list[int],
    output_padding: list[int],
    dilation: list[int],
    groups: int,
    algo: str,
) -> torch.Tensor:
    n, c_out, h, w = conv_transpose2d_output_shape(
        input.shape, weight.shape, stride, padding, output_padding, dilation, groups
    )
    if bias is not None and tuple(bias.shape) != (c_out,):
        raise ValueError(f"{OP}: bias must have shape ({c_out},), got {tuple(bias.shape)}")
    _check_algo(algo, "triton", input, weight, groups)
    extra_h, extra_w = _extra_rows(output_padding, stride)
    # The conv2d whose grad input this is: its input is our output, its output our input
    # (zero-padded by the extra rows, if any).
    g = dict(
        n=n, c=c_out, h=h, w=w, k=input.shape[1], r=weight.shape[2], s=weight.shape[3],
        p=input.shape[2] + extra_h, q=input.shape[3] + extra_w,
    )  # fmt: skip
    algo = _triton_algo(algo, g, groups, input.dtype)
    out = input.new_empty((n, c_out, h, w)).contiguous(memory_format=conv2d_memory_format(input))
    if out.numel() == 0:
        return out
    grad_output = input
    if extra_h or extra_w:
        grad_output = torch.nn.functional.pad(input, [0, extra_w, 0, extra_h])
    triton_grad_input(grad_output, weight, out, g, stride, padding, dilation, groups, algo)
    if bias is not None:
        out.add_(bias.view(1, -1, 1, 1))
    return out


# Explicit fake kernel: triton_op would trace the function itself, but in Triton's interpreter
# (no GPU) the kernel launches would then touch fake tensors' data.
torch.library.register_fake("cnnops::conv_transpose2d_triton")(_conv_transpose2d_fake)

torch.library.register_autograd(
    "cnnops::conv_transpose2d_triton",
    _autograd_formula(
        torch.ops.cnnops.conv2d_triton.default, torch.ops.cnnops._conv2d_triton_backward.default
    ),
    setup_context=_setup_context,
)

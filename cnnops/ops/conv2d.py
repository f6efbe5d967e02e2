"""cnnops.conv2d: the public function, its fake kernel and its autograd formula.

The kernels are the C++ ops `cnnops::conv2d` and `cnnops::_conv2d_backward` (csrc/ops/), one
implementation per backend. This module normalises the arguments the way
torch.nn.functional.conv2d accepts them, checks them, picks the backend and calls the op; the
kernels resolve algo="auto" themselves, separately for the forward and backward pass.
"""

import torch
import torch.nn.functional as F

from cnnops.ops._backend import resolve_backend

ALGOS = ("direct", "im2col", "implicit_gemm", "depthwise")

# The algorithms each backend has kernels for.
BACKEND_ALGOS = {
    "cpu": ("direct", "im2col", "depthwise"),
    "cuda": ("direct", "im2col"),
    "triton": ("depthwise",),
}


def _pair(value, name):
    if isinstance(value, bool):
        raise TypeError(f"conv2d: {name} must be an int or a pair of ints, got {value!r}")
    if isinstance(value, int):
        return (value, value)
    if (
        isinstance(value, (tuple, list))
        and len(value) == 2
        and all(isinstance(v, int) and not isinstance(v, bool) for v in value)
    ):
        return tuple(value)
    if isinstance(value, (tuple, list)) and len(value) == 1 and isinstance(value[0], int):
        return (value[0], value[0])
    raise TypeError(f"conv2d: {name} must be an int or a pair of ints, got {value!r}")


def conv2d_output_shape(input_shape, weight_shape, stride, padding, dilation, groups):
    """Checks a conv2d problem's sizes and returns the output shape (N, C_out, P, Q).

    The C++ kernels run the same checks (csrc/ops/conv2d.cpp: conv2d_shape); this copy lets the
    public function and the fake kernel raise before any kernel is reached.
    """
    if len(input_shape) != 4:
        raise ValueError(f"conv2d: input must be 4-D (N, C, H, W), got shape {tuple(input_shape)}")
    if len(weight_shape) != 4:
        raise ValueError(
            "conv2d: weight must be 4-D (C_out, C_in/groups, kH, kW), got shape "
            f"{tuple(weight_shape)}"
        )
    for name, pair, low in (
        ("stride", stride, 1),
        ("padding", padding, 0),
        ("dilation", dilation, 1),
    ):
        if any(v < low for v in pair):
            raise ValueError(f"conv2d: {name} must be >= {low}, got {tuple(pair)}")
    if groups < 1:
        raise ValueError(f"conv2d: groups must be >= 1, got {groups}")
    n, c, h, w = input_shape
    k, c_per_group, r, s = weight_shape
    if c % groups:
        raise ValueError(f"conv2d: groups ({groups}) must divide the input channels ({c})")
    if k % groups:
        raise ValueError(
            f"conv2d: groups ({groups}) must divide the output channels (weight.size(0) = {k})"
        )
    if c_per_group * groups != c:
        raise ValueError(
            f"conv2d: weight.size(1) ({c_per_group}) times groups ({groups}) must equal the "
            f"input channels ({c})"
        )
    if min(k, r, s) == 0:
        raise ValueError(
            f"conv2d: weight must have no zero-sized dimension, got {tuple(weight_shape)}"
        )
    if min(c, h, w) == 0:
        raise ValueError(
            f"conv2d: input must have non-zero channels, height and width, got {tuple(input_shape)}"
        )
    eff_h = dilation[0] * (r - 1) + 1
    eff_w = dilation[1] * (s - 1) + 1
    if eff_h > h + 2 * padding[0] or eff_w > w + 2 * padding[1]:
        raise ValueError(
            f"conv2d: the dilated kernel ({eff_h} x {eff_w}) is larger than the padded input "
            f"({h + 2 * padding[0]} x {w + 2 * padding[1]})"
        )
    p = (h + 2 * padding[0] - eff_h) // stride[0] + 1
    q = (w + 2 * padding[1] - eff_w) // stride[1] + 1
    return (n, k, p, q)


def conv2d_memory_format(input):
    """The output's memory format; the same rule as the C++ conv2d_memory_format."""
    if input.is_contiguous(memory_format=torch.channels_last) and not input.is_contiguous():
        return torch.channels_last
    return torch.contiguous_format


def _check_tensors(input, weight, bias):
    for name, t in (("input", input), ("weight", weight)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"conv2d: {name} must be a Tensor, got {type(t).__name__}")
    if bias is not None and not isinstance(bias, torch.Tensor):
        raise TypeError(f"conv2d: bias must be a Tensor or None, got {type(bias).__name__}")
    if not input.is_floating_point():
        raise TypeError(f"conv2d: input must be a floating-point tensor, got {input.dtype}")
    for name, t in (("weight", weight), ("bias", bias)):
        if t is None:
            continue
        if t.dtype != input.dtype:
            raise TypeError(
                f"conv2d: {name} dtype {t.dtype} does not match input dtype {input.dtype}"
            )
        if t.device != input.device:
            raise ValueError(
                f"conv2d: {name} is on {t.device} but input is on {input.device}; "
                "they must be on the same device"
            )


def _same_padding(input, weight, stride, dilation):
    """Padding for padding="same": symmetric where possible, the odd pixel at the bottom/right
    as torch puts it."""
    if stride != (1, 1):
        raise ValueError(f"conv2d: padding='same' needs stride 1, got stride {stride}")
    total = [d * (k - 1) for d, k in zip(dilation, weight.shape[2:], strict=True)]
    before = tuple(t // 2 for t in total)
    extra = [t - 2 * b for t, b in zip(total, before, strict=True)]
    if any(extra):
        # The op pads symmetrically; torch puts the odd pixel of 'same' padding at the end.
        input = F.pad(input, [0, extra[1], 0, extra[0]])
    return input, before


def conv2d(
    input,
    weight,
    bias=None,
    stride=1,
    padding=0,
    dilation=1,
    groups=1,
    *,
    algo="auto",
    backend=None,
):
    """2-D convolution with the signature of torch.nn.functional.conv2d.

    algo: "auto", "direct", "im2col" or "depthwise" (groups == input channels), where the backend
        has it (BACKEND_ALGOS).
        "auto" lets the backend choose, separately for the forward and the backward pass.
    backend: None (see cnnops.use_backend), "cpu", "cuda" or "triton".
    An explicit algo or backend that cannot serve the call raises.
    """
    _check_tensors(input, weight, bias)
    if isinstance(groups, bool) or not isinstance(groups, int):
        raise TypeError(f"conv2d: groups must be an int, got {groups!r}")
    stride = _pair(stride, "stride")
    dilation = _pair(dilation, "dilation")
    if isinstance(padding, str):
        if padding == "valid":
            padding = (0, 0)
        elif padding == "same":
            if weight.dim() != 4:
                raise ValueError(f"conv2d: weight must be 4-D, got shape {tuple(weight.shape)}")
            input, padding = _same_padding(input, weight, stride, dilation)
        else:
            raise ValueError(
                f"conv2d: padding must be 'same', 'valid', an int or a pair, got {padding!r}"
            )
    else:
        padding = _pair(padding, "padding")
    conv2d_output_shape(input.shape, weight.shape, stride, padding, dilation, groups)

    backend = resolve_backend("conv2d", input.device, backend)
    if algo != "auto" and algo not in ALGOS:
        raise ValueError(f"conv2d: unknown algo {algo!r}; expected 'auto' or one of {ALGOS}")
    # "auto" goes to the kernels, which pick per pass: the best forward and the best backward
    # algorithm for a shape can differ (csrc/ops/cpu/conv2d_kernel.cpp: conv2d_cpu).
    if algo != "auto" and algo not in BACKEND_ALGOS[backend]:
        raise ValueError(
            f"conv2d: algo {algo!r} is not available on the {backend} backend "
            f"(it has: {', '.join(BACKEND_ALGOS[backend])})"
        )
    depthwise = groups == input.shape[1] and weight.shape[0] % groups == 0
    if not depthwise and (algo == "depthwise" or backend == "triton"):
        who = (
            "algo 'depthwise'"
            if algo == "depthwise"
            else "the triton backend (so far only its depthwise algorithm)"
        )
        raise ValueError(
            f"conv2d: {who} needs a depthwise layer (groups == input channels, output channels a "
            f"multiple of them); got groups={groups}, {input.shape[1]} input and "
            f"{weight.shape[0]} output channels"
        )
    args = (input, weight, bias, stride, padding, dilation, groups, algo)
    if backend == "triton":
        return torch.ops.cnnops.conv2d_triton.default(*args)
    if _needs_autograd(input, weight, bias):
        return torch.ops.cnnops.conv2d.default(*args)
    # No gradient can flow: skip the Python autograd kernel that register_autograd installs. It
    # only redispatches here, and costs ~10 us a call, 5% of a batch-1 ResNeXt layer.
    with torch._C._AutoDispatchBelowAutograd():
        return torch.ops.cnnops.conv2d.default(*args)


def _needs_autograd(*tensors):
    """Whether a call must go through the autograd kernel. Always under torch.compile, which
    traces the op through its autograd formula and cannot trace the dispatch guard."""
    if torch.compiler.is_compiling():
        return True
    return torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)


@torch.library.register_fake("cnnops::conv2d")
def _conv2d_fake(input, weight, bias, stride, padding, dilation, groups, algo):
    shape = conv2d_output_shape(input.shape, weight.shape, stride, padding, dilation, groups)
    return input.new_empty(shape).contiguous(memory_format=conv2d_memory_format(input))


@torch.library.register_fake("cnnops::_conv2d_backward")
def _conv2d_backward_fake(
    grad_output, input, weight, stride, padding, dilation, groups, algo, output_mask
):
    grad_input = (
        torch.empty_like(input, memory_format=conv2d_memory_format(input))
        if output_mask[0]
        else input.new_empty(0)
    )
    grad_weight = (
        torch.empty_like(weight, memory_format=torch.contiguous_format)
        if output_mask[1]
        else input.new_empty(0)
    )
    grad_bias = weight.new_empty(weight.shape[0]) if output_mask[2] else input.new_empty(0)
    return grad_input, grad_weight, grad_bias


def _setup_context(ctx, inputs, output):
    input, weight, bias, stride, padding, dilation, groups, algo = inputs
    ctx.save_for_backward(input, weight)
    ctx.conv_args = (stride, padding, dilation, groups, algo)
    ctx.has_bias = bias is not None


def _autograd_formula(backward_op):
    """The backward of a conv2d op (C++ or Triton) through its backward op, which computes only
    the gradients that are needed."""

    def backward(ctx, grad_output):
        input, weight = ctx.saved_tensors
        mask = [
            ctx.needs_input_grad[0],
            ctx.needs_input_grad[1],
            ctx.has_bias and ctx.needs_input_grad[2],
        ]
        grads = backward_op(grad_output, input, weight, *ctx.conv_args, mask)
        needed = tuple(grad if need else None for grad, need in zip(grads, mask, strict=True))
        return needed + (None,) * 5  # stride, padding, dilation, groups, algo

    return backward


torch.library.register_autograd(
    "cnnops::conv2d",
    _autograd_formula(torch.ops.cnnops._conv2d_backward),
    setup_context=_setup_context,
)


# ---------------------------------------------------------------------------------------------
# The triton backend: its own ops, made with triton_op so that torch.compile sees the kernels.
# The kernels live in cnnops.kernels.conv2d; so far the depthwise algorithm.

# Launch configurations, kept as data: block sizes per kernel.
TRITON_CONFIGS = {
    "depthwise_forward": {"BLOCK_Q": 16, "BLOCK_C": 32},
    "depthwise_grad_input": {"BLOCK_X": 16, "BLOCK_C": 32},
    "depthwise_grad_weight": {"BLOCK_PIX": 64, "BLOCK_C": 32},
}


def _triton_conv_geometry(input, weight, stride, padding, dilation):
    n, c, h, w = input.shape
    k, _, r, s = weight.shape
    _, _, p, q = conv2d_output_shape(input.shape, weight.shape, stride, padding, dilation, c)
    return dict(n=n, c=c, h=h, w=w, k=k, r=r, s=s, p=p, q=q)


def _check_triton_algo(algo):
    # Again here: the triton ops can be called directly, without conv2d()'s checks.
    if algo != "auto" and algo not in BACKEND_ALGOS["triton"]:
        raise ValueError(
            f"conv2d: algo {algo!r} is not available on the triton backend "
            f"(it has: {', '.join(BACKEND_ALGOS['triton'])})"
        )


@torch.library.triton_op("cnnops::conv2d_triton", mutates_args=())
def _conv2d_triton(
    input: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    stride: list[int],
    padding: list[int],
    dilation: list[int],
    groups: int,
    algo: str,
) -> torch.Tensor:
    import triton

    from cnnops.kernels import conv2d as kernels

    _check_triton_algo(algo)
    g = _triton_conv_geometry(input, weight, stride, padding, dilation)
    out = input.new_empty((g["n"], g["k"], g["p"], g["q"])).contiguous(
        memory_format=conv2d_memory_format(input)
    )
    if out.numel() == 0:
        return out
    cfg = TRITON_CONFIGS["depthwise_forward"]
    w = weight.contiguous()
    grid = (
        g["n"] * g["p"],
        triton.cdiv(g["q"], cfg["BLOCK_Q"]),
        triton.cdiv(g["k"], cfg["BLOCK_C"]),
    )
    torch.library.wrap_triton(kernels.depthwise_forward_kernel)[grid](
        input, w, bias if bias is not None else w, out,
        g["h"], g["w"], g["p"], g["q"], g["k"], g["k"] // g["c"],
        *input.stride(), *out.stride(),
        padding[0], padding[1], dilation[0], dilation[1],
        R=g["r"], S=g["s"], STRIDE_H=stride[0], STRIDE_W=stride[1],
        HAS_BIAS=bias is not None, FP64=input.dtype == torch.float64, **cfg,
    )  # fmt: skip
    return out


@torch.library.triton_op("cnnops::_conv2d_triton_backward", mutates_args=())
def _conv2d_triton_backward(
    grad_output: torch.Tensor,
    input: torch.Tensor,
    weight: torch.Tensor,
    stride: list[int],
    padding: list[int],
    dilation: list[int],
    groups: int,
    algo: str,
    output_mask: list[bool],
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    import triton

    from cnnops.kernels import conv2d as kernels

    _check_triton_algo(algo)
    g = _triton_conv_geometry(input, weight, stride, padding, dilation)
    mult = g["k"] // g["c"]
    conv = (padding[0], padding[1], dilation[0], dilation[1])
    fp64 = input.dtype == torch.float64
    taps = dict(R=g["r"], S=g["s"], STRIDE_H=stride[0], STRIDE_W=stride[1], FP64=fp64)
    w = weight.contiguous()
    grad_input = input.new_empty(0)
    if output_mask[0]:
        grad_input = torch.empty_like(input, memory_format=conv2d_memory_format(input))
        if grad_input.numel() > 0:
            cfg = TRITON_CONFIGS["depthwise_grad_input"]
            grid = (
                g["n"] * g["h"],
                triton.cdiv(g["w"], cfg["BLOCK_X"]),
                triton.cdiv(g["c"], cfg["BLOCK_C"]),
            )
            torch.library.wrap_triton(kernels.depthwise_grad_input_kernel)[grid](
                grad_output, w, grad_input,
                g["h"], g["w"], g["p"], g["q"], g["c"], mult,
                *grad_output.stride(), *grad_input.stride(), *conv, **taps, **cfg,
            )  # fmt: skip
    grad_weight = input.new_empty(0)
    if output_mask[1]:
        grad_weight = torch.empty_like(weight, memory_format=torch.contiguous_format)
        cfg = TRITON_CONFIGS["depthwise_grad_weight"]
        grid = (triton.cdiv(g["k"], cfg["BLOCK_C"]), g["r"] * g["s"])
        torch.library.wrap_triton(kernels.depthwise_grad_weight_kernel)[grid](
            grad_output, input, grad_weight,
            g["n"], g["h"], g["w"], g["p"], g["q"], g["k"], mult,
            *grad_output.stride(), *input.stride(), *conv, **taps, **cfg,
        )  # fmt: skip
    grad_bias = grad_output.sum((0, 2, 3)) if output_mask[2] else input.new_empty(0)
    return grad_input, grad_weight, grad_bias


# Explicit fake kernels: triton_op would trace the function itself, but in Triton's interpreter
# (no GPU) the kernel launches would then touch fake tensors' data.
torch.library.register_fake("cnnops::conv2d_triton")(_conv2d_fake)
torch.library.register_fake("cnnops::_conv2d_triton_backward")(_conv2d_backward_fake)

torch.library.register_autograd(
    "cnnops::conv2d_triton",
    _autograd_formula(torch.ops.cnnops._conv2d_triton_backward),
    setup_context=_setup_context,
)

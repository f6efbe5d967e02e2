"""cnnops.conv2d: the public function, its fake kernel and its autograd formula.

The kernels are the C++ ops `cnnops::conv2d` and `cnnops::_conv2d_backward` (csrc/ops/), one
implementation per backend. This module normalises the arguments the way
torch.nn.functional.conv2d accepts them, checks them, picks the backend and calls the op; the
kernels resolve algo="auto" themselves, separately for the forward and backward pass.
"""

import functools
import os

import torch
import torch.nn.functional as F

from cnnops.ops._backend import autocast_unifies, resolve_backend

ALGOS = ("direct", "im2col", "implicit_gemm", "depthwise")

# The algorithms each backend has kernels for.
BACKEND_ALGOS = {
    "cpu": ("direct", "im2col", "depthwise"),
    "cuda": ("direct", "im2col", "depthwise"),
    "triton": ("direct", "implicit_gemm", "depthwise"),
}


def _pair(value, name, op="conv2d"):
    if isinstance(value, bool):
        raise TypeError(f"{op}: {name} must be an int or a pair of ints, got {value!r}")
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
    raise TypeError(f"{op}: {name} must be an int or a pair of ints, got {value!r}")


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


def _check_tensors(input, weight, bias, op="conv2d"):
    for name, t in (("input", input), ("weight", weight)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{op}: {name} must be a Tensor, got {type(t).__name__}")
    if bias is not None and not isinstance(bias, torch.Tensor):
        raise TypeError(f"{op}: bias must be a Tensor or None, got {type(bias).__name__}")
    if not input.is_floating_point():
        raise TypeError(f"{op}: input must be a floating-point tensor, got {input.dtype}")
    for name, t in (("weight", weight), ("bias", bias)):
        if t is None:
            continue
        if t.dtype != input.dtype and not autocast_unifies(input, t):
            raise TypeError(
                f"{op}: {name} dtype {t.dtype} does not match input dtype {input.dtype}"
            )
        if t.device != input.device:
            raise ValueError(
                f"{op}: {name} is on {t.device} but input is on {input.device}; "
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

    algo: "auto", "direct", "im2col", "implicit_gemm" or "depthwise" (groups == input channels),
        where the backend has it (BACKEND_ALGOS).
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
    if algo == "depthwise" and not _is_depthwise(input.shape[1], weight.shape[0], groups):
        raise ValueError(_not_depthwise_message(input.shape[1], weight.shape[0], groups))
    args = (input, weight, bias, stride, padding, dilation, groups, algo)
    if backend == "triton":
        return torch.ops.cnnops.conv2d_triton.default(*args)
    if _needs_autograd(input, weight, bias):
        return torch.ops.cnnops.conv2d.default(*args)
    # No gradient can flow: skip the Python autograd kernel that register_autograd installs. It
    # only redispatches here, and costs ~10 us a call, 5% of a batch-1 ResNeXt layer.
    with torch._C._AutoDispatchBelowAutograd():
        return torch.ops.cnnops.conv2d.default(*args)


def _not_depthwise_message(in_channels, out_channels, groups):
    return (
        "conv2d: algo 'depthwise' needs a depthwise layer (groups == input channels, output "
        f"channels a multiple of them); got groups={groups}, {in_channels} input and "
        f"{out_channels} output channels"
    )


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
# The kernels live in cnnops.kernels.conv2d.

# Launch configurations, kept as data.
# - depthwise kernels: one block shape each.
# - direct and implicit_gemm (three GEMM-shaped kernels each: forward, grad input, grad weight):
#   on a GPU, triton.autotune times "autotune" once per problem shape and keeps the fastest.
#   Triton's interpreter (no GPU) runs "interpreter": small tiles, so that the small test shapes
#   span several tiles in every dimension. grad weight splits its reduction over N*P*Q into
#   chunks of at least "split_min_pixels" (tests/kernels/aot_compile.py compiles every config).
TRITON_CONFIGS = {
    # MAX_BLOCK_X: the widest input tile (columns) the forward stages; wider halos (large
    # dilations) load each tap's window instead. The staged tile takes registers: with 4 warps
    # the 7x7 specialisations spill, with 8 none does (tests/kernels/aot_compile.py).
    "depthwise_forward": {"BLOCK_Q": 16, "BLOCK_C": 32, "MAX_BLOCK_X": 64, "num_warps": 8},
    "depthwise_grad_input": {"BLOCK_X": 16, "BLOCK_C": 32},
    "depthwise_grad_weight": {"BLOCK_PIX": 64, "BLOCK_C": 32},
    "implicit_gemm": {
        "autotune": [
            dict(BLOCK_M=128, BLOCK_N=128, BLOCK_K=64, num_warps=8, num_stages=3),
            dict(BLOCK_M=128, BLOCK_N=128, BLOCK_K=32, num_warps=8, num_stages=4),
            dict(BLOCK_M=128, BLOCK_N=64, BLOCK_K=32, num_warps=4, num_stages=4),
            dict(BLOCK_M=64, BLOCK_N=128, BLOCK_K=32, num_warps=4, num_stages=4),
            dict(BLOCK_M=64, BLOCK_N=64, BLOCK_K=32, num_warps=4, num_stages=4),
        ],
        "interpreter": dict(BLOCK_M=32, BLOCK_N=16, BLOCK_K=16),
        "split_min_pixels": {"gpu": 1024, "interpreter": 64},
    },
    "direct": {
        "autotune": [
            dict(BLOCK_M=64, BLOCK_N=64, BLOCK_K=4, num_warps=4, num_stages=2),
            dict(BLOCK_M=128, BLOCK_N=32, BLOCK_K=4, num_warps=4, num_stages=2),
            dict(BLOCK_M=32, BLOCK_N=32, BLOCK_K=8, num_warps=4, num_stages=2),
        ],
        "interpreter": dict(BLOCK_M=32, BLOCK_N=16, BLOCK_K=8),
        "split_min_pixels": {"gpu": 1024, "interpreter": 64},
    },
}

# What the autotuners key their choice on: the problem's sizes, and its layout (through the
# channel stride, 1 in channels_last).
_AUTOTUNE_KEYS = {
    "conv2d_forward_kernel": ["N", "H", "W", "P", "Q", "CG", "KG", "R", "S", "sxc", "stride_h"],
    "conv2d_grad_input_kernel": ["N", "H", "W", "P", "Q", "CG", "KG", "R", "S", "sic", "stride_h"],
    "conv2d_grad_weight_kernel": [
        "N", "H", "W", "P", "Q", "CG", "KG", "R", "S", "sxc", "stride_h", "PIX_PER_SPLIT",
    ],
}  # fmt: skip


def _interpreting():
    return os.environ.get("TRITON_INTERPRET") == "1"


@functools.cache
def _gemm_kernel(name, algo):
    """(kernel, fixed block sizes) for a GEMM-shaped kernel: autotuned over TRITON_CONFIGS[algo]
    on a GPU (the block sizes then come from the autotuner), one config in the interpreter."""
    import triton
    import triton.testing

    from cnnops.kernels import conv2d as kernels

    kernel = getattr(kernels, name)
    configs = TRITON_CONFIGS[algo]
    if _interpreting():
        return kernel, configs["interpreter"]
    tuned = triton.autotune(
        [
            triton.Config(
                {k: v for k, v in c.items() if k.startswith("BLOCK_")},
                num_warps=c["num_warps"],
                num_stages=c["num_stages"],
            )
            for c in configs["autotune"]
        ],
        key=_AUTOTUNE_KEYS[name],
        # Shorter timing than Triton's default (25 + 100 ms per config): a new layer shape costs
        # about a quarter second per kernel, and the configs differ by far more than the noise.
        do_bench=functools.partial(triton.testing.do_bench, warmup=10, rep=40),
    )(kernel)
    return tuned, {}


def _triton_conv_geometry(input, weight, stride, padding, dilation, groups):
    n, c, h, w = input.shape
    k, _, r, s = weight.shape
    _, _, p, q = conv2d_output_shape(input.shape, weight.shape, stride, padding, dilation, groups)
    return dict(n=n, c=c, h=h, w=w, k=k, r=r, s=s, p=p, q=q)


def _is_depthwise(in_channels, out_channels, groups):
    return groups == in_channels and out_channels % groups == 0


def _triton_algo(algo, g, groups, dtype):
    """The triton algorithm that runs the conv2d of geometry `g` (or its grad input): "auto"
    resolved, an explicit one checked. (Again here: the triton ops can be called directly,
    without conv2d()'s checks.)"""
    if algo != "auto" and algo not in BACKEND_ALGOS["triton"]:
        raise ValueError(
            f"conv2d: algo {algo!r} is not available on the triton backend "
            f"(it has: {', '.join(BACKEND_ALGOS['triton'])})"
        )
    depthwise = _is_depthwise(g["c"], g["k"], groups)
    if algo == "depthwise" and not depthwise:
        raise ValueError(_not_depthwise_message(g["c"], g["k"], groups))
    if algo != "auto":
        return algo
    if depthwise:
        return "depthwise"
    # Tensor cores take no float64: the FMA kernel is the one for it.
    return "direct" if dtype == torch.float64 else "implicit_gemm"


def _channels_last(t):
    """`t` in channels_last, copied only if it is not. The GEMM kernels read and write their
    activations through strides, but only in channels_last are they fast: a tile's channels are
    contiguous. In an NCHW tile Triton sees no contiguity along the pixels (q = m % Q), spreads
    the warp along the channels instead, and every thread then keeps every row's coordinates:
    the kernels spill (tests/kernels/aot_compile.py). So NCHW goes in and out through a copy,
    as cuDNN's tensor-core kernels do it."""
    return t.contiguous(memory_format=torch.channels_last)


def _channels_last_target(result):
    """Where a GEMM kernel writes `result`: into it if it is channels_last, else into a
    channels_last tensor that is then copied into it (see _channels_last)."""
    if result.is_contiguous(memory_format=torch.channels_last):
        return result
    return torch.empty_like(result, memory_format=torch.channels_last)


def _check_pixel_count(what, count):
    # The GEMM kernels index pixels (not elements) in int32.
    if count >= 2**31:
        raise ValueError(
            f"conv2d: the triton backend's direct and implicit_gemm kernels take fewer than 2^31 "
            f"{what} pixels (batch x height x width), got {count}; split the batch"
        )


def _gemm_options(algo, dtype):
    use_dot = algo == "implicit_gemm" and dtype != torch.float64
    # TF32 for float32 exactly when torch's own convolution would use it.
    tf32 = dtype == torch.float32 and torch.backends.cudnn.allow_tf32
    return dict(
        USE_DOT=use_dot,
        INPUT_PRECISION="tf32" if tf32 else "ieee",
        FP64=dtype == torch.float64,
    )


def _conv_scalars(stride, padding, dilation):
    return (stride[0], stride[1], padding[0], padding[1], dilation[0], dilation[1])


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
    g = _triton_conv_geometry(input, weight, stride, padding, dilation, groups)
    algo = _triton_algo(algo, g, groups, input.dtype)
    out = input.new_empty((g["n"], g["k"], g["p"], g["q"])).contiguous(
        memory_format=conv2d_memory_format(input)
    )
    if out.numel() == 0:
        return out
    if algo == "depthwise":
        _depthwise_forward(input, weight, bias, out, g, stride, padding, dilation)
        return out
    import triton

    _check_pixel_count("input", g["n"] * g["h"] * g["w"])
    _check_pixel_count("output", g["n"] * g["p"] * g["q"])
    input = _channels_last(input)
    target = _channels_last_target(out)
    kernel, cfg = _gemm_kernel("conv2d_forward_kernel", algo)
    # (R, S, C_in/groups, C_out): the weight tile's output channels are contiguous.
    w = weight.permute(2, 3, 1, 0).contiguous()
    cg, kg = g["c"] // groups, g["k"] // groups

    def grid(meta):
        tiles = triton.cdiv(g["n"] * g["p"] * g["q"], meta["BLOCK_M"])
        return (tiles * triton.cdiv(kg, meta["BLOCK_N"]), groups)

    torch.library.wrap_triton(kernel)[grid](
        input, w, bias if bias is not None else w, target,
        g["n"], g["h"], g["w"], g["p"], g["q"], cg, kg, g["r"], g["s"],
        *input.stride(), *w.stride(), *target.stride(),
        *_conv_scalars(stride, padding, dilation),
        HAS_BIAS=bias is not None, **_gemm_options(algo, input.dtype), **cfg,
    )  # fmt: skip
    if target is not out:
        out.copy_(target)
    return out


def depthwise_tile_columns(block_q, s, stride_w, dilation_w):
    """The depthwise forward's input tile width: BLOCK_Q outputs' columns and their halo,
    rounded up to a power of two (tl.arange's sizes are)."""
    import triton

    return triton.next_power_of_2((block_q - 1) * stride_w + (s - 1) * dilation_w + 1)


def _depthwise_forward(input, weight, bias, out, g, stride, padding, dilation):
    import triton

    from cnnops.kernels import conv2d as kernels

    cfg = dict(TRITON_CONFIGS["depthwise_forward"])
    block_x = depthwise_tile_columns(cfg["BLOCK_Q"], g["s"], stride[1], dilation[1])
    cfg["BLOCK_X"] = block_x if block_x <= cfg.pop("MAX_BLOCK_X") else 0
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
    g = _triton_conv_geometry(input, weight, stride, padding, dilation, groups)
    algo = _triton_algo(algo, g, groups, input.dtype)
    if algo != "depthwise":
        _check_pixel_count("input", g["n"] * g["h"] * g["w"])
        _check_pixel_count("output", g["n"] * g["p"] * g["q"])
        # Converted once for both gradients (see _channels_last).
        grad_output = _channels_last(grad_output)
    grad_input = input.new_empty(0)
    if output_mask[0]:
        grad_input = torch.empty_like(input, memory_format=conv2d_memory_format(input))
        triton_grad_input(grad_output, weight, grad_input, g, stride, padding, dilation, groups,
                          algo)  # fmt: skip
    grad_weight = input.new_empty(0)
    if output_mask[1]:
        grad_weight = torch.empty_like(weight, memory_format=torch.contiguous_format)
        if algo == "depthwise":
            _depthwise_backward("grad_weight", grad_output, input, weight, grad_weight, g, stride,
                                padding, dilation, groups, algo)  # fmt: skip
        else:
            _gemm_backward("grad_weight", grad_output, _channels_last(input), weight, grad_weight,
                           g, stride, padding, dilation, groups, algo)  # fmt: skip
    grad_bias = grad_output.sum((0, 2, 3)) if output_mask[2] else input.new_empty(0)
    return grad_input, grad_weight, grad_bias


def triton_grad_input(grad_output, weight, result, g, stride, padding, dilation, groups, algo):
    """Writes conv2d's grad input into `result`, its geometry `g` (_triton_conv_geometry): the
    grad input of _conv2d_triton_backward and the output of conv_transpose2d's triton op, which
    has no conv2d input tensor, only its size. algo: a resolved one (_triton_algo)."""
    if result.numel() == 0:
        return
    if algo == "depthwise":
        _depthwise_backward("grad_input", grad_output, None, weight, result, g, stride, padding,
                            dilation, groups, algo)  # fmt: skip
        return
    _check_pixel_count("input", g["n"] * g["h"] * g["w"])
    _check_pixel_count("output", g["n"] * g["p"] * g["q"])
    _gemm_backward("grad_input", _channels_last(grad_output), None, weight, result, g, stride,
                   padding, dilation, groups, algo)  # fmt: skip


# The two backward launchers read `input` for grad weight only (None for grad input).
def _depthwise_backward(which, grad_output, input, weight, result, g, stride, padding, dilation,
                        groups, algo):  # fmt: skip
    import triton

    from cnnops.kernels import conv2d as kernels

    mult = g["k"] // g["c"]
    conv = (padding[0], padding[1], dilation[0], dilation[1])
    taps = dict(
        R=g["r"], S=g["s"], STRIDE_H=stride[0], STRIDE_W=stride[1],
        FP64=weight.dtype == torch.float64,
    )  # fmt: skip
    w = weight.contiguous()
    if which == "grad_input":
        cfg = TRITON_CONFIGS["depthwise_grad_input"]
        grid = (
            g["n"] * g["h"],
            triton.cdiv(g["w"], cfg["BLOCK_X"]),
            triton.cdiv(g["c"], cfg["BLOCK_C"]),
        )
        torch.library.wrap_triton(kernels.depthwise_grad_input_kernel)[grid](
            grad_output, w, result,
            g["h"], g["w"], g["p"], g["q"], g["c"], mult,
            *grad_output.stride(), *result.stride(), *conv, **taps, **cfg,
        )  # fmt: skip
    else:
        cfg = TRITON_CONFIGS["depthwise_grad_weight"]
        grid = (triton.cdiv(g["k"], cfg["BLOCK_C"]), g["r"] * g["s"])
        torch.library.wrap_triton(kernels.depthwise_grad_weight_kernel)[grid](
            grad_output, input, result,
            g["n"], g["h"], g["w"], g["p"], g["q"], g["k"], mult,
            *grad_output.stride(), *input.stride(), *conv, **taps, **cfg,
        )  # fmt: skip


def _grad_weight_split(g, groups, algo, device):
    """(number of chunks, pixels per chunk) for grad weight's reduction over N*P*Q: enough
    programs to fill a GPU (2 per SM, estimated at 64 x 64 tiles), chunks no smaller than the
    configured minimum, and a multiple of every BLOCK_K."""
    import triton

    pixels = g["n"] * g["p"] * g["q"]
    tiles = triton.cdiv(g["k"] // groups, 64) * triton.cdiv(g["c"] // groups, 64)
    tiles *= groups * g["r"] * g["s"]
    side = "interpreter" if _interpreting() else "gpu"
    min_pixels = TRITON_CONFIGS[algo]["split_min_pixels"][side]
    sms = 8 if _interpreting() else torch.cuda.get_device_properties(device).multi_processor_count
    split = max(1, min(triton.cdiv(2 * sms, tiles), pixels // min_pixels))
    per_split = triton.cdiv(triton.cdiv(pixels, split), 64) * 64
    return triton.cdiv(pixels, per_split) if pixels else 1, per_split


def _gemm_backward(which, grad_output, input, weight, result, g, stride, padding, dilation,
                   groups, algo):  # fmt: skip
    import triton

    cg, kg = g["c"] // groups, g["k"] // groups
    sizes = (g["n"], g["h"], g["w"], g["p"], g["q"], cg, kg, g["r"], g["s"])
    options = _gemm_options(algo, weight.dtype)
    if which == "grad_input":
        kernel, cfg = _gemm_kernel("conv2d_grad_input_kernel", algo)
        # (R, S, C_out, C_in/groups): the weight tile's input channels are contiguous.
        w = weight.permute(2, 3, 0, 1).contiguous()

        def grid(meta):
            tiles = triton.cdiv(g["n"] * g["h"] * g["w"], meta["BLOCK_M"])
            return (tiles * triton.cdiv(cg, meta["BLOCK_N"]), groups)

        target = _channels_last_target(result)
        torch.library.wrap_triton(kernel)[grid](
            grad_output, w, target, *sizes,
            *grad_output.stride(), *w.stride(), *target.stride(),
            *_conv_scalars(stride, padding, dilation), **options, **cfg,
        )  # fmt: skip
        if target is not result:
            result.copy_(target)
        return
    kernel, cfg = _gemm_kernel("conv2d_grad_weight_kernel", algo)
    split, per_split = _grad_weight_split(g, groups, algo, input.device)
    accumulate = torch.float64 if input.dtype == torch.float64 else torch.float32
    partial = input.new_empty((split, *weight.shape), dtype=accumulate)

    def grid(meta):
        return (
            triton.cdiv(kg, meta["BLOCK_M"]) * triton.cdiv(cg, meta["BLOCK_N"]),
            groups * g["r"] * g["s"],
            split,
        )

    torch.library.wrap_triton(kernel)[grid](
        grad_output, input, partial, *sizes, per_split,
        *grad_output.stride(), *input.stride(),
        *_conv_scalars(stride, padding, dilation), **options, **cfg,
    )  # fmt: skip
    result.copy_(partial.sum(0))


# Explicit fake kernels: triton_op would trace the function itself, but in Triton's interpreter
# (no GPU) the kernel launches would then touch fake tensors' data.
torch.library.register_fake("cnnops::conv2d_triton")(_conv2d_fake)
torch.library.register_fake("cnnops::_conv2d_triton_backward")(_conv2d_backward_fake)

torch.library.register_autograd(
    "cnnops::conv2d_triton",
    _autograd_formula(torch.ops.cnnops._conv2d_triton_backward),
    setup_context=_setup_context,
)

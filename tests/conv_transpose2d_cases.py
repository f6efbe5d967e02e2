"""Named conv_transpose2d test cases and helpers, shared by the CPU, Triton and CUDA tests.

The references are torch.nn.functional.conv_transpose2d in float64; tolerances as for conv2d
(tests/tolerance.py).
"""

import pytest
import torch
import torch.nn.functional as F
from tolerance import assert_close_to_reference


def case(
    n,
    c_in,
    h,
    w,
    c_out,
    kernel,
    stride=1,
    padding=0,
    output_padding=0,
    dilation=1,
    groups=1,
    bias=True,
    id=None,
):
    """Input (n, c_in, h, w); weight (c_in, c_out / groups, *kernel)."""
    kh, kw = (kernel, kernel) if isinstance(kernel, int) else kernel
    spec = dict(
        n=n,
        c_in=c_in,
        h=h,
        w=w,
        c_out=c_out,
        kh=kh,
        kw=kw,
        stride=stride,
        padding=padding,
        output_padding=output_padding,
        dilation=dilation,
        groups=groups,
        bias=bias,
    )
    return pytest.param(spec, id=id)


CASES = [
    case(2, 6, 5, 5, 4, 1, id="1x1"),
    case(2, 5, 4, 5, 3, 1, stride=2, id="1x1-s2"),
    case(2, 5, 6, 6, 7, 3, padding=1, id="3x3"),
    case(2, 8, 5, 5, 4, 2, stride=2, id="2x2-s2-unet"),
    case(2, 4, 5, 6, 3, 3, stride=2, padding=1, output_padding=1, id="3x3-s2-op1"),
    case(2, 6, 4, 4, 3, 4, stride=2, padding=1, id="4x4-s2-p1-dcgan"),
    case(1, 3, 5, 4, 4, 3, stride=3, output_padding=2, id="3x3-s3-op2"),
    case(2, 4, 6, 6, 5, 3, padding=2, dilation=2, id="3x3-dil2"),
    # output_padding >= stride (smaller than dilation): the conv2d over the output has more
    # output rows/columns than the input; the extra ones read zeros.
    case(2, 4, 5, 6, 3, 3, padding=1, output_padding=1, dilation=2, id="op-ge-stride"),
    case(
        1,
        3,
        5,
        4,
        4,
        3,
        stride=(1, 2),
        padding=(0, 1),
        output_padding=(2, 1),
        dilation=3,
        id="op-ge-stride-rows-only",
    ),
    case(2, 3, 4, 5, 2, 2, stride=2, output_padding=2, dilation=3, id="op-ge-stride-s2"),
    case(2, 8, 6, 6, 6, 3, padding=1, groups=2, id="groups2"),
    case(2, 8, 5, 5, 8, 3, stride=2, padding=1, output_padding=1, groups=4, id="groups4-s2"),
    # groups == C_in: depthwise-like. With C_out == C_in it is conv2d's depthwise grad input.
    case(2, 6, 7, 7, 6, 3, stride=2, padding=1, output_padding=1, groups=6, id="depthwise"),
    case(2, 4, 6, 6, 8, 3, padding=1, groups=4, id="groups-eq-cin-mult2"),
    case(
        2,
        4,
        6,
        5,
        5,
        (3, 5),
        stride=(2, 1),
        padding=(1, 2),
        output_padding=(1, 0),
        dilation=(1, 2),
        id="asymmetric",
    ),
    case(2, 3, 7, 11, 5, 3, stride=2, id="odd-non-square"),
    case(1, 3, 9, 9, 2, 3, padding=3, id="padding-larger-than-kernel"),
    case(0, 4, 5, 5, 3, 3, stride=2, padding=1, id="batch0"),
    case(2, 4, 5, 5, 6, 3, padding=1, bias=False, id="no-bias"),
    case(2, 1, 6, 6, 3, 3, stride=2, id="cin1"),
    case(1, 4, 1, 1, 3, 3, id="1x1-input"),
]

# Layers that conv2d's depthwise kernels serve: groups == C_out, C_in a multiple of it (a
# depthwise conv2d with that channel multiplier, seen from its grad input).
DEPTHWISE_CASES = [
    *(c for c in CASES if c.values[0]["groups"] == c.values[0]["c_out"] > 1),
    case(2, 16, 6, 5, 16, 3, stride=2, padding=1, output_padding=1, groups=16, id="dw-16ch-s2"),
    case(1, 5, 5, 5, 5, 5, padding=2, groups=5, bias=False, id="dw-5x5-no-bias"),
    case(2, 4, 5, 5, 4, 3, padding=1, output_padding=1, dilation=2, groups=4, id="dw-op-ge-stride"),
    case(2, 8, 6, 6, 4, 3, padding=1, groups=4, id="dw-cin-mult2"),
]

LAYOUTS = ["nchw", "channels_last", "non_contiguous"]


def make_problem(spec, dtype, layout="nchw", seed=0):
    gen = torch.Generator().manual_seed(seed)
    shape = (spec["n"], spec["c_in"], spec["h"], spec["w"])
    x = torch.randn(shape, generator=gen, dtype=torch.float64)
    w = torch.randn(
        spec["c_in"],
        spec["c_out"] // spec["groups"],
        spec["kh"],
        spec["kw"],
        generator=gen,
        dtype=torch.float64,
    )
    b = torch.randn(spec["c_out"], generator=gen, dtype=torch.float64) if spec["bias"] else None
    x, w = x.to(dtype), w.to(dtype)
    b = b.to(dtype) if b is not None else None
    if layout == "channels_last":
        x = x.contiguous(memory_format=torch.channels_last)
    elif layout == "non_contiguous":
        # Every other column of a twice-as-wide tensor: a strided view, neither NCHW nor NHWC.
        wide = torch.zeros(*x.shape[:3], 2 * x.shape[3], dtype=dtype)
        wide[..., ::2] = x
        x = wide[..., ::2]
        assert x.numel() == 0 or not x.is_contiguous()
    return x, w, b


def conv_args(spec):
    keys = ("stride", "padding", "output_padding", "groups", "dilation")
    return {k: spec[k] for k in keys}


def reduction_lengths(spec, in_shape, out_shape):
    """Reduction length of each result: output, grad input, grad weight, grad bias."""
    taps = spec["kh"] * spec["kw"]
    cin_g, cout_g = spec["c_in"] // spec["groups"], spec["c_out"] // spec["groups"]
    n, _, h, w = in_shape
    _, _, p, q = out_shape
    return cin_g * taps, cout_g * taps, n * h * w, n * p * q


def check_against_torch(conv, spec, dtype=torch.float32, layout="nchw", device="cpu"):
    """conv(x, w, b) (a cnnops.conv_transpose2d call with spec's arguments) against float64
    F.conv_transpose2d: the output, its memory format (channels_last in, channels_last out),
    and the gradients of every input, for one random grad output."""
    x, w, b = (t.to(device) if t is not None else None for t in make_problem(spec, dtype, layout))
    params = [t.requires_grad_() for t in (x, w, b) if t is not None]
    out = conv(x, w, b)

    x64, w64 = x.detach().double().requires_grad_(), w.detach().double().requires_grad_()
    b64 = b.detach().double().requires_grad_() if b is not None else None
    ref = F.conv_transpose2d(x64, w64, b64, **conv_args(spec))
    lengths = reduction_lengths(spec, x.shape, ref.shape)
    assert out.dtype == dtype
    assert_close_to_reference(out, ref, lengths[0])
    if layout == "channels_last" and not x.is_contiguous():
        # (An input with C == 1, or empty, is NCHW-contiguous too: either layout is right.)
        assert out.is_contiguous(memory_format=torch.channels_last)
    else:
        assert out.is_contiguous()

    grad_out = torch.randn(
        ref.shape, generator=torch.Generator().manual_seed(1), dtype=torch.float64
    ).to(device)
    grads = torch.autograd.grad(out, params, grad_out.to(dtype))
    ref_grads = torch.autograd.grad(ref, [t for t in (x64, w64, b64) if t is not None], grad_out)
    for name, got, want, length in zip(
        ("grad_input", "grad_weight", "grad_bias"), grads, ref_grads, lengths[1:], strict=False
    ):
        assert_close_to_reference(got, want, length, name)

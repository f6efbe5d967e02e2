"""Named conv2d test cases and helpers, shared by the CPU and CUDA conv2d tests."""

import pytest
import torch
import torch.nn.functional as F
from tolerance import assert_close_to_reference


def case(n, c, h, w, k, kernel, stride=1, padding=0, dilation=1, groups=1, bias=True, id=None):
    kh, kw = (kernel, kernel) if isinstance(kernel, int) else kernel
    spec = dict(
        n=n,
        c=c,
        h=h,
        w=w,
        k=k,
        kh=kh,
        kw=kw,
        stride=stride,
        padding=padding,
        dilation=dilation,
        groups=groups,
        bias=bias,
    )
    return pytest.param(spec, id=id)


CASES = [
    case(2, 8, 10, 10, 6, 1, id="1x1"),
    case(2, 6, 12, 12, 5, 1, stride=2, id="1x1-s2"),
    case(2, 5, 11, 11, 7, 3, padding=1, id="3x3"),
    case(2, 4, 13, 13, 6, 5, padding=2, id="5x5"),
    case(2, 3, 20, 20, 8, 7, stride=2, padding=3, id="7x7-s2-p3"),
    case(1, 3, 47, 47, 8, 11, stride=4, padding=2, id="11x11-s4-alexnet"),
    case(2, 6, 14, 14, 4, 3, padding=2, dilation=2, id="3x3-dil2"),
    case(2, 4, 17, 15, 4, 3, padding=3, dilation=3, id="3x3-dil3"),
    case(2, 8, 9, 9, 6, 3, padding=1, groups=2, id="groups2"),
    case(2, 8, 9, 9, 8, 3, padding=1, groups=4, id="groups4"),
    case(2, 64, 6, 6, 64, 3, padding=1, groups=32, id="groups32"),
    case(2, 6, 11, 11, 6, 3, padding=1, groups=6, id="depthwise"),
    case(2, 6, 11, 11, 12, 3, stride=2, padding=1, groups=6, id="depthwise-mult2-s2"),
    case(2, 4, 12, 16, 5, (3, 5), stride=(1, 2), padding=(2, 1), dilation=(2, 1), id="asymmetric"),
    case(2, 3, 9, 21, 4, 3, padding=1, id="non-square"),
    case(2, 3, 8, 8, 4, 3, padding=3, id="pad-more-than-half-kernel"),
    case(1, 4, 9, 9, 5, 3, padding=1, id="batch1"),
    case(0, 4, 9, 9, 5, 3, padding=1, id="batch0"),
    case(2, 1, 13, 13, 4, 3, id="cin1"),
    case(3, 5, 7, 7, 3, 3, stride=2, id="odd-7"),
    case(2, 3, 13, 13, 5, 3, stride=3, padding=1, id="odd-13-s3"),
    case(2, 4, 5, 5, 3, 5, id="1x1-output"),
    case(2, 4, 9, 9, 6, 3, padding=1, bias=False, id="no-bias"),
    case(1, 16, 31, 31, 8, 3, padding=12, dilation=12, id="aspp-dil12"),
    case(1, 4, 9, 9, 4, 3, padding=6, dilation=4, id="all-padding-rows"),
    case(1, 3, 4, 4, 2, 3, padding=(0, 8), dilation=(1, 3), id="column-bands-all-padding"),
    case(2, 8, 12, 12, 6, 3, padding=10, dilation=10, groups=2, id="aspp-blocks-grouped"),
    case(2, 5, 21, 21, 4, 3, padding=12, dilation=12, id="aspp-blocks-dense"),
]

# The depthwise layers of CASES and more, for the depthwise algorithms of every backend.
# Channels (for the CPU's channels_last kernel): two whole vectors and no block of 4; a block
# then 2 vectors; a vector and a scalar.
DEPTHWISE_CASES = [
    *(c for c in CASES if c.values[0]["groups"] == c.values[0]["c"] > 1),
    case(2, 32, 12, 12, 32, 3, padding=1, groups=32, id="dw-32ch"),
    case(2, 96, 13, 11, 96, 3, stride=2, padding=1, groups=96, id="dw-96ch-s2"),
    case(1, 17, 7, 8, 17, 5, padding=2, groups=17, id="dw-17ch-5x5"),
    case(2, 80, 9, 9, 80, 3, padding=2, dilation=2, groups=80, id="dw-80ch-dil2"),
    case(1, 65, 6, 5, 65, 3, groups=65, bias=False, id="dw-65ch-no-pad-no-bias"),
    case(2, 64, 9, 9, 64, 7, stride=2, padding=3, groups=64, id="dw-64ch-7x7-s2"),
    case(2, 16, 5, 5, 32, 3, padding=1, groups=16, id="dw-mult2"),
    case(0, 16, 5, 5, 16, 3, padding=1, groups=16, id="dw-batch0"),
]

LAYOUTS = ["nchw", "channels_last", "non_contiguous"]


def make_problem(spec, dtype, layout="nchw", seed=0):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(spec["n"], spec["c"], spec["h"], spec["w"], generator=gen, dtype=torch.float64)
    w = torch.randn(
        spec["k"],
        spec["c"] // spec["groups"],
        spec["kh"],
        spec["kw"],
        generator=gen,
        dtype=torch.float64,
    )
    b = torch.randn(spec["k"], generator=gen, dtype=torch.float64) if spec["bias"] else None
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
    return dict(
        stride=spec["stride"],
        padding=spec["padding"],
        dilation=spec["dilation"],
        groups=spec["groups"],
    )


def reduction_lengths(spec, out_shape):
    """Reduction length of each result: output, grad input, grad weight, grad bias."""
    n, k, p, q = out_shape
    cg, kg = spec["c"] // spec["groups"], spec["k"] // spec["groups"]
    taps = spec["kh"] * spec["kw"]
    return cg * taps, kg * taps, n * p * q, n * p * q


def check_against_torch(conv, spec, dtype=torch.float32, layout="nchw", device="cpu"):
    """conv(x, w, b) (a cnnops.conv2d call with spec's arguments) against float64 F.conv2d:
    the output, its memory format (torch's rule: channels_last in, channels_last out), and the
    gradients of every input, for one random grad output."""
    x, w, b = (t.to(device) if t is not None else None for t in make_problem(spec, dtype, layout))
    params = [t.requires_grad_() for t in (x, w, b) if t is not None]
    out = conv(x, w, b)

    x64, w64 = x.detach().double().requires_grad_(), w.detach().double().requires_grad_()
    b64 = b.detach().double().requires_grad_() if b is not None else None
    ref = F.conv2d(x64, w64, b64, **conv_args(spec))
    lengths = reduction_lengths(spec, ref.shape)
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

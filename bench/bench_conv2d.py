"""conv2d benchmark cases: the shape sets of bench/shapes.py against the providers below."""

import math
import sys
from dataclasses import dataclass
from functools import partial

import torch
import torch.nn.functional as F

import cnnops
from bench.harness import Case, Provider, close_error
from bench.shapes import (
    BATCHES_BY_DEVICE,
    CONV_SETS,
    CONV_SETS_BY_DEVICE,
    DTYPES_BY_DEVICE,
    ConvLayer,
)

OP = "conv2d"
SET_NAMES = tuple(CONV_SETS)

# Sets whose layers are grouped or depthwise: the only ones where the simple direct algorithm
# finishes in reasonable time on a CPU.
GROUPED_SETS = ("mobilenetv2_dw", "resnext50_grouped", "large_kernel_dw")


@dataclass(frozen=True)
class Conv2dProvider:
    name: str
    backend: str | None  # None: torch.nn.functional.conv2d
    algo: str = "auto"
    device_type: str = "cpu"
    channels_last: bool = False  # this provider gets channels_last copies of the inputs
    sets: tuple | None = None  # None: every set
    depthwise_only: bool = False  # only layers with groups == C_in (C_out a multiple of it)


# Adding a provider is adding a line. Per device type, the first one is the reference.
PROVIDERS = (
    Conv2dProvider("torch", None, device_type="cpu"),
    Conv2dProvider("cpu-direct", "cpu", "direct", sets=GROUPED_SETS),
    Conv2dProvider("cpu-depthwise", "cpu", "depthwise", depthwise_only=True),
    Conv2dProvider("cpu-im2col", "cpu", "im2col"),
    Conv2dProvider("cpu-auto", "cpu", "auto"),
    Conv2dProvider("torch", None, device_type="cuda"),
    Conv2dProvider(
        "torch-nhwc", None, device_type="cuda", channels_last=True
    ),  # cuDNN's NHWC kernels
    Conv2dProvider("cuda-direct", "cuda", "direct", device_type="cuda"),
    Conv2dProvider("cuda-im2col", "cuda", "im2col", device_type="cuda"),
    Conv2dProvider("cuda-depthwise", "cuda", "depthwise", device_type="cuda", depthwise_only=True),
    Conv2dProvider("cuda-auto", "cuda", "auto", device_type="cuda"),
    Conv2dProvider("triton-implicit_gemm", "triton", "implicit_gemm", device_type="cuda"),
    Conv2dProvider("triton-direct", "triton", "direct", device_type="cuda", sets=GROUPED_SETS),
    Conv2dProvider(
        "triton-depthwise", "triton", "depthwise", device_type="cuda", depthwise_only=True
    ),
    Conv2dProvider("triton-auto", "triton", "auto", device_type="cuda"),
)


# Tiny layers to find out whether a provider runs at all.
PROBE_DENSE = ConvLayer("probe", 4, 4, 3, 1, 1, 1, 1, 6)
PROBE_DEPTHWISE = ConvLayer("probe", 4, 4, 3, 1, 1, 1, 4, 6)


def output_size(layer):
    return (
        layer.size + 2 * layer.padding - layer.dilation * (layer.kernel - 1) - 1
    ) // layer.stride + 1


def reduction_length(layer):
    return (layer.c_in // layer.groups) * layer.kernel * layer.kernel


def conv_flops(layer, batch):
    """2 * N * C_out * P * Q * (C_in / groups) * R * S."""
    return 2 * batch * layer.c_out * output_size(layer) ** 2 * reduction_length(layer)


def is_depthwise(layer):
    return layer.groups == layer.c_in and layer.c_out % layer.c_in == 0


def conv_call(spec, layer):
    """The provider's function of (x, w): F.conv2d, or cnnops.conv2d with backend and algo."""
    conv_args = (None, layer.stride, layer.padding, layer.dilation, layer.groups)
    if spec.backend is None:
        return lambda x, w: F.conv2d(x, w, *conv_args)
    return lambda x, w: cnnops.conv2d(x, w, *conv_args, algo=spec.algo, backend=spec.backend)


def probe(spec, device):
    """Why `spec` cannot run on `device` now, or None. Backends and algos arrive over time
    (triton, implicit_gemm), so a listed provider that cannot run yet is skipped and named."""
    if spec.backend is None:
        return None
    if spec.backend not in cnnops.available_backends(device):
        return f"backend {spec.backend!r} not available"
    layer = PROBE_DEPTHWISE if spec.depthwise_only else PROBE_DENSE
    x = torch.randn(1, layer.c_in, layer.size, layer.size, device=device)
    w = torch.randn(
        layer.c_out, layer.c_in // layer.groups, layer.kernel, layer.kernel, device=device
    )
    try:
        conv_call(spec, layer)(x, w)
    except (RuntimeError, ValueError, NotImplementedError) as exc:
        return f"{type(exc).__name__}: {exc}".splitlines()[0]
    return None


def usable_providers(device):
    """(the providers for `device` that run, {name: why not} for the others)."""
    usable, skipped = [], {}
    for spec in PROVIDERS:
        if spec.device_type != device.type:
            continue
        reason = probe(spec, device)
        if reason is None:
            usable.append(spec)
        else:
            skipped[spec.name] = reason
    return usable, skipped


def with_backward(conv):
    """Forward plus backward of conv(x, w): the gradients of input and weight for grad_output go,
    flattened into one tensor so that one error check covers both."""

    def run(x, w, go):
        x, w = x.detach().requires_grad_(), w.detach().requires_grad_()
        return torch.cat([g.flatten() for g in torch.autograd.grad(conv(x, w), (x, w), go)])

    return run


def _to_channels_last(args):
    return tuple(t.contiguous(memory_format=torch.channels_last) for t in args)


def make_case(set_name, layer, batch, dtype, device, specs, channels_last, backward=False):
    """backward: time forward plus backward (grad input and grad weight) instead of forward."""
    n, c, h, k, r = batch, layer.c_in, layer.size, layer.c_out, layer.kernel
    p = output_size(layer)
    reduction = reduction_length(layer)

    def make_args():
        generator = torch.Generator().manual_seed(0)
        x = torch.randn(n, c, h, h, generator=generator)
        # Weights at the scale of a trained layer's keep the outputs O(1) whatever the reduction.
        w = torch.randn(k, c // layer.groups, r, r, generator=generator) / math.sqrt(reduction)
        args = (x, w, torch.randn(n, k, p, p, generator=generator)) if backward else (x, w)
        args = tuple(t.to(device, dtype) for t in args)
        return _to_channels_last(args) if channels_last else args

    def reference(x, w):
        return F.conv2d(x, w, None, layer.stride, layer.padding, layer.dilation, layer.groups)

    def expected(args):
        args = tuple(t.double() for t in args)
        return with_backward(reference)(*args) if backward else reference(*args)

    def call(spec):
        return with_backward(conv_call(spec, layer)) if backward else conv_call(spec, layer)

    providers = tuple(
        Provider(spec.name, call(spec), _to_channels_last if spec.channels_last else None)
        for spec in specs
        if (spec.sets is None or set_name in spec.sets)
        and (not spec.depthwise_only or is_depthwise(layer))
    )
    # Backward: grad input reduces over K/groups * R * S terms, grad weight over N * P * Q; the
    # check takes the longer. Forward + both gradients is three convolutions' arithmetic.
    grad_reduction = max((k // layer.groups) * r * r, n * p * p)
    return Case(
        op=f"{OP} fwd+bwd" if backward else OP,
        set_name=set_name,
        layer=layer.name,
        batch=n,
        shape=dict(
            N=n,
            C=c,
            H=h,
            W=h,
            K=k,
            R=r,
            S=r,
            stride=layer.stride,
            pad=layer.padding,
            dil=layer.dilation,
            groups=layer.groups,
        ),
        dtype=dtype,
        device=device,
        make_args=make_args,
        expected=expected,
        error=partial(
            conv_error, reduction_length=grad_reduction if backward else reduction, device=device
        ),
        providers=providers,
        flops=(3 if backward else 1) * conv_flops(layer, n),
        # The fewest bytes of the forward pass; the backward pass has no such simple floor.
        min_bytes=None
        if backward
        else torch.finfo(dtype).bits // 8 * (n * c * h * h + k * reduction + n * k * p * p),
    )


def conv_error(actual, expected, reduction_length, device):
    """(max abs error, tolerance), the tolerance as in tests/tolerance.py: float32 rounding
    error grows like sqrt(reduction) * eps; 16x that never flakes, one wrong term (O(1)) fails."""
    eps = torch.finfo(actual.dtype).eps
    if actual.dtype == torch.float32 and device.type == "cuda" and torch.backends.cudnn.allow_tf32:
        eps = 2.0**-10  # TF32 keeps a 10-bit mantissa
    scale = max(1.0, expected.abs().max().item()) if expected.numel() else 1.0
    return close_error(actual, expected, 16 * eps * math.sqrt(max(1, reduction_length)) * scale)


def build_cases(
    device,
    *,
    sets=None,
    batches=None,
    dtypes=None,
    quick=False,
    channels_last=False,
    backward=False,
    stream=sys.stderr,
):
    """(the conv2d cases for `device`, notes for the results header).

    quick: batch 1 and the cheapest layer of each set, a smoke test of every path.
    backward: time forward plus backward (grad input and weight) instead of the forward pass.
    """
    device = torch.device(device)
    specs, skipped = usable_providers(device)
    notes = [f"{OP} provider {name} skipped: {why}" for name, why in skipped.items()]
    for note in notes:
        print(note, file=stream)
    set_names = [s for s in CONV_SETS_BY_DEVICE[device.type] if sets is None or s in sets]
    batches = (1,) if quick else tuple(batches or BATCHES_BY_DEVICE[device.type])
    cases = []
    for set_name in set_names:
        layers = CONV_SETS[set_name]
        if quick:
            layers = [min(layers, key=lambda layer: conv_flops(layer, 1))]
        for dtype_name in dtypes or DTYPES_BY_DEVICE[device.type]:
            for batch in batches:
                for layer in layers:
                    cases.append(
                        make_case(
                            set_name,
                            layer,
                            batch,
                            getattr(torch, dtype_name),
                            device,
                            specs,
                            channels_last,
                            backward,
                        )
                    )
    return cases, notes

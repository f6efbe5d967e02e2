"""conv_transpose2d on a GPU: the CUDA C++ backend (conv2d's grad-input kernels) and the triton
backend natively, against torch in float64, and float16/bfloat16 against torch's own error."""

import pytest
import torch
import torch.nn.functional as F
from conv_transpose2d_cases import (
    CASES,
    DEPTHWISE_CASES,
    LAYOUTS,
    check_against_torch,
    conv_args,
    make_problem,
)

import cnnops

pytestmark = pytest.mark.cuda
CUDA_ALGOS = ["direct", "im2col", "auto"]


@pytest.fixture(autouse=True)
def _exact_fp32():
    # TF32 would put fp32 results outside the fp32 tolerance; test the kernels' own precision.
    old = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = old


def by_id(cases, *ids):
    return [next(c for c in cases if c.id == i) for i in ids]


def cnnops_conv(spec, backend, algo="auto"):
    return lambda x, w, b: cnnops.conv_transpose2d(
        x, w, b, **conv_args(spec), algo=algo, backend=backend
    )


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("algo", CUDA_ALGOS)
@pytest.mark.parametrize("spec", CASES)
def test_cuda_float32_forward_and_gradients(spec, algo, layout):
    check_against_torch(cnnops_conv(spec, "cuda", algo), spec, torch.float32, layout, "cuda")


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("spec", DEPTHWISE_CASES)
def test_cuda_depthwise(spec, layout):
    for dtype in (torch.float32, torch.float64):
        check_against_torch(cnnops_conv(spec, "cuda", "depthwise"), spec, dtype, layout, "cuda")


@pytest.mark.parametrize("layout", ["nchw", "channels_last"])
# "auto" is implicit_gemm in float32, except on depthwise layers.
@pytest.mark.parametrize("algo", ["direct", "auto"])
@pytest.mark.parametrize("spec", CASES)
def test_triton_float32_forward_and_gradients(spec, algo, layout):
    check_against_torch(cnnops_conv(spec, "triton", algo), spec, torch.float32, layout, "cuda")


HALF_CASES = by_id(
    CASES,
    "3x3",
    "2x2-s2-unet",
    "3x3-s2-op1",
    "op-ge-stride-s2",
    "groups4-s2",
    "depthwise",
    "asymmetric",
)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("layout", ["nchw", "channels_last"])
@pytest.mark.parametrize(
    "backend,algo",
    [
        ("cuda", "direct"),
        ("cuda", "im2col"),
        ("cuda", "auto"),
        ("triton", "implicit_gemm"),
        ("triton", "direct"),
        ("triton", "auto"),
    ],
)
@pytest.mark.parametrize("spec", HALF_CASES)
def test_half_precision_error_at_most_twice_torchs(spec, backend, algo, layout, dtype):
    """float16/bfloat16: error against the float64 reference at most 2x torch's own in that
    dtype, forward and every gradient."""
    x, w, b = (t.cuda() for t in make_problem(spec, torch.float64, layout))
    grad_out = None

    def results(conv, dtype):
        nonlocal grad_out
        args = [t.to(dtype).requires_grad_() for t in (x, w, b)]
        out = conv(*args)
        if grad_out is None:
            grad_out = torch.randn(out.shape, dtype=torch.float64, device="cuda")
        return [out, *torch.autograd.grad(out, args, grad_out.to(dtype))]

    torch_conv = lambda *a: F.conv_transpose2d(*a, **conv_args(spec))  # noqa: E731
    ref = results(torch_conv, torch.float64)
    theirs = results(torch_conv, dtype)
    ours = results(cnnops_conv(spec, backend, algo), dtype)
    assert ours[0].dtype == dtype
    for name, r, t, o in zip(("output", "grad_input", "grad_weight", "grad_bias"), ref, theirs,
                             ours, strict=True):  # fmt: skip
        slack = torch.finfo(dtype).eps * max(1.0, r.abs().max().item())
        torch_err = (t.double() - r).abs().max().item()
        our_err = (o.double() - r).abs().max().item()
        assert our_err <= 2 * torch_err + slack, f"{name}: {our_err} vs torch's {torch_err}"


@pytest.mark.parametrize("algo", ["direct", "im2col"])
def test_gradcheck_float64(algo):
    spec = dict(by_id(CASES, "op-ge-stride-s2")[0].values[0], n=1)
    x, w, b = (t.cuda().requires_grad_() for t in make_problem(spec, torch.float64))
    assert torch.autograd.gradcheck(cnnops_conv(spec, "cuda", algo), [x, w, b], eps=1e-6, atol=1e-5)


@pytest.mark.parametrize("layout", ["nchw", "channels_last"])
@pytest.mark.parametrize(
    "op,algo",
    [
        ("conv_transpose2d", "direct"),
        ("conv_transpose2d", "im2col"),
        ("conv_transpose2d", "depthwise"),
        ("conv_transpose2d_triton", "implicit_gemm"),
        ("conv_transpose2d_triton", "depthwise"),
    ],
)
def test_opcheck(op, algo, layout):
    spec = by_id(DEPTHWISE_CASES, "dw-16ch-s2")[0].values[0]
    x, w, b = (t.cuda().requires_grad_() for t in make_problem(spec, torch.float32, layout))
    args = (x, w, b, [2, 2], [1, 1], [1, 1], [1, 1], 16, algo)
    torch.library.opcheck(getattr(torch.ops.cnnops, op).default, args)


@pytest.mark.parametrize("backend", ["cuda", "triton"])
def test_compile_fullgraph(backend):
    spec = by_id(CASES, "groups4-s2")[0].values[0]
    x, w, b = (t.cuda() for t in make_problem(spec, torch.float32))
    x.requires_grad_()
    fn = torch.compile(
        lambda x, w, b: torch.relu(
            cnnops.conv_transpose2d(x, w, b, **conv_args(spec), backend=backend)
        ),
        fullgraph=True,
    )
    got = fn(x, w, b)
    (grad,) = torch.autograd.grad(got.sum(), x)
    want = torch.relu(F.conv_transpose2d(x, w, b, **conv_args(spec)))
    (want_grad,) = torch.autograd.grad(want.sum(), x)
    torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(grad, want_grad, atol=1e-4, rtol=1e-4)


def test_cuda_and_cpu_tensors_mixed_raise():
    x, w, _ = make_problem(CASES[2].values[0], torch.float32)
    with pytest.raises(ValueError, match="same device"):
        cnnops.conv_transpose2d(x.cuda(), w)

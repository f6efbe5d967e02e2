"""The triton backend's conv_transpose2d (conv2d's grad-input kernels: direct, implicit_gemm and
depthwise) against F.conv_transpose2d.

Without a GPU the kernels run in Triton's interpreter on CPU tensors (tests/conftest.py sets
TRITON_INTERPRET=1), on tiny shapes; with one, natively on CUDA tensors.
"""

import pytest
import torch
from conv_transpose2d_cases import (
    CASES,
    DEPTHWISE_CASES,
    check_against_torch,
    conv_args,
    make_problem,
)

import cnnops

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
# On a GPU machine these run natively and belong to the GPU lane (`pytest -m cuda`).
pytestmark = [pytest.mark.cuda] if DEVICE == "cuda" else []


@pytest.fixture(autouse=True)
def _exact_fp32():
    # float32 implicit GEMM follows cudnn.allow_tf32; test the kernels at float32 precision.
    old = torch.backends.cudnn.allow_tf32
    torch.backends.cudnn.allow_tf32 = False
    yield
    torch.backends.cudnn.allow_tf32 = old


def by_id(cases, *ids):
    return [next(c for c in cases if c.id == i) for i in ids]


GEMM_CASES = by_id(
    CASES,
    "1x1",
    "2x2-s2-unet",
    "3x3-s2-op1",
    "op-ge-stride-s2",
    "op-ge-stride-rows-only",
    "groups4-s2",
    "asymmetric",
    "batch0",
    "cin1",
)


def triton_conv(spec, algo="auto"):
    return lambda x, w, b: cnnops.conv_transpose2d(
        x, w, b, **conv_args(spec), backend="triton", algo=algo
    )


# direct is implicit_gemm's kernel with FMAs instead of tl.dot: a few cases suffice for it.
GEMM_ALGO_CASES = [
    *(pytest.param(p.values[0], "implicit_gemm", id=f"{p.id}-implicit_gemm") for p in GEMM_CASES),
    *(
        pytest.param(p.values[0], "direct", id=f"{p.id}-direct")
        for p in by_id(CASES, "2x2-s2-unet", "op-ge-stride-s2", "batch0")
    ),
]


@pytest.mark.parametrize("spec,algo", GEMM_ALGO_CASES)
def test_gemm_algos_match_torch(spec, algo):
    check_against_torch(triton_conv(spec, algo), spec, torch.float32, "nchw", DEVICE)


@pytest.mark.parametrize("layout", ["channels_last", "non_contiguous"])
@pytest.mark.parametrize("spec", by_id(CASES, "3x3-s2-op1", "groups2"))
def test_implicit_gemm_in_other_layouts(spec, layout):
    check_against_torch(triton_conv(spec, "implicit_gemm"), spec, torch.float32, layout, DEVICE)


@pytest.mark.parametrize("layout", ["nchw", "channels_last"])
@pytest.mark.parametrize(
    "spec", by_id(DEPTHWISE_CASES, "depthwise", "dw-op-ge-stride", "dw-cin-mult2")
)
def test_depthwise_matches_torch(spec, layout):
    """algo="auto" picks the depthwise kernels for these layers."""
    check_against_torch(triton_conv(spec), spec, torch.float32, layout, DEVICE)


@pytest.mark.parametrize("spec", by_id(CASES, "3x3-s2-op1", "op-ge-stride", "depthwise"))
def test_float64_runs_the_fma_kernels(spec):
    check_against_torch(triton_conv(spec), spec, torch.float64, "nchw", DEVICE)


@pytest.mark.parametrize("algo", ["implicit_gemm", "depthwise"])
def test_gradcheck(algo):
    # fast_mode: a few random directions, not one interpreted launch per input element.
    groups = 2 if algo == "depthwise" else 1
    x = torch.randn(1, 2, 4, 3, dtype=torch.float64)
    w = torch.randn(2, 1 if algo == "depthwise" else 3, 3, 3, dtype=torch.float64)
    b = torch.randn(w.shape[1] * groups, dtype=torch.float64)
    inputs = [t.to(DEVICE).requires_grad_() for t in (x, w, b)]

    def fn(x, w, b):
        return cnnops.conv_transpose2d(
            x, w, b, 2, 1, 1, groups, 2, backend="triton", algo=algo
        )  # stride 2, padding 1, output_padding 1, dilation 2

    assert torch.autograd.gradcheck(fn, inputs, eps=1e-6, atol=1e-5, fast_mode=True)


# In the interpreter, tracing through triton_op's kernel launches (opcheck's AOT-dispatch test)
# reaches fake tensors' data; that part runs on a GPU only.
INTERPRETER_OPCHECK = ("test_schema", "test_autograd_registration", "test_faketensor")


@pytest.mark.parametrize("layout", ["nchw", "channels_last"])
@pytest.mark.parametrize("algo", ["depthwise", "implicit_gemm"])
def test_opcheck(algo, layout):
    spec = by_id(DEPTHWISE_CASES, "depthwise")[0].values[0]
    x, w, b = (t.to(DEVICE).requires_grad_() for t in make_problem(spec, torch.float32, layout))
    args = (x, w, b, [2, 2], [1, 1], [1, 1], [1, 1], 6, algo)
    utils = "ALL" if DEVICE == "cuda" else INTERPRETER_OPCHECK
    torch.library.opcheck(torch.ops.cnnops.conv_transpose2d_triton.default, args, test_utils=utils)


@pytest.mark.parametrize(
    "call,message",
    [
        pytest.param(
            lambda x: cnnops.conv_transpose2d(
                x, torch.randn(4, 3, 3, 3, device=DEVICE), backend="triton", algo="depthwise"
            ),
            "algo 'depthwise' needs a depthwise layer",
            id="depthwise-algo-on-dense-layer",
        ),
        pytest.param(
            lambda x: torch.ops.cnnops.conv_transpose2d_triton(
                x,
                torch.randn(4, 3, 3, 3, device=DEVICE),
                None,
                [1, 1],
                [0, 0],
                [0, 0],
                [1, 1],
                1,
                "depthwise",
            ),
            "algo 'depthwise' needs a depthwise layer",
            id="op-called-directly",
        ),
        pytest.param(
            lambda x: torch.ops.cnnops.conv_transpose2d_triton(
                x,
                torch.randn(4, 3, 3, 3, device=DEVICE),
                None,
                [2, 2],
                [0, 0],
                [2, 0],
                [1, 1],
                1,
                "auto",
            ),
            "output_padding must be smaller than stride or dilation",
            id="op-called-directly-output-padding",
        ),
        pytest.param(
            lambda x: cnnops.conv_transpose2d(
                x,
                torch.randn(4, 1, 3, 3, device=DEVICE),
                groups=4,
                backend="triton",
                algo="im2col",
            ),
            "algo 'im2col' is not available on the triton backend",
            id="algo-not-on-triton",
        ),
    ],
)
def test_bad_input_raises_clear_error(call, message):
    with pytest.raises(ValueError, match=message):
        call(torch.randn(1, 4, 5, 5, device=DEVICE))

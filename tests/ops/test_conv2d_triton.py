"""The triton backend's conv2d (direct, implicit_gemm and depthwise) against F.conv2d.

Without a GPU the kernels run in Triton's interpreter on CPU tensors (tests/conftest.py sets
TRITON_INTERPRET=1), on small shapes; with one, natively on CUDA tensors.
"""

import pytest
import torch
import torch.nn.functional as F
from conv2d_cases import CASES, LAYOUTS, case, check_against_torch, conv_args, make_problem

import cnnops

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
# On a GPU machine these run natively and belong to the GPU lane (`pytest -m cuda`).
pytestmark = [pytest.mark.cuda] if DEVICE == "cuda" else []
GEMM_ALGOS = ["implicit_gemm", "direct"]


@pytest.fixture(autouse=True)
def _exact_fp32():
    # float32 implicit GEMM follows cudnn.allow_tf32 (on by default); the float32 checks test the
    # kernels at full float32 precision. test_tf32_follows_cudnn_flag covers TF32.
    old = torch.backends.cudnn.allow_tf32
    torch.backends.cudnn.allow_tf32 = False
    yield
    torch.backends.cudnn.allow_tf32 = old


# Several tiles in every dimension of every GEMM (the interpreter's tiles are 32 x 16 x 16 and
# 32 x 16 x 8): output channels, input channels, and output pixels.
WIDE_CASE = case(2, 40, 7, 6, 72, 3, padding=1, groups=2, id="wide-channels-groups2")
# The layouts on a sample of the cases: the strides change only the addressing.
LAYOUT_CASES = [CASES[i] for i in (0, 2, 6, 9, 12, 13, 17)] + [WIDE_CASE]


@pytest.mark.parametrize("algo", GEMM_ALGOS)
@pytest.mark.parametrize("spec", [*CASES, WIDE_CASE])
def test_gemm_algos_match_torch(spec, algo):
    """The foundation's case list: every stride, padding, dilation and groups, odd sizes, batch 0,
    forward and every gradient."""
    check_against_torch(
        lambda x, w, b: cnnops.conv2d(x, w, b, **conv_args(spec), backend="triton", algo=algo),
        spec,
        torch.float32,
        "nchw",
        DEVICE,
    )


@pytest.mark.parametrize("layout", [layout for layout in LAYOUTS if layout != "nchw"])
@pytest.mark.parametrize("algo", GEMM_ALGOS)
@pytest.mark.parametrize("spec", LAYOUT_CASES)
def test_gemm_algos_in_other_layouts(spec, algo, layout):
    check_against_torch(
        lambda x, w, b: cnnops.conv2d(x, w, b, **conv_args(spec), backend="triton", algo=algo),
        spec,
        torch.float32,
        layout,
        DEVICE,
    )


@pytest.mark.parametrize("spec", [CASES[i] for i in (2, 6, 8, 12, 13)])
def test_float64_runs_the_fma_kernels(spec):
    """float64 (gradcheck's dtype): tensor cores take none, so implicit_gemm and auto run the
    FMA path, in float64."""
    check_against_torch(
        lambda x, w, b: cnnops.conv2d(x, w, b, **conv_args(spec), backend="triton"),
        spec,
        torch.float64,
        "nchw",
        DEVICE,
    )


TRITON_DEPTHWISE_CASES = [
    case(2, 6, 11, 11, 6, 3, padding=1, groups=6, id="3x3"),
    case(2, 6, 11, 11, 12, 3, stride=2, padding=1, groups=6, id="mult2-s2"),
    case(1, 40, 9, 8, 40, 3, stride=2, padding=1, groups=40, id="two-channel-blocks-s2"),
    case(1, 5, 9, 9, 5, 5, padding=2, groups=5, bias=False, id="5x5-no-bias"),
    case(1, 4, 13, 13, 4, 7, stride=2, padding=3, groups=4, id="7x7-s2"),
    case(2, 4, 9, 9, 4, 3, padding=2, dilation=2, groups=4, id="dil2"),
    case(1, 3, 8, 10, 3, (3, 5), stride=(1, 2), padding=(2, 1), groups=3, id="asymmetric"),
    case(1, 3, 18, 19, 3, 3, padding=1, groups=3, id="several-column-blocks"),
    case(0, 4, 5, 5, 4, 3, padding=1, groups=4, id="batch0"),
    # A halo wider than the staged tile (MAX_BLOCK_X): each tap loads its own window.
    case(1, 3, 52, 52, 3, 3, dilation=25, groups=3, id="dil25-unstaged"),
]


@pytest.mark.parametrize(
    "layout,dtype", [*((layout, torch.float32) for layout in LAYOUTS), ("nchw", torch.float64)]
)
@pytest.mark.parametrize("spec", TRITON_DEPTHWISE_CASES)
def test_depthwise_matches_torch(spec, layout, dtype):
    check_against_torch(
        lambda x, w, b: cnnops.conv2d(x, w, b, **conv_args(spec), backend="triton"),
        spec,
        dtype,
        layout,
        DEVICE,
    )


@pytest.mark.parametrize(
    "algo,channels,weight_shape,groups,dilation",
    [("depthwise", 2, (4, 1, 3, 3), 2, 1), ("implicit_gemm", 4, (6, 2, 3, 3), 2, 2)],
    ids=["depthwise", "implicit_gemm"],
)
def test_gradcheck(algo, channels, weight_shape, groups, dilation):
    # fast_mode: a few random directions, not one interpreted launch per input element.
    x = torch.randn(1, channels, 6, 5, dtype=torch.float64)
    w = torch.randn(*weight_shape, dtype=torch.float64)
    b = torch.randn(weight_shape[0], dtype=torch.float64)
    inputs = [t.to(DEVICE).requires_grad_() for t in (x, w, b)]

    def fn(x, w, b):
        return cnnops.conv2d(x, w, b, 2, 1, dilation, groups, backend="triton", algo=algo)

    assert torch.autograd.gradcheck(fn, inputs, eps=1e-6, atol=1e-5, fast_mode=True)


# In the interpreter, tracing through triton_op's kernel launches (opcheck's AOT-dispatch test)
# reaches fake tensors' data; that part runs on a GPU only.
INTERPRETER_OPCHECK = ("test_schema", "test_autograd_registration", "test_faketensor")


@pytest.mark.parametrize("layout", ["nchw", "channels_last"])
@pytest.mark.parametrize("algo", ["depthwise", *GEMM_ALGOS])
def test_opcheck(algo, layout):
    x, w, b = make_problem(TRITON_DEPTHWISE_CASES[1].values[0], torch.float32, layout)
    x, w, b = (t.to(DEVICE).requires_grad_() for t in (x, w, b))
    args = (x, w, b, [2, 2], [1, 1], [1, 1], 6, algo)
    utils = "ALL" if DEVICE == "cuda" else INTERPRETER_OPCHECK
    torch.library.opcheck(torch.ops.cnnops.conv2d_triton.default, args, test_utils=utils)


@pytest.mark.parametrize(
    "call,message",
    [
        pytest.param(
            lambda x: cnnops.conv2d(
                x, torch.randn(8, 4, 3, 3, device=DEVICE), backend="triton", algo="depthwise"
            ),
            "algo 'depthwise' needs a depthwise layer",
            id="depthwise-algo-on-dense-layer",
        ),
        pytest.param(
            lambda x: torch.ops.cnnops.conv2d_triton(
                x,
                torch.randn(8, 4, 3, 3, device=DEVICE),
                None,
                [1, 1],
                [0, 0],
                [1, 1],
                1,
                "depthwise",
            ),
            "algo 'depthwise' needs a depthwise layer",
            id="op-called-directly",
        ),
        pytest.param(
            lambda x: cnnops.conv2d(
                x, torch.randn(4, 1, 3, 3, device=DEVICE), groups=4, backend="triton", algo="im2col"
            ),
            "algo 'im2col' is not available on the triton backend",
            id="algo-not-on-triton",
        ),
    ],
)
def test_bad_input_raises_clear_error(call, message):
    with pytest.raises(ValueError, match=message):
        call(torch.randn(1, 4, 6, 6, device=DEVICE))


# The GPU-only checks take each algorithm through a layer it serves: a depthwise layer for
# depthwise, a grouped one for the GEMM kernels.
GPU_LAYERS = {
    "depthwise": dict(c=32, k=32, groups=32),
    "implicit_gemm": dict(c=32, k=48, groups=2),
    "direct": dict(c=32, k=48, groups=2),
}
ALL_ALGOS = list(GPU_LAYERS)


def gpu_layer(algo, dtype=torch.float32, n=2, size=14):
    layer = GPU_LAYERS[algo]
    x = torch.randn(n, layer["c"], size, size, device="cuda", dtype=dtype)
    w = torch.randn(layer["k"], layer["c"] // layer["groups"], 3, 3, device="cuda", dtype=dtype)
    return x.contiguous(memory_format=torch.channels_last), w, layer["groups"]


def conv_shape(spec):
    x, w, _ = make_problem(spec, torch.float64)
    return F.conv2d(x, w, **conv_args(spec)).shape


# Each algorithm on the layers it serves.
HALF_PRECISION_CASES = [
    pytest.param(p.values[0], algo, id=f"{p.id}-{algo}")
    for algo in GEMM_ALGOS
    for p in [CASES[i] for i in (2, 4, 6, 9, 13)] + [WIDE_CASE]
] + [
    pytest.param(p.values[0], "depthwise", id=f"{p.id}-depthwise")
    for p in TRITON_DEPTHWISE_CASES[:8]
]


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("layout", ["nchw", "channels_last"])
@pytest.mark.parametrize("spec,algo", HALF_PRECISION_CASES)
def test_half_precision_error_at_most_twice_torchs(spec, algo, layout, dtype):
    """float16/bfloat16 (float32 accumulation): error against the float64 reference at most 2x
    torch's own in that dtype, forward and every gradient."""
    x, w, b = (
        t.cuda() if t is not None else None for t in make_problem(spec, torch.float64, layout)
    )
    grad_out = torch.randn(conv_shape(spec), dtype=torch.float64, device="cuda")

    def results(conv, dtype):
        args = [t.to(dtype).requires_grad_() for t in (x, w, b) if t is not None]
        if b is None:
            args.append(None)
        out = conv(*args)
        return [
            out,
            *torch.autograd.grad(out, [a for a in args if a is not None], grad_out.to(dtype)),
        ]

    ref = results(lambda *a: F.conv2d(*a, **conv_args(spec)), torch.float64)
    theirs = results(lambda *a: F.conv2d(*a, **conv_args(spec)), dtype)
    ours = results(
        lambda *a: cnnops.conv2d(*a, **conv_args(spec), backend="triton", algo=algo), dtype
    )
    names = ("output", "grad_input", "grad_weight", "grad_bias")
    for name, r, t, o in zip(names, ref, theirs, ours, strict=False):
        torch_err = (t.double() - r).abs().max().item()
        our_err = (o.double() - r).abs().max().item()
        assert our_err <= 2 * torch_err + 1e-6, f"{name}: {our_err} vs torch's {torch_err}"


@pytest.mark.cuda
def test_tf32_follows_cudnn_flag():
    """float32 implicit GEMM runs on TF32 tensor cores exactly when torch's convolution would:
    with the flag off its error is float32's; with it on, TF32's (10-bit mantissa)."""
    x = torch.randn(8, 256, 14, 14, device="cuda").contiguous(memory_format=torch.channels_last)
    w = torch.randn(256, 256, 3, 3, device="cuda") / 48
    ref = F.conv2d(x.double(), w.double(), padding=1)

    def error(allow_tf32):
        torch.backends.cudnn.allow_tf32 = allow_tf32
        out = cnnops.conv2d(x, w, padding=1, backend="triton", algo="implicit_gemm")
        return (out.double() - ref).abs().max().item() / ref.abs().max().item()

    exact, tf32 = error(False), error(True)
    assert exact < 1e-5, exact
    assert 1e-5 < tf32 < 1e-2, tf32


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("algo", ALL_ALGOS)
def test_torch_compile_fullgraph_on_gpu(algo, dtype):
    """torch.compile sees through triton_op to the kernels (a GPU only: Inductor does not run
    Triton's interpreter), forward and backward."""
    x, w, groups = gpu_layer(algo, dtype)
    x.requires_grad_()

    @torch.compile(fullgraph=True)
    def block(x, w):
        return torch.relu(
            cnnops.conv2d(x, w, padding=1, groups=groups, backend="triton", algo=algo)
        )

    got = block(x, w)
    (grad,) = torch.autograd.grad(got.float().sum(), x)
    x32 = x.detach().float().requires_grad_()
    want = torch.relu(F.conv2d(x32, w.float(), padding=1, groups=groups))
    (want_grad,) = torch.autograd.grad(want.sum(), x32)
    torch.testing.assert_close(got.float(), want, atol=2e-2, rtol=2e-2)
    torch.testing.assert_close(grad.float(), want_grad, atol=5e-2, rtol=2e-2)


@pytest.mark.cuda
@pytest.mark.parametrize("memory_format", [torch.contiguous_format, torch.channels_last])
def test_large_tensor_is_indexed_in_int64(memory_format):
    """Depthwise: input and output past 2^31 elements: their last rows lie past 2^31, where 32-bit
    offsets would wrap (in NCHW, channel 1's plane; in channels_last, the last rows of both)."""
    x = torch.randn(1, 2, 33000, 33000, device="cuda", dtype=torch.float16)
    x = x.contiguous(memory_format=memory_format)
    w = torch.randn(2, 1, 3, 3, device="cuda", dtype=torch.float16)
    assert x.numel() > 2**31
    out = cnnops.conv2d(x, w, padding=1, groups=2, backend="triton")
    # Output rows 1..4 and the last rows but one, from the input rows they read, in float32.
    for first in (1, x.shape[2] - 5):
        want = F.conv2d(x[:, :, first - 1 : first + 5].float(), w.float(), padding=(0, 1), groups=2)
        torch.testing.assert_close(out[:, :, first : first + 4].float(), want, atol=2e-2, rtol=2e-2)


@pytest.mark.cuda
def test_large_tensor_implicit_gemm_forward_and_grad_input():
    """Implicit GEMM with input, output and grad input past 2^31 elements (channels_last: the
    last rows lie past 2^31), checked on their first and last rows."""
    x = torch.randn(1, 16, 12000, 12000, device="cuda", dtype=torch.float16)
    x = x.contiguous(memory_format=torch.channels_last).requires_grad_()
    w = torch.randn(16, 16, 3, 3, device="cuda", dtype=torch.float16) / 12
    assert x.numel() > 2**31
    out = cnnops.conv2d(x, w, padding=1, backend="triton", algo="implicit_gemm")
    grad_out = torch.randn_like(out)
    (grad_x,) = torch.autograd.grad(out, x, grad_out)
    for first in (1, x.shape[2] - 5):
        rows = x.detach()[:, :, first - 1 : first + 5].float()
        torch.testing.assert_close(
            out[:, :, first : first + 4].float(),
            F.conv2d(rows, w.float(), padding=(0, 1)),
            atol=2e-2,
            rtol=2e-2,
        )
        # Grad input rows first+1 and first+2 gather grad output rows first..first+3 only; the
        # transposed convolution of those rows puts input row first+j-1 at its row j.
        go_rows = grad_out[:, :, first : first + 4].float()
        want = F.conv_transpose2d(go_rows, w.float(), padding=(0, 1))
        torch.testing.assert_close(
            grad_x[:, :, first + 1 : first + 3].float(), want[:, :, 2:4], atol=5e-2, rtol=2e-2
        )


@pytest.mark.cuda
@pytest.mark.parametrize("algo", ALL_ALGOS)
def test_cuda_graph_capture(algo):
    x, w, groups = gpu_layer(algo, n=4, size=28)
    b = torch.randn(w.shape[0], device="cuda")
    conv = lambda: cnnops.conv2d(x, w, b, 2, 1, 1, groups, backend="triton", algo=algo)  # noqa: E731
    want = conv()
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        conv()  # warm-up: compile and autotune outside the capture
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        captured = conv()
    x.copy_(torch.randn_like(x))
    graph.replay()
    torch.testing.assert_close(captured, conv())
    assert not torch.equal(captured, want)


@pytest.mark.cuda
@pytest.mark.parametrize("layout", ["nchw", "channels_last"])
@pytest.mark.parametrize("algo", ALL_ALGOS)
def test_cuda_and_triton_agree(algo, layout):
    spec = (TRITON_DEPTHWISE_CASES[2] if algo == "depthwise" else WIDE_CASE).values[0]
    x, w, b = (t.cuda() for t in make_problem(spec, torch.float32, layout))
    triton_out = cnnops.conv2d(x, w, b, **conv_args(spec), backend="triton", algo=algo)
    cuda_out = cnnops.conv2d(x, w, b, **conv_args(spec), backend="cuda", algo="direct")
    torch.testing.assert_close(triton_out, cuda_out, atol=1e-4, rtol=1e-4)

"""The CUDA C++ conv2d kernels against torch (cuDNN / float64 references). Needs a GPU."""

import pytest
import torch
import torch.nn.functional as F
from conv2d_cases import (
    CASES,
    DEPTHWISE_CASES,
    LAYOUTS,
    case,
    check_against_torch,
    conv_args,
    make_problem,
    reduction_lengths,
)
from tolerance import assert_close_to_reference

import cnnops

pytestmark = pytest.mark.cuda
CUDA_ALGOS = ["direct", "im2col"]


@pytest.fixture(autouse=True)
def _exact_fp32():
    # TF32 would put fp32 results outside the fp32 tolerance; test the kernels' own precision.
    old = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = old


def to_cuda(*tensors):
    return [t.cuda() if t is not None else None for t in tensors]


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("algo", CUDA_ALGOS)
@pytest.mark.parametrize("spec", CASES)
def test_float32_forward_and_gradients(spec, algo, layout):
    x, w, b = make_problem(spec, torch.float32, layout)
    x, w, b = [t.detach().requires_grad_() if t is not None else None for t in to_cuda(x, w, b)]
    out = cnnops.conv2d(x, w, b, **conv_args(spec), algo=algo, backend="cuda")
    x64, w64 = x.detach().double().requires_grad_(), w.detach().double().requires_grad_()
    b64 = b.detach().double().requires_grad_() if b is not None else None
    ref = F.conv2d(x64, w64, b64, **conv_args(spec))
    lengths = reduction_lengths(spec, ref.shape)
    assert_close_to_reference(out, ref, lengths[0])
    grad_out = torch.randn(ref.shape, dtype=torch.float64, device="cuda")
    params = [t for t in (x, w, b) if t is not None]
    grads = torch.autograd.grad(out, params, grad_out.float())
    ref_grads = torch.autograd.grad(ref, [t for t in (x64, w64, b64) if t is not None], grad_out)
    for name, got, want, length in zip(
        ("grad_input", "grad_weight", "grad_bias"), grads, ref_grads, lengths[1:], strict=False
    ):
        assert_close_to_reference(got, want, length, name)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("algo", CUDA_ALGOS)
@pytest.mark.parametrize("spec", [CASES[i] for i in (0, 2, 4, 6, 10, 12, 13)])
def test_half_precision_error_at_most_twice_torchs(spec, algo, dtype):
    """fp16/bf16 error against the fp64 reference must be at most 2x torch's own in that dtype."""
    x, w, b = make_problem(spec, torch.float64)
    x, w, b = to_cuda(x, w, b)
    ref = F.conv2d(x, w, b, **conv_args(spec))
    low = [t.to(dtype) if t is not None else None for t in (x, w, b)]
    torch_err = (F.conv2d(*low, **conv_args(spec)).double() - ref).abs().max().item()
    ours = cnnops.conv2d(*low, **conv_args(spec), algo=algo, backend="cuda")
    assert ours.dtype == dtype
    our_err = (ours.double() - ref).abs().max().item()
    assert our_err <= 2 * torch_err + torch.finfo(dtype).eps, (our_err, torch_err)


@pytest.mark.parametrize("algo", CUDA_ALGOS)
def test_gradcheck_float64(algo):
    spec = dict(CASES[13].values[0], n=1)
    x, w, b = to_cuda(*make_problem(spec, torch.float64))
    inputs = [t.requires_grad_() for t in (x, w, b)]
    assert torch.autograd.gradcheck(
        lambda *a: cnnops.conv2d(*a, **conv_args(spec), algo=algo, backend="cuda"),
        inputs,
        eps=1e-6,
        atol=1e-5,
    )


@pytest.mark.parametrize("algo", CUDA_ALGOS)
def test_opcheck(algo):
    x, w, b = to_cuda(*make_problem(CASES[9].values[0], torch.float32))
    torch.library.opcheck(
        torch.ops.cnnops.conv2d.default,
        (x.requires_grad_(), w.requires_grad_(), b, [1, 1], [1, 1], [1, 1], 4, algo),
    )


def test_compile_fullgraph():
    x, w, b = to_cuda(*make_problem(CASES[9].values[0], torch.float32))
    fn = torch.compile(
        lambda x, w, b: torch.relu(cnnops.conv2d(x, w, b, padding=1, groups=4)), fullgraph=True
    )
    torch.testing.assert_close(
        fn(x, w, b), torch.relu(F.conv2d(x, w, b, padding=1, groups=4)), atol=1e-4, rtol=1e-4
    )


@pytest.mark.parametrize("algo", CUDA_ALGOS)
def test_cuda_graph_capture(algo):
    x, w, b = to_cuda(*make_problem(CASES[2].values[0], torch.float32))
    cnnops.conv2d(x, w, b, padding=1, algo=algo)  # warm up outside the capture
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = cnnops.conv2d(x, w, b, padding=1, algo=algo)
    x.copy_(torch.randn_like(x))
    graph.replay()
    torch.testing.assert_close(out, F.conv2d(x, w, b, padding=1), atol=1e-4, rtol=1e-4)


def test_cpu_and_cuda_tensors_mixed_raise():
    x, w, _ = make_problem(CASES[2].values[0], torch.float32)
    with pytest.raises(ValueError, match="same device"):
        cnnops.conv2d(x.cuda(), w)


# The depthwise algorithm: the depthwise layers of every backend's tests, and planes that take
# several tiles, channel tiles with a remainder (channels_last tiles hold 32), strides that take
# the kernels' generic paths, a channel multiplier with a 7x7 kernel, and a dilation whose
# float64 halo does not fit in shared memory even for one thread's outputs (the kernels hand
# over to direct there; in float32 it still fits, in tiles of one run).
CUDA_DEPTHWISE_CASES = [
    *DEPTHWISE_CASES,
    case(2, 8, 70, 130, 8, 3, padding=1, groups=8, id="dw-many-tiles"),
    case(1, 40, 57, 45, 40, 3, stride=2, padding=1, groups=40, id="dw-40ch-s2-tiles"),
    case(2, 6, 33, 38, 6, 5, stride=2, padding=2, groups=6, id="dw-5x5-s2"),
    case(2, 5, 20, 23, 5, 3, stride=3, padding=1, groups=5, id="dw-s3"),
    case(
        1, 4, 30, 31, 12, 7, stride=(2, 3), padding=3, dilation=(1, 2), groups=4, id="dw-7x7-mult3"
    ),
    case(1, 2, 120, 120, 2, 3, padding=50, dilation=50, groups=2, id="dw-dil50-halo-too-large"),
]


def depthwise_conv(spec, algo="depthwise"):
    return lambda x, w, b: cnnops.conv2d(x, w, b, **conv_args(spec), algo=algo, backend="cuda")


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("spec", CUDA_DEPTHWISE_CASES)
def test_depthwise_forward_and_gradients(spec, layout):
    """algo="depthwise": shared-memory tiles in NCHW or channels_last order, forward, grad input
    and grad weight; float64 runs the same kernels with double accumulators."""
    for dtype in (torch.float32, torch.float64):
        check_against_torch(depthwise_conv(spec), spec, dtype, layout, device="cuda")


def _depthwise_spec(case_id):
    return next(c.values[0] for c in CUDA_DEPTHWISE_CASES if c.id == case_id)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("layout", ["nchw", "channels_last"])
@pytest.mark.parametrize("case_id", ["depthwise", "dw-96ch-s2", "dw-mult2", "dw-5x5-s2"])
def test_depthwise_half_precision_error_at_most_twice_torchs(case_id, layout, dtype):
    """Output, grad input and grad weight: error against float64 at most 2x torch's own."""
    spec = _depthwise_spec(case_id)
    x, w, b = to_cuda(*make_problem(spec, torch.float64, layout))
    torch_conv = lambda x, w, b: F.conv2d(x, w, b, **conv_args(spec))  # noqa: E731
    grad_out = None
    results = {}  # output, grad input, grad weight, in float64
    for name, conv, dt in (
        ("reference", torch_conv, torch.float64),
        ("torch", torch_conv, dtype),
        ("ours", depthwise_conv(spec), dtype),
    ):
        args = [t.detach().to(dt).requires_grad_() for t in (x, w, b)]
        out = conv(*args)
        if grad_out is None:
            grad_out = torch.randn(out.shape, dtype=torch.float64, device="cuda")
        grads = torch.autograd.grad(out, args[:2], grad_out.to(dt))
        results[name] = [out.double(), *(g.double() for g in grads)]
    for i, result in enumerate(("output", "grad_input", "grad_weight")):
        want = results["reference"][i]
        slack = torch.finfo(dtype).eps * max(1.0, want.abs().max().item())
        torch_err = (results["torch"][i] - want).abs().max().item()
        our_err = (results["ours"][i] - want).abs().max().item()
        assert our_err <= 2 * torch_err + slack, (result, our_err, torch_err)


@pytest.mark.parametrize("layout", ["nchw", "channels_last"])
def test_depthwise_gradcheck_float64(layout):
    spec = dict(_depthwise_spec("dw-mult2"), n=1, h=6, w=7)
    x, w, b = to_cuda(*make_problem(spec, torch.float64, layout))
    inputs = [t.requires_grad_() for t in (x, w, b)]
    assert torch.autograd.gradcheck(depthwise_conv(spec), inputs, eps=1e-6, atol=1e-5)


@pytest.mark.parametrize("layout", ["nchw", "channels_last"])
def test_depthwise_opcheck(layout):
    spec = _depthwise_spec("dw-32ch")
    x, w, b = to_cuda(*make_problem(spec, torch.float32, layout))
    args = (x.requires_grad_(), w.requires_grad_(), b.requires_grad_(), [1, 1], [1, 1], [1, 1])
    torch.library.opcheck(torch.ops.cnnops.conv2d.default, (*args, 32, "depthwise"))


@pytest.mark.parametrize("layout", ["nchw", "channels_last"])
def test_depthwise_is_auto_and_deterministic(layout):
    """algo="auto" runs the depthwise kernels on a depthwise layer, and they add in a fixed
    order (no atomics): every run gives the same bits."""
    spec = _depthwise_spec("dw-many-tiles")
    x, w, b = to_cuda(*make_problem(spec, torch.float32, layout))
    grad_out = torch.randn(2, 8, 70, 130, device="cuda")
    results = []
    for algo in ("auto", "depthwise", "depthwise"):
        args = [t.detach().requires_grad_() for t in (x, w, b)]
        out = depthwise_conv(spec, algo)(*args)
        results.append([out, *torch.autograd.grad(out, args, grad_out)])
    for other in results[1:]:
        for got, want in zip(other, results[0], strict=True):
            assert torch.equal(got, want)


def test_depthwise_cuda_graph_capture():
    spec = _depthwise_spec("dw-40ch-s2-tiles")
    x, w, b = to_cuda(*make_problem(spec, torch.float32, "channels_last"))
    conv = lambda: depthwise_conv(spec)(x, w, b)  # noqa: E731
    conv()  # warm up outside the capture
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = conv()
    x.copy_(torch.randn_like(x))
    graph.replay()
    torch.testing.assert_close(out, F.conv2d(x, w, b, **conv_args(spec)), atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("memory_format", [torch.contiguous_format, torch.channels_last])
def test_depthwise_large_tensor_is_indexed_in_int64(memory_format):
    """Input, output and grads past 2^31 elements: the kernels take 64-bit offsets. Checked on
    the first and the last rows, against torch on the slices they read."""
    x = torch.randn(1, 2, 33000, 33000, device="cuda", dtype=torch.float16)
    x = x.contiguous(memory_format=memory_format)
    w = torch.randn(2, 1, 3, 3, device="cuda", dtype=torch.float16)
    assert x.numel() > 2**31
    out = cnnops.conv2d(x, w, padding=1, groups=2, algo="depthwise", backend="cuda")
    grad_input = torch.ops.cnnops._conv2d_backward(
        out, x, w, [1, 1], [1, 1], [1, 1], 2, "depthwise", [True, False, False]
    )[0]
    flipped = w.float().flip(2, 3)  # grad input of a stride-1 depthwise conv: a conv with these
    for first in (1, x.shape[2] - 5):
        rows = slice(first - 1, first + 5)
        want = F.conv2d(x[:, :, rows].float(), w.float(), padding=(0, 1), groups=2)
        torch.testing.assert_close(out[:, :, first : first + 4].float(), want, atol=2e-2, rtol=2e-2)
        want = F.conv2d(out[:, :, rows].float(), flipped, padding=(0, 1), groups=2)
        got = grad_input[:, :, first : first + 4].float()
        torch.testing.assert_close(got, want, atol=5e-2, rtol=2e-2)


@pytest.mark.parametrize("memory_format", [torch.contiguous_format, torch.channels_last])
@pytest.mark.parametrize("algo", CUDA_ALGOS)
def test_large_tensor_is_indexed_in_int64(algo, memory_format):
    """A dense layer whose input, output and grad input pass 2^31 elements, through direct and
    im2col: checked on the first and the last rows, against torch on the slices they read."""
    x = torch.randn(1, 2, 33000, 33000, device="cuda", dtype=torch.float16)
    x = x.contiguous(memory_format=memory_format)
    w = torch.randn(2, 2, 3, 3, device="cuda", dtype=torch.float16) / 4
    assert x.numel() > 2**31
    out = cnnops.conv2d(x, w, padding=1, algo=algo, backend="cuda")
    grad_input = torch.ops.cnnops._conv2d_backward(
        out, x, w, [1, 1], [1, 1], [1, 1], 1, algo, [True, False, False]
    )[0]
    # Grad input of a stride-1 convolution: a convolution with the transposed, flipped filters.
    transposed = w.float().transpose(0, 1).flip(2, 3)
    for first in (1, x.shape[2] - 5):
        rows = slice(first - 1, first + 5)
        want = F.conv2d(x[:, :, rows].float(), w.float(), padding=(0, 1))
        torch.testing.assert_close(out[:, :, first : first + 4].float(), want, atol=2e-2, rtol=2e-2)
        want = F.conv2d(out[:, :, rows].float(), transposed, padding=(0, 1))
        got = grad_input[:, :, first : first + 4].float()
        torch.testing.assert_close(got, want, atol=5e-2, rtol=2e-2)


def test_depthwise_algo_on_a_non_depthwise_layer_raises():
    x = torch.randn(2, 4, 9, 9, device="cuda")
    dense, grouped = torch.randn(6, 4, 3, 3, device="cuda"), torch.randn(4, 2, 3, 3, device="cuda")
    for w, groups in ((dense, 1), (grouped, 2)):
        message = "algo 'depthwise' needs a depthwise layer"
        with pytest.raises(ValueError, match=message):
            cnnops.conv2d(x, w, groups=groups, algo="depthwise", backend="cuda")
        args = (x, w, None, [1, 1], [0, 0], [1, 1], groups, "depthwise")
        with pytest.raises(RuntimeError, match=message):
            torch.ops.cnnops.conv2d(*args)
        grad_out = torch.randn(2, w.shape[0], 7, 7, device="cuda")
        with pytest.raises(RuntimeError, match=message):
            torch.ops.cnnops._conv2d_backward(
                grad_out, x, w, [1, 1], [0, 0], [1, 1], groups, "depthwise", [True, True, True]
            )

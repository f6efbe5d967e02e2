"""The CUDA C++ conv2d kernels against torch (cuDNN / float64 references). Needs a GPU."""

import pytest
import torch
import torch.nn.functional as F
from conv2d_cases import CASES, LAYOUTS, conv_args, make_problem, reduction_lengths
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

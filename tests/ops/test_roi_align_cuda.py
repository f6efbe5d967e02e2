"""The CUDA C++ roi_align kernels (backend="cuda") against torchvision.ops.roi_align on CUDA.
Needs a GPU.

float32 and float64 results are compared with torchvision's in the same dtype (the formulas are
torchvision's, step for step). float16 and bfloat16 ones are compared with torchvision's float64
result from the same rounded inputs, and may be off by at most twice torchvision's own error in
that dtype (or, where torchvision has no kernel for the dtype, twice the error of rounding the
float64 result to it).
"""

import pytest
import torch
import torchvision
from roi_cases import (
    DETERMINISTIC_TOLERANCE,
    cuda_problem,
    deterministic_algorithms,
    random_like,
    random_rois,
    wide_problem,
    with_layout,
)

import cnnops

pytestmark = pytest.mark.cuda

CASES = [
    pytest.param(dict(output_size=(7, 7), sampling_ratio=-1, aligned=False), id="7x7-adaptive"),
    pytest.param(dict(output_size=(7, 7), sampling_ratio=0, aligned=True), id="7x7-ratio0-aligned"),
    pytest.param(dict(output_size=(3, 5), sampling_ratio=2, aligned=False), id="3x5-ratio2"),
    pytest.param(dict(output_size=(2, 2), sampling_ratio=2, aligned=True), id="2x2-ratio2-aligned"),
    pytest.param(dict(output_size=1, sampling_ratio=-1, aligned=True), id="1x1-aligned"),
]
LAYOUTS = ["nchw", "channels_last", "non_contiguous"]
TOLERANCE = {
    torch.float32: dict(atol=1e-5, rtol=1e-5),
    torch.float64: dict(atol=1e-12, rtol=1e-12),
}


def ours(x, rois, **args):
    return cnnops.roi_align(x, rois, spatial_scale=0.5, backend="cuda", **args)


def theirs(x, rois, **args):
    return torchvision.ops.roi_align(x, rois, spatial_scale=0.5, **args)


def check_against_torchvision(x, rois, args, reference_dtype=None, tol=None):
    """Forward and gradient against torchvision's, computed in reference_dtype (default: x's)."""
    x = x.detach().requires_grad_()
    x_ref = x.detach().to(reference_dtype or x.dtype).requires_grad_()
    got = ours(x, rois, **args)
    want = theirs(x_ref, rois.to(x_ref.dtype), **args)
    tol = tol or TOLERANCE[x.dtype]
    torch.testing.assert_close(got, want.to(got.dtype), **tol)
    grad = random_like(got)
    (got_grad,) = torch.autograd.grad(got, x, grad)
    (want_grad,) = torch.autograd.grad(want, x_ref, grad.to(x_ref.dtype))
    torch.testing.assert_close(got_grad, want_grad.to(got_grad.dtype), **tol)
    return got, got_grad


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("args", CASES)
def test_forward_and_gradient_match_torchvision(args, dtype, layout):
    x, rois = cuda_problem(dtype, layout)
    got, _ = check_against_torchvision(x, rois, args)
    if layout == "channels_last":
        assert got.is_contiguous(memory_format=torch.channels_last)
    else:
        assert got.is_contiguous()


@pytest.mark.parametrize("layout", ["nchw", "channels_last"])
@pytest.mark.parametrize("args", [CASES[0], CASES[3]])
def test_many_channels(args, layout):
    # 70 channels: two work items per RoI in the forward, partial channel groups in the backward.
    x, rois = wide_problem(torch.float32, layout)
    check_against_torchvision(x, rois, args)


@pytest.mark.parametrize("layout", ["nchw", "channels_last"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_sampling_grids_larger_than_the_tap_table(dtype, layout):
    # 7 x 100 sample rows and columns per RoI, and an adaptive 286 x 286 grid: more taps than
    # shared memory holds, computed in the sample loop instead (next to RoIs that fit). Bins
    # average up to 10^4 samples: against float64, with a tolerance for float32 sums that long.
    x, rois = cuda_problem(dtype, layout, k=6)
    # Not the empty RoI: its 49 x 10^4 samples all tap the same 4 pixels, whose float32
    # gradient sums of 2 * 10^6 terms stray by more than this tolerance.
    rois[2, 3:] = rois[2, 1:3] + 6.0
    tol = dict(atol=1e-3, rtol=1e-3) if dtype == torch.float32 else dict(atol=1e-10, rtol=1e-10)
    args = dict(output_size=7, sampling_ratio=100, aligned=True)
    check_against_torchvision(x, rois, args, torch.float64, tol)
    rois[3, 1:] = torch.tensor([-2000.0, -2000.0, 2000.0, 2000.0], dtype=dtype)
    args = dict(output_size=7, sampling_ratio=-1, aligned=False)
    check_against_torchvision(x, rois, args, torch.float64, tol)


@pytest.mark.parametrize("layout", ["nchw", "non_contiguous", "channels_last"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_tall_outputs_of_wide_rois(dtype, layout):
    # 64 bin rows over the 140 columns of a full-width RoI: more row sums than the NCHW forward
    # keeps in shared memory, so those RoIs take the direct form, next to narrow ones that don't.
    gen = torch.Generator().manual_seed(11)
    x = torch.randn(2, 3, 20, 140, generator=gen, dtype=torch.float64)
    x = with_layout(x.cuda().to(dtype), layout)
    rois = random_rois(8, 2, 2 * 140, seed=11).cuda().to(dtype)
    rois[:3, 1:] = torch.tensor([-4.0, 1.0, 285.0, 37.0], dtype=dtype)
    check_against_torchvision(x, rois, dict(output_size=(64, 4), sampling_ratio=2, aligned=False))


def max_error(actual, reference):
    return (actual.double() - reference).abs().max().item()


def torchvision_in(dtype, x, rois, args, grad):
    """torchvision's result and gradient in `dtype`, or None where it has no kernel for it."""
    x = x.detach().requires_grad_()
    try:
        out = theirs(x, rois, **args)
    except RuntimeError:
        return None
    (x_grad,) = torch.autograd.grad(out, x, grad)
    return out, x_grad


@pytest.mark.parametrize("layout", ["nchw", "channels_last"])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("args", [CASES[0], CASES[1], CASES[3]])
def test_half_precision_within_twice_torchvisions_error(args, dtype, layout):
    x, rois = wide_problem(dtype, layout, channels=37)
    grad = random_like(ours(x, rois, **args))
    x_ref = x.detach().double().requires_grad_()
    ref = theirs(x_ref, rois.double(), **args)
    (ref_grad,) = torch.autograd.grad(ref, x_ref, grad.double())

    x = x.detach().requires_grad_()
    got = ours(x, rois, **args)
    (got_grad,) = torch.autograd.grad(got, x, grad)
    assert got.dtype == dtype and got_grad.dtype == dtype

    baseline = torchvision_in(dtype, x, rois, args, grad)
    if baseline is None:
        baseline = ref.to(dtype), ref_grad.to(dtype)
    floor = 1e-2 * torch.finfo(dtype).eps
    assert max_error(got, ref) <= 2 * max_error(baseline[0], ref) + floor
    assert max_error(got_grad, ref_grad) <= 2 * max_error(baseline[1], ref_grad) + floor


def backward_op(grad, rois, x_shape, args):
    size = args["output_size"]
    pooled_h, pooled_w = (size, size) if isinstance(size, int) else size
    n, c, h, w = x_shape
    return torch.ops.cnnops._roi_align_backward(
        grad, rois, 0.5, pooled_h, pooled_w, n, c, h, w, args["sampling_ratio"], args["aligned"]
    )


@pytest.mark.parametrize("layout", ["nchw", "channels_last"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("args", [CASES[0], CASES[1], CASES[2]])
def test_deterministic_backward_is_bitwise_repeatable(args, dtype, layout):
    # 600 RoIs over 2 images: more than one 256-RoI pass of the gather kernel's RoI list.
    x, rois = wide_problem(dtype, layout, k=600)
    grad = with_layout(random_like(ours(x, rois, **args)), layout)
    atomic = backward_op(grad, rois, x.shape, args)
    with deterministic_algorithms():
        first = backward_op(grad, rois, x.shape, args)
        second = backward_op(grad, rois, x.shape, args)
    assert torch.equal(first, second)
    assert first.stride() == atomic.stride()
    if layout == "channels_last":
        assert first.is_contiguous(memory_format=torch.channels_last)
    torch.testing.assert_close(first, atomic, **DETERMINISTIC_TOLERANCE[dtype])


@pytest.mark.parametrize("args", CASES)
def test_deterministic_backward_matches_torchvision_in_float64(args):
    x, rois = cuda_problem(torch.float64)
    x.requires_grad_()
    want = theirs(x, rois, **args)
    grad = random_like(want)
    (want_grad,) = torch.autograd.grad(want, x, grad)
    with deterministic_algorithms():
        (got_grad,) = torch.autograd.grad(ours(x, rois, **args), x, grad)
        # out.sum() sends an expanded (stride 0) gradient.
        (sum_grad,) = torch.autograd.grad(ours(x, rois, **args).sum(), x)
    torch.testing.assert_close(got_grad, want_grad, atol=1e-12, rtol=1e-12)
    (want_sum_grad,) = torch.autograd.grad(theirs(x, rois, **args).sum(), x)
    torch.testing.assert_close(sum_grad, want_sum_grad, atol=1e-12, rtol=1e-12)


def test_deterministic_backward_of_fine_sampling_grids():
    # Sample spacing far below a pixel: many candidate samples per pixel in the gather kernel.
    x, rois = cuda_problem(torch.float64, k=6)
    args = dict(output_size=(3, 4), sampling_ratio=40, aligned=False)
    grad = random_like(ours(x, rois, **args))
    atomic = backward_op(grad, rois, x.shape, args)
    with deterministic_algorithms():
        gathered = backward_op(grad, rois, x.shape, args)
    torch.testing.assert_close(gathered, atomic, atol=1e-12, rtol=1e-12)


@pytest.mark.parametrize("deterministic", [False, True])
@pytest.mark.parametrize("layout", ["nchw", "channels_last"])
def test_no_rois_and_no_channels(layout, deterministic):
    x, rois = cuda_problem(torch.float32, layout)
    x.requires_grad_()
    out = ours(x, rois[:0], output_size=7)
    assert out.shape == (0, 5, 7, 7)
    if layout == "channels_last":
        assert out.is_contiguous(memory_format=torch.channels_last)
    empty = ours(x[:, :0], rois, output_size=(2, 3))
    assert empty.shape == (12, 0, 2, 3)
    with deterministic_algorithms(deterministic):
        (grad,) = torch.autograd.grad(out.sum(), x)
    assert torch.equal(grad, torch.zeros_like(x))
    grad_input = torch.ops.cnnops._roi_align_backward(
        empty.detach(), rois, 0.5, 2, 3, 2, 0, 11, 13, -1, False
    )
    assert grad_input.shape == (2, 0, 11, 13)


@pytest.mark.parametrize("deterministic", [False, True])
def test_gradcheck(deterministic):
    x, rois = cuda_problem(torch.float64, k=4)
    x = x[:, :2, :6, :7].detach().requires_grad_()
    rois = rois.clone()
    rois[:, 1:] = rois[:, 1:].clamp(-4, 20)

    def check():
        return torch.autograd.gradcheck(
            lambda x: ours(x, rois, output_size=(3, 2), sampling_ratio=2, aligned=True),
            (x,),
            fast_mode=True,
        )

    with deterministic_algorithms(deterministic):
        assert check()


@pytest.mark.parametrize("layout", ["nchw", "channels_last"])
def test_opcheck(layout):
    x, rois = cuda_problem(torch.float32, layout, k=6)
    x.requires_grad_()
    torch.library.opcheck(torch.ops.cnnops.roi_align.default, (x, rois, 0.5, 3, 3, 2, True))


def test_torch_compile_fullgraph():
    x, rois = cuda_problem(torch.float32)

    @torch.compile(fullgraph=True, backend="eager")
    def pooled(x, rois):
        return torch.relu(ours(x, rois, output_size=7, sampling_ratio=2, aligned=True))

    want = torch.relu(theirs(x, rois, output_size=7, sampling_ratio=2, aligned=True))
    torch.testing.assert_close(pooled(x, rois), want, atol=1e-5, rtol=1e-5)


def bad_rois(column, value, direct=False):
    def make(x, rois):
        rois = rois.clone()
        rois[3, column] = value
        if direct:
            return torch.ops.cnnops.roi_align(x, rois, 0.5, 7, 7, -1, False)
        return ours(x, rois, output_size=7)

    return make


def backward_with_bad_rois(x, rois):
    rois = rois.clone()
    rois[3, 2] = float("nan")
    grad = torch.ones(12, 5, 7, 7, dtype=x.dtype, device=x.device)
    return torch.ops.cnnops._roi_align_backward(grad, rois, 0.5, 7, 7, 2, 5, 11, 13, -1, False)


@pytest.mark.parametrize(
    "call,error,message",
    [
        pytest.param(bad_rois(1, float("nan")), RuntimeError, "non-finite coordinate", id="nan"),
        pytest.param(bad_rois(4, float("inf")), RuntimeError, "non-finite coordinate", id="inf"),
        pytest.param(
            bad_rois(0, 2.0),
            RuntimeError,
            r"batch index 2, expected .* \[0, 2\)",
            id="batch-index-past-the-batch",
        ),
        pytest.param(bad_rois(0, -1.0), RuntimeError, "batch index -1", id="negative-batch-index"),
        pytest.param(
            bad_rois(0, 0.5), RuntimeError, "batch index 0.5", id="fractional-batch-index"
        ),
        pytest.param(
            bad_rois(0, 7.0, direct=True),
            RuntimeError,
            "batch index 7",
            id="op-called-directly-batch-index",
        ),
        pytest.param(
            bad_rois(3, 1e12),
            RuntimeError,
            "too large for an adaptive sampling grid",
            id="adaptive-grid-too-large",
        ),
        pytest.param(
            lambda x, r: ours(x, r, output_size=7, sampling_ratio=2**40),
            RuntimeError,
            "sampling grid per bin",
            id="sampling-ratio-too-large",
        ),
        pytest.param(backward_with_bad_rois, RuntimeError, "non-finite coordinate", id="backward"),
        pytest.param(
            lambda x, r: ours(x, r.cpu(), output_size=7),
            ValueError,
            "boxes are on cpu",
            id="rois-on-the-cpu",
        ),
        pytest.param(
            lambda x, r: torch.ops.cnnops.roi_align(x, r.cpu(), 0.5, 7, 7, -1, False),
            RuntimeError,
            "rois are on cpu",
            id="op-called-directly-rois-on-the-cpu",
        ),
        pytest.param(
            lambda x, r: torch.ops.cnnops.roi_align(x, r, 0.5, 0, 7, -1, False),
            RuntimeError,
            "output_size must be positive",
            id="op-called-directly-output-size-0",
        ),
    ],
)
def test_bad_input_raises_clear_error(call, error, message):
    x, rois = cuda_problem(torch.float32)
    with pytest.raises(error, match=message):
        call(x, rois)

"""The CUDA C++ roi_pool kernels (backend="cuda") against torchvision.ops.roi_pool on CUDA.
Needs a GPU.

A max picks one of its inputs, so outputs and argmaxes are compared for equality: with
torchvision in float32 and float64; for float16 and bfloat16 with torchvision in float32 on the
same (exactly upcast) inputs, whose window arithmetic is ours (torchvision's own half kernel
rounds the scaled coordinates and bin sizes to half). Gradients are sums of bin gradients and
are compared within rounding.
"""

import pytest
import torch
import torchvision
from roi_cases import (
    DETERMINISTIC_TOLERANCE,
    cuda_problem,
    deterministic_algorithms,
    random_like,
    wide_problem,
    with_layout,
)

import cnnops

pytestmark = pytest.mark.cuda

OUTPUT_SIZES = [
    pytest.param((7, 7), id="7x7"),
    pytest.param((3, 5), id="3x5"),
    pytest.param(1, id="1x1"),
    pytest.param((12, 9), id="bins-smaller-than-pixels"),
]
LAYOUTS = ["nchw", "channels_last", "non_contiguous"]


def pair(size):
    return (size, size) if isinstance(size, int) else size


def ours_with_argmax(x, rois, output_size, spatial_scale=0.5):
    return torch.ops.cnnops.roi_pool(x, rois, spatial_scale, *pair(output_size))


def theirs_with_argmax(x, rois, output_size, spatial_scale=0.5):
    return torch.ops.torchvision.roi_pool(x, rois, spatial_scale, *pair(output_size))


def check_against_torchvision(x, rois, output_size, spatial_scale=0.5):
    out, argmax = ours_with_argmax(x, rois, output_size, spatial_scale)
    want, want_argmax = theirs_with_argmax(x, rois, output_size, spatial_scale)
    assert argmax.dtype == torch.int32 and argmax.stride() == out.stride()
    torch.testing.assert_close(out, want, atol=0, rtol=0, equal_nan=True)
    assert torch.equal(argmax, want_argmax.to(torch.int32))

    x = x.detach().requires_grad_()
    got = cnnops.roi_pool(x, rois, output_size, spatial_scale, backend="cuda")
    want = torchvision.ops.roi_pool(x, rois, output_size, spatial_scale)
    grad = random_like(got)
    (got_grad,) = torch.autograd.grad(got, x, grad)
    (want_grad,) = torch.autograd.grad(want, x, grad)
    torch.testing.assert_close(got_grad, want_grad)
    return out


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("output_size", OUTPUT_SIZES)
def test_forward_argmax_and_gradient_match_torchvision(output_size, dtype, layout):
    x, rois = cuda_problem(dtype, layout)
    out = check_against_torchvision(x, rois, output_size)
    if layout == "channels_last":
        assert out.is_contiguous(memory_format=torch.channels_last)
    else:
        assert out.is_contiguous()


@pytest.mark.parametrize("layout", ["nchw", "channels_last"])
def test_many_channels(layout):
    x, rois = wide_problem(torch.float32, layout)
    check_against_torchvision(x, rois, (7, 7))


def test_ties_pick_the_first_pixel_in_scan_order():
    x, rois = cuda_problem(torch.float32)
    gen = torch.Generator().manual_seed(2)
    x = torch.randint(0, 3, x.shape, generator=gen).float().cuda()
    check_against_torchvision(x, rois, (4, 4))
    check_against_torchvision(x.contiguous(memory_format=torch.channels_last), rois, (4, 4))


def test_half_pixel_coordinates_round_away_from_zero():
    x, _ = cuda_problem()
    rois = torch.tensor(
        [[0, 2.5, 1.5, 8.5, 6.5], [1, -2.5, -0.5, 3.5, 4.5], [0, 0.49999997, 1.5, 10.5, 9.5]],
        dtype=torch.float64,
        device="cuda",
    )
    check_against_torchvision(x, rois, (3, 3), spatial_scale=1.0)


def test_bins_of_minus_infinity_and_nan_follow_torchvision():
    # torchvision compares with `>` from -FLT_MAX: NaN never wins, and a bin of -inf keeps
    # -FLT_MAX with no argmax (and so no gradient).
    x, _ = cuda_problem(torch.float32)
    x[0, :, :6, :6] = float("-inf")
    x[1, 2, 3:8, 3:9] = float("nan")
    rois = torch.tensor([[0, 0, 0, 10, 10], [1, 4, 4, 20, 20], [1, 0, 0, 25, 21.0]], device="cuda")
    out, argmax = ours_with_argmax(x, rois, (2, 2))
    want, want_argmax = theirs_with_argmax(x, rois, (2, 2))
    torch.testing.assert_close(out, want, atol=0, rtol=0, equal_nan=True)
    assert torch.equal(argmax, want_argmax.to(torch.int32))
    assert out[0, 0, 0, 0] == -torch.finfo(torch.float32).max and argmax[0, 0, 0, 0] == -1


@pytest.mark.parametrize("layout", ["nchw", "channels_last"])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision(dtype, layout):
    x, rois = wide_problem(dtype, layout, channels=37)
    out, argmax = ours_with_argmax(x, rois, (7, 7))
    want, want_argmax = theirs_with_argmax(x.float(), rois.float(), (7, 7))
    assert out.dtype == dtype
    assert torch.equal(out, want.to(dtype))
    assert torch.equal(argmax, want_argmax.to(torch.int32))

    x = x.detach().requires_grad_()
    grad = random_like(out)
    (got_grad,) = torch.autograd.grad(cnnops.roi_pool(x, rois, 7, 0.5, backend="cuda"), x, grad)
    # The reference routes the same gradients (float32 windows, equal argmaxes) and sums them in
    # float32; ours sums in float32 and rounds once: at most twice the error of that rounding.
    x_ref = x.detach().float().requires_grad_()
    ref = torchvision.ops.roi_pool(x_ref, rois.float(), 7, 0.5)
    (ref_grad,) = torch.autograd.grad(ref, x_ref, grad.float())
    ref_grad = ref_grad.double()
    rounding = (ref_grad.to(dtype).double() - ref_grad).abs().max().item()
    error = (got_grad.double() - ref_grad).abs().max().item()
    assert error <= 2 * rounding + 1e-2 * torch.finfo(dtype).eps


def backward_op(grad, rois, argmax, x_shape):
    return torch.ops.cnnops._roi_pool_backward(grad, rois, argmax, *x_shape)


@pytest.mark.parametrize("layout", ["nchw", "channels_last"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("output_size", [(7, 7), (12, 9)])
def test_deterministic_backward_is_bitwise_repeatable(output_size, dtype, layout):
    # 600 RoIs over 2 images (more than one 256-RoI pass of the gather kernel's list), plus
    # repeated RoIs, whose bins send their gradients to the same pixels.
    x, rois = wide_problem(dtype, layout, k=600)
    rois[-20:] = rois[:1]
    out, argmax = ours_with_argmax(x, rois, output_size)
    grad = with_layout(random_like(out), layout)
    atomic = backward_op(grad, rois, argmax, x.shape)
    with deterministic_algorithms():
        first = backward_op(grad, rois, argmax, x.shape)
        second = backward_op(grad, rois, argmax, x.shape)
    assert torch.equal(first, second)
    assert first.stride() == atomic.stride()
    torch.testing.assert_close(first, atomic, **DETERMINISTIC_TOLERANCE[dtype])


@pytest.mark.parametrize("layout", ["nchw", "channels_last"])
def test_deterministic_backward_follows_any_valid_argmax(layout):
    # The gather finds its bins from argmax itself, not from the RoI windows: a hand-made argmax
    # (any pixel, or -1) routes every gradient where the atomic kernel sends it.
    x, rois = wide_problem(torch.float64, layout, k=50)
    out, _ = ours_with_argmax(x, rois, (5, 4))
    gen = torch.Generator().manual_seed(7)
    argmax = torch.randint(-1, 19 * 23, out.shape, generator=gen, dtype=torch.int32).cuda()
    argmax = with_layout(argmax, layout)
    grad = with_layout(random_like(out), layout)
    atomic = backward_op(grad, rois, argmax, x.shape)
    with deterministic_algorithms():
        gathered = backward_op(grad, rois, argmax, x.shape)
    torch.testing.assert_close(gathered, atomic, atol=1e-12, rtol=1e-12)


def test_deterministic_backward_through_autograd():
    x, rois = cuda_problem(torch.float64)
    x.requires_grad_()
    with deterministic_algorithms():
        # out.sum() sends an expanded (stride 0) gradient.
        (got,) = torch.autograd.grad(cnnops.roi_pool(x, rois, 3, 0.5, backend="cuda").sum(), x)
    (want,) = torch.autograd.grad(torchvision.ops.roi_pool(x, rois, 3, 0.5).sum(), x)
    torch.testing.assert_close(got, want, atol=1e-12, rtol=1e-12)


@pytest.mark.parametrize("deterministic", [False, True])
@pytest.mark.parametrize("layout", ["nchw", "channels_last"])
def test_no_rois_and_no_channels(layout, deterministic):
    x, rois = cuda_problem(torch.float32, layout)
    x.requires_grad_()
    out = cnnops.roi_pool(x, rois[:0], 7, 0.5, backend="cuda")
    assert out.shape == (0, 5, 7, 7)
    with deterministic_algorithms(deterministic):
        (grad,) = torch.autograd.grad(out.sum(), x)
    assert torch.equal(grad, torch.zeros_like(x))
    empty, argmax = ours_with_argmax(x[:, :0].detach(), rois, (2, 3))
    assert empty.shape == (12, 0, 2, 3) and argmax.shape == (12, 0, 2, 3)
    assert backward_op(empty, rois, argmax, (2, 0, 11, 13)).shape == (2, 0, 11, 13)


@pytest.mark.parametrize("deterministic", [False, True])
def test_gradcheck(deterministic):
    _, rois = cuda_problem(k=4)
    # Distinct values, so that no two pixels tie and the max is differentiable.
    x = torch.randperm(2 * 2 * 6 * 7, generator=torch.Generator().manual_seed(0)).double()
    x = x.view(2, 2, 6, 7).cuda().requires_grad_()
    rois = rois.clone()
    rois[:, 1:] = rois[:, 1:].clamp(-4, 20)

    def check():
        return torch.autograd.gradcheck(
            lambda x: cnnops.roi_pool(x, rois, (3, 2), 0.5, backend="cuda"), (x,)
        )

    with deterministic_algorithms(deterministic):
        assert check()


@pytest.mark.parametrize("layout", ["nchw", "channels_last"])
def test_opcheck(layout):
    x, rois = cuda_problem(torch.float32, layout, k=6)
    x.requires_grad_()
    torch.library.opcheck(torch.ops.cnnops.roi_pool.default, (x, rois, 0.5, 3, 3))


def test_torch_compile_fullgraph():
    x, rois = cuda_problem(torch.float32)

    @torch.compile(fullgraph=True, backend="eager")
    def pooled(x, rois):
        return torch.relu(cnnops.roi_pool(x, rois, 7, 0.5, backend="cuda"))

    want = torch.relu(torchvision.ops.roi_pool(x, rois, 7, 0.5))
    torch.testing.assert_close(pooled(x, rois), want, atol=0, rtol=0)


def bad_rois(column, value, direct=False):
    def make(x, rois):
        rois = rois.clone()
        rois[3, column] = value
        if direct:
            return torch.ops.cnnops.roi_pool(x, rois, 0.5, 7, 7)
        return cnnops.roi_pool(x, rois, 7, 0.5, backend="cuda")

    return make


def backward_with_argmax(argmax_value, dtype=torch.int32):
    def call(x, rois):
        out, argmax = torch.ops.cnnops.roi_pool(x, rois, 0.5, 2, 2)
        argmax = argmax.clone().to(dtype)
        argmax[0, 0, 0, 0] = argmax_value
        return torch.ops.cnnops._roi_pool_backward(out, rois, argmax, 2, 5, 11, 13)

    return call


def backward_with_bad_rois(x, rois):
    out, argmax = torch.ops.cnnops.roi_pool(x, rois, 0.5, 2, 2)
    rois = rois.clone()
    rois[3, 0] = 5.0
    return torch.ops.cnnops._roi_pool_backward(out, rois, argmax, 2, 5, 11, 13)


@pytest.mark.parametrize(
    "call,error,message",
    [
        pytest.param(bad_rois(1, float("nan")), RuntimeError, "non-finite coordinate", id="nan"),
        pytest.param(bad_rois(4, float("-inf")), RuntimeError, "non-finite coordinate", id="inf"),
        pytest.param(
            bad_rois(0, 2.0),
            RuntimeError,
            r"batch index 2, expected .* \[0, 2\)",
            id="batch-index-past-the-batch",
        ),
        pytest.param(
            bad_rois(0, 0.5), RuntimeError, "batch index 0.5", id="fractional-batch-index"
        ),
        pytest.param(
            bad_rois(0, -3.0, direct=True),
            RuntimeError,
            "batch index -3",
            id="op-called-directly-batch-index",
        ),
        pytest.param(
            lambda x, r: torch.ops.cnnops.roi_pool(x, r, -1.0, 7, 7),
            RuntimeError,
            "spatial_scale must be a positive",
            id="op-called-directly-scale",
        ),
        pytest.param(
            lambda x, r: torch.ops.cnnops.roi_pool(x, r.cpu(), 0.5, 7, 7),
            RuntimeError,
            "rois are on cpu",
            id="op-called-directly-rois-on-the-cpu",
        ),
        pytest.param(
            backward_with_argmax(11 * 13),
            RuntimeError,
            "argmax values must be -1 or pixel offsets",
            id="backward-argmax-out-of-range",
        ),
        pytest.param(
            backward_with_argmax(-2),
            RuntimeError,
            "argmax values must be -1 or pixel offsets",
            id="backward-argmax-below-minus-one",
        ),
        pytest.param(
            backward_with_argmax(0, torch.int64),
            RuntimeError,
            "argmax must be an int32 tensor",
            id="backward-argmax-int64",
        ),
        pytest.param(
            backward_with_bad_rois,
            RuntimeError,
            "batch index 5",
            id="backward-batch-index",
        ),
    ],
)
def test_bad_input_raises_clear_error(call, error, message):
    x, rois = cuda_problem(torch.float32)
    with pytest.raises(error, match=message):
        call(x, rois)

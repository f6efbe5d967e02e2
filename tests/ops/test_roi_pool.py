"""cnnops.roi_pool on the CPU backend against torchvision.ops.roi_pool."""

import pytest
import torch
import torchvision
from roi_cases import problem, random_rois

import cnnops

OUTPUT_SIZES = [
    pytest.param((7, 7), id="7x7"),
    pytest.param((3, 5), id="3x5"),
    pytest.param(1, id="1x1"),
    pytest.param((12, 9), id="bins-smaller-than-pixels"),
]


def check_forward_and_gradient(x, rois, output_size, spatial_scale=0.5):
    x = x.detach().requires_grad_()
    got = cnnops.roi_pool(x, rois, output_size, spatial_scale)
    want = torchvision.ops.roi_pool(x, rois, output_size, spatial_scale)
    # A max picks one of its inputs: the results are equal, not merely close.
    torch.testing.assert_close(got, want, atol=0, rtol=0)
    grad = torch.randn(got.shape, generator=torch.Generator().manual_seed(1), dtype=x.dtype)
    (got_grad,) = torch.autograd.grad(got, x, grad)
    (want_grad,) = torch.autograd.grad(want, x, grad)
    torch.testing.assert_close(got_grad, want_grad)
    return got, got_grad


@pytest.mark.parametrize("layout", ["nchw", "channels_last", "non_contiguous"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("output_size", OUTPUT_SIZES)
def test_forward_and_gradient_match_torchvision(output_size, dtype, layout):
    x, rois = problem(dtype, layout)
    got, _ = check_forward_and_gradient(x, rois, output_size)
    if layout == "channels_last":
        assert got.is_contiguous(memory_format=torch.channels_last)


def test_ties_pick_the_first_pixel_in_scan_order():
    # Integer-valued features tie often; torchvision keeps the first maximum (row by row), and
    # the gradient shows which pixel won.
    x, rois = problem(torch.float32)
    x = torch.randint(0, 3, x.shape, generator=torch.Generator().manual_seed(2)).float()
    check_forward_and_gradient(x, rois, (4, 4))


def test_half_pixel_coordinates_round_away_from_zero():
    x, _ = problem()
    rois = torch.tensor(
        [[0, 2.5, 1.5, 8.5, 6.5], [1, -2.5, -0.5, 3.5, 4.5], [0, 0.49999997, 1.5, 10.5, 9.5]],
        dtype=torch.float64,
    )
    check_forward_and_gradient(x, rois, (3, 3), spatial_scale=1.0)


def test_bins_of_minus_infinity_and_nan_follow_torchvision():
    # torchvision compares with `>` from -FLT_MAX: NaN never wins, and a bin of -inf keeps
    # -FLT_MAX with no argmax (and so no gradient).
    x, rois = problem(torch.float32)
    x[0, :, :6, :6] = float("-inf")
    x[1, 2, 3:8, 3:9] = float("nan")
    rois = torch.tensor([[0, 0, 0, 10, 10], [1, 4, 4, 20, 20], [1, 0, 0, 25, 21.0]])
    got = cnnops.roi_pool(x, rois, (2, 2), 0.5)
    want = torchvision.ops.roi_pool(x, rois, (2, 2), 0.5)
    torch.testing.assert_close(got, want, atol=0, rtol=0, equal_nan=True)
    assert got[0, 0, 0, 0] == -torch.finfo(torch.float32).max


def test_list_of_boxes_form():
    x, _ = problem()
    boxes = [random_rois(4, 1, 26, seed=3)[:, 1:], random_rois(6, 1, 26, seed=4)[:, 1:]]
    got = cnnops.roi_pool(x, boxes, 4, 0.5)
    torch.testing.assert_close(got, torchvision.ops.roi_pool(x, boxes, 4, 0.5))


def test_no_rois_and_no_channels():
    x, rois = problem()
    x.requires_grad_()
    out = cnnops.roi_pool(x, rois[:0], 7, 0.5)
    assert out.shape == (0, 5, 7, 7)
    (grad,) = torch.autograd.grad(out.sum(), x)
    assert torch.equal(grad, torch.zeros_like(x))
    assert cnnops.roi_pool(x[:, :0], rois, (2, 3), 0.5).shape == (12, 0, 2, 3)


def test_gradcheck():
    x, rois = problem(k=4)
    # Distinct values, so that no two pixels tie and the max is differentiable.
    x = torch.randperm(2 * 2 * 6 * 7, generator=torch.Generator().manual_seed(0)).double()
    x = x.view(2, 2, 6, 7).requires_grad_()
    rois = rois.clone()
    rois[:, 1:] = rois[:, 1:].clamp(-4, 20)
    assert torch.autograd.gradcheck(lambda x: cnnops.roi_pool(x, rois, (3, 2), 0.5), (x,))


def test_backward_is_deterministic_and_sums_overlapping_rois():
    x, _ = problem(torch.float32)
    rois = torch.tensor([[0, 0, 0, 20, 20]] * 5 + [[0, 2, 2, 18, 18]] * 5, dtype=torch.float32)
    x.requires_grad_()
    out = cnnops.roi_pool(x, rois, 3, 0.5)
    grad = torch.randn(out.shape, generator=torch.Generator().manual_seed(3))
    first = torch.autograd.grad(out, x, grad, retain_graph=True)[0]
    assert torch.equal(first, torch.autograd.grad(out, x, grad)[0])
    want = torch.autograd.grad(torchvision.ops.roi_pool(x, rois, 3, 0.5), x, grad)[0]
    torch.testing.assert_close(first, want)


def test_opcheck():
    x, rois = problem(torch.float32, k=6)
    x.requires_grad_()
    torch.library.opcheck(torch.ops.cnnops.roi_pool.default, (x, rois, 0.5, 3, 3))


def test_torch_compile_fullgraph():
    x, rois = problem(torch.float32)

    @torch.compile(fullgraph=True, backend="eager")
    def pooled(x, rois):
        return torch.relu(cnnops.roi_pool(x, rois, 7, 0.5))

    want = torch.relu(torchvision.ops.roi_pool(x, rois, 7, 0.5))
    torch.testing.assert_close(pooled(x, rois), want)


def test_nn_module_matches_torchvision():
    x, rois = problem(torch.float32)
    ours = cnnops.nn.RoIPool((7, 7), 0.5)
    theirs = torchvision.ops.RoIPool((7, 7), 0.5)
    torch.testing.assert_close(ours(x, rois), theirs(x, rois))
    assert repr(ours) == "RoIPool(output_size=(7, 7), spatial_scale=0.5)"


def bad_rois(column, value):
    def make(x, rois):
        rois = rois.clone()
        rois[3, column] = value
        return cnnops.roi_pool(x, rois, 7, 0.5)

    return make


def backward_with_argmax(argmax_value):
    def call(x, rois):
        out, argmax = torch.ops.cnnops.roi_pool(x, rois, 0.5, 2, 2)
        argmax = argmax.clone()
        argmax[0, 0, 0, 0] = argmax_value
        return torch.ops.cnnops._roi_pool_backward(out, rois, argmax, 2, 5, 11, 13)

    return call


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
            lambda x, r: cnnops.roi_pool(x, r[:, 1:], 7), ValueError, r"\[K, 5\]", id="rois-shape"
        ),
        pytest.param(
            lambda x, r: cnnops.roi_pool(x, r.float(), 7), TypeError, "boxes dtype", id="dtype"
        ),
        pytest.param(
            lambda x, r: cnnops.roi_pool(x, r, 7, 0.0),
            ValueError,
            "spatial_scale must be a positive",
            id="zero-scale",
        ),
        pytest.param(
            lambda x, r: cnnops.roi_pool(x, r, (7, 0)),
            ValueError,
            "output_size must be positive",
            id="output-size-0",
        ),
        pytest.param(
            lambda x, r: cnnops.roi_pool(x.long(), r, 7), TypeError, "floating point", id="ints"
        ),
        pytest.param(
            lambda x, r: torch.ops.cnnops.roi_pool(x, r, -1.0, 7, 7),
            RuntimeError,
            "spatial_scale must be a positive",
            id="op-called-directly",
        ),
        pytest.param(
            backward_with_argmax(11 * 13),
            RuntimeError,
            "argmax values must be -1 or pixel offsets",
            id="backward-argmax-out-of-range",
        ),
        pytest.param(
            lambda x, r: cnnops.roi_pool(x, r, 7, backend="cuda"),
            RuntimeError,
            "cuda backend needs CUDA tensors",
            id="cuda-backend-on-cpu-tensors",
        ),
    ],
)
def test_bad_input_raises_clear_error(call, error, message):
    x, rois = problem()
    with pytest.raises(error, match=message):
        call(x, rois)

"""cnnops.roi_align on the CPU backend against torchvision.ops.roi_align."""

import pytest
import torch
import torchvision
from roi_cases import problem, random_rois

import cnnops

CASES = [
    pytest.param(dict(output_size=(7, 7), sampling_ratio=-1, aligned=False), id="7x7-adaptive"),
    pytest.param(dict(output_size=(7, 7), sampling_ratio=0, aligned=True), id="7x7-ratio0-aligned"),
    pytest.param(dict(output_size=(3, 5), sampling_ratio=2, aligned=False), id="3x5-ratio2"),
    pytest.param(dict(output_size=(2, 2), sampling_ratio=2, aligned=True), id="2x2-ratio2-aligned"),
    pytest.param(dict(output_size=1, sampling_ratio=-1, aligned=True), id="1x1-aligned"),
]


@pytest.mark.parametrize("layout", ["nchw", "channels_last", "non_contiguous"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("args", CASES)
def test_forward_and_gradient_match_torchvision(args, dtype, layout):
    x, rois = problem(dtype, layout)
    x.requires_grad_()
    got = cnnops.roi_align(x, rois, spatial_scale=0.5, **args)
    want = torchvision.ops.roi_align(x, rois, spatial_scale=0.5, **args)
    tol = dict(atol=1e-5, rtol=1e-5) if dtype == torch.float32 else dict(atol=1e-12, rtol=1e-12)
    torch.testing.assert_close(got, want, **tol)
    if layout == "channels_last":
        assert got.is_contiguous(memory_format=torch.channels_last)
    grad = torch.randn(got.shape, generator=torch.Generator().manual_seed(1), dtype=dtype)
    (got_grad,) = torch.autograd.grad(got, x, grad)
    (want_grad,) = torch.autograd.grad(want, x, grad)
    torch.testing.assert_close(got_grad, want_grad, **tol)


def test_list_of_boxes_form():
    x, _ = problem()
    boxes = [random_rois(4, 1, 26, seed=3)[:, 1:], random_rois(6, 1, 26, seed=4)[:, 1:]]
    got = cnnops.roi_align(x, boxes, 4, 0.5)
    torch.testing.assert_close(got, torchvision.ops.roi_align(x, boxes, 4, 0.5))


def test_no_rois():
    x, rois = problem()
    assert cnnops.roi_align(x, rois[:0], 7, 0.5).shape == (0, 5, 7, 7)
    x.requires_grad_()
    out = cnnops.roi_align(x, rois[:0], 7, 0.5)
    (grad,) = torch.autograd.grad(out.sum(), x)
    assert torch.equal(grad, torch.zeros_like(x))


def test_gradcheck():
    x, rois = problem(k=4)
    x = x[:, :2, :6, :7].detach().requires_grad_()
    rois = rois.clone()
    rois[:, 1:] = rois[:, 1:].clamp(-4, 20)
    assert torch.autograd.gradcheck(
        lambda x: cnnops.roi_align(x, rois, (3, 2), 0.5, 2, True), (x,), fast_mode=True
    )


def test_opcheck():
    x, rois = problem(torch.float32, k=6)
    x.requires_grad_()
    args = (x, rois, 0.5, 3, 3, 2, True)
    torch.library.opcheck(torch.ops.cnnops.roi_align.default, args)


def test_torch_compile_fullgraph():
    x, rois = problem(torch.float32)

    @torch.compile(fullgraph=True, backend="eager")
    def pooled(x, rois):
        return torch.relu(cnnops.roi_align(x, rois, 7, 0.5, 2, True))

    want = torch.relu(torchvision.ops.roi_align(x, rois, 7, 0.5, 2, True))
    torch.testing.assert_close(pooled(x, rois), want)


def test_nn_module_matches_torchvision():
    x, rois = problem(torch.float32)
    ours = cnnops.nn.RoIAlign((7, 7), 0.5, 2, aligned=True)
    theirs = torchvision.ops.RoIAlign((7, 7), 0.5, 2, aligned=True)
    torch.testing.assert_close(ours(x, rois), theirs(x, rois))
    assert repr(ours).startswith("RoIAlign(output_size=(7, 7), spatial_scale=0.5")


def bad_rois(column, value):
    def make(x, rois):
        rois = rois.clone()
        rois[3, column] = value
        return cnnops.roi_align(x, rois, 7, 0.5)

    return make


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
            lambda x, r: cnnops.roi_align(x, r[:, :4], 7), ValueError, r"\[K, 5\]", id="rois-shape"
        ),
        pytest.param(
            lambda x, r: cnnops.roi_align(x, [r[:, :3]], 7),
            ValueError,
            r"boxes\[0\] must be a \[L, 4\]",
            id="list-shape",
        ),
        pytest.param(
            lambda x, r: cnnops.roi_align(x, r.float(), 7),
            TypeError,
            "boxes dtype",
            id="dtype-mismatch",
        ),
        pytest.param(
            lambda x, r: cnnops.roi_align(x, r, 7, -0.5),
            ValueError,
            "spatial_scale must be a positive",
            id="negative-scale",
        ),
        pytest.param(
            lambda x, r: cnnops.roi_align(x, r, 0),
            ValueError,
            "output_size must be positive",
            id="output-size-0",
        ),
        pytest.param(lambda x, r: cnnops.roi_align(x[0], r, 7), ValueError, "4-D", id="3d-input"),
        pytest.param(
            lambda x, r: torch.ops.cnnops.roi_align(x, r, 0.5, 0, 7, -1, False),
            RuntimeError,
            "output_size must be positive",
            id="op-called-directly",
        ),
    ],
)
def test_bad_input_raises_clear_error(call, error, message):
    x, rois = problem()
    with pytest.raises(error, match=message):
        call(x, rois)


@pytest.mark.parametrize(
    "sampling_ratio,rois",
    [
        pytest.param(2**40, [[0, 1.0, 1.0, 5.0, 5.0]], id="sampling-ratio-2^40"),
        pytest.param(-1, [[0, -1e30, -1e30, 1e30, 1e30]], id="adaptive-grid-of-a-huge-roi"),
    ],
)
def test_absurd_sampling_grids_raise_instead_of_crashing(sampling_ratio, rois):
    # torchvision overflows or loops for hours on these.
    x, _ = problem()
    with pytest.raises(RuntimeError, match="sampling grid"):
        cnnops.roi_align(x, torch.tensor(rois, dtype=x.dtype), 7, 0.5, sampling_ratio)


def test_many_rois_are_pooled_in_groups_with_the_same_result():
    # 300 RoIs of 4 x 4 bins with 30 x 30 samples each: 1.08M taps, past one group's table, so
    # the kernels run two groups; the results must not notice.
    x, _ = problem(torch.float32)
    rois = random_rois(300, 2, 26, seed=5, dtype=torch.float32)
    x.requires_grad_()
    got = cnnops.roi_align(x, rois, 4, 0.5, 30)
    want = torchvision.ops.roi_align(x, rois, 4, 0.5, 30)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    grad = torch.randn(got.shape, generator=torch.Generator().manual_seed(1))
    torch.testing.assert_close(
        torch.autograd.grad(got, x, grad)[0], torch.autograd.grad(want, x, grad)[0],
        atol=1e-4, rtol=1e-4,
    )  # fmt: skip

"""The triton backend's roi_pool (cnnops::roi_pool_triton and its backward) against
torchvision.ops.roi_pool on the same device: outputs and argmaxes equal, gradients close.

Without a GPU the kernels run in Triton's interpreter on CPU tensors (tests/conftest.py sets
TRITON_INTERPRET=1) on a 2 x 5 x 11 x 13 map; with one, natively on CUDA tensors, and the
cuda-marked tests add a Faster R-CNN head (512 RoIs, 256 channels) and the half types.
"""

import pytest
import torch
import torchvision
from roi_cases import problem, random_rois

import cnnops
from cnnops.ops.roi_align import roi_memory_format
from cnnops.ops.roi_pool import TRITON_CONFIGS

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
pytestmark = [] if DEVICE == "cpu" else [pytest.mark.cuda]

# In the interpreter, tracing through triton_op's kernel launches (opcheck's AOT-dispatch test)
# reaches fake tensors' data; that part runs on a GPU only.
OPCHECK_UTILS = "ALL" if DEVICE == "cuda" else ("test_schema", "test_faketensor")


def on_device(x, rois):
    """x and rois on DEVICE, x with the same strides (.to() would make a map with gaps
    contiguous)."""
    moved = torch.empty_strided(x.shape, x.stride(), dtype=x.dtype, device=DEVICE)
    return moved.copy_(x), rois.to(DEVICE)


def check_forward_and_gradient(x, rois, output_size, spatial_scale=0.5, grad_layout=None):
    """Output and argmax equal to torchvision's (a max picks one of its inputs), grad input
    close; returns ours."""
    pooled = (output_size, output_size) if isinstance(output_size, int) else output_size
    out, argmax = torch.ops.cnnops.roi_pool_triton(x, rois, spatial_scale, *pooled)
    want, want_argmax = torch.ops.torchvision.roi_pool(x, rois, spatial_scale, *pooled)
    torch.testing.assert_close(out, want, atol=0, rtol=0, equal_nan=True)
    assert argmax.dtype == torch.int32
    assert torch.equal(argmax, want_argmax)
    x = x.detach().requires_grad_()
    got = cnnops.roi_pool(x, rois, output_size, spatial_scale, backend="triton")
    want = torchvision.ops.roi_pool(x, rois, output_size, spatial_scale)
    grad = torch.randn(got.shape, generator=torch.Generator().manual_seed(1), dtype=x.dtype)
    grad = grad.to(DEVICE)
    if grad_layout == "channels_last":
        grad = grad.contiguous(memory_format=torch.channels_last)
    (got_grad,) = torch.autograd.grad(got, x, grad)
    (want_grad,) = torch.autograd.grad(want, x, grad)
    torch.testing.assert_close(got_grad, want_grad)
    return got, grad, got_grad


def case(output_size, dtype, layout):
    size = "x".join(map(str, output_size)) if isinstance(output_size, tuple) else output_size
    return pytest.param(output_size, dtype, layout, id=f"{size}-{str(dtype)[6:]}-{layout}")


CASES = [
    case((7, 7), torch.float64, "nchw"),
    case((7, 7), torch.float32, "channels_last"),
    case((7, 7), torch.float32, "non_contiguous"),
    case((3, 5), torch.float64, "channels_last"),
    case((3, 5), torch.float32, "nchw"),
    case(1, torch.float64, "non_contiguous"),
    case(1, torch.float32, "nchw"),
    case((12, 9), torch.float64, "nchw"),  # bins smaller than pixels: they overlap
    case((12, 9), torch.float32, "channels_last"),
]


@pytest.mark.parametrize("output_size,dtype,layout", CASES)
def test_forward_and_gradient_match_torchvision(output_size, dtype, layout):
    """Random RoIs, and ones across every border, outside the map (empty bins: 0 and argmax
    -1) and empty (roi_cases). The result takes the input's layout, grad input the
    gradient's."""
    x, rois = on_device(*problem(dtype, layout))
    got, grad, grad_input = check_forward_and_gradient(x, rois, output_size, grad_layout=layout)
    assert got.is_contiguous(memory_format=roi_memory_format(x))
    assert grad_input.is_contiguous(memory_format=roi_memory_format(grad))


@pytest.mark.parametrize("layout", ["nchw", "channels_last"])
def test_several_blocks_per_roi(layout, monkeypatch):
    """Blocks of 16 bins and 2 channels: a RoI's 5 x 4 bins and 5 channels span several
    programs, the last of each partial."""
    for kernel in ("roi_pool_fwd", "roi_pool_bwd"):
        for side in ("gpu", "interpreter"):
            configs = dict(TRITON_CONFIGS[kernel][side])
            configs[layout] = dict(configs[layout], BLOCK_BINS=16, BLOCK_C=2)
            monkeypatch.setitem(TRITON_CONFIGS[kernel], side, configs)
    x, rois = on_device(*problem(torch.float64, layout, k=6))
    check_forward_and_gradient(x, rois, (5, 4), grad_layout=layout)


def test_ties_pick_the_first_pixel_in_scan_order():
    """Integer-valued features tie often; torchvision keeps the first maximum (row by row):
    the argmaxes are equal."""
    x, rois = problem(torch.float32)
    x = torch.randint(0, 3, x.shape, generator=torch.Generator().manual_seed(2)).float()
    check_forward_and_gradient(*on_device(x, rois), (4, 4))


def test_half_pixel_coordinates_round_away_from_zero():
    x, _ = problem()
    rois = torch.tensor(
        [
            [0, 2.5, 1.5, 8.5, 6.5],
            [1, -2.5, -0.5, 3.5, 4.5],
            [0, 0.49999997, 1.5, 10.5, 9.5],
            [1, -0.5, -1.5, -0.49999997, 0.5],
            [0, 12.5, 10.5, 12.5, 10.5],
        ],
        dtype=torch.float64,
    )
    check_forward_and_gradient(*on_device(x, rois), (3, 3), spatial_scale=1.0)


def test_bins_of_minus_infinity_and_nan_follow_torchvision():
    """torchvision compares with `>` from -FLT_MAX: NaN never wins, and a bin of -inf keeps
    -FLT_MAX with argmax -1 (and so no gradient)."""
    x, _ = problem(torch.float32)
    x[0, :, :6, :6] = float("-inf")
    x[1, 2, 3:8, 3:9] = float("nan")
    rois = torch.tensor([[0, 0, 0, 10, 10], [1, 4, 4, 20, 20], [1, 0, 0, 25, 21.0]])
    got, _, _ = check_forward_and_gradient(*on_device(x, rois), (2, 2))
    assert got[0, 0, 0, 0] == -torch.finfo(torch.float32).max


def test_list_of_boxes_and_strided_rois():
    x, _ = on_device(*problem())
    boxes = [random_rois(4, 1, 26, seed=3)[:, 1:], random_rois(6, 1, 26, seed=4)[:, 1:]]
    boxes = [b.to(DEVICE) for b in boxes]
    got = cnnops.roi_pool(x, boxes, 4, 0.5, backend="triton")
    torch.testing.assert_close(got, torchvision.ops.roi_pool(x, boxes, 4, 0.5), atol=0, rtol=0)
    rois = random_rois(7, 2, 26, seed=5).to(DEVICE)
    strided = rois.t().contiguous().t()
    got = cnnops.roi_pool(x, strided, 3, 0.5, backend="triton")
    torch.testing.assert_close(got, torchvision.ops.roi_pool(x, rois, 3, 0.5), atol=0, rtol=0)


def test_no_rois_and_no_channels():
    x, rois = on_device(*problem())
    x.requires_grad_()
    out = cnnops.roi_pool(x, rois[:0], 7, 0.5, backend="triton")
    assert out.shape == (0, 5, 7, 7)
    (grad,) = torch.autograd.grad(out.sum(), x)
    assert torch.equal(grad, torch.zeros_like(x))
    out, argmax = torch.ops.cnnops.roi_pool_triton(x[:, :0], rois, 0.5, 2, 3)
    assert out.shape == argmax.shape == (12, 0, 2, 3)


def deterministic_grad(x, rois, output_size, grad):
    x = x.detach().requires_grad_()
    torch.use_deterministic_algorithms(True)
    try:
        out = cnnops.roi_pool(x, rois, output_size, 0.5, backend="triton")
        return torch.autograd.grad(out, x, grad)[0]
    finally:
        torch.use_deterministic_algorithms(False)


@pytest.mark.parametrize("layout", ["nchw", "channels_last"])
def test_deterministic_backward(layout):
    """Under torch.use_deterministic_algorithms the gradient is gathered without atomics: two
    runs agree bit for bit, and with the default (atomic) path and torchvision to rounding.
    Overlapping RoIs send several bins to one pixel; one RoI lies outside the map."""
    x, rois = problem(torch.float32, layout, k=6)
    x, rois = on_device(x[:1, :, :6, :7], rois)
    rois[:, 0] = 0
    rois[3:5, 1:] = torch.tensor([[0.0, 0.0, 12.0, 12.0], [2.0, 2.0, 11.0, 12.0]])
    if layout == "channels_last":
        x = x.contiguous(memory_format=torch.channels_last)
    grad = torch.randn(6, 5, 4, 3, generator=torch.Generator().manual_seed(2)).to(DEVICE)
    if layout == "channels_last":
        grad = grad.contiguous(memory_format=torch.channels_last)
    first = deterministic_grad(x, rois, (4, 3), grad)
    second = deterministic_grad(x, rois, (4, 3), grad)
    assert torch.equal(first, second)
    assert first.is_contiguous(memory_format=torch.channels_last) == (layout == "channels_last")
    xg = x.detach().requires_grad_()
    (atomic,) = torch.autograd.grad(cnnops.roi_pool(xg, rois, (4, 3), 0.5, backend="triton"),
                                    xg, grad)  # fmt: skip
    torch.testing.assert_close(first, atomic)
    (want,) = torch.autograd.grad(torchvision.ops.roi_pool(xg, rois, (4, 3), 0.5), xg, grad)
    torch.testing.assert_close(first, want)


def test_gradcheck():
    _, rois = problem(k=4)
    # Distinct values, so that no two pixels tie and the max is differentiable.
    x = torch.randperm(2 * 2 * 6 * 7, generator=torch.Generator().manual_seed(0)).double()
    x, rois = on_device(x.view(2, 2, 6, 7), rois)
    x.requires_grad_()
    rois[:, 1:] = rois[:, 1:].clamp(-4, 20)
    assert torch.autograd.gradcheck(
        lambda x: cnnops.roi_pool(x, rois, (3, 2), 0.5, backend="triton"), (x,), fast_mode=True
    )


def test_opcheck():
    x, rois = on_device(*problem(torch.float32, k=6))
    args = (x.requires_grad_(), rois, 0.5, 3, 3)
    torch.library.opcheck(torch.ops.cnnops.roi_pool_triton.default, args, test_utils=OPCHECK_UTILS)
    out, argmax = torch.ops.cnnops.roi_pool_triton(x.detach(), rois, 0.5, 3, 3)
    args = (torch.randn_like(out), rois, argmax, 2, 5, 11, 13)
    torch.library.opcheck(
        torch.ops.cnnops._roi_pool_backward_triton.default, args, test_utils=OPCHECK_UTILS
    )


def test_torch_compile_fullgraph():
    x, rois = on_device(*problem(torch.float32))

    @torch.compile(fullgraph=True, backend="eager")
    def pooled(x, rois):
        return torch.relu(cnnops.roi_pool(x, rois, 7, 0.5, backend="triton"))

    x = x.requires_grad_()
    got = pooled(x, rois)
    want = torch.relu(torchvision.ops.roi_pool(x, rois, 7, 0.5))
    torch.testing.assert_close(got, want)
    (got_grad,) = torch.autograd.grad(got.sum(), x)
    (want_grad,) = torch.autograd.grad(want.sum(), x)
    torch.testing.assert_close(got_grad, want_grad)


def test_use_backend_routes_to_triton():
    x, rois = on_device(*problem(torch.float32, k=4))
    with cnnops.use_backend("triton"):
        got = cnnops.nn.RoIPool((2, 2), 0.5)(x, rois)
    torch.testing.assert_close(got, torchvision.ops.roi_pool(x, rois, 2, 0.5), atol=0, rtol=0)


def bad_rois(column, value):
    def make(x, rois):
        rois = rois.clone()
        rois[3, column] = value
        return cnnops.roi_pool(x, rois, 7, 0.5, backend="triton")

    return make


def backward_with_argmax(change):
    def call(x, rois):
        out, argmax = torch.ops.cnnops.roi_pool_triton(x, rois, 0.5, 2, 2)
        out, argmax, rois = change(out, argmax.clone(), rois.clone())
        return torch.ops.cnnops._roi_pool_backward_triton(out, rois, argmax, 2, 5, 11, 13)

    return call


def argmax_past_the_plane(out, argmax, rois):
    argmax[0, 0, 0, 0] = 11 * 13
    return out, argmax, rois


def nan_roi(out, argmax, rois):
    rois[7, 3] = float("nan")
    return out, argmax, rois


@pytest.mark.parametrize(
    "call,error,message",
    [
        pytest.param(bad_rois(1, float("nan")), RuntimeError,
                     r"roi_pool: rois\[3\] has a non-finite coordinate \(nan, ", id="nan"),
        pytest.param(bad_rois(4, float("-inf")), RuntimeError, "non-finite coordinate",
                     id="inf"),
        pytest.param(bad_rois(0, 2.0), RuntimeError,
                     r"batch index 2, expected an integer in \[0, 2\)",
                     id="batch-index-past-the-batch"),
        pytest.param(bad_rois(0, 0.5), RuntimeError, "batch index 0.5",
                     id="fractional-batch-index"),
        pytest.param(lambda x, r: cnnops.roi_pool(x, r.float(), 7, backend="triton"), TypeError,
                     "boxes dtype", id="dtype"),
        pytest.param(lambda x, r: torch.ops.cnnops.roi_pool_triton(x, r, -1.0, 7, 7),
                     ValueError, "spatial_scale must be a positive", id="op-called-directly"),
        pytest.param(backward_with_argmax(argmax_past_the_plane), ValueError,
                     r"argmax values must be -1 or pixel offsets in \[0, 143\)",
                     id="backward-argmax-out-of-range"),
        pytest.param(backward_with_argmax(nan_roi), RuntimeError,
                     r"rois\[7\] has a non-finite coordinate", id="backward-nan-roi"),
        pytest.param(backward_with_argmax(lambda o, a, r: (o, a[:, :, :1], r)), ValueError,
                     "argmax must be an int32", id="backward-argmax-shape"),
        pytest.param(backward_with_argmax(lambda o, a, r: (o, a.float(), r)), ValueError,
                     "argmax must be an int32", id="backward-argmax-dtype"),
    ],
)  # fmt: skip
def test_bad_input_raises_clear_error(call, error, message):
    x, rois = on_device(*problem())
    with pytest.raises(error, match=message):
        call(x, rois)


# ---- GPU only: the benchmark's shape, the half types. ---------------------------------------


def faster_rcnn_head(dtype, channels_last, seed=0):
    """2 x 256 x 50 x 68 (an 800 x 1088 image at stride 16) and 512 RoIs of 16 to 400 pixels."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(2, 256, 50, 68, generator=gen, dtype=torch.float64)
    wh = torch.rand(512, 2, generator=gen, dtype=torch.float64) * 384 + 16
    x1 = torch.rand(512, generator=gen, dtype=torch.float64) * (1088 - wh[:, 0])
    y1 = torch.rand(512, generator=gen, dtype=torch.float64) * (800 - wh[:, 1])
    idx = torch.randint(0, 2, (512,), generator=gen).double()
    rois = torch.stack([idx, x1, y1, x1 + wh[:, 0], y1 + wh[:, 1]], 1)
    x = x.to("cuda", dtype)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    return x, rois.to("cuda", dtype)


@pytest.mark.cuda
@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "channels_last"])
def test_faster_rcnn_head_on_gpu(channels_last):
    x, rois = faster_rcnn_head(torch.float32, channels_last)
    check_forward_and_gradient(x, rois, 7, 1 / 16)
    x.requires_grad_()
    grad = torch.randn(512, 256, 7, 7, device="cuda")
    torch.use_deterministic_algorithms(True)
    try:
        first = torch.autograd.grad(cnnops.roi_pool(x, rois, 7, 1 / 16, backend="triton"), x, grad)
        second = torch.autograd.grad(cnnops.roi_pool(x, rois, 7, 1 / 16, backend="triton"), x,
                                     grad)  # fmt: skip
    finally:
        torch.use_deterministic_algorithms(False)
    assert torch.equal(first[0], second[0])
    (want,) = torch.autograd.grad(torchvision.ops.roi_pool(x, rois, 7, 1 / 16), x, grad)
    torch.testing.assert_close(first[0], want)


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "channels_last"])
def test_half_types_on_gpu(dtype, channels_last):
    """The windows are computed in float32 from the half-precision RoIs: the output is exactly
    torchvision's on the same values in float32."""
    x, rois = faster_rcnn_head(dtype, channels_last)
    got = cnnops.roi_pool(x, rois, 7, 1 / 16, backend="triton")
    want = torchvision.ops.roi_pool(x.float(), rois.float(), 7, 1 / 16).to(dtype)
    assert got.dtype == dtype
    torch.testing.assert_close(got, want, atol=0, rtol=0)

"""The triton backend's roi_align (cnnops::roi_align_triton and its backward) against
torchvision.ops.roi_align on the same device.

Without a GPU the kernels run in Triton's interpreter on CPU tensors (tests/conftest.py sets
TRITON_INTERPRET=1) on a 2 x 5 x 11 x 13 map; with one, natively on CUDA tensors, and the
cuda-marked tests add a Faster R-CNN head (512 RoIs, 256 channels) and the half types.
"""

import pytest
import torch
import torchvision
from roi_cases import problem, random_rois

import cnnops
from cnnops.ops.roi_align import TRITON_CONFIGS, roi_memory_format

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


def tolerance(dtype):
    return dict(atol=1e-5, rtol=1e-5) if dtype == torch.float32 else dict(atol=1e-12, rtol=1e-12)


def case(output_size, sampling_ratio, aligned, dtype, layout):
    args = dict(output_size=output_size, sampling_ratio=sampling_ratio, aligned=aligned)
    size = "x".join(map(str, output_size)) if isinstance(output_size, tuple) else output_size
    ratio = "adaptive" if sampling_ratio == -1 else f"ratio{sampling_ratio}"
    name = f"{size}-{ratio}{'-aligned' if aligned else ''}-{str(dtype)[6:]}-{layout}"
    return pytest.param(args, dtype, layout, id=name)


# Each output size and sampling with two or three of the dtypes and layouts (the interpreter
# takes about a second a case).
CASES = [
    case((7, 7), -1, False, torch.float64, "nchw"),
    case((7, 7), -1, False, torch.float32, "channels_last"),
    case((7, 7), -1, True, torch.float64, "non_contiguous"),
    case((7, 7), 0, True, torch.float64, "channels_last"),
    case((7, 7), 0, True, torch.float32, "nchw"),
    case((3, 5), 2, False, torch.float64, "nchw"),
    case((3, 5), 2, False, torch.float32, "non_contiguous"),
    case((3, 5), 2, False, torch.float64, "channels_last"),
    case((2, 2), 2, True, torch.float64, "non_contiguous"),
    case((2, 2), 2, True, torch.float32, "channels_last"),
    case(1, 3, True, torch.float64, "nchw"),
    case(1, 1, False, torch.float32, "channels_last"),
]


def check_forward_and_gradient(x, rois, args, grad_layout=None, spatial_scale=0.5):
    """Forward and grad input against torchvision; returns ours."""
    x = x.detach().requires_grad_()
    got = cnnops.roi_align(x, rois, spatial_scale=spatial_scale, backend="triton", **args)
    want = torchvision.ops.roi_align(x, rois, spatial_scale=spatial_scale, **args)
    torch.testing.assert_close(got, want, **tolerance(x.dtype))
    grad = torch.randn(got.shape, generator=torch.Generator().manual_seed(1), dtype=x.dtype)
    grad = grad.to(DEVICE)
    if grad_layout == "channels_last":
        grad = grad.contiguous(memory_format=torch.channels_last)
    (got_grad,) = torch.autograd.grad(got, x, grad)
    (want_grad,) = torch.autograd.grad(want, x, grad)
    torch.testing.assert_close(got_grad, want_grad, **tolerance(x.dtype))
    return got, grad, got_grad


@pytest.mark.parametrize("args,dtype,layout", CASES)
def test_forward_and_gradient_match_torchvision(args, dtype, layout):
    """Random RoIs, and ones across every border, outside the map and empty (roi_cases). The
    result takes the input's layout, grad input the gradient's."""
    x, rois = on_device(*problem(dtype, layout))
    got, grad, grad_input = check_forward_and_gradient(x, rois, args, grad_layout=layout)
    assert got.is_contiguous(memory_format=roi_memory_format(x))
    assert grad_input.is_contiguous(memory_format=roi_memory_format(grad))


@pytest.mark.parametrize("layout", ["nchw", "channels_last"])
def test_several_blocks_per_roi(layout, monkeypatch):
    """Blocks of 16 bins and 2 channels: a RoI's 5 x 4 bins and 5 channels span several
    programs, the last of each partial."""
    for kernel in ("roi_align_fwd", "roi_align_bwd"):
        for side in ("gpu", "interpreter"):
            configs = dict(TRITON_CONFIGS[kernel][side])
            configs[layout] = dict(configs[layout], BLOCK_BINS=16, BLOCK_C=2)
            monkeypatch.setitem(TRITON_CONFIGS[kernel], side, configs)
    x, rois = on_device(*problem(torch.float64, layout, k=4))
    args = dict(output_size=(5, 4), sampling_ratio=2, aligned=False)
    check_forward_and_gradient(x, rois, args, grad_layout=layout)


def test_rois_at_pixel_edges_tiny_and_inverted():
    """Corners on pixel edges and centres (taps with weight 0 and 1), RoIs under a pixel, one
    inverted (x2 < x1: aligned, its samples run backwards), one on the last row and column."""
    x, _ = on_device(*problem())
    rois = torch.tensor(
        [
            [0, 0.0, 0.0, 12.0, 10.0],
            [1, 2.0, 3.0, 2.25, 3.1],
            [0, 11.0, 9.0, 5.0, 2.0],
            [1, 12.0, 10.0, 13.0, 11.0],
            [0, -1.0, -1.0, 0.0, 0.0],
            [1, 0.5, 0.5, 12.5, 10.5],
        ],
        dtype=torch.float64,
        device=DEVICE,
    )
    for aligned in (False, True):
        for ratio in (-1, 3):
            args = dict(output_size=(4, 3), sampling_ratio=ratio, aligned=aligned)
            check_forward_and_gradient(x, rois, args, spatial_scale=1.0)


def test_list_of_boxes_and_strided_rois():
    x, _ = on_device(*problem())
    boxes = [random_rois(4, 1, 26, seed=3)[:, 1:], random_rois(6, 1, 26, seed=4)[:, 1:]]
    boxes = [b.to(DEVICE) for b in boxes]
    got = cnnops.roi_align(x, boxes, 4, 0.5, backend="triton")
    torch.testing.assert_close(got, torchvision.ops.roi_align(x, boxes, 4, 0.5))
    rois = random_rois(7, 2, 26, seed=5).to(DEVICE)
    strided = rois.t().contiguous().t()  # column-major: strides (1, 7)
    assert strided.stride() == (1, 7)
    got = cnnops.roi_align(x, strided, 3, 0.5, 2, True, backend="triton")
    torch.testing.assert_close(got, torchvision.ops.roi_align(x, rois, 3, 0.5, 2, True))


def test_no_rois_and_no_channels():
    x, rois = on_device(*problem())
    x.requires_grad_()
    out = cnnops.roi_align(x, rois[:0], 7, 0.5, backend="triton")
    assert out.shape == (0, 5, 7, 7)
    (grad,) = torch.autograd.grad(out.sum(), x)
    assert torch.equal(grad, torch.zeros_like(x))
    empty = torch.zeros(2, 0, 11, 13, dtype=x.dtype, device=DEVICE, requires_grad=True)
    out = cnnops.roi_align(empty, rois, 7, 0.5, backend="triton")
    assert out.shape == (12, 0, 7, 7)
    (grad,) = torch.autograd.grad(out.sum(), empty)
    assert grad.shape == empty.shape


def deterministic_grad(x, rois, args, grad):
    x = x.detach().requires_grad_()
    torch.use_deterministic_algorithms(True)
    try:
        out = cnnops.roi_align(x, rois, spatial_scale=0.5, backend="triton", **args)
        return torch.autograd.grad(out, x, grad)[0]
    finally:
        torch.use_deterministic_algorithms(False)


@pytest.mark.parametrize(
    "layout,args",
    [
        pytest.param("nchw", dict(output_size=3, sampling_ratio=2, aligned=True),
                     id="nchw-ratio2-aligned"),
        pytest.param("channels_last", dict(output_size=(4, 3), sampling_ratio=-1, aligned=False),
                     id="channels_last-adaptive"),
    ],
)  # fmt: skip
def test_deterministic_backward(layout, args):
    """Under torch.use_deterministic_algorithms the gradient is gathered without atomics: two
    runs agree bit for bit, and with the default (atomic) path and torchvision to rounding.
    The RoIs include an empty one (aligned: zero-size bins, every sample a candidate)."""
    x, rois = problem(torch.float32, layout, k=5)
    x, rois = on_device(x[:1, :, :5, :6], rois)
    rois[:, 0] = 0
    if layout == "channels_last":
        x = x.contiguous(memory_format=torch.channels_last)
    out_shape = torchvision.ops.roi_align(x, rois, spatial_scale=0.5, **args).shape
    grad = torch.randn(out_shape, generator=torch.Generator().manual_seed(2)).to(DEVICE)
    if layout == "channels_last":
        grad = grad.contiguous(memory_format=torch.channels_last)
    first = deterministic_grad(x, rois, args, grad)
    second = deterministic_grad(x, rois, args, grad)
    assert torch.equal(first, second)
    assert first.is_contiguous(memory_format=torch.channels_last) == (layout == "channels_last")
    xg = x.detach().requires_grad_()
    out = cnnops.roi_align(xg, rois, spatial_scale=0.5, backend="triton", **args)
    (atomic,) = torch.autograd.grad(out, xg, grad)
    torch.testing.assert_close(first, atomic, atol=1e-5, rtol=1e-5)
    out = torchvision.ops.roi_align(xg, rois, spatial_scale=0.5, **args)
    (want,) = torch.autograd.grad(out, xg, grad)
    torch.testing.assert_close(first, want, atol=1e-5, rtol=1e-5)


def test_deterministic_backward_float64_matches_torchvision():
    x, rois = problem(torch.float64, k=4, seed=3)
    x, rois = on_device(x[:1, :2, :4, :5], rois)
    rois[:, 0] = 0
    args = dict(output_size=(2, 3), sampling_ratio=-1, aligned=False)
    out = torchvision.ops.roi_align(x, rois, spatial_scale=0.5, **args)
    grad = torch.randn(out.shape, generator=torch.Generator().manual_seed(3), dtype=x.dtype)
    got = deterministic_grad(x, rois, args, grad.to(DEVICE))
    xg = x.detach().requires_grad_()
    out = torchvision.ops.roi_align(xg, rois, spatial_scale=0.5, **args)
    (want,) = torch.autograd.grad(out, xg, grad.to(DEVICE))
    torch.testing.assert_close(got, want, **tolerance(torch.float64))


def test_gradcheck():
    x, rois = problem(k=4)
    x, rois = on_device(x[:, :2, :6, :7], rois)
    x = x.detach().requires_grad_()
    rois[:, 1:] = rois[:, 1:].clamp(-4, 20)
    assert torch.autograd.gradcheck(
        lambda x: cnnops.roi_align(x, rois, (3, 2), 0.5, 2, True, backend="triton"),
        (x,),
        fast_mode=True,
    )


def test_opcheck():
    x, rois = on_device(*problem(torch.float32, k=6))
    args = (x.requires_grad_(), rois, 0.5, 3, 3, 2, True)
    torch.library.opcheck(torch.ops.cnnops.roi_align_triton.default, args, test_utils=OPCHECK_UTILS)
    grad = torch.randn(6, 5, 3, 3, device=DEVICE)
    args = (grad, rois, 0.5, 3, 3, 2, 5, 11, 13, 2, True)
    torch.library.opcheck(
        torch.ops.cnnops._roi_align_backward_triton.default, args, test_utils=OPCHECK_UTILS
    )


def test_torch_compile_fullgraph():
    x, rois = on_device(*problem(torch.float32))

    @torch.compile(fullgraph=True, backend="eager")
    def pooled(x, rois):
        return torch.relu(cnnops.roi_align(x, rois, 7, 0.5, 2, True, backend="triton"))

    x = x.requires_grad_()
    got = pooled(x, rois)
    want = torch.relu(torchvision.ops.roi_align(x, rois, 7, 0.5, 2, True))
    torch.testing.assert_close(got, want)
    (got_grad,) = torch.autograd.grad(got.sum(), x)
    (want_grad,) = torch.autograd.grad(want.sum(), x)
    torch.testing.assert_close(got_grad, want_grad)


def test_use_backend_routes_to_triton():
    x, rois = on_device(*problem(torch.float32, k=4))
    with cnnops.use_backend("triton"):
        got = cnnops.nn.RoIAlign((2, 2), 0.5, 2, aligned=True)(x, rois)
    torch.testing.assert_close(got, torchvision.ops.roi_align(x, rois, 2, 0.5, 2, True))


def bad_rois(column, value):
    def make(x, rois):
        rois = rois.clone()
        rois[3, column] = value
        return cnnops.roi_align(x, rois, 7, 0.5, backend="triton")

    return make


def bad_rois_backward(x, rois):
    rois = rois.clone()
    rois[5, 2] = float("nan")
    grad = torch.zeros(12, 5, 2, 2, dtype=x.dtype, device=DEVICE)
    return torch.ops.cnnops._roi_align_backward_triton(grad, rois, 0.5, 2, 2, 2, 5, 11, 13, 2,
                                                       False)  # fmt: skip


@pytest.mark.parametrize(
    "call,error,message",
    [
        pytest.param(bad_rois(1, float("nan")), RuntimeError,
                     r"roi_align: rois\[3\] has a non-finite coordinate \(nan, ", id="nan"),
        pytest.param(bad_rois(4, float("inf")), RuntimeError, r"non-finite coordinate \(.*inf\)",
                     id="inf"),
        pytest.param(bad_rois(0, 2.0), RuntimeError,
                     r"rois\[3\] has batch index 2, expected an integer in \[0, 2\)",
                     id="batch-index-past-the-batch"),
        pytest.param(bad_rois(0, -1.0), RuntimeError, "batch index -1", id="negative-batch-index"),
        pytest.param(bad_rois(0, 0.5), RuntimeError, "batch index 0.5",
                     id="fractional-batch-index"),
        pytest.param(bad_rois(0, float("nan")), RuntimeError, "batch index nan",
                     id="nan-batch-index"),
        pytest.param(bad_rois_backward, RuntimeError, r"rois\[5\] has a non-finite coordinate",
                     id="backward-op-called-directly"),
        pytest.param(lambda x, r: cnnops.roi_align(x, r.float(), 7, backend="triton"), TypeError,
                     "boxes dtype", id="dtype-mismatch"),
        pytest.param(lambda x, r: torch.ops.cnnops.roi_align_triton(x, r, 0.5, 0, 7, -1, False),
                     ValueError, "output_size must be positive", id="op-called-directly"),
        pytest.param(lambda x, r: torch.ops.cnnops.roi_align_triton(x, r[:, :4], 0.5, 7, 7, -1,
                                                                    False),
                     ValueError, r"rois must be a \[K, 5\] tensor", id="op-rois-shape"),
        pytest.param(lambda x, r: torch.ops.cnnops.roi_align_triton(x[:, :, :0], r, 0.5, 7, 7,
                                                                    -1, False),
                     ValueError, "non-zero height and width", id="op-empty-map"),
        pytest.param(lambda x, r: torch.ops.cnnops._roi_align_backward_triton(
                         torch.zeros(12, 5, 3, 3, dtype=x.dtype, device=DEVICE), r, 0.5, 2, 2,
                         2, 5, 11, 13, 2, False),
                     ValueError, r"grad must be \(K, C, pooled_height, pooled_width\)",
                     id="backward-grad-shape"),
    ],
)  # fmt: skip
def test_bad_input_raises_clear_error(call, error, message):
    x, rois = on_device(*problem())
    with pytest.raises(error, match=message):
        call(x, rois)


@pytest.mark.parametrize(
    "sampling_ratio,rois,message",
    [
        pytest.param(2**40, [[0, 1.0, 1.0, 5.0, 5.0]], "sampling_ratio 1099511627776",
                     id="sampling-ratio-2^40"),
        pytest.param(-1, [[0, 1.0, 1.0, 5.0, 5.0], [1, -1e30, -1e30, 1e30, 1e30]],
                     r"rois\[1\] needs a \d+ x \d+ sampling grid in each of its 7 x 7 bins",
                     id="adaptive-grid-of-a-huge-roi"),
        pytest.param(1200, [[0, 1.0, 1.0, 5.0, 5.0]],  # 49 x 1200^2 samples, over 2^26
                     r"rois\[0\] needs a 1200 x 1200 sampling", id="more-samples-than-a-roi-takes"),
    ],
)  # fmt: skip
def test_absurd_sampling_grids_raise_instead_of_hanging(sampling_ratio, rois, message):
    """torchvision overflows, or loops for hours, on these; the C++ backends raise, and so does
    this one, before any kernel but the check runs (forward and backward)."""
    x, _ = on_device(*problem())
    rois = torch.tensor(rois, dtype=x.dtype, device=DEVICE)
    with pytest.raises(RuntimeError, match=f"sampling grid|{message}") as error:
        cnnops.roi_align(x, rois, 7, 0.5, sampling_ratio, backend="triton")
    assert error.match(message)
    grad = torch.zeros(rois.shape[0], 5, 7, 7, dtype=x.dtype, device=DEVICE)
    with pytest.raises(RuntimeError, match=message):
        torch.ops.cnnops._roi_align_backward_triton(grad, rois, 0.5, 7, 7, 2, 5, 11, 13,
                                                    sampling_ratio, False)  # fmt: skip


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
    args = dict(output_size=7, spatial_scale=1 / 16, sampling_ratio=2)
    x.requires_grad_()
    got = cnnops.roi_align(x, rois, backend="triton", **args)
    want = torchvision.ops.roi_align(x, rois, **args)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    assert got.is_contiguous(memory_format=torch.channels_last) == channels_last
    grad = torch.randn_like(got)
    (got_grad,) = torch.autograd.grad(got, x, grad)
    (want_grad,) = torch.autograd.grad(want, x, grad)
    torch.testing.assert_close(got_grad, want_grad, atol=1e-4, rtol=1e-4)
    torch.use_deterministic_algorithms(True)
    try:
        first = torch.autograd.grad(cnnops.roi_align(x, rois, backend="triton", **args), x, grad)
        second = torch.autograd.grad(cnnops.roi_align(x, rois, backend="triton", **args), x, grad)
    finally:
        torch.use_deterministic_algorithms(False)
    assert torch.equal(first[0], second[0])
    torch.testing.assert_close(first[0], want_grad, atol=1e-4, rtol=1e-4)


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "channels_last"])
def test_half_types_on_gpu(dtype, channels_last):
    """Computed in float32: the error against float64 is at most twice torchvision's own."""
    x, rois = faster_rcnn_head(dtype, channels_last)
    args = dict(output_size=7, spatial_scale=1 / 16, sampling_ratio=2, aligned=True)
    reference = torchvision.ops.roi_align(x.double(), rois.double(), **args)
    got = cnnops.roi_align(x, rois, backend="triton", **args)
    theirs = torchvision.ops.roi_align(x, rois, **args)
    assert got.dtype == dtype
    ours_error = (got.double() - reference).abs().max().item()
    their_error = (theirs.double() - reference).abs().max().item()
    assert ours_error <= 2 * their_error + 1e-6, (ours_error, their_error)
    xg = x.detach().requires_grad_()
    grad = torch.randn(got.shape, device="cuda", dtype=dtype)
    (got_grad,) = torch.autograd.grad(cnnops.roi_align(xg, rois, backend="triton", **args), xg,
                                      grad)  # fmt: skip
    xr = x.double().requires_grad_()
    (want_grad,) = torch.autograd.grad(torchvision.ops.roi_align(xr, rois.double(), **args), xr,
                                       grad.double())  # fmt: skip
    scale = want_grad.abs().max().item()
    assert got_grad.dtype == dtype
    assert (got_grad.double() - want_grad).abs().max().item() <= 4e-2 * scale

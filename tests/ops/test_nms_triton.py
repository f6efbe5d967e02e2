"""The triton backend's nms, batched_nms and box_iou against torchvision.ops on the same device;
its soft_nms against a plain-Python float64 Soft-NMS (tests/soft_nms_reference.py).

Without a GPU the kernels run in Triton's interpreter on CPU tensors (tests/conftest.py sets
TRITON_INTERPRET=1), on tens to hundreds of boxes; with one, natively on CUDA tensors, and the
cuda-marked tests add 10k boxes and agreement with the cuda backend.
"""

import math

import pytest
import soft_nms_reference
import torch
import torchvision

import cnnops
from cnnops.ops.nms import float32_at_or_below

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
# On a GPU machine these run natively and belong to the GPU lane (`pytest -m cuda`).
# Empty boxes give IoU 0 / 0 = NaN, as in torchvision; the interpreter's numpy warns about it.
pytestmark = [pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")]
if DEVICE == "cuda":
    pytestmark.append(pytest.mark.cuda)


def random_boxes(n, seed, scale=100.0, offset=0.0, dtype=torch.float32, device=DEVICE):
    """n boxes with corners in [offset, offset + scale) and sides up to scale / 4: at that
    density a few hundred boxes overlap at every IoU."""
    g = torch.Generator().manual_seed(seed)
    xy = torch.rand(n, 2, generator=g, dtype=torch.float64) * scale + offset
    wh = torch.rand(n, 2, generator=g, dtype=torch.float64) * scale / 4
    return torch.cat([xy, xy + wh], 1).to(device=device, dtype=dtype)


def random_scores(n, seed, dtype=torch.float32, device=DEVICE):
    g = torch.Generator().manual_seed(seed + 1000)
    return torch.rand(n, generator=g, dtype=torch.float64).to(device=device, dtype=dtype)


def _ties(n):
    # Four distinct scores: the order within a score is the original index's.
    levels = torch.randint(0, 4, (n,), generator=torch.Generator().manual_seed(3))
    return random_boxes(n, 3), levels.to(DEVICE, torch.float32) / 4


def _identical(n):
    boxes = torch.tensor([[10.0, 20.0, 30.0, 50.0]], device=DEVICE).repeat(n, 1)
    return boxes, random_scores(n, 4)


def _identical_tied(n):
    return _identical(n)[0], torch.full((n,), 0.5, device=DEVICE)


def _zero_area(n):
    boxes = random_boxes(n, 5)
    boxes[::3, 2] = boxes[::3, 0]  # zero width
    boxes[1::3, 3] = boxes[1::3, 1]  # zero height
    return boxes, random_scores(n, 5)


def _negative(n):
    return random_boxes(n, 6, offset=-80.0), random_scores(n, 6)


def _inverted(n):
    boxes = random_boxes(n, 7)
    boxes[::4] = boxes[::4, [2, 3, 0, 1]]  # x2 < x1 and y2 < y1: negative areas
    return boxes, random_scores(n, 7)


def _nan_and_inf(n):
    boxes = random_boxes(n, 8)
    boxes[3, 0] = math.nan
    boxes[7, 2] = math.inf
    boxes[11] = torch.tensor([-math.inf, -math.inf, math.inf, math.inf])
    return boxes, random_scores(n, 8)


def _chain(n):
    """Each box overlaps the next by 7/13 and the one after by 1/4, scores falling along the
    row: at threshold 0.5 each kept box suppresses only the next, a chain as long as the row."""
    x = torch.arange(n, dtype=torch.float32, device=DEVICE) * 3
    boxes = torch.stack([x, torch.zeros_like(x), x + 10, torch.full_like(x, 10.0)], 1)
    return boxes, torch.linspace(1.0, 0.1, n, device=DEVICE)


def _random(n, seed=1):
    return random_boxes(n, seed), random_scores(n, seed)


NMS_CASES = [
    pytest.param(lambda: _random(1), id="one-box"),
    pytest.param(lambda: _random(7, 2), id="7-boxes"),
    pytest.param(lambda: _random(64, 9), id="one-full-word"),
    pytest.param(lambda: _random(200), id="200-boxes"),
    pytest.param(lambda: _ties(150), id="tied-scores"),
    pytest.param(lambda: _identical(70), id="identical-boxes"),
    pytest.param(lambda: _identical_tied(70), id="identical-boxes-tied-scores"),
    pytest.param(lambda: _zero_area(90), id="zero-area"),
    pytest.param(lambda: _negative(120), id="negative-coordinates"),
    pytest.param(lambda: _inverted(60), id="inverted-boxes"),
    pytest.param(lambda: _nan_and_inf(40), id="nan-and-inf-coordinates"),
    pytest.param(lambda: _chain(150), id="suppression-chain"),
]


@pytest.mark.parametrize("iou_threshold", [0.2, 0.5, 0.8])
@pytest.mark.parametrize("make", NMS_CASES)
def test_nms_matches_torchvision(make, iou_threshold):
    boxes, scores = make()
    got = cnnops.nms(boxes, scores, iou_threshold, backend="triton")
    assert got.dtype == torch.int64 and got.device == boxes.device
    expected = torchvision.ops.nms(boxes, scores, iou_threshold)
    torch.testing.assert_close(got, expected, rtol=0, atol=0)  # its message shows where


def test_nms_float64():
    boxes = random_boxes(150, 10, dtype=torch.float64)
    scores = random_scores(150, 10, torch.float64)
    for iou_threshold in (0.3, 0.6):
        got = cnnops.nms(boxes, scores, iou_threshold, backend="triton")
        assert torch.equal(got, torchvision.ops.nms(boxes, scores, iou_threshold))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_nms_half_precision_upcasts(dtype):
    """float16 and bfloat16 boxes are compared in float32: as nms on the upcast boxes."""
    boxes, scores = random_boxes(100, 11, dtype=dtype), random_scores(100, 11, dtype)
    got = cnnops.nms(boxes, scores, 0.4, backend="triton")
    assert torch.equal(got, torchvision.ops.nms(boxes.float(), scores.float(), 0.4))


def test_threshold_is_compared_as_torchvision_does():
    """torchvision's CPU nms compares its float32 IoU with the float64 threshold; so does every
    cnnops backend, on every device. (torchvision's CUDA nms rounds the threshold to float32
    first, and disagrees exactly here.)"""
    # Areas 5 and 1, the second inside the first: IoU = 1 / 5 = float32(0.2), just above 0.2.
    boxes = torch.tensor([[0.0, 0.0, 5.0, 1.0], [0.0, 0.0, 1.0, 1.0]], device=DEVICE)
    scores = torch.tensor([0.9, 0.8], device=DEVICE)
    iou = torch.tensor(0.2, dtype=torch.float32).item()
    assert iou > 0.2
    for threshold, kept in ((0.2, [0]), (iou, [0, 1]), (0.19999999, [0])):
        got = cnnops.nms(boxes, scores, threshold, backend="triton")
        assert got.tolist() == kept, threshold
        assert torchvision.ops.nms(boxes.cpu(), scores.cpu(), threshold).tolist() == kept


@pytest.mark.parametrize(
    "value",
    [0.0, 0.2, 0.5, 0.8, 1.0, -0.2, 1e-45, -1e-45, 3.5e38, -3.5e38, math.inf, -math.inf, 1e-300],
)
def test_float32_at_or_below(value):
    """The largest float32 not above the float64 value (csrc/ops/nms.h's float_threshold_below)."""
    below = float32_at_or_below(value)
    f = torch.tensor(below, dtype=torch.float32)
    assert f.item() == below and below <= value
    up = torch.nextafter(f, torch.tensor(math.inf)).item()
    assert up > value or below == value


def batched_reference(boxes, scores, idxs, iou_threshold):
    """batched_nms as torchvision.ops.nms per class, merged by descending score (ties: lower
    index). Exact: torchvision's own batched_nms offsets the coordinates, which rounds them."""
    kept = [
        members[torchvision.ops.nms(boxes[members], scores[members], iou_threshold)]
        for members in (torch.nonzero(idxs == c).view(-1) for c in torch.unique(idxs))
    ]
    kept = torch.sort(torch.cat(kept)).values if kept else idxs.new_empty(0, dtype=torch.int64)
    return kept[torch.sort(scores[kept], descending=True, stable=True).indices]


@pytest.mark.parametrize("idx_dtype", [torch.int64, torch.int32, torch.uint8])
@pytest.mark.parametrize("iou_threshold", [0.2, 0.5])
@pytest.mark.parametrize("n,classes", [(100, 3), (180, 7), (50, 1)], ids=["3cls", "7cls", "1cls"])
def test_batched_nms_matches_per_class_nms(n, classes, iou_threshold, idx_dtype):
    boxes, scores = _random(n, 12)
    g = torch.Generator().manual_seed(12)
    idxs = torch.randint(0, classes, (n,), generator=g).to(device=DEVICE, dtype=idx_dtype)
    got = cnnops.batched_nms(boxes, scores, idxs, iou_threshold, backend="triton")
    assert torch.equal(got, batched_reference(boxes, scores, idxs, iou_threshold))


def test_batched_nms_matches_torchvision_on_integer_boxes():
    """Integer coordinates stay exact under torchvision's per-class offsets."""
    boxes = random_boxes(120, 13).round()
    scores = random_scores(120, 13)
    idxs = torch.randint(0, 4, (120,), generator=torch.Generator().manual_seed(13)).to(DEVICE)
    # A threshold exact in float32: integer boxes often have IoUs like 3/10, where torchvision's
    # CUDA nms (threshold rounded to float32) and its CPU nms disagree.
    got = cnnops.batched_nms(boxes, scores, idxs, 0.25, backend="triton")
    assert torch.equal(got, torchvision.ops.batched_nms(boxes, scores, idxs, 0.25))


def test_batched_nms_negative_class_ids_and_coordinates():
    boxes, scores = _negative(80)
    idxs = torch.randint(-3, 2, (80,), generator=torch.Generator().manual_seed(14)).to(DEVICE)
    got = cnnops.batched_nms(boxes, scores, idxs, 0.4, backend="triton")
    assert torch.equal(got, batched_reference(boxes, scores, idxs, 0.4))


def test_empty_input():
    boxes = torch.empty(0, 4, device=DEVICE)
    scores = torch.empty(0, device=DEVICE)
    for got in (
        cnnops.nms(boxes, scores, 0.5, backend="triton"),
        cnnops.nms(boxes, scores, 0.5, score_threshold=0.1, max_output=3, backend="triton"),
        cnnops.batched_nms(
            boxes, scores, torch.empty(0, dtype=torch.int64, device=DEVICE), 0.5, backend="triton"
        ),
    ):
        assert got.shape == (0,) and got.dtype == torch.int64 and got.device == boxes.device


def nms_reference(boxes, scores, iou_threshold, score_threshold, max_output):
    candidates = torch.arange(boxes.shape[0], device=boxes.device)
    if score_threshold is not None:
        candidates = torch.nonzero(scores > score_threshold).view(-1)
    kept = candidates[torchvision.ops.nms(boxes[candidates], scores[candidates], iou_threshold)]
    return kept if max_output is None else kept[:max_output]


@pytest.mark.parametrize(
    "score_threshold,max_output",
    [
        (0.3, None),
        (None, 5),
        (0.5, 4),
        (None, 0),
        (None, 1000),
        (0.99999, None),  # (almost) nothing passes
        (-1.0, 70),  # everything passes; the limit reached past the first word
    ],
)
def test_score_threshold_and_max_output(score_threshold, max_output):
    boxes, scores = _random(200, 15)
    got = cnnops.nms(
        boxes, scores, 0.3, score_threshold=score_threshold, max_output=max_output,
        backend="triton",
    )  # fmt: skip
    expected = nms_reference(boxes, scores, 0.3, score_threshold, max_output)
    assert torch.equal(got, expected)


def test_score_threshold_drops_equal_scores():
    boxes, scores = _ties(60)
    got = cnnops.nms(boxes, scores, 0.5, score_threshold=0.5, backend="triton")
    assert (scores[got] > 0.5).all()
    assert torch.equal(got, nms_reference(boxes, scores, 0.5, 0.5, None))


def test_non_contiguous_inputs():
    wide = random_boxes(90, 16).repeat_interleave(2, dim=1)  # [90, 8]: every column twice
    boxes = wide[:, ::2]
    scores = random_scores(180, 16)[::2]
    assert not boxes.is_contiguous() and not scores.is_contiguous()
    got = cnnops.nms(boxes, scores, 0.4, backend="triton")
    assert torch.equal(got, torchvision.ops.nms(boxes.contiguous(), scores.contiguous(), 0.4))
    torch.testing.assert_close(
        cnnops.box_iou(boxes, boxes.t().contiguous().t(), backend="triton"),
        torchvision.ops.box_iou(boxes.contiguous(), boxes.contiguous()),
        equal_nan=True,
    )


def test_use_backend_routes_to_triton():
    boxes, scores = _random(30, 17)
    with cnnops.use_backend("triton"):
        got = cnnops.nms(boxes, scores, 0.5)
        iou = cnnops.box_iou(boxes, boxes)
    assert torch.equal(got, torchvision.ops.nms(boxes, scores, 0.5))
    torch.testing.assert_close(iou, torchvision.ops.box_iou(boxes, boxes))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize(
    "make",
    [
        pytest.param(lambda dt: (random_boxes(37, 20, dtype=dt), random_boxes(50, 21, dtype=dt)),
                     id="37x50"),
        pytest.param(lambda dt: (random_boxes(1, 22, dtype=dt), random_boxes(70, 23, dtype=dt)),
                     id="1x70"),
        pytest.param(lambda dt: (_zero_area(20)[0].to(dt), _inverted(33)[0].to(dt)),
                     id="zero-area-inverted"),
        pytest.param(lambda dt: (_negative(18)[0].to(dt), _negative(40)[0].to(dt)),
                     id="negative"),
        pytest.param(lambda dt: (random_boxes(0, 24, dtype=dt), random_boxes(5, 25, dtype=dt)),
                     id="0x5"),
        pytest.param(lambda dt: (random_boxes(5, 26, dtype=dt), random_boxes(0, 27, dtype=dt)),
                     id="5x0"),
    ],
)  # fmt: skip
def test_box_iou_matches_torchvision(make, dtype):
    boxes1, boxes2 = make(dtype)
    got = cnnops.box_iou(boxes1, boxes2, backend="triton")
    assert got.dtype == dtype and got.shape == (boxes1.shape[0], boxes2.shape[0])
    torch.testing.assert_close(got, torchvision.ops.box_iou(boxes1, boxes2), equal_nan=True)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_box_iou_half_precision(dtype):
    """Computed in float32, stored in the boxes' dtype (as the other backends' box_iou)."""
    boxes1, boxes2 = random_boxes(20, 28, dtype=dtype), random_boxes(30, 29, dtype=dtype)
    got = cnnops.box_iou(boxes1, boxes2, backend="triton")
    assert got.dtype == dtype
    expected = torchvision.ops.box_iou(boxes1.float(), boxes2.float()).to(dtype)
    torch.testing.assert_close(got, expected, equal_nan=True)


# In the interpreter, tracing through triton_op's kernel launches (opcheck's AOT-dispatch test)
# reaches fake tensors' data; that part runs on a GPU only.
INTERPRETER_OPCHECK = ("test_schema", "test_faketensor")
OPCHECK_UTILS = "ALL" if DEVICE == "cuda" else INTERPRETER_OPCHECK


@pytest.mark.parametrize(
    "with_classes,score_threshold,max_output",
    [(False, None, None), (True, None, None), (False, 0.2, 6)],
    ids=["nms", "batched", "thresholds"],
)
def test_opcheck_nms(with_classes, score_threshold, max_output):
    boxes, scores = _random(40, 30)
    idxs = torch.randint(0, 3, (40,), device=DEVICE) if with_classes else None
    args = (boxes, scores, idxs, 0.5, score_threshold, max_output)
    torch.library.opcheck(torch.ops.cnnops.nms_triton.default, args, test_utils=OPCHECK_UTILS)


def test_opcheck_box_iou():
    args = (random_boxes(20, 31), random_boxes(9, 32))
    torch.library.opcheck(torch.ops.cnnops.box_iou_triton.default, args, test_utils=OPCHECK_UTILS)


def _boxes(n=4, **kwargs):
    return random_boxes(n, 33, **kwargs)


@pytest.mark.parametrize(
    "call,error,message",
    [
        pytest.param(
            lambda: cnnops.nms(torch.rand(4, 3, device=DEVICE), torch.rand(4, device=DEVICE), 0.5,
                               backend="triton"),
            ValueError, r"boxes must be a \[N, 4\] tensor", id="boxes-not-Nx4",
        ),
        pytest.param(
            lambda: cnnops.nms(_boxes(), torch.rand(5, device=DEVICE), 0.5, backend="triton"),
            ValueError, "scores must be a", id="scores-wrong-length",
        ),
        pytest.param(
            lambda: cnnops.nms(_boxes().long(), torch.rand(4, device=DEVICE), 0.5,
                               backend="triton"),
            TypeError, "boxes must be floating point", id="integer-boxes",
        ),
        pytest.param(
            lambda: cnnops.nms(_boxes(), torch.rand(4, device=DEVICE, dtype=torch.float64), 0.5,
                               backend="triton"),
            TypeError, "scores dtype", id="dtype-mismatch",
        ),
        pytest.param(
            lambda: cnnops.nms(_boxes(), torch.rand(4, device=DEVICE), math.nan, backend="triton"),
            ValueError, "iou_threshold must not be NaN", id="nan-threshold",
        ),
        pytest.param(
            lambda: cnnops.nms(_boxes(), torch.rand(4, device=DEVICE), 0.5, max_output=-1,
                               backend="triton"),
            ValueError, "max_output must be", id="negative-max-output",
        ),
        pytest.param(
            lambda: cnnops.batched_nms(_boxes(), torch.rand(4, device=DEVICE),
                                       torch.rand(4, device=DEVICE), 0.5, backend="triton"),
            TypeError, "idxs must be an integer tensor", id="float-idxs",
        ),
        pytest.param(
            lambda: cnnops.batched_nms(_boxes(), torch.rand(4, device=DEVICE),
                                       torch.zeros(3, dtype=torch.int64, device=DEVICE), 0.5,
                                       backend="triton"),
            ValueError, r"idxs must be a \[N\] tensor", id="idxs-wrong-length",
        ),
        pytest.param(
            lambda: cnnops.box_iou(_boxes(), _boxes(dtype=torch.float64), backend="triton"),
            TypeError, "boxes2 dtype", id="box-iou-dtype-mismatch",
        ),
        pytest.param(
            lambda: torch.ops.cnnops.nms_triton(torch.rand(4, 5, device=DEVICE),
                                                torch.rand(4, device=DEVICE), None, 0.5, None,
                                                None),
            ValueError, r"boxes must be a \[N, 4\] tensor", id="op-called-directly",
        ),
        pytest.param(
            lambda: torch.ops.cnnops.nms_triton(_boxes(), torch.rand(4, device=DEVICE),
                                                torch.zeros(2, dtype=torch.int64, device=DEVICE),
                                                0.5, None, None),
            ValueError, r"idxs must be a \[N\] tensor", id="op-called-directly-idxs",
        ),
        pytest.param(
            lambda: torch.ops.cnnops.box_iou_triton(_boxes(), torch.rand(3, device=DEVICE)),
            ValueError, r"boxes2 must be a \[N, 4\] tensor", id="box-iou-op-called-directly",
        ),
    ],
)  # fmt: skip
def test_bad_input_raises_clear_error(call, error, message):
    with pytest.raises(error, match=message):
        call()


def test_too_many_boxes_raises_before_any_kernel():
    """The mask kernel's grid puts the words of boxes on its second axis (at most 65535)."""
    boxes = torch.zeros(65535 * 64 + 1, 4, device=DEVICE)
    scores = torch.zeros(boxes.shape[0], device=DEVICE)
    with pytest.raises(ValueError, match="the triton backend takes at most 4194240 boxes"):
        cnnops.nms(boxes, scores, 0.5, backend="triton")


# ---- GPU only: bigger sizes, and agreement with the cuda backend. -----------------------------

BIG = 10_000


def big_problem(seed, classes=None):
    """10k boxes over a 1000 x 1000 image, sides up to 250: many overlaps at every threshold.

    On a GPU the kernels may fuse a product into a sum (FMA), each compiler its own way, and over
    10^7 pairs a 1-ulp difference in some union would likely cross the threshold somewhere. So
    the corners lie on a grid of 1/8: every area, intersection and union is then exact in
    float32, and only the (IEEE) division rounds."""
    boxes = (random_boxes(BIG, seed, scale=1000.0, device="cuda") * 8).round() / 8
    scores = random_scores(BIG, seed, device="cuda")
    idxs = None
    if classes:
        g = torch.Generator().manual_seed(seed)
        idxs = torch.randint(0, classes, (BIG,), generator=g).cuda()
    return boxes, scores, idxs


# Thresholds exact in float32: torchvision's CUDA nms rounds the threshold to float32 first
# (see test_threshold_is_compared_as_torchvision_does).
@pytest.mark.cuda
@pytest.mark.parametrize("iou_threshold", [0.25, 0.5, 0.75])
def test_nms_10k_boxes_on_gpu(iou_threshold):
    boxes, scores, _ = big_problem(40)
    got = cnnops.nms(boxes, scores, iou_threshold, backend="triton")
    assert torch.equal(got, torchvision.ops.nms(boxes, scores, iou_threshold))


@pytest.mark.cuda
def test_batched_nms_10k_boxes_on_gpu():
    boxes, scores, idxs = big_problem(41, classes=20)
    got = cnnops.batched_nms(boxes, scores, idxs, 0.5, backend="triton")
    assert torch.equal(got, batched_reference(boxes, scores, idxs, 0.5))


@pytest.mark.cuda
def test_nms_10k_score_threshold_and_max_output_on_gpu():
    boxes, scores, _ = big_problem(42)
    got = cnnops.nms(boxes, scores, 0.5, score_threshold=0.3, max_output=300, backend="triton")
    assert torch.equal(got, nms_reference(boxes, scores, 0.5, 0.3, 300))


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_box_iou_large_on_gpu(dtype):
    boxes1 = random_boxes(3000, 43, scale=1000.0, dtype=dtype, device="cuda")
    boxes2 = random_boxes(2000, 44, scale=1000.0, dtype=dtype, device="cuda")
    got = cnnops.box_iou(boxes1, boxes2, backend="triton")
    torch.testing.assert_close(got, torchvision.ops.box_iou(boxes1, boxes2), equal_nan=True)


@pytest.mark.cuda
def test_torch_compile_fullgraph_on_gpu():
    """torch.compile sees through triton_op to the kernels (a GPU only: Inductor does not run
    Triton's interpreter); nms's output size is unbacked."""
    boxes, scores, idxs = big_problem(46, classes=5)

    @torch.compile(fullgraph=True)
    def detect(boxes, scores, idxs):
        kept = cnnops.batched_nms(boxes, scores, idxs, 0.5, backend="triton")
        return kept, cnnops.box_iou(boxes[:100], boxes[100:300], backend="triton")

    kept, iou = detect(boxes, scores, idxs)
    assert torch.equal(kept, batched_reference(boxes, scores, idxs, 0.5))
    torch.testing.assert_close(
        iou, torchvision.ops.box_iou(boxes[:100], boxes[100:300]), equal_nan=True
    )


@pytest.mark.cuda
@pytest.mark.parametrize("classes", [None, 20], ids=["nms", "batched"])
def test_triton_and_cuda_backends_agree(classes):
    boxes, scores, idxs = big_problem(45, classes)
    if idxs is None:
        triton_kept = cnnops.nms(boxes, scores, 0.5, max_output=1000, backend="triton")
        cuda_kept = cnnops.nms(boxes, scores, 0.5, max_output=1000, backend="cuda")
    else:
        triton_kept = cnnops.batched_nms(boxes, scores, idxs, 0.5, backend="triton")
        cuda_kept = cnnops.batched_nms(boxes, scores, idxs, 0.5, backend="cuda")
    assert torch.equal(triton_kept, cuda_kept)
    torch.testing.assert_close(
        cnnops.box_iou(boxes[:500], boxes[500:1500], backend="triton"),
        cnnops.box_iou(boxes[:500], boxes[500:1500], backend="cuda"),
        equal_nan=True,
    )


# ---- soft_nms ---------------------------------------------------------------------------------
# Against the plain-Python float64 Soft-NMS (tests/soft_nms_reference.py): float64 exactly,
# float32 and below by replaying the kernel's picks in float64 (near-ties may go either way).

SOFT_NMS_PARAMS = [
    pytest.param("gaussian", 0.5, 0.3, 0.001, id="gaussian-default"),
    pytest.param("gaussian", 0.1, 0.3, 0.05, id="gaussian-sigma0.1"),
    pytest.param("linear", 0.5, 0.3, 0.001, id="linear-default"),
]
SOFT_NMS_SETS = [
    pytest.param(boxes, scores, id=f"{name}-{str(dtype)[6:]}")
    for dtype in (torch.float64, torch.float32)
    for name, boxes, scores in soft_nms_reference.box_sets(48, dtype, DEVICE)
    if dtype == torch.float64 or name in ("random", "equal-scores", "identical-boxes")
]


def _check_soft_nms(got, *args, rtol=1e-5, score_rtol=None):
    if args[0].dtype == torch.float64:
        soft_nms_reference.assert_matches_reference(got, *args)
    else:
        soft_nms_reference.assert_valid_trajectory(got, *args, rtol=rtol, score_rtol=score_rtol)


@pytest.mark.parametrize("method,sigma,iou_threshold,score_threshold", SOFT_NMS_PARAMS)
@pytest.mark.parametrize("boxes,scores", SOFT_NMS_SETS)
def test_soft_nms_matches_reference(boxes, scores, method, sigma, iou_threshold, score_threshold):
    args = (boxes, scores, sigma, iou_threshold, score_threshold, method)
    _check_soft_nms(cnnops.soft_nms(*args, backend="triton"), *args)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_soft_nms_half_precision_upcasts(dtype):
    """Computed in float32 from the upcast boxes and scores; the returned scores are rounded to
    the dtype."""
    boxes, scores = random_boxes(40, 50, dtype=dtype), random_scores(40, 50, dtype)
    for method in ("gaussian", "linear"):
        got = cnnops.soft_nms(boxes, scores, method=method, backend="triton")
        assert got[1].dtype == dtype
        _check_soft_nms(got, boxes, scores, 0.5, 0.3, 0.001, method,
                        score_rtol=torch.finfo(dtype).eps)  # fmt: skip


@pytest.mark.parametrize("method", ["gaussian", "linear"])
def test_soft_nms_agrees_with_cpu_backend(method):
    """float64: the same picks as the C++ CPU kernel, and the same scores to the last bits."""
    boxes = random_boxes(60, 51, dtype=torch.float64)
    scores = random_scores(60, 51, torch.float64)
    keep, kept = cnnops.soft_nms(boxes, scores, 0.3, method=method, backend="triton")
    cpu_keep, cpu_kept = cnnops.soft_nms(boxes.cpu(), scores.cpu(), 0.3, method=method)
    assert torch.equal(keep.cpu(), cpu_keep)
    torch.testing.assert_close(kept.cpu(), cpu_kept, rtol=1e-14, atol=0)


def test_soft_nms_nan_scores_and_coordinates():
    """NaN scores: dropped, never returned. NaN IoUs (NaN coordinates, two empty boxes): no
    overlap. A score of inf that meets weight 0 (inf * 0) is dropped as NaN."""
    boxes = random_boxes(40, 52, dtype=torch.float64)
    scores = random_scores(40, 52, torch.float64)
    scores[[2, 9]] = math.nan
    boxes[5, 0] = math.nan
    boxes[6] = boxes[7] = torch.tensor([3.0, 3.0, 3.0, 8.0])  # empty, equal: IoU 0 / 0
    got = cnnops.soft_nms(boxes, scores, backend="triton")
    assert 2 not in got[0].tolist() and 9 not in got[0].tolist()
    soft_nms_reference.assert_matches_reference(got, boxes, scores, 0.5, 0.3, 0.001, "gaussian")
    same = torch.tensor([[0.0, 0.0, 1.0, 1.0]], device=DEVICE).repeat(3, 1)
    keep, kept = cnnops.soft_nms(same, torch.tensor([0.5, math.inf, 0.7], device=DEVICE),
                                 method="linear", backend="triton")  # fmt: skip
    assert keep.tolist() == [1] and kept.tolist() == [math.inf]


def test_soft_nms_score_threshold_comparison():
    """`score < score_threshold` drops (equal stays), compared exactly as in float64."""
    boxes = torch.tensor([[0.0, 0, 1, 1], [2, 2, 3, 3], [4, 4, 5, 5]], device=DEVICE)
    scores = torch.tensor([0.5, 0.25, 0.3], device=DEVICE)
    for threshold, kept in ((0.25, [0, 2, 1]), (0.3, [0, 2]), (0.300000012, [0]), (0.6, [])):
        got = cnnops.soft_nms(boxes, scores, score_threshold=threshold, backend="triton")
        assert got[0].tolist() == kept, threshold


def test_soft_nms_empty_and_one_box():
    keep, kept = cnnops.soft_nms(torch.zeros(0, 4, device=DEVICE), torch.zeros(0, device=DEVICE),
                                 backend="triton")  # fmt: skip
    assert keep.shape == (0,) and keep.dtype == torch.int64 and kept.shape == (0,)
    keep, kept = cnnops.soft_nms(torch.tensor([[0.0, 0, 1, 1]], device=DEVICE),
                                 torch.tensor([0.7], device=DEVICE), backend="triton")  # fmt: skip
    assert keep.tolist() == [0] and kept.tolist() == [pytest.approx(0.7)]


def test_soft_nms_use_backend_routes_to_triton():
    boxes, scores = _random(20, 53)
    with cnnops.use_backend("triton"):
        got = cnnops.soft_nms(boxes, scores)
    _check_soft_nms(got, boxes, scores, 0.5, 0.3, 0.001, "gaussian")


@pytest.mark.parametrize("method", ["gaussian", "linear"])
def test_opcheck_soft_nms(method):
    boxes, scores = _random(24, 54)
    args = (boxes, scores, 0.5, 0.3, 0.001, method)
    torch.library.opcheck(torch.ops.cnnops.soft_nms_triton.default, args, test_utils=OPCHECK_UTILS)


@pytest.mark.parametrize(
    "call,error,message",
    [
        pytest.param(
            lambda: cnnops.soft_nms(torch.rand(4, 3, device=DEVICE), torch.rand(4, device=DEVICE),
                                    backend="triton"),
            ValueError, r"boxes must be a \[N, 4\] tensor", id="boxes-not-Nx4",
        ),
        pytest.param(
            lambda: cnnops.soft_nms(_boxes(), torch.rand(4, device=DEVICE, dtype=torch.float64),
                                    backend="triton"),
            TypeError, "scores dtype", id="dtype-mismatch",
        ),
        pytest.param(
            lambda: cnnops.soft_nms(_boxes(), torch.rand(4, device=DEVICE), sigma=0.0,
                                    backend="triton"),
            ValueError, "sigma must be > 0", id="sigma-zero",
        ),
        pytest.param(
            lambda: cnnops.soft_nms(_boxes(), torch.rand(4, device=DEVICE), method="soft",
                                    backend="triton"),
            ValueError, "method must be", id="method-unknown",
        ),
        pytest.param(
            lambda: cnnops.soft_nms(_boxes(), torch.rand(4, device=DEVICE),
                                    score_threshold=math.nan, backend="triton"),
            ValueError, "score_threshold must not be NaN", id="nan-score-threshold",
        ),
        pytest.param(
            lambda: torch.ops.cnnops.soft_nms_triton(_boxes(), torch.rand(4, device=DEVICE),
                                                     -1.0, 0.3, 0.001, "gaussian"),
            ValueError, "sigma must be > 0", id="op-called-directly",
        ),
    ],
)  # fmt: skip
def test_soft_nms_bad_input_raises_clear_error(call, error, message):
    with pytest.raises(error, match=message):
        call()


# GPU only: thousands of boxes (several BLOCKs a sweep), torch.compile, and the cuda backend.


@pytest.mark.cuda
@pytest.mark.parametrize("method", ["gaussian", "linear"])
def test_soft_nms_3000_boxes_on_gpu(method):
    boxes = random_boxes(3000, 55, scale=1000.0, dtype=torch.float64, device="cuda")
    scores = random_scores(3000, 55, torch.float64, device="cuda")
    keep, kept = cnnops.soft_nms(boxes, scores, method=method, backend="triton")
    cpu_keep, cpu_kept = cnnops.soft_nms(boxes.cpu(), scores.cpu(), method=method)
    assert torch.equal(keep.cpu(), cpu_keep)
    torch.testing.assert_close(kept.cpu(), cpu_kept, rtol=1e-13, atol=0)
    boxes32, scores32 = boxes[:1500].float(), scores[:1500].float()
    got = cnnops.soft_nms(boxes32, scores32, method=method, backend="triton")
    soft_nms_reference.assert_valid_trajectory(got, boxes32, scores32, 0.5, 0.3, 0.001, method)


@pytest.mark.cuda
def test_soft_nms_torch_compile_fullgraph_on_gpu():
    boxes = random_boxes(2000, 56, scale=1000.0, dtype=torch.float64, device="cuda")
    scores = random_scores(2000, 56, torch.float64, device="cuda")

    @torch.compile(fullgraph=True)
    def rescored(boxes, scores):
        keep, kept = cnnops.soft_nms(boxes, scores, backend="triton")
        return boxes[keep], kept * 2

    keep, kept = cnnops.soft_nms(boxes, scores, backend="triton")
    with torch._dynamo.config.patch(capture_dynamic_output_shape_ops=True):
        got_boxes, got_scores = rescored(boxes, scores)
    torch.testing.assert_close(got_boxes, boxes[keep])
    torch.testing.assert_close(got_scores, kept * 2)


@pytest.mark.cuda
@pytest.mark.parametrize("method", ["gaussian", "linear"])
def test_soft_nms_triton_and_cuda_backends_agree(method):
    boxes = random_boxes(5000, 57, scale=1000.0, dtype=torch.float64, device="cuda")
    scores = random_scores(5000, 57, torch.float64, device="cuda")
    triton_keep, triton_kept = cnnops.soft_nms(boxes, scores, method=method, backend="triton")
    cuda_keep, cuda_kept = cnnops.soft_nms(boxes, scores, method=method, backend="cuda")
    assert torch.equal(triton_keep, cuda_keep)
    torch.testing.assert_close(triton_kept, cuda_kept, rtol=1e-13, atol=0)

"""cnnops.nms, batched_nms and box_iou on the CPU backend against torchvision.ops."""

import math

import pytest
import torch
import torchvision

import cnnops


def random_boxes(n, dtype=torch.float32, size=1000.0, seed=0, offset=0.0):
    """Detection-like boxes: corners uniform over a size x size image, sides up to size / 10."""
    gen = torch.Generator().manual_seed(seed)
    xy = torch.rand(n, 2, generator=gen, dtype=torch.float64) * size + offset
    wh = torch.rand(n, 2, generator=gen, dtype=torch.float64) * size / 10
    return torch.cat([xy, xy + wh], 1).to(dtype)


def random_scores(n, dtype=torch.float32, seed=1):
    return torch.rand(n, generator=torch.Generator().manual_seed(seed), dtype=torch.float64).to(
        dtype
    )


def box_sets():
    """(id, boxes, scores): random and adversarial sets."""
    yield "random-2000", random_boxes(2000), random_scores(2000)
    yield "random-float64", random_boxes(500, torch.float64), random_scores(500, torch.float64)
    yield "negative-coordinates", random_boxes(500, offset=-700.0), random_scores(500)
    # Five distinct scores: ties everywhere, resolved by the lower index first.
    ties = torch.randint(0, 5, (600,), generator=torch.Generator().manual_seed(2)).float()
    yield "equal-scores", random_boxes(600), ties
    identical = torch.tensor([[10.0, 20.0, 50.0, 60.0]]).repeat(40, 1)
    yield "identical-boxes", identical, random_scores(40)
    zero_area = random_boxes(300)
    zero_area[::3, 2] = zero_area[::3, 0]  # zero width: IoU 0, or 0/0 with another such box
    zero_area[1::3, 3] = zero_area[1::3, 1]
    yield "zero-area", zero_area, random_scores(300)
    # One box covering everything: the windowed search must fall back to scanning all.
    huge = random_boxes(400)
    huge[7] = torch.tensor([-5000.0, -5000.0, 5000.0, 5000.0])
    yield "one-huge-box", huge, random_scores(400)
    yield "empty", torch.zeros(0, 4), torch.zeros(0)
    yield "one-box", torch.tensor([[0.0, 0.0, 1.0, 1.0]]), torch.tensor([0.5])


BOX_SETS = [pytest.param(boxes, scores, id=name) for name, boxes, scores in box_sets()]
THRESHOLDS = [0.2, 0.5, 0.8]


@pytest.mark.parametrize("iou_threshold", THRESHOLDS)
@pytest.mark.parametrize("boxes,scores", BOX_SETS)
def test_nms_matches_torchvision(boxes, scores, iou_threshold):
    got = cnnops.nms(boxes, scores, iou_threshold)
    assert got.dtype == torch.int64
    torch.testing.assert_close(
        got, torchvision.ops.nms(boxes, scores, iou_threshold), rtol=0, atol=0
    )


@pytest.mark.parametrize("iou_threshold", [0.0, -0.5, 1.0])
def test_nms_edge_thresholds(iou_threshold):
    """0: any overlap suppresses; below 0: disjoint boxes too (the all-pairs path); 1: none."""
    boxes, scores = random_boxes(300), random_scores(300)
    want = torchvision.ops.nms(boxes, scores, iou_threshold)
    torch.testing.assert_close(cnnops.nms(boxes, scores, iou_threshold), want, rtol=0, atol=0)


def test_iou_just_above_and_below_the_threshold():
    """Box pairs whose IoU lands on either side of 0.5 by one float32 step: the comparison is
    torchvision's (IoU in float32, compared with the double threshold)."""
    rows = []
    for height in (5.0, math.nextafter(5.0, 6.0), math.nextafter(5.0, 4.0)):
        rows += [[0.0, 0.0, 10.0, 10.0], [0.0, 0.0, 10.0, height]]
    boxes = torch.tensor(rows) + torch.arange(3).repeat_interleave(2)[:, None] * 100
    scores = torch.tensor([0.9, 0.8] * 3)
    for threshold in (0.5, 0.49999997, 0.50000001):
        want = torchvision.ops.nms(boxes, scores, threshold)
        torch.testing.assert_close(cnnops.nms(boxes, scores, threshold), want, rtol=0, atol=0)


def test_non_finite_coordinates_match_torchvision():
    """NaN and inf boxes neither crash nor suppress anything they should not (the all-pairs path:
    the x1 order means nothing with NaN)."""
    boxes, scores = random_boxes(200), random_scores(200)
    boxes[3, 0] = float("nan")
    boxes[10, 2] = float("inf")
    want = torchvision.ops.nms(boxes, scores, 0.5)
    torch.testing.assert_close(cnnops.nms(boxes, scores, 0.5), want, rtol=0, atol=0)


@pytest.mark.parametrize("iou_threshold", THRESHOLDS)
@pytest.mark.parametrize("classes", [1, 3, 80])
def test_batched_nms_matches_torchvision(classes, iou_threshold):
    n = 3000
    boxes, scores = random_boxes(n), random_scores(n)
    idxs = torch.randint(0, classes, (n,), generator=torch.Generator().manual_seed(3))
    got = cnnops.batched_nms(boxes, scores, idxs, iou_threshold)
    want = torchvision.ops.batched_nms(boxes, scores, idxs, iou_threshold)
    # The same boxes, by descending score. Among equal scores torchvision's order is its sort's
    # (unstable above 1000 boxes); ours puts the lower index first, as its nms does.
    torch.testing.assert_close(got.sort().values, want.sort().values, rtol=0, atol=0)
    torch.testing.assert_close(scores[got], scores[want], rtol=0, atol=0)
    ties = scores[got][1:] == scores[got][:-1]
    assert (got[1:][ties] > got[:-1][ties]).all()


def test_batched_nms_needs_no_coordinate_offsets():
    """Identical boxes in different classes all survive; in one class only the best does."""
    boxes = torch.tensor([[-50.0, -50.0, -10.0, -10.0]]).repeat(6, 1)
    scores = torch.tensor([0.1, 0.9, 0.5, 0.7, 0.3, 0.8])
    idxs = torch.tensor([0, 1, 2, 0, 1, 2])
    torch.testing.assert_close(
        cnnops.batched_nms(boxes, scores, idxs, 0.5), torch.tensor([1, 5, 3])
    )


def test_score_threshold_and_max_output():
    boxes, scores = random_boxes(1000), random_scores(1000)
    full = torchvision.ops.nms(boxes, scores, 0.5)
    torch.testing.assert_close(cnnops.nms(boxes, scores, 0.5, max_output=10), full[:10])
    assert cnnops.nms(boxes, scores, 0.5, max_output=0).numel() == 0
    above = torch.nonzero(scores > 0.7).view(-1)
    want = above[torchvision.ops.nms(boxes[above], scores[above], 0.5)]
    torch.testing.assert_close(cnnops.nms(boxes, scores, 0.5, score_threshold=0.7), want)
    assert cnnops.nms(boxes, scores, 0.5, score_threshold=2.0).numel() == 0


def test_non_contiguous_boxes():
    boxes = random_boxes(500)
    wide = torch.zeros(500, 8)
    wide[:, ::2] = boxes
    strided = wide[:, ::2]  # every other column: a strided view
    assert not strided.is_contiguous()
    scores = random_scores(500)
    want = torchvision.ops.nms(boxes, scores, 0.5)
    torch.testing.assert_close(cnnops.nms(strided, scores, 0.5), want, rtol=0, atol=0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_box_iou_matches_torchvision(dtype):
    a, b = random_boxes(300, dtype), random_boxes(170, dtype, seed=5)
    a[4, 2] = a[4, 0]  # a zero-area box
    torch.testing.assert_close(cnnops.box_iou(a, b), torchvision.ops.box_iou(a, b))
    assert cnnops.box_iou(a[:0], b).shape == (0, 170)
    assert cnnops.box_iou(a, b[:0]).shape == (300, 0)


def test_opcheck():
    boxes, scores = random_boxes(50), random_scores(50)
    idxs = torch.randint(0, 3, (50,))
    # The output size is data-dependent: the fake kernel allocates an unbacked size.
    for args in ((boxes, scores, None, 0.5, None, None), (boxes, scores, idxs, 0.5, 0.1, 20)):
        torch.library.opcheck(torch.ops.cnnops.nms.default, args)
    torch.library.opcheck(torch.ops.cnnops.box_iou.default, (boxes, random_boxes(20, seed=4)))


def test_export_of_a_function_calling_nms():
    class Detector(torch.nn.Module):
        def forward(self, boxes, scores):
            keep = cnnops.nms(boxes, scores, 0.5)
            return boxes[keep]

    boxes, scores = random_boxes(200), random_scores(200)
    program = torch.export.export(Detector(), (boxes, scores))
    want = boxes[torchvision.ops.nms(boxes, scores, 0.5)]
    torch.testing.assert_close(program.module()(boxes, scores), want)


def test_torch_compile_fullgraph(monkeypatch):
    monkeypatch.setattr(torch._dynamo.config, "capture_dynamic_output_shape_ops", True)

    @torch.compile(fullgraph=True, backend="eager")
    def kept_boxes(boxes, scores):
        return boxes[cnnops.nms(boxes, scores, 0.5)]

    boxes, scores = random_boxes(300), random_scores(300)
    torch.testing.assert_close(
        kept_boxes(boxes, scores), boxes[torchvision.ops.nms(boxes, scores, 0.5)]
    )


@pytest.mark.parametrize(
    "call,error,message",
    [
        pytest.param(
            lambda b, s: cnnops.nms(b[:, :3], s, 0.5),
            ValueError,
            r"boxes must be a \[N, 4\]",
            id="boxes-shape",
        ),
        pytest.param(
            lambda b, s: cnnops.nms(b, s[:-1], 0.5),
            ValueError,
            "one score per box",
            id="scores-length",
        ),
        pytest.param(
            lambda b, s: cnnops.nms(b, s.double(), 0.5),
            TypeError,
            "scores dtype",
            id="scores-dtype",
        ),
        pytest.param(
            lambda b, s: cnnops.nms(b.long(), s, 0.5),
            TypeError,
            "floating point",
            id="integer-boxes",
        ),
        pytest.param(
            lambda b, s: cnnops.nms(b, s, float("nan")),
            ValueError,
            "iou_threshold must not be NaN",
            id="nan-threshold",
        ),
        pytest.param(
            lambda b, s: cnnops.nms(b, s, 0.5, max_output=-1),
            ValueError,
            "max_output",
            id="negative-max-output",
        ),
        pytest.param(
            lambda b, s: cnnops.batched_nms(b, s, torch.zeros(3), 0.5),
            ValueError,
            "one class index per box",
            id="idxs-length",
        ),
        pytest.param(
            lambda b, s: cnnops.batched_nms(b, s, torch.zeros(len(s)), 0.5),
            TypeError,
            "integer tensor",
            id="float-idxs",
        ),
        pytest.param(
            lambda b, s: cnnops.box_iou(b, b.double()),
            TypeError,
            "boxes2 dtype",
            id="box-iou-dtypes",
        ),
        pytest.param(
            lambda b, s: cnnops.nms(b, s, 0.5, backend="cuda"),
            RuntimeError,
            "backend 'cuda' cannot run",
            id="cuda-backend-on-cpu",
        ),
        pytest.param(
            lambda b, s: torch.ops.cnnops.nms(b[:, :2], s, None, 0.5, None, None),
            RuntimeError,
            r"boxes must be a \[N, 4\]",
            id="op-called-directly",
        ),
    ],
)
def test_bad_input_raises_clear_error(call, error, message):
    with pytest.raises(error, match=message):
        call(random_boxes(10), random_scores(10))

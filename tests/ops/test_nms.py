"""cnnops.nms, batched_nms and box_iou on the CPU backend against torchvision.ops; soft_nms
against a plain-Python float64 Soft-NMS (tests/soft_nms_reference.py)."""

import math

import pytest
import soft_nms_reference
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


def test_torch_compile_fullgraph():
    # config.patch, not monkeypatch.setattr: on torch 2.14 monkeypatch's undo leaves the flag
    # hidden ("does not exist"), which breaks torch.compile and torch.export later in the process.
    @torch.compile(fullgraph=True, backend="eager")
    def kept_boxes(boxes, scores):
        return boxes[cnnops.nms(boxes, scores, 0.5)]

    boxes, scores = random_boxes(300), random_scores(300)
    with torch._dynamo.config.patch(capture_dynamic_output_shape_ops=True):
        got = kept_boxes(boxes, scores)
    torch.testing.assert_close(got, boxes[torchvision.ops.nms(boxes, scores, 0.5)])


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


# ---- soft_nms --------------------------------------------------------------------------------

SOFT_NMS_PARAMS = [
    pytest.param("gaussian", 0.5, 0.3, 0.001, id="gaussian-default"),
    pytest.param("gaussian", 0.1, 0.3, 0.05, id="gaussian-sigma0.1"),
    pytest.param("gaussian", 2.0, 0.3, 0.0, id="gaussian-sigma2-no-threshold"),
    pytest.param("linear", 0.5, 0.3, 0.001, id="linear-default"),
    pytest.param("linear", 0.5, 0.6, 0.1, id="linear-iou0.6"),
    pytest.param("linear", 0.5, 0.0, 0.001, id="linear-iou0"),
]
SOFT_NMS_SETS = [
    pytest.param(boxes, scores, id=name)
    for dtype in (torch.float64, torch.float32)
    for name, boxes, scores in soft_nms_reference.box_sets(200, dtype)
    if dtype == torch.float64 or name in ("random", "equal-scores", "identical-boxes")
]


@pytest.mark.parametrize("method,sigma,iou_threshold,score_threshold", SOFT_NMS_PARAMS)
@pytest.mark.parametrize("boxes,scores", SOFT_NMS_SETS)
def test_soft_nms_matches_reference(boxes, scores, method, sigma, iou_threshold, score_threshold):
    """Against the plain-Python float64 algorithm: float64 exactly (picks; scores to 1e-12),
    float32 by replaying its picks in float64 (near-ties may go either way)."""
    args = (boxes, scores, sigma, iou_threshold, score_threshold, method)
    got = cnnops.soft_nms(*args)
    if boxes.dtype == torch.float64:
        soft_nms_reference.assert_matches_reference(got, *args)
    else:
        soft_nms_reference.assert_valid_trajectory(got, *args, rtol=1e-5)


@pytest.mark.parametrize("method", ["gaussian", "linear"])
def test_soft_nms_float32_agrees_with_float64(method):
    """On a few hundred random boxes no near-tie decides: float32 picks the boxes float64 picks."""
    boxes = soft_nms_reference.random_boxes(300, 7)
    scores = soft_nms_reference.random_scores(300, 7)
    keep32, kept32 = cnnops.soft_nms(boxes, scores, method=method)
    keep64, kept64 = cnnops.soft_nms(boxes.double(), scores.double(), method=method)
    assert torch.equal(keep32, keep64)
    torch.testing.assert_close(kept32, kept64.float(), rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_soft_nms_gaussian_weight_accuracy(dtype):
    """The kernels' own exp (csrc/ops/nms.h): pairs of boxes, the second inside the first with an
    exact IoU k / 256, decayed once by exp(x), x = -IoU^2 / sigma rounded in the dtype (x's own
    rounding is the dtype's, not exp's): within 2 ulp of exp(x), down to x = -86. 64 pairs per
    call, far apart, all scoring 1: the large boxes go first, each decaying its partner, through
    the SIMD loop and its scalar tail."""
    ulps = 2 * torch.finfo(dtype).eps
    k = torch.arange(1, 257, 4, dtype=torch.float64)
    pairs = k.numel()
    shift = torch.arange(pairs, dtype=torch.float64)[:, None] * 100
    large = torch.tensor([[0.0, 0.0, 16.0, 16.0]]) + shift
    small = torch.stack([torch.zeros(pairs), torch.zeros(pairs), torch.full((pairs,), 16.0),
                         k / 16], 1) + shift  # fmt: skip
    boxes = torch.cat([large, small]).to(dtype)
    scores = torch.ones(2 * pairs, dtype=dtype)
    iou = (k / 256).to(dtype)
    for sigma in (0.0116, 0.1, 0.5, 3.0):
        keep, kept = cnnops.soft_nms(boxes, scores, sigma, score_threshold=0.0)
        assert keep[:pairs].tolist() == list(range(pairs))
        want = torch.exp((-(iou * iou) / torch.tensor(sigma, dtype=dtype)).double())
        got = torch.empty(pairs, dtype=torch.float64)
        got[keep[pairs:] - pairs] = kept[pairs:].double()
        error = (got - want).abs() / want
        assert (error <= ulps).all(), (sigma, error.max().item())


def test_soft_nms_tiny_weights_flush_to_zero():
    """exp(-IoU^2 / sigma) below about 1e-38 (float32) is 0, not subnormal; with
    score_threshold 0 the box stays, at score 0."""
    boxes = torch.tensor([[0.0, 0.0, 10.0, 10.0], [0.0, 0.0, 10.0, 10.0], [20, 20, 30, 30.0]])
    scores = torch.tensor([0.9, 0.8, 0.1])
    keep, kept = cnnops.soft_nms(boxes, scores, sigma=1 / 90, score_threshold=0.0)
    assert keep.tolist() == [0, 2, 1] and torch.equal(kept, torch.tensor([0.9, 0.1, 0.0]))
    keep, kept = cnnops.soft_nms(boxes, scores, sigma=1 / 90)  # 0 < 0.001: dropped
    assert keep.tolist() == [0, 2]


def test_soft_nms_score_threshold_comparison():
    """`score < score_threshold` drops a box: equal stays. The float32 comparison is the exact
    float64 one: float32(0.3) = 0.30000001192... passes 0.3, not 0.300000012."""
    boxes = torch.tensor([[0.0, 0, 1, 1], [2, 2, 3, 3], [4, 4, 5, 5]])
    scores = torch.tensor([0.5, 0.25, 0.3])
    assert cnnops.soft_nms(boxes, scores, score_threshold=0.25)[0].tolist() == [0, 2, 1]
    assert cnnops.soft_nms(boxes, scores, score_threshold=0.3)[0].tolist() == [0, 2]
    assert cnnops.soft_nms(boxes, scores, score_threshold=0.300000012)[0].tolist() == [0]
    assert cnnops.soft_nms(boxes, scores, score_threshold=0.6)[0].tolist() == []


def test_soft_nms_linear_threshold_is_strict():
    """linear decays only where IoU > iou_threshold: at IoU exactly 0.5 with threshold 0.5 not."""
    boxes = torch.tensor([[0.0, 0.0, 10.0, 10.0], [0.0, 0.0, 10.0, 5.0]])  # IoU 0.5
    scores = torch.tensor([0.9, 0.8])
    for threshold, decayed in ((0.5, 0.8), (0.49999, 0.4)):
        keep, kept = cnnops.soft_nms(boxes, scores, iou_threshold=threshold, method="linear")
        assert keep.tolist() == [0, 1]
        assert kept[1].item() == pytest.approx(decayed)


def test_soft_nms_linear_full_overlap_drops():
    """Identical boxes: IoU 1, weight 0: the best box alone survives (as hard NMS)."""
    boxes = torch.tensor([[1.0, 2.0, 3.0, 4.0]]).repeat(5, 1)
    scores = torch.tensor([0.2, 0.9, 0.9, 0.5, 0.1])
    keep, kept = cnnops.soft_nms(boxes, scores, method="linear")
    assert keep.tolist() == [1] and kept.tolist() == [pytest.approx(0.9)]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_soft_nms_nan_and_inf_scores(dtype):
    """NaN scores are dropped (never picked, never returned). +inf is picked first; a box whose
    score becomes inf * 0 = NaN is dropped too. With score_threshold -inf, -inf scores are
    picked, last, lowest index first."""
    boxes = soft_nms_reference.random_boxes(40, 8, dtype=dtype)
    scores = soft_nms_reference.random_scores(40, 8, dtype)
    scores[[3, 17]] = math.nan
    keep, kept = cnnops.soft_nms(boxes, scores)
    assert 3 not in keep.tolist() and 17 not in keep.tolist()
    assert not kept.isnan().any()
    if dtype == torch.float64:
        check = soft_nms_reference.assert_matches_reference
    else:
        check = soft_nms_reference.assert_valid_trajectory
    check((keep, kept), boxes, scores, 0.5, 0.3, 0.001, "gaussian")
    same = torch.tensor([[0.0, 0.0, 1.0, 1.0]], dtype=dtype).repeat(3, 1)
    keep, kept = cnnops.soft_nms(same, torch.tensor([0.5, math.inf, 0.7], dtype=dtype),
                                 method="linear")  # fmt: skip
    assert keep.tolist() == [1] and kept.tolist() == [math.inf]
    disjoint = torch.tensor([[0.0, 0, 1, 1], [2, 2, 3, 3], [4, 4, 5, 5], [6, 6, 7, 7]], dtype=dtype)
    scores = torch.tensor([-math.inf, 0.5, -math.inf, math.nan], dtype=dtype)
    keep, kept = cnnops.soft_nms(disjoint, scores, score_threshold=-math.inf)
    assert keep.tolist() == [1, 0, 2] and kept.tolist() == [0.5, -math.inf, -math.inf]


def test_soft_nms_nan_and_inf_coordinates():
    """NaN IoUs count as no overlap: no crash, no NaN score, the reference's answer."""
    boxes = soft_nms_reference.random_boxes(60, 9, dtype=torch.float64)
    boxes[3, 0] = math.nan
    boxes[10, 2] = math.inf
    boxes[11] = torch.tensor([-math.inf, -math.inf, math.inf, math.inf])
    scores = soft_nms_reference.random_scores(60, 9, torch.float64)
    for method in ("gaussian", "linear"):
        got = cnnops.soft_nms(boxes, scores, method=method)
        assert not got[1].isnan().any()
        soft_nms_reference.assert_matches_reference(got, boxes, scores, 0.5, 0.3, 0.001, method)


@pytest.mark.parametrize("method", ["gaussian", "linear"])
def test_soft_nms_parallel_passes(method):
    """70,000 boxes: the first passes are shared by the cores (from 65,536 survivors), their
    chunks' bests merged. 20 clusters of identical boxes, interleaved over the index range so each
    spans every chunk, equal scores within a cluster: a pick wipes out its cluster (linear: weight
    0; gaussian with sigma 1/100: weight 0 in float32), the lowest index of the best cluster
    first, and one thread or two must agree."""
    n, clusters = 70_000, 20
    cluster = torch.arange(n) % clusters
    corner = cluster.float()[:, None] * 10
    boxes = torch.cat([corner, corner, corner + 5, corner + 5], 1)
    scores = 0.5 + cluster.float() / 100 * ((cluster * 7) % 3 - 1)  # some clusters tie
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = cnnops.soft_nms(boxes, scores, sigma=0.01, method=method)
        torch.set_num_threads(max(2, threads))
        many = cnnops.soft_nms(boxes, scores, sigma=0.01, method=method)
    finally:
        torch.set_num_threads(threads)
    # Box c is cluster c's first.
    want = sorted(range(clusters), key=lambda c: (-scores[c].item(), c))
    for keep, kept in (one, many):
        assert keep.tolist() == want
        assert torch.equal(kept, scores[want])


def test_soft_nms_empty_and_one_box():
    for dtype in (torch.float32, torch.float64):
        keep, kept = cnnops.soft_nms(torch.zeros(0, 4, dtype=dtype), torch.zeros(0, dtype=dtype))
        assert keep.shape == (0,) and keep.dtype == torch.int64
        assert kept.shape == (0,) and kept.dtype == dtype
        keep, kept = cnnops.soft_nms(torch.tensor([[0, 0, 1, 1]], dtype=dtype),
                                     torch.tensor([0.7], dtype=dtype))  # fmt: skip
        assert keep.tolist() == [0] and kept.tolist() == [pytest.approx(0.7)]
        keep, _ = cnnops.soft_nms(torch.tensor([[0, 0, 1, 1]], dtype=dtype),
                                  torch.tensor([0.0001], dtype=dtype))  # fmt: skip
        assert keep.numel() == 0


def test_soft_nms_non_contiguous_inputs():
    boxes = soft_nms_reference.random_boxes(150, 10, dtype=torch.float64)
    scores = soft_nms_reference.random_scores(300, 10, torch.float64)[::2]
    strided = boxes.t().contiguous().t()
    assert not strided.is_contiguous() and not scores.is_contiguous()
    got = cnnops.soft_nms(strided, scores)
    soft_nms_reference.assert_matches_reference(got, boxes, scores, 0.5, 0.3, 0.001, "gaussian")


def test_soft_nms_opcheck():
    boxes = soft_nms_reference.random_boxes(40, 11)
    scores = soft_nms_reference.random_scores(40, 11)
    for method in ("gaussian", "linear"):
        args = (boxes, scores, 0.5, 0.3, 0.001, method)
        torch.library.opcheck(torch.ops.cnnops.soft_nms.default, args)


def test_soft_nms_torch_compile_fullgraph():
    @torch.compile(fullgraph=True, backend="eager")
    def rescored(boxes, scores):
        keep, kept = cnnops.soft_nms(boxes, scores, sigma=0.3, method="gaussian")
        return boxes[keep], kept * 2

    boxes = soft_nms_reference.random_boxes(100, 12)
    scores = soft_nms_reference.random_scores(100, 12)
    keep, kept = cnnops.soft_nms(boxes, scores, sigma=0.3)
    with torch._dynamo.config.patch(capture_dynamic_output_shape_ops=True):
        got_boxes, got_scores = rescored(boxes, scores)
    torch.testing.assert_close(got_boxes, boxes[keep])
    torch.testing.assert_close(got_scores, kept * 2)


def test_soft_nms_export():
    class Rescore(torch.nn.Module):
        def forward(self, boxes, scores):
            keep, kept = cnnops.soft_nms(boxes, scores, method="linear")
            return boxes[keep], kept

    boxes = soft_nms_reference.random_boxes(80, 13)
    scores = soft_nms_reference.random_scores(80, 13)
    program = torch.export.export(Rescore(), (boxes, scores))
    keep, kept = cnnops.soft_nms(boxes, scores, method="linear")
    got_boxes, got_scores = program.module()(boxes, scores)
    torch.testing.assert_close(got_boxes, boxes[keep])
    torch.testing.assert_close(got_scores, kept)


def _soft(b, s, **kwargs):
    return cnnops.soft_nms(b, s, **kwargs)


@pytest.mark.parametrize(
    "call,error,message",
    [
        pytest.param(lambda b, s: _soft(b[:, :3], s), ValueError, r"boxes must be a \[N, 4\]",
                     id="boxes-shape"),
        pytest.param(lambda b, s: _soft(b, s[:-1]), ValueError, "one score per box",
                     id="scores-length"),
        pytest.param(lambda b, s: _soft(b, s.double()), TypeError, "scores dtype",
                     id="scores-dtype"),
        pytest.param(lambda b, s: _soft(b.long(), s.long()), TypeError, "floating point",
                     id="integer-boxes"),
        pytest.param(lambda b, s: _soft(b, s.tolist()), TypeError, "scores must be a Tensor",
                     id="scores-list"),
        pytest.param(lambda b, s: _soft(b, s, sigma=0.0), ValueError, "sigma must be > 0",
                     id="sigma-zero"),
        pytest.param(lambda b, s: _soft(b, s, sigma=-1.0), ValueError, "sigma must be > 0",
                     id="sigma-negative"),
        pytest.param(lambda b, s: _soft(b, s, sigma=math.inf), ValueError, "and finite",
                     id="sigma-inf"),
        pytest.param(lambda b, s: _soft(b, s, sigma=math.nan), ValueError, "sigma must be > 0",
                     id="sigma-nan"),
        pytest.param(lambda b, s: _soft(b, s, sigma="0.5"), TypeError, "sigma must be a number",
                     id="sigma-str"),
        pytest.param(lambda b, s: _soft(b, s, iou_threshold=math.nan), ValueError,
                     "iou_threshold must not be NaN", id="iou-threshold-nan"),
        pytest.param(lambda b, s: _soft(b, s, score_threshold=math.nan), ValueError,
                     "score_threshold must not be NaN", id="score-threshold-nan"),
        pytest.param(lambda b, s: _soft(b, s, score_threshold=None), TypeError,
                     "score_threshold must be a number", id="score-threshold-none"),
        pytest.param(lambda b, s: _soft(b, s, method="hard"), ValueError,
                     'method must be "gaussian" or "linear"', id="method-unknown"),
        pytest.param(lambda b, s: _soft(b, s, method=1), TypeError, "method must be a str",
                     id="method-int"),
        pytest.param(lambda b, s: _soft(b.half(), s.half()), RuntimeError,
                     "cpu backend.*float32 or float64", id="half-on-cpu"),
        pytest.param(lambda b, s: _soft(b, s, backend="cuda"), RuntimeError,
                     "backend 'cuda' cannot run", id="cuda-backend-on-cpu"),
        pytest.param(lambda b, s: torch.ops.cnnops.soft_nms(b, s, 0.0, 0.3, 0.001, "gaussian"),
                     RuntimeError, "sigma must be > 0", id="op-called-directly-sigma"),
        pytest.param(lambda b, s: torch.ops.cnnops.soft_nms(b, s, 0.5, 0.3, 0.001, "hard"),
                     RuntimeError, "method must be", id="op-called-directly-method"),
        pytest.param(lambda b, s: torch.ops.cnnops.soft_nms(b, s[:2], 0.5, 0.3, 0.001, "linear"),
                     RuntimeError, "one score per box", id="op-called-directly-scores"),
    ],
)  # fmt: skip
def test_soft_nms_bad_input_raises_clear_error(call, error, message):
    with pytest.raises(error, match=message):
        call(random_boxes(10), random_scores(10))

"""The CUDA C++ nms, batched_nms and box_iou kernels against torchvision.ops. Needs a GPU.

Kept indices must be identical, order included. Where scores tie, the reference runs on the
scores' stable descending rank (distinct values, the same order as a stable sort), which is the
order cnnops promises; torchvision's own sort does not promise stability.
"""

import pytest
import torch
import torchvision
from torch._dynamo import config as dynamo_config

import cnnops

pytestmark = pytest.mark.cuda


def random_boxes(n, dtype=torch.float32, origin=0.0, spread=1000.0, max_size=100.0, seed=0):
    gen = torch.Generator().manual_seed(seed)
    corner = origin + torch.rand(n, 2, generator=gen, dtype=torch.float64) * spread
    size = torch.rand(n, 2, generator=gen, dtype=torch.float64) * max_size
    return torch.cat([corner, corner + size], dim=1).to(dtype).cuda()


def random_scores(n, dtype=torch.float32, seed=1):
    gen = torch.Generator().manual_seed(seed)
    return torch.rand(n, generator=gen, dtype=torch.float64).to(dtype).cuda()


def stable_rank(scores):
    """Distinct float32 scores in the order of a stable descending sort of `scores`."""
    order = torch.sort(scores, stable=True, descending=True).indices
    rank = torch.empty(scores.shape[0], dtype=torch.float32, device=scores.device)
    rank[order] = torch.arange(scores.shape[0], 0, -1, dtype=torch.float32, device=scores.device)
    return rank


def reference_nms(boxes, scores, iou_threshold, score_threshold=None, max_output=None):
    candidates = torch.arange(boxes.shape[0], device=boxes.device)
    if score_threshold is not None:
        candidates = candidates[scores.double() > score_threshold]
    rank = stable_rank(scores[candidates]).to(boxes.dtype)
    kept = candidates[torchvision.ops.nms(boxes[candidates], rank, iou_threshold)]
    return kept if max_output is None else kept[:max_output]


def reference_batched_nms(boxes, scores, idxs, iou_threshold):
    """Class by class (torchvision's coordinate offset would change the IoUs' rounding)."""
    rank = stable_rank(scores)
    kept = torch.zeros(boxes.shape[0], dtype=torch.bool, device=boxes.device)
    for cls in torch.unique(idxs):
        members = torch.where(idxs == cls)[0]
        kept[members[torchvision.ops.nms(boxes[members], rank[members], iou_threshold)]] = True
    kept = torch.where(kept)[0]
    return kept[torch.sort(rank[kept], descending=True).indices]


def assert_same_indices(got, want):
    assert got.dtype == torch.int64 and got.device == want.device
    assert torch.equal(got, want), f"kept {got.numel()} boxes, torchvision {want.numel()}"


@pytest.mark.parametrize("iou_threshold", [0.2, 0.5, 0.8])
@pytest.mark.parametrize("n", [1000, 10000])
def test_nms_float32(n, iou_threshold):
    boxes, scores = random_boxes(n), random_scores(n)
    got = cnnops.nms(boxes, scores, iou_threshold, backend="cuda")
    assert_same_indices(got, reference_nms(boxes, scores, iou_threshold))


@pytest.mark.parametrize("iou_threshold", [0.2, 0.5, 0.8])
def test_nms_float64(iou_threshold):
    boxes, scores = random_boxes(3000, torch.float64), random_scores(3000, torch.float64)
    got = cnnops.nms(boxes, scores, iou_threshold, backend="cuda")
    assert_same_indices(got, reference_nms(boxes, scores, iou_threshold))


@pytest.mark.parametrize(
    "boxes",
    [
        pytest.param(lambda n: random_boxes(n, spread=300.0), id="random"),
        pytest.param(
            lambda n: torch.tensor([[10.0, 20.0, 50.0, 70.0]]).repeat(n, 1).cuda(), id="identical"
        ),
        pytest.param(lambda n: random_boxes(n, max_size=0.0), id="zero-area"),
        pytest.param(lambda n: random_boxes(n, origin=-700.0, spread=500.0), id="negative"),
    ],
)
@pytest.mark.parametrize("iou_threshold", [0.2, 0.5, 0.8])
def test_nms_equal_scores_keep_lower_index_first(boxes, iou_threshold):
    n = 2000
    boxes = boxes(n)
    scores = torch.randint(0, 8, (n,), generator=torch.Generator().manual_seed(2)).float().cuda()
    got = cnnops.nms(boxes, scores, iou_threshold, backend="cuda")
    assert_same_indices(got, reference_nms(boxes, scores, iou_threshold))


def test_nms_identical_boxes_keep_the_first_best():
    boxes = torch.tensor([[0.0, 0.0, 4.0, 4.0]]).repeat(200, 1).cuda()
    scores = torch.ones(200).cuda()
    scores[[70, 150]] = 2.0
    assert cnnops.nms(boxes, scores, 0.5, backend="cuda").tolist() == [70]


def test_nms_zero_area_boxes_never_suppress():
    boxes = random_boxes(500, max_size=0.0)
    kept = cnnops.nms(boxes, random_scores(500), 0.0, backend="cuda")
    assert kept.numel() == 500


@pytest.mark.parametrize("iou_threshold", [0.2, 0.5, 0.8])
def test_batched_nms_80_classes(iou_threshold):
    n = 20000
    boxes, scores = random_boxes(n, spread=400.0), random_scores(n)
    idxs = torch.randint(0, 80, (n,), generator=torch.Generator().manual_seed(3)).cuda()
    got = cnnops.batched_nms(boxes, scores, idxs, iou_threshold, backend="cuda")
    assert_same_indices(got, reference_batched_nms(boxes, scores, idxs, iou_threshold))


def test_batched_nms_classes_never_suppress_each_other():
    boxes = torch.tensor([[0.0, 0.0, 10.0, 10.0]]).repeat(130, 1).cuda()
    scores = torch.linspace(1.0, 0.0, 130).cuda()
    idxs = torch.arange(130).cuda() % 3
    got = cnnops.batched_nms(boxes, scores, idxs.to(torch.int32), 0.5, backend="cuda")
    assert got.tolist() == [0, 1, 2]


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("iou_threshold", [0.2, 0.5, 0.8])
def test_nms_half_boxes_near_1200(dtype, iou_threshold):
    """Computed in float: equal to torchvision on the float32 upcast of the same boxes."""
    boxes = random_boxes(4000, dtype, origin=1200.0, spread=200.0, max_size=40.0)
    scores = random_scores(4000, dtype)
    got = cnnops.nms(boxes, scores, iou_threshold, backend="cuda")
    assert_same_indices(got, reference_nms(boxes.float(), scores.float(), iou_threshold))
    idxs = torch.randint(0, 5, (4000,), generator=torch.Generator().manual_seed(4)).cuda()
    got = cnnops.batched_nms(boxes, scores, idxs, iou_threshold, backend="cuda")
    assert_same_indices(
        got, reference_batched_nms(boxes.float(), scores.float(), idxs, iou_threshold)
    )


@pytest.mark.parametrize(
    "score_threshold, max_output",
    [(0.5, None), (None, 10), (0.3, 7), (0.9, 100000), (None, 0), (2.0, None), (-1.0, 1)],
)
def test_nms_score_threshold_and_max_output(score_threshold, max_output):
    boxes, scores = random_boxes(5000, spread=500.0), random_scores(5000)
    got = cnnops.nms(
        boxes, scores, 0.5, score_threshold=score_threshold, max_output=max_output, backend="cuda"
    )
    assert_same_indices(got, reference_nms(boxes, scores, 0.5, score_threshold, max_output))


def test_nms_score_threshold_compares_exactly():
    """The threshold is not rounded to the scores' dtype; a NaN score is not above it."""
    boxes = torch.tensor([[0, 0, 1, 1], [2, 2, 3, 3], [4, 4, 5, 5]], dtype=torch.float16).cuda()
    scores = torch.tensor([0.30004883, float("nan"), 0.9], dtype=torch.float16).cuda()
    got = cnnops.nms(boxes, scores, 0.5, score_threshold=0.30001, backend="cuda")
    assert got.tolist() == [2, 0]


def test_nms_non_contiguous_inputs():
    boxes = random_boxes(700).t().contiguous().t()  # column-major
    scores = random_scores(1400)[::2]
    assert not boxes.is_contiguous() and not scores.is_contiguous()
    got = cnnops.nms(boxes, scores, 0.5, backend="cuda")
    assert_same_indices(got, reference_nms(boxes.contiguous(), scores.contiguous(), 0.5))


@pytest.mark.slow
def test_nms_removed_words_in_global_memory():
    """Over 327,680 boxes the greedy pass keeps its removed bits in global memory. Pairs of
    identical boxes, apart from all other pairs: each pair keeps its better box."""
    pairs = 170_000
    side = 1 + int(pairs**0.5)
    cell = torch.arange(pairs, device="cuda")
    corner = torch.stack([cell % side, cell // side], dim=1).float() * 4.0
    boxes = torch.cat([corner, corner + 2.0], dim=1).repeat_interleave(2, dim=0)
    scores = random_scores(2 * pairs)
    got = cnnops.nms(boxes, scores, 0.5, backend="cuda")
    better = torch.where(scores[1::2] > scores[0::2], 1, 0) + 2 * cell
    want = better[torch.sort(scores[better], stable=True, descending=True).indices]
    assert_same_indices(got, want)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_box_iou(dtype):
    boxes1 = random_boxes(333, dtype, origin=-100.0, spread=300.0)
    boxes2 = random_boxes(1029, dtype, spread=300.0, seed=5)
    got = cnnops.box_iou(boxes1, boxes2, backend="cuda")
    assert got.dtype == dtype
    torch.testing.assert_close(got, torchvision.ops.box_iou(boxes1, boxes2))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_box_iou_half(dtype):
    """Computed in float, rounded once: the float32 result of the same boxes, rounded."""
    boxes1 = random_boxes(100, dtype, origin=1200.0, spread=100.0)
    boxes2 = random_boxes(70, dtype, origin=1200.0, spread=100.0, seed=6)
    got = cnnops.box_iou(boxes1, boxes2, backend="cuda")
    assert got.dtype == dtype
    want = torchvision.ops.box_iou(boxes1.float(), boxes2.float()).to(dtype)
    torch.testing.assert_close(got, want, atol=0, rtol=0, equal_nan=True)


def test_box_iou_many_row_tiles():
    # More row tiles than the grid's y dimension holds: the grid-stride loop covers the rest.
    boxes1, boxes2 = random_boxes(32 * 65535 + 40), random_boxes(3, seed=7)
    got = cnnops.box_iou(boxes1, boxes2, backend="cuda")
    torch.testing.assert_close(got, torchvision.ops.box_iou(boxes1, boxes2))


def test_empty_inputs():
    empty = torch.empty(0, 4).cuda()
    got = cnnops.nms(empty, torch.empty(0).cuda(), 0.5, backend="cuda")
    assert got.shape == (0,) and got.dtype == torch.int64 and got.is_cuda
    got = cnnops.batched_nms(
        empty,
        torch.empty(0).cuda(),
        torch.empty(0, dtype=torch.int64).cuda(),
        0.5,
        backend="cuda",
    )
    assert got.shape == (0,) and got.dtype == torch.int64
    assert cnnops.box_iou(empty, random_boxes(3), backend="cuda").shape == (0, 3)
    assert cnnops.box_iou(random_boxes(3), empty, backend="cuda").shape == (3, 0)


def test_compile_fullgraph_dynamic_output():
    boxes, scores = random_boxes(800), random_scores(800)

    def kept_scores(boxes, scores):
        return scores[cnnops.nms(boxes, scores, 0.5)] * 2

    with dynamo_config.patch(capture_dynamic_output_shape_ops=True):
        got = torch.compile(kept_scores, fullgraph=True)(boxes, scores)
    torch.testing.assert_close(got, scores[reference_nms(boxes, scores, 0.5)] * 2)


def test_opcheck_box_iou():
    torch.library.opcheck(torch.ops.cnnops.box_iou.default, (random_boxes(9), random_boxes(5)))


@pytest.mark.parametrize(
    "call, error, message",
    [
        pytest.param(
            lambda b, s: cnnops.nms(b[:, :3], s, 0.5), ValueError, r"\[N, 4\]", id="boxes-shape"
        ),
        pytest.param(
            lambda b, s: cnnops.nms(b, s[:-1], 0.5),
            ValueError,
            "one score per box",
            id="scores-shape",
        ),
        pytest.param(
            lambda b, s: cnnops.nms(b, s.cpu(), 0.5),
            ValueError,
            "scores are on",
            id="scores-device",
        ),
        pytest.param(
            lambda b, s: cnnops.nms(b, s.double(), 0.5), TypeError, "dtype", id="scores-dtype"
        ),
        pytest.param(
            lambda b, s: cnnops.batched_nms(b, s, s.long().cpu(), 0.5),
            ValueError,
            "idxs are on",
            id="idxs-device",
        ),
        pytest.param(
            lambda b, s: cnnops.batched_nms(b, s, s, 0.5), TypeError, "integer", id="idxs-dtype"
        ),
        pytest.param(
            lambda b, s: cnnops.box_iou(b, b.cpu()),
            ValueError,
            "boxes2 are on",
            id="box-iou-device",
        ),
        pytest.param(
            lambda b, s: cnnops.nms(b.cpu(), s.cpu(), 0.5, backend="cuda"),
            RuntimeError,
            "needs CUDA tensors",
            id="cpu-tensors-cuda-backend",
        ),
        # The C++ op checks again: torch.ops.cnnops.nms can be called directly.
        pytest.param(
            lambda b, s: torch.ops.cnnops.nms(b, s.cpu(), None, 0.5, None, None),
            RuntimeError,
            "scores are on",
            id="op-scores-device",
        ),
        pytest.param(
            lambda b, s: torch.ops.cnnops.nms(b, s, s[:2].long(), 0.5, None, None),
            RuntimeError,
            "one class index per box",
            id="op-idxs-shape",
        ),
        pytest.param(
            lambda b, s: torch.ops.cnnops.nms(b, s, None, 0.5, None, -1),
            RuntimeError,
            "max_output",
            id="op-max-output",
        ),
        pytest.param(
            lambda b, s: torch.ops.cnnops.box_iou(b, b[:, :2]),
            RuntimeError,
            r"\[N, 4\]",
            id="op-box-iou-shape",
        ),
    ],
)
def test_bad_inputs(call, error, message):
    boxes, scores = random_boxes(10), random_scores(10)
    with pytest.raises(error, match=message):
        call(boxes, scores)

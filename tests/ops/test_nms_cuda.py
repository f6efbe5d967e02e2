"""The CUDA C++ nms, batched_nms and box_iou kernels against torchvision.ops, and soft_nms against
a plain-Python float64 Soft-NMS (tests/soft_nms_reference.py). Needs a GPU.

Kept indices must be identical, order included. Where scores tie, the reference runs on the
scores' stable descending rank (distinct values, the same order as a stable sort), which is the
order cnnops promises; torchvision's own sort does not promise stability.
"""

import pytest
import soft_nms_reference
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


# ---- soft_nms ---------------------------------------------------------------------------------
# Against the plain-Python float64 Soft-NMS (tests/soft_nms_reference.py): float64 exactly,
# float32 and below by replaying the kernel's picks in float64 (near-ties may go either way).

SOFT_NMS_PARAMS = [
    pytest.param("gaussian", 0.5, 0.3, 0.001, id="gaussian-default"),
    pytest.param("gaussian", 0.1, 0.3, 0.05, id="gaussian-sigma0.1"),
    pytest.param("gaussian", 2.0, 0.3, 0.0, id="gaussian-sigma2-no-threshold"),
    pytest.param("linear", 0.5, 0.3, 0.001, id="linear-default"),
    pytest.param("linear", 0.5, 0.6, 0.1, id="linear-iou0.6"),
]
# Made in the test, not at collection: CUDA tensors need the GPU that collection may lack.
SOFT_NMS_SETS = [
    pytest.param(name, dtype, id=f"{name}-{str(dtype)[6:]}")
    for dtype in (torch.float64, torch.float32)
    for name, _, _ in soft_nms_reference.box_sets(300, dtype)
    if dtype == torch.float64 or name in ("random", "equal-scores", "identical-boxes")
]


def soft_nms_set(name, dtype):
    sets = soft_nms_reference.box_sets(300, dtype, "cuda")
    return next((boxes, scores) for set_name, boxes, scores in sets if set_name == name)


def check_soft_nms(got, *args, score_rtol=None):
    if args[0].dtype == torch.float64:
        soft_nms_reference.assert_matches_reference(got, *args)
    else:
        soft_nms_reference.assert_valid_trajectory(got, *args, rtol=1e-5, score_rtol=score_rtol)


@pytest.mark.parametrize("method,sigma,iou_threshold,score_threshold", SOFT_NMS_PARAMS)
@pytest.mark.parametrize("set_name,dtype", SOFT_NMS_SETS)
def test_soft_nms_matches_reference(set_name, dtype, method, sigma, iou_threshold, score_threshold):
    boxes, scores = soft_nms_set(set_name, dtype)
    args = (boxes, scores, sigma, iou_threshold, score_threshold, method)
    check_soft_nms(cnnops.soft_nms(*args, backend="cuda"), *args)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("method", ["gaussian", "linear"])
def test_soft_nms_half_boxes(dtype, method):
    """Computed in float32 from the upcast inputs; returned scores rounded to the dtype."""
    boxes = random_boxes(1500, dtype, origin=1200.0, spread=400.0, max_size=60.0)
    scores = random_scores(1500, dtype)
    got = cnnops.soft_nms(boxes, scores, method=method, backend="cuda")
    assert got[1].dtype == dtype
    check_soft_nms(got, boxes, scores, 0.5, 0.3, 0.001, method,
                   score_rtol=torch.finfo(dtype).eps)  # fmt: skip


@pytest.mark.parametrize("method", ["gaussian", "linear"])
@pytest.mark.parametrize("n", [1000, 1025, 5000])
def test_soft_nms_float64_agrees_with_cpu_kernel(n, method):
    """More boxes than threads (1024): several per thread. The CPU kernel runs the same
    arithmetic (csrc/ops/nms.h): the same picks, scores to the last bits (FMA)."""
    boxes = random_boxes(n, torch.float64, spread=500.0)
    scores = random_scores(n, torch.float64)
    keep, kept = cnnops.soft_nms(boxes, scores, method=method, backend="cuda")
    cpu_keep, cpu_kept = cnnops.soft_nms(boxes.cpu(), scores.cpu(), method=method)
    assert torch.equal(keep.cpu(), cpu_keep)
    torch.testing.assert_close(kept.cpu(), cpu_kept, rtol=1e-13, atol=0)


def test_soft_nms_float32_1500_boxes():
    boxes, scores = random_boxes(1500, spread=400.0), random_scores(1500)
    for method in ("gaussian", "linear"):
        got = cnnops.soft_nms(boxes, scores, method=method, backend="cuda")
        check_soft_nms(got, boxes, scores, 0.5, 0.3, 0.001, method)


def test_soft_nms_equal_scores_lowest_index_first():
    """Identical boxes and scores spread over all 1024 threads: picks in index order."""
    boxes = torch.tensor([[0.0, 0.0, 4.0, 4.0]]).repeat(3000, 1).cuda()
    scores = torch.full((3000,), 0.5).cuda()
    keep, _ = cnnops.soft_nms(boxes, scores, sigma=0.5, score_threshold=0.0, backend="cuda")
    assert keep[:50].tolist() == list(range(50))
    keep, _ = cnnops.soft_nms(boxes, scores, method="linear", backend="cuda")
    assert keep.tolist() == [0]


def test_soft_nms_nan_and_inf():
    """NaN scores: dropped. NaN coordinates: no overlap. inf * weight 0 = NaN: dropped. With
    score_threshold -inf, -inf scores are picked, last, lowest index first."""
    boxes, scores = random_boxes(200, torch.float64), random_scores(200, torch.float64)
    scores[[3, 150]] = float("nan")
    boxes[7, 0] = float("nan")
    got = cnnops.soft_nms(boxes, scores, backend="cuda")
    assert 3 not in got[0].tolist() and 150 not in got[0].tolist()
    soft_nms_reference.assert_matches_reference(got, boxes, scores, 0.5, 0.3, 0.001, "gaussian")
    same = torch.tensor([[0.0, 0.0, 1.0, 1.0]]).repeat(3, 1).cuda()
    keep, kept = cnnops.soft_nms(same, torch.tensor([0.5, float("inf"), 0.7]).cuda(),
                                 method="linear", backend="cuda")  # fmt: skip
    assert keep.tolist() == [1] and kept.tolist() == [float("inf")]
    disjoint = torch.tensor([[0.0, 0, 1, 1], [2, 2, 3, 3], [4, 4, 5, 5]]).cuda()
    scores = torch.tensor([-float("inf"), 0.5, -float("inf")]).cuda()
    keep, _ = cnnops.soft_nms(disjoint, scores, score_threshold=-float("inf"), backend="cuda")
    assert keep.tolist() == [1, 0, 2]


def test_soft_nms_empty_one_box_and_non_contiguous():
    keep, kept = cnnops.soft_nms(torch.empty(0, 4).cuda(), torch.empty(0).cuda(), backend="cuda")
    assert keep.shape == (0,) and keep.dtype == torch.int64 and keep.is_cuda and kept.shape == (0,)
    keep, kept = cnnops.soft_nms(torch.tensor([[0.0, 0, 1, 1]]).cuda(), torch.tensor([0.7]).cuda(),
                                 backend="cuda")  # fmt: skip
    assert keep.tolist() == [0]
    boxes = random_boxes(300, torch.float64).t().contiguous().t()
    scores = random_scores(600, torch.float64)[::2]
    got = cnnops.soft_nms(boxes, scores, backend="cuda")
    soft_nms_reference.assert_matches_reference(got, boxes, scores, 0.5, 0.3, 0.001, "gaussian")


def test_soft_nms_opcheck():
    for method in ("gaussian", "linear"):
        args = (random_boxes(60), random_scores(60), 0.5, 0.3, 0.001, method)
        torch.library.opcheck(torch.ops.cnnops.soft_nms.default, args)


def test_soft_nms_compile_fullgraph():
    boxes, scores = random_boxes(800), random_scores(800)

    def rescored(boxes, scores):
        keep, kept = cnnops.soft_nms(boxes, scores, backend="cuda")
        return boxes[keep], kept * 2

    keep, kept = cnnops.soft_nms(boxes, scores, backend="cuda")
    with dynamo_config.patch(capture_dynamic_output_shape_ops=True):
        got_boxes, got_scores = torch.compile(rescored, fullgraph=True)(boxes, scores)
    torch.testing.assert_close(got_boxes, boxes[keep])
    torch.testing.assert_close(got_scores, kept * 2)


@pytest.mark.parametrize(
    "call, error, message",
    [
        pytest.param(lambda b, s: cnnops.soft_nms(b, s.cpu(), backend="cuda"), ValueError,
                     "scores are on", id="scores-device"),
        pytest.param(lambda b, s: cnnops.soft_nms(b, s, sigma=-0.5, backend="cuda"), ValueError,
                     "sigma must be > 0", id="sigma-negative"),
        pytest.param(lambda b, s: cnnops.soft_nms(b, s, method="Gaussian", backend="cuda"),
                     ValueError, "method must be", id="method-case"),
        pytest.param(lambda b, s: torch.ops.cnnops.soft_nms(b, s.cpu(), 0.5, 0.3, 0.001,
                                                            "gaussian"),
                     RuntimeError, "scores are on", id="op-scores-device"),
        pytest.param(lambda b, s: torch.ops.cnnops.soft_nms(b, s, 0.5, float("nan"), 0.001,
                                                            "linear"),
                     RuntimeError, "iou_threshold must not be NaN", id="op-nan-threshold"),
    ],
)  # fmt: skip
def test_soft_nms_bad_inputs(call, error, message):
    boxes, scores = random_boxes(10), random_scores(10)
    with pytest.raises(error, match=message):
        call(boxes, scores)

"""Soft-NMS in plain Python float64, independent of the kernels, and the checks the soft_nms tests
of every backend share.

The algorithm (cnnops.soft_nms's docstring): pick the live box of highest current score (ties:
the lower index), decay every other live box j by w(IoU(pick, j)), gaussian exp(-IoU^2 / sigma)
or linear 1 - IoU where IoU > iou_threshold; a box whose score is below score_threshold (or NaN)
leaves. The IoU is torchvision's formula, written with the same comparisons as csrc/ops/nms.h
(which matters only for NaN coordinates), then clamped to [0, 1] with NaN as 0.
"""

import math

import torch


def box_iou(a, b):
    area_a = (a[2] - a[0]) * (a[3] - a[1])
    area_b = (b[2] - b[0]) * (b[3] - b[1])
    w = (a[2] if a[2] < b[2] else b[2]) - (a[0] if a[0] > b[0] else b[0])
    h = (a[3] if a[3] < b[3] else b[3]) - (a[1] if a[1] > b[1] else b[1])
    inter = (w if w > 0 else 0.0) * (h if h > 0 else 0.0)
    union = area_a + area_b - inter
    if union == 0:  # IEEE division, where Python raises
        return math.nan if not inter > 0 else math.copysign(math.inf, union)
    return inter / union


def weight(iou, sigma, iou_threshold, method):
    overlap = min(iou, 1.0) if iou > 0 else 0.0  # NaN: 0
    if method == "gaussian":
        return math.exp(-(overlap * overlap) / sigma)
    return 1.0 - overlap if overlap > iou_threshold else 1.0


def soft_nms_reference(boxes, scores, sigma, iou_threshold, score_threshold, method):
    """(keep, kept scores) as Python lists, in float64 from the given tensors' values."""
    b = boxes.detach().cpu().double().tolist()
    score = scores.detach().cpu().double().tolist()
    live = [i for i, s in enumerate(score) if s >= score_threshold]
    keep, kept = [], []
    while live:
        pick = max(live, key=lambda i: (score[i], -i))
        keep.append(pick)
        kept.append(score[pick])
        survivors = []
        for j in live:
            if j == pick:
                continue
            score[j] *= weight(box_iou(b[pick], b[j]), sigma, iou_threshold, method)
            if score[j] >= score_threshold:
                survivors.append(j)
        live = survivors
    return keep, kept


def assert_matches_reference(got, boxes, scores, sigma, iou_threshold, score_threshold, method):
    """Exact picks and float64-close scores: for float64 inputs, where the kernels and the
    reference differ by an ulp or so (their exp is not libm's) and near-ties cannot flip."""
    keep, kept = got
    want_keep, want_kept = soft_nms_reference(
        boxes, scores, sigma, iou_threshold, score_threshold, method
    )
    assert keep.dtype == torch.int64 and keep.device == boxes.device
    assert kept.dtype == scores.dtype and kept.device == scores.device
    assert keep.tolist() == want_keep
    torch.testing.assert_close(
        kept.cpu().double(), torch.tensor(want_kept, dtype=torch.float64), rtol=1e-12, atol=1e-300
    )


def assert_valid_trajectory(
    got, boxes, scores, sigma, iou_threshold, score_threshold, method, rtol=1e-5, score_rtol=None
):
    """The kernel's picks replayed in float64: for float32 (and float16, bfloat16) kernels, whose
    decayed scores differ from float64 ones in the last bits, so that on thousands of boxes a
    near-tie between two live boxes may go either way, and the rest of the run with it. Each pick
    must be a live box scoring within rtol of the best live score (and, among exactly equal
    scores, the lowest index); its returned score must match the replayed one (within
    score_rtol, default rtol); the replay then decays the others by the kernel's pick. A box
    within rtol of score_threshold may go either way; every box clearly above it must be picked
    in the end."""
    keep, kept = got
    assert keep.dtype == torch.int64 and keep.device == boxes.device
    assert kept.dtype == scores.dtype and keep.shape == kept.shape
    score_rtol = rtol if score_rtol is None else score_rtol
    b = boxes.detach().cpu().double().tolist()
    score = scores.detach().cpu().double().tolist()
    live = {i for i, s in enumerate(score) if s >= score_threshold}
    band = abs(score_threshold) * rtol

    picks = zip(keep.tolist(), kept.cpu().double().tolist(), strict=True)
    for step, (pick, value) in enumerate(picks):
        assert pick in live, f"pick {step}: box {pick} is not live"
        best = max(score[i] for i in live)
        assert score[pick] >= best - abs(best) * rtol, (
            f"pick {step}: box {pick} scores {score[pick]}, the best live box {best}"
        )
        lower_tie = [i for i in live if score[i] == score[pick] and i < pick]
        assert not lower_tie, f"pick {step}: box {pick} ties with the lower index {lower_tie}"
        assert math.isclose(value, score[pick], rel_tol=score_rtol, abs_tol=1e-30), (
            f"pick {step}: box {pick} returned score {value}, replayed {score[pick]}"
        )
        live.discard(pick)
        for j in list(live):
            score[j] *= weight(box_iou(b[pick], b[j]), sigma, iou_threshold, method)
            if score[j] < score_threshold - band:
                live.discard(j)
    missed = [i for i in live if score[i] >= score_threshold + band]
    assert not missed, f"boxes {missed[:10]} are still above score_threshold but were not picked"


def random_boxes(n, seed, scale=100.0, offset=0.0, dtype=torch.float32, device="cpu"):
    """n boxes with corners in [offset, offset + scale) and sides up to scale / 4: a few hundred
    of them overlap often."""
    g = torch.Generator().manual_seed(seed)
    xy = torch.rand(n, 2, generator=g, dtype=torch.float64) * scale + offset
    wh = torch.rand(n, 2, generator=g, dtype=torch.float64) * scale / 4
    return torch.cat([xy, xy + wh], 1).to(device=device, dtype=dtype)


def random_scores(n, seed, dtype=torch.float32, device="cpu"):
    g = torch.Generator().manual_seed(seed + 1000)
    return torch.rand(n, generator=g, dtype=torch.float64).to(device=device, dtype=dtype)


def box_sets(n, dtype=torch.float32, device="cpu"):
    """(id, boxes, scores): random and adversarial sets of about n boxes."""

    def make(boxes, scores):
        return boxes.to(device=device, dtype=dtype), scores.to(device=device, dtype=dtype)

    yield "random", *make(random_boxes(n, 1), random_scores(n, 1))
    yield "negative-coordinates", *make(random_boxes(n, 2, offset=-80.0), random_scores(n, 2))
    # Four distinct scores: ties everywhere, resolved by the lower index.
    levels = torch.randint(0, 4, (n,), generator=torch.Generator().manual_seed(3))
    yield "equal-scores", *make(random_boxes(n, 3), levels.double() / 4 + 0.25)
    identical = torch.tensor([[10.0, 20.0, 30.0, 50.0]]).repeat(n // 4, 1)
    yield "identical-boxes", *make(identical, random_scores(n // 4, 4))
    yield "identical-boxes-equal-scores", *make(identical, torch.full((n // 4,), 0.5))
    zero_area = random_boxes(n, 5)
    zero_area[::3, 2] = zero_area[::3, 0]  # zero width: IoU 0, or 0 / 0 with another such box
    zero_area[1::3, 3] = zero_area[1::3, 1]
    yield "zero-area", *make(zero_area, random_scores(n, 5))
    inverted = random_boxes(n, 6)
    inverted[::4] = inverted[::4, [2, 3, 0, 1]]  # x2 < x1 and y2 < y1: negative areas
    yield "inverted-boxes", *make(inverted, random_scores(n, 6))
    yield "one-box", *make(torch.tensor([[0.0, 0.0, 1.0, 1.0]]), torch.tensor([0.5]))
    yield "empty", *make(torch.zeros(0, 4), torch.zeros(0))

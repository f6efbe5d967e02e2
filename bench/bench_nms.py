"""nms, batched_nms and box_iou benchmark cases against torchvision.ops; soft_nms against a
vectorised pure-torch Soft-NMS (torchvision has none).

The boxes are detection-like: corners uniform over a 1000 x 1000 image, sides up to 100, scores
uniform. A keep set is correct when it holds the same boxes as torchvision's, by descending
score (torchvision's own order among equal scores is its sort's).
"""

import math
import sys

import torch
import torchvision

import cnnops
from bench.harness import Case, Provider, close_error, cnnops_backends

OP = "nms"
# Problem sizes per set and device type: box counts (batched_nms: 80 classes).
NMS_SETS = {
    "nms": {"cpu": (5_000, 20_000), "cuda": (10_000, 100_000)},
    "batched_nms": {"cpu": (20_000,), "cuda": (20_000, 100_000)},
    "box_iou": {"cpu": (1_000,), "cuda": (4_000,)},
    # Against a vectorised pure-torch Soft-NMS (torchvision has none): one pass of tensor ops per
    # pick, so the reference's time is mostly per-op overhead; sizes it finishes in well under
    # a second.
    "soft_nms": {"cpu": (1_000,), "cuda": (5_000,)},
}
SET_NAMES = tuple(NMS_SETS)
CLASSES = 80
IOU_THRESHOLD = 0.5


def torch_soft_nms(boxes, scores, sigma=0.5, score_threshold=0.001):
    """Gaussian Soft-NMS in plain torch ops, vectorised over the boxes, looping over the picks:
    the baseline soft_nms is timed against (cnnops.soft_nms's defaults)."""
    index = torch.nonzero(scores >= score_threshold).view(-1)
    boxes, current = boxes[index], scores[index]
    area = (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])
    keep, kept = [], []
    while index.numel() > 0:
        best = int(torch.argmax(current))  # the first of equal maxima: the lowest index
        keep.append(index[best])
        kept.append(current[best])
        b = boxes[best]
        w = (torch.minimum(boxes[:, 2], b[2]) - torch.maximum(boxes[:, 0], b[0])).clamp(min=0)
        h = (torch.minimum(boxes[:, 3], b[3]) - torch.maximum(boxes[:, 1], b[1])).clamp(min=0)
        inter = w * h
        iou = (inter / (area + area[best] - inter)).nan_to_num(0.0).clamp(0.0, 1.0)
        current = current * torch.exp(-(iou * iou) / sigma)
        live = current >= score_threshold
        live[best] = False
        index, boxes, area, current = index[live], boxes[live], area[live], current[live]
    if not keep:
        return scores.new_empty(0, dtype=torch.int64), scores.new_empty(0)
    return torch.stack(keep), torch.stack(kept)


def soft_nms_error(actual, expected):
    """0 when `actual` picks the boxes of `expected` with the same scores (to 1e-5 relative), in
    any order: equal scores to float32 precision may swap places."""
    keep, kept = actual
    want_keep, want_kept = expected
    if keep.shape != want_keep.shape or not torch.equal(
        keep.sort().values.cpu(), want_keep.sort().values.cpu()
    ):
        return math.inf, 1e-5
    got = kept.double()[keep.argsort()]
    want = want_kept[want_keep.argsort()]
    return ((got - want).abs() / want.abs().clamp(min=1e-30)).max().item(), 1e-5


REFERENCES = {
    "nms": lambda boxes, scores: torchvision.ops.nms(boxes, scores, IOU_THRESHOLD),
    "batched_nms": lambda boxes, scores, idxs: torchvision.ops.batched_nms(
        boxes, scores, idxs, IOU_THRESHOLD
    ),
    "box_iou": lambda boxes1, boxes2: torchvision.ops.box_iou(boxes1, boxes2),
    "soft_nms": torch_soft_nms,
}


def cnnops_call(set_name, backend):
    if set_name == "nms":
        return lambda boxes, scores: cnnops.nms(boxes, scores, IOU_THRESHOLD, backend=backend)
    if set_name == "batched_nms":
        return lambda boxes, scores, idxs: cnnops.batched_nms(
            boxes, scores, idxs, IOU_THRESHOLD, backend=backend
        )
    if set_name == "soft_nms":
        return lambda boxes, scores: cnnops.soft_nms(boxes, scores, backend=backend)
    return lambda boxes1, boxes2: cnnops.box_iou(boxes1, boxes2, backend=backend)


def random_boxes(n, generator):
    xy = torch.rand(n, 2, generator=generator) * 1000
    wh = torch.rand(n, 2, generator=generator) * 100
    return torch.cat([xy, xy + wh], 1)


def keep_error(actual, expected, scores):
    """0 when `actual` keeps the boxes of `expected` with the same scores in the same order."""
    same = (
        actual.shape == expected.shape
        and torch.equal(actual.sort().values, expected.sort().values)
        and torch.equal(scores[actual], scores[expected])
    )
    return (0.0 if same else math.inf), 0.5


def make_case(set_name, n, device, backends):
    def make_args():
        generator = torch.Generator().manual_seed(0)
        boxes = random_boxes(n, generator)
        if set_name == "box_iou":
            return boxes.to(device), random_boxes(n, generator).to(device)
        scores = torch.rand(n, generator=generator)
        args = (boxes, scores)
        if set_name == "batched_nms":
            args += (torch.randint(0, CLASSES, (n,), generator=generator),)
        return tuple(t.to(device) for t in args)

    reference = REFERENCES[set_name]
    if set_name == "soft_nms":
        expected = lambda args: reference(*(t.double() for t in args))  # noqa: E731
        error = soft_nms_error
    elif set_name == "box_iou":
        expected = lambda args: reference(*(t.double() for t in args))  # noqa: E731
        error = lambda actual, want: close_error(actual, want, 1e-5)  # noqa: E731
    else:
        expected = lambda args: reference(*args)  # noqa: E731
        error = None
    reference_name = "torch" if set_name == "soft_nms" else "torchvision"
    providers = (Provider(reference_name, reference),) + tuple(
        Provider(f"cnnops-{backend}", cnnops_call(set_name, backend)) for backend in backends
    )
    case = Case(
        op=set_name,
        set_name=set_name,
        layer=f"{n} boxes" + (f", {CLASSES} classes" if set_name == "batched_nms" else ""),
        batch=1,
        shape=dict(N=n, sigma=0.5)
        if set_name == "soft_nms"
        else dict(N=n, iou_threshold=IOU_THRESHOLD),
        dtype=torch.float32,
        device=device,
        make_args=make_args,
        expected=expected,
        error=error,
        providers=providers,
    )
    if error is None:
        # The keep set's check needs the scores, which the case's arguments hold.
        scores = make_args()[1]
        case.error = lambda actual, want: keep_error(actual, want, scores)
    return case


def build_cases(
    device,
    *,
    sets=None,
    batches=None,
    dtypes=None,
    quick=False,
    channels_last=False,
    backward=False,
    stream=sys.stderr,
):
    """(the box-op cases for `device`, notes for the results header). batches, dtypes,
    channels_last and backward do not apply (float32 boxes, no gradients)."""
    device = torch.device(device)
    backends, notes = cnnops_backends(("nms", "box_iou"), device, OP)
    for note in notes:
        print(note, file=stream)
    if backward:
        return [], notes
    cases = []
    for set_name, sizes in NMS_SETS.items():
        if sets is not None and set_name not in sets:
            continue
        for n in sizes[device.type][:1] if quick else sizes[device.type]:
            cases.append(make_case(set_name, 1000 if quick else n, device, backends))
    return cases, notes

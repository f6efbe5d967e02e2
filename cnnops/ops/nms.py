"""cnnops.nms, batched_nms, soft_nms and box_iou: the public functions and their fake kernels.

nms, batched_nms and box_iou: same signatures and results as torchvision.ops, plus
`score_threshold` and `max_output` for nms and a `backend` keyword. soft_nms: mmcv's soft_nms
with torchvision's IoU. The kernels are the C++ ops `cnnops::nms` (with class ids for
batched_nms), `cnnops::soft_nms` and `cnnops::box_iou` (csrc/ops/nms.cpp), one implementation
per backend, and for the triton backend the ops `cnnops::nms_triton`, `cnnops::soft_nms_triton`
and `cnnops::box_iou_triton` defined here (their kernels are in cnnops.kernels.nms).
"""

import math
import os
import struct

import torch

from cnnops.ops._backend import autocast_unifies, resolve_backend


def _check_boxes(boxes, name, op):
    if not isinstance(boxes, torch.Tensor):
        raise TypeError(f"{op}: {name} must be a Tensor, got {type(boxes).__name__}")
    if boxes.dim() != 2 or boxes.shape[1] != 4:
        raise ValueError(
            f"{op}: {name} must be a [N, 4] tensor of (x1, y1, x2, y2), got shape "
            f"{tuple(boxes.shape)}"
        )
    if not boxes.is_floating_point():
        raise TypeError(f"{op}: {name} must be floating point, got {boxes.dtype}")


def _check_same(t, name, boxes, op, boxes_name="boxes"):
    if t.dtype != boxes.dtype and not autocast_unifies(boxes, t):
        raise TypeError(
            f"{op}: {name} dtype {t.dtype} does not match {boxes_name} dtype {boxes.dtype}"
        )
    if t.device != boxes.device:
        raise ValueError(f"{op}: {name} are on {t.device} but {boxes_name} are on {boxes.device}")


def _check_scores(boxes, scores, op):
    _check_boxes(boxes, "boxes", op)
    if not isinstance(scores, torch.Tensor):
        raise TypeError(f"{op}: scores must be a Tensor, got {type(scores).__name__}")
    if scores.dim() != 1 or scores.shape[0] != boxes.shape[0]:
        raise ValueError(
            f"{op}: scores must be a [N] tensor with one score per box (N = {boxes.shape[0]}), "
            f"got shape {tuple(scores.shape)}"
        )
    _check_same(scores, "scores", boxes, op)


def _check_threshold(value, name, op):
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{op}: {name} must be a number, got {value!r}")
    if math.isnan(value):
        raise ValueError(f"{op}: {name} must not be NaN")
    return float(value)


def nms(boxes, scores, iou_threshold, *, score_threshold=None, max_output=None, backend=None):
    """torchvision.ops.nms: the indices (int64) of the boxes kept by greedy non-maximum
    suppression, by descending score. A box is dropped when its IoU with a kept, higher-scoring
    box is above iou_threshold.

    score_threshold: boxes scoring at or below it are dropped first.
    max_output: keep at most this many (the highest-scoring survivors).
    backend: None (see cnnops.use_backend), "cpu", "cuda" or "triton".
    """
    _check_scores(boxes, scores, "nms")
    iou_threshold = _check_threshold(iou_threshold, "iou_threshold", "nms")
    if score_threshold is not None:
        score_threshold = _check_threshold(score_threshold, "score_threshold", "nms")
    if max_output is not None:
        if isinstance(max_output, bool) or not isinstance(max_output, int) or max_output < 0:
            raise ValueError(f"nms: max_output must be an int >= 0 or None, got {max_output!r}")
    args = (boxes, scores, None, iou_threshold, score_threshold, max_output)
    if resolve_backend("nms", boxes.device, backend) == "triton":
        return torch.ops.cnnops.nms_triton(*args)
    return torch.ops.cnnops.nms(*args)


def batched_nms(boxes, scores, idxs, iou_threshold, *, backend=None):
    """torchvision.ops.batched_nms: nms within each class (idxs: one integer class per box);
    boxes of different classes never suppress each other. Indices by descending score.

    Unlike torchvision, it does not offset each class's boxes by a multiple of the largest
    coordinate: the kernels compare class ids, so float16 boxes and negative coordinates are
    safe.
    """
    _check_scores(boxes, scores, "batched_nms")
    iou_threshold = _check_threshold(iou_threshold, "iou_threshold", "batched_nms")
    if not isinstance(idxs, torch.Tensor):
        raise TypeError(f"batched_nms: idxs must be a Tensor, got {type(idxs).__name__}")
    if idxs.dim() != 1 or idxs.shape[0] != boxes.shape[0]:
        raise ValueError(
            "batched_nms: idxs must be a [N] tensor with one class index per box "
            f"(N = {boxes.shape[0]}), got shape {tuple(idxs.shape)}"
        )
    _check_idxs(boxes, idxs)
    args = (boxes, scores, idxs, iou_threshold, None, None)
    if resolve_backend("nms", boxes.device, backend) == "triton":
        return torch.ops.cnnops.nms_triton(*args)
    return torch.ops.cnnops.nms(*args)


_SOFT_NMS_METHODS = ("gaussian", "linear")


def _check_soft_nms_args(boxes, scores, sigma, iou_threshold, score_threshold, method):
    """The checks of soft_nms, also run by the triton op (which can be called directly)."""
    _check_scores(boxes, scores, "soft_nms")
    if isinstance(sigma, bool) or not isinstance(sigma, (int, float)):
        raise TypeError(f"soft_nms: sigma must be a number, got {sigma!r}")
    if not (math.isfinite(sigma) and sigma > 0):
        raise ValueError(f"soft_nms: sigma must be > 0 and finite, got {sigma!r}")
    iou_threshold = _check_threshold(iou_threshold, "iou_threshold", "soft_nms")
    score_threshold = _check_threshold(score_threshold, "score_threshold", "soft_nms")
    if not isinstance(method, str):
        raise TypeError(f"soft_nms: method must be a str, got {method!r}")
    if method not in _SOFT_NMS_METHODS:
        raise ValueError(f'soft_nms: method must be "gaussian" or "linear", got {method!r}')
    if boxes.shape[0] > 2**31 - 1:
        raise ValueError(f"soft_nms: at most 2^31 - 1 boxes, got {boxes.shape[0]}")
    return float(sigma), iou_threshold, score_threshold


def soft_nms(
    boxes,
    scores,
    sigma=0.5,
    iou_threshold=0.3,
    score_threshold=0.001,
    method="gaussian",
    *,
    backend=None,
):
    """Soft-NMS (Bodla et al. 2017; mmcv's soft_nms, with torchvision's IoU: no +1 offset, and
    the Gaussian method by default, where mmcv's default is linear).

    Repeatedly picks the surviving box of highest current score (ties: the lower index) and
    multiplies the score of every other survivor j by a weight of its IoU with the picked box:
      method="gaussian": exp(-IoU^2 / sigma) (iou_threshold is unused, as in mmcv);
      method="linear": 1 - IoU where IoU > iou_threshold, else 1.
    A box is dropped, never to be picked, as soon as its score is below score_threshold
    (`score < score_threshold`, as in mmcv: a score equal to it stays), both at the start (mmcv
    checks only after a decay) and after every decay. The IoU is clamped to [0, 1] first (NaN,
    from two empty boxes or NaN coordinates, counts as 0), so weights lie in [0, 1] and
    non-negative scores only fall.

    NaN scores: a box scoring NaN (or whose score becomes NaN, inf * 0) is dropped, as if below
    every threshold; it is never picked and never returned.

    Returns (keep, scores): int64 indices of the picked boxes in pick order, and their scores
    when picked (the decayed scores, in the scores' dtype). For non-negative scores the pick
    order is by descending decayed score.

    Computed in float32 for float32, float16 and bfloat16 boxes, float64 for float64 boxes; the
    comparisons with the (float64) thresholds are exact. The Gaussian weight uses its own
    exp (csrc/ops/nms.h: within 1.2 ulp in float32), and flushes weights below about 1e-38
    (float32) or 1e-308 (float64) to 0.

    backend: None (see cnnops.use_backend), "cpu" (float32, float64), "cuda" or "triton".
    """
    sigma, iou_threshold, score_threshold = _check_soft_nms_args(
        boxes, scores, sigma, iou_threshold, score_threshold, method
    )
    args = (boxes, scores, sigma, iou_threshold, score_threshold, method)
    if resolve_backend("nms", boxes.device, backend) == "triton":
        return torch.ops.cnnops.soft_nms_triton(*args)
    return torch.ops.cnnops.soft_nms(*args)


def _check_idxs(boxes, idxs):
    if idxs.is_floating_point() or idxs.is_complex() or idxs.dtype == torch.bool:
        raise TypeError(f"batched_nms: idxs must be an integer tensor, got {idxs.dtype}")
    if idxs.device != boxes.device:
        raise ValueError(f"batched_nms: idxs are on {idxs.device} but boxes are on {boxes.device}")


def box_iou(boxes1, boxes2, *, backend=None):
    """torchvision.ops.box_iou: the [N, M] IoU of every pair of (x1, y1, x2, y2) boxes."""
    _check_boxes(boxes1, "boxes1", "box_iou")
    _check_boxes(boxes2, "boxes2", "box_iou")
    _check_same(boxes2, "boxes2", boxes1, "box_iou", "boxes1")
    if resolve_backend("box_iou", boxes1.device, backend) == "triton":
        return torch.ops.cnnops.box_iou_triton(boxes1, boxes2)
    return torch.ops.cnnops.box_iou(boxes1, boxes2)


@torch.library.register_fake("cnnops::nms")
def _nms_fake(boxes, scores, idxs, iou_threshold, score_threshold, max_output):
    # How many boxes survive depends on the data: an unbacked size.
    kept = torch.library.get_ctx().new_dynamic_size()
    return boxes.new_empty((kept,), dtype=torch.int64)


@torch.library.register_fake("cnnops::soft_nms")
def _soft_nms_fake(boxes, scores, sigma, iou_threshold, score_threshold, method):
    # How many boxes are picked depends on the data: one unbacked size, shared by both outputs.
    picked = torch.library.get_ctx().new_dynamic_size()
    return boxes.new_empty((picked,), dtype=torch.int64), scores.new_empty((picked,))


@torch.library.register_fake("cnnops::box_iou")
def _box_iou_fake(boxes1, boxes2):
    return boxes1.new_empty((boxes1.shape[0], boxes2.shape[0]))


# ---------------------------------------------------------------------------------------------
# The triton backend: its own ops, made with triton_op so that torch.compile sees the kernels.
# The kernels live in cnnops.kernels.nms.

# Launch configurations, kept as data (tests/kernels/aot_compile.py compiles each).
# - word_bits: boxes per mask word (an int64). nms_iou_mask and nms_greedy must agree on it.
# - nms_iou_mask: BLOCK_ROWS sorted boxes x one word of boxes per program.
# - nms_greedy: one program; CHUNK_WORDS mask words per step of its OR-reduction.
# - box_iou: a BLOCK_N x BLOCK_M tile of IoUs per program.
# - soft_nms: one program, BLOCK boxes at a time.
# The IoU tiles hold 8 values per thread: the IEEE division (div.rn) is a subroutine in SASS
# whose call keeps every live value in registers, and at 16 per thread box_iou in float16 and
# float64 spills (tests/kernels/aot_compile.py).
# Triton's interpreter (no GPU) runs smaller tiles and chunks, so that the tests' tens to hundreds
# of boxes span several row blocks and several chunks.
TRITON_CONFIGS = {
    "word_bits": 64,
    "nms_iou_mask": {
        "gpu": dict(BLOCK_ROWS=16, num_warps=4),
        "interpreter": dict(BLOCK_ROWS=16),
    },
    "nms_greedy": {
        "gpu": dict(CHUNK_WORDS=16, num_warps=4),
        "interpreter": dict(CHUNK_WORDS=2),
    },
    "box_iou": {
        "gpu": dict(BLOCK_N=32, BLOCK_M=32, num_warps=4),
        "interpreter": dict(BLOCK_N=16, BLOCK_M=32),
    },
    # soft_nms: one program; BLOCK boxes per step of its sweep over the boxes (one sweep a pick).
    "soft_nms": {
        "gpu": dict(BLOCK=1024, num_warps=8),
        "interpreter": dict(BLOCK=32),
    },
}

# Triton's limit on the second and third grid dimensions; the mask kernel's words go there.
_MAX_GRID_Y = 65535


def _triton_config(kernel):
    side = "interpreter" if os.environ.get("TRITON_INTERPRET") == "1" else "gpu"
    return TRITON_CONFIGS[kernel][side]


def float32_at_or_below(value):
    """The largest float32 <= value (a Python float).

    torchvision compares a float32 IoU with a float64 threshold; for a float32 x, x > t holds
    exactly when x > (the largest float32 <= t), so the float32 kernels compare with that
    (csrc/ops/nms.h: float_threshold_below). Pure Python: torch.compile traces this launcher."""
    if math.isnan(value):
        return value
    largest = struct.unpack("<f", struct.pack("<I", 0x7F7FFFFF))[0]
    if value >= largest:
        return math.inf if value == math.inf else largest
    if value < -largest:
        return -math.inf
    nearest = struct.unpack("<f", struct.pack("<f", value))[0]
    if nearest <= value:
        return nearest
    bits = struct.unpack("<I", struct.pack("<f", nearest))[0]
    if nearest > 0:
        bits -= 1
    elif nearest == 0:
        bits = 0x80000001  # the negative float32 of least magnitude
    else:
        bits += 1  # a negative float32 of one ulp more magnitude
    return struct.unpack("<f", struct.pack("<I", bits))[0]


def _compute_dtype(dtype):
    # float16 and bfloat16 boxes are upcast: their areas and products overflow or lose too much.
    return torch.float64 if dtype == torch.float64 else torch.float32


@torch.library.triton_op("cnnops::nms_triton", mutates_args=())
def _nms_triton(
    boxes: torch.Tensor,
    scores: torch.Tensor,
    idxs: torch.Tensor | None,
    iou_threshold: float,
    score_threshold: float | None,
    max_output: int | None,
) -> torch.Tensor:
    # Again here: the op can be called directly, without nms()'s checks.
    _check_scores(boxes, scores, "nms")
    if idxs is not None:
        _check_idxs(boxes, idxs)
        if idxs.dim() != 1 or idxs.shape[0] != boxes.shape[0]:
            raise ValueError(
                "batched_nms: idxs must be a [N] tensor with one class index per box "
                f"(N = {boxes.shape[0]}), got shape {tuple(idxs.shape)}"
            )
    if max_output is not None and max_output < 0:
        raise ValueError(f"nms: max_output must be >= 0, got {max_output}")
    from cnnops.kernels import nms as kernels

    n = boxes.shape[0]
    word_bits = TRITON_CONFIGS["word_bits"]
    n_words = (n + word_bits - 1) // word_bits
    if n_words > _MAX_GRID_Y:
        raise ValueError(
            f"nms: the triton backend takes at most {_MAX_GRID_Y * word_bits} boxes, got {n}"
        )
    compute = _compute_dtype(boxes.dtype)
    # torchvision's order: descending score, ties by index (a stable sort).
    order = torch.sort(scores, dim=0, descending=True, stable=True).indices
    sorted_boxes = boxes.index_select(0, order).to(compute).contiguous()
    if score_threshold is None:
        valid = torch.ones(n, dtype=torch.int8, device=boxes.device)
    else:
        # The comparison the C++ backends make: in the scores' dtype.
        valid = (scores.index_select(0, order) > score_threshold).to(torch.int8)
    classes = idxs.index_select(0, order).to(torch.int64) if idxs is not None else None
    threshold = iou_threshold if compute == torch.float64 else float32_at_or_below(iou_threshold)
    threshold = torch.full((1,), threshold, dtype=compute, device=boxes.device)
    keep = torch.zeros(n, dtype=torch.int8, device=boxes.device)
    if n > 0:
        # Only the words at or after each row's own word are written (and read).
        mask = torch.empty((n, n_words), dtype=torch.int64, device=boxes.device)
        removed = torch.zeros(n_words, dtype=torch.int64, device=boxes.device)
        cfg = _triton_config("nms_iou_mask")
        grid = ((n + cfg["BLOCK_ROWS"] - 1) // cfg["BLOCK_ROWS"], n_words)
        torch.library.wrap_triton(kernels.nms_iou_mask_kernel)[grid](
            sorted_boxes, classes if classes is not None else valid, threshold, mask,
            n, n_words,
            HAS_CLASSES=classes is not None, FP64=compute == torch.float64,
            WORD_BITS=word_bits, **cfg,
        )  # fmt: skip
        limit = n if max_output is None else min(max_output, n)
        torch.library.wrap_triton(kernels.nms_greedy_kernel)[(1,)](
            mask, valid, removed, keep, n, n_words, limit,
            WORD_BITS=word_bits, **_triton_config("nms_greedy"),
        )  # fmt: skip
    # Kept sorted positions, ascending: the kept boxes by descending score.
    return order.index_select(0, torch.nonzero(keep).view(-1))


@torch.library.triton_op("cnnops::soft_nms_triton", mutates_args=())
def _soft_nms_triton(
    boxes: torch.Tensor,
    scores: torch.Tensor,
    sigma: float,
    iou_threshold: float,
    score_threshold: float,
    method: str,
) -> tuple[torch.Tensor, torch.Tensor]:
    sigma, iou_threshold, score_threshold = _check_soft_nms_args(
        boxes, scores, sigma, iou_threshold, score_threshold, method
    )
    from cnnops.kernels import nms as kernels

    n = boxes.shape[0]
    compute = _compute_dtype(boxes.dtype)
    device = boxes.device
    keep = torch.empty(n, dtype=torch.int64, device=device)
    kept_scores = torch.empty(n, dtype=compute, device=device)
    count = torch.zeros(1, dtype=torch.int32, device=device)
    if n > 0:
        if compute == torch.float32:
            # The float64 comparisons, made in float32 (as csrc/ops/nms.h's float thresholds):
            # iou > t  <=>  iou > (largest float32 <= t); s >= t  <=>  s >= (smallest >= t).
            iou_threshold = float32_at_or_below(iou_threshold)
            score_threshold = -float32_at_or_below(-score_threshold)
            # sigma stays > 0 in float32 (the weight divides by it), as in csrc/ops/nms.h's
            # soft_nms_sigma: at least the least positive float32, +inf above the largest.
            sigma = math.inf if sigma > 3.4028234663852886e38 else max(sigma, 2.0**-149)
        params = torch.tensor([sigma, iou_threshold, score_threshold], dtype=compute, device=device)
        work = torch.empty(n, dtype=compute, device=device)
        work.copy_(scores)
        torch.library.wrap_triton(kernels.soft_nms_kernel)[(1,)](
            boxes.to(compute).contiguous(), work, params, keep, kept_scores, count, n,
            GAUSSIAN=method == "gaussian", FP64=compute == torch.float64,
            **_triton_config("soft_nms"),
        )  # fmt: skip
    # The picks are the first `count` entries. One nonzero, so that both outputs share its
    # (data-dependent) size; it is the op's one host synchronisation, as nms's.
    picked = torch.nonzero(torch.arange(n, device=device) < count).view(-1)
    return keep.index_select(0, picked), kept_scores.index_select(0, picked).to(scores.dtype)


@torch.library.triton_op("cnnops::box_iou_triton", mutates_args=())
def _box_iou_triton(boxes1: torch.Tensor, boxes2: torch.Tensor) -> torch.Tensor:
    _check_boxes(boxes1, "boxes1", "box_iou")
    _check_boxes(boxes2, "boxes2", "box_iou")
    _check_same(boxes2, "boxes2", boxes1, "box_iou", "boxes1")
    from cnnops.kernels import nms as kernels

    n, m = boxes1.shape[0], boxes2.shape[0]
    out = boxes1.new_empty((n, m))
    if out.numel() == 0:
        return out
    cfg = _triton_config("box_iou")
    column_tiles = (m + cfg["BLOCK_M"] - 1) // cfg["BLOCK_M"]
    grid = ((n + cfg["BLOCK_N"] - 1) // cfg["BLOCK_N"], column_tiles)
    if column_tiles > _MAX_GRID_Y:
        raise ValueError(
            f"box_iou: the triton backend takes at most {_MAX_GRID_Y * cfg['BLOCK_M']} boxes2, "
            f"got {m}"
        )
    torch.library.wrap_triton(kernels.box_iou_kernel)[grid](
        boxes1, boxes2, out, n, m,
        *boxes1.stride(), *boxes2.stride(), *out.stride(),
        FP64=boxes1.dtype == torch.float64, **cfg,
    )  # fmt: skip
    return out


# Explicit fake kernels: triton_op would trace the function itself, but in Triton's interpreter
# (no GPU) the kernel launches would then touch fake tensors' data.
torch.library.register_fake("cnnops::nms_triton")(_nms_fake)
torch.library.register_fake("cnnops::soft_nms_triton")(_soft_nms_fake)
torch.library.register_fake("cnnops::box_iou_triton")(_box_iou_fake)

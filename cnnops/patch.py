"""cnnops.patch_torchvision / unpatch_torchvision: route torchvision.ops' nms, batched_nms,
box_iou, roi_align and roi_pool through cnnops, so torchvision's own modules and detection
models run on cnnops kernels without being changed.

torchvision's code calls these functions through module globals (`from .roi_align import
roi_align` in torchvision.ops.poolers, `box_ops.batched_nms` in the detection models, `nms` in
torchvision.ops.boxes' batched_nms helpers, ...). Patching therefore replaces every global of
every loaded torchvision module that is one of the five functions, not only the
`torchvision.ops.X` attributes, and unpatching puts the very same function objects back, also
in torchvision modules imported while the patch was on (which copied the wrappers).

Not reached: references taken before patching and kept elsewhere. The detection models keep
one: RegionProposalNetwork and RoIHeads store `box_ops.box_iou` as `box_similarity` when they
are built, so a model built outside the patch keeps computing its training-time IoUs with
torchvision's box_iou (plain torch arithmetic, no torchvision kernel).
"""

import functools
import sys
import threading

from cnnops.ops._backend import BACKENDS
from cnnops.ops.nms import batched_nms as _cnnops_batched_nms
from cnnops.ops.nms import box_iou as _cnnops_box_iou
from cnnops.ops.nms import nms as _cnnops_nms
from cnnops.ops.roi_align import roi_align as _cnnops_roi_align
from cnnops.ops.roi_pool import roi_pool as _cnnops_roi_pool

# The open patches, oldest first; the wrappers use the newest one's backend. A plain global
# guarded by a lock (as cnnops.use_backend's stack): patching is process-wide by nature.
_patches = []
_lock = threading.RLock()
# While patched: (module, name, original) for every global replaced.
_replaced = []
# While patched: {id(wrapper): original} for the five wrappers.
_originals = {}


def _backend():
    return _patches[-1].backend if _patches else None


def _torchvision_functions():
    """{name: torchvision's function}, from the modules that define them."""
    try:
        import torchvision.ops  # noqa: F401  (loads torchvision.ops.boxes, roi_align, ...)
    except ImportError as e:
        raise ImportError("cnnops.patch_torchvision: torchvision is not installed") from e
    # Not torchvision.ops.roi_align: that name is the function, which hides the module.
    boxes = sys.modules["torchvision.ops.boxes"]
    return {
        "nms": boxes.nms,
        "batched_nms": boxes.batched_nms,
        "box_iou": boxes.box_iou,
        "roi_align": sys.modules["torchvision.ops.roi_align"].roi_align,
        "roi_pool": sys.modules["torchvision.ops.roi_pool"].roi_pool,
    }


def _wrappers(tv):
    """cnnops functions with torchvision's signatures, one per entry of `tv`. Forms of a call
    that cnnops has no op for (quantized tensors, box_iou's other box formats and batched
    boxes) go to torchvision's function, so a patched call never fails where torchvision's
    would not; every other call runs on cnnops, whose results are torchvision's."""

    @functools.wraps(tv["nms"])
    def nms(boxes, scores, iou_threshold):
        if boxes.is_quantized:
            return tv["nms"](boxes, scores, iou_threshold)
        return _cnnops_nms(boxes, scores, iou_threshold, backend=_backend())

    @functools.wraps(tv["batched_nms"])
    def batched_nms(boxes, scores, idxs, iou_threshold):
        return _cnnops_batched_nms(boxes, scores, idxs, iou_threshold, backend=_backend())

    @functools.wraps(tv["box_iou"])
    def box_iou(boxes1, boxes2, fmt="xyxy"):
        if fmt == "xyxy" and _plain_boxes(boxes1, boxes2):
            return _cnnops_box_iou(boxes1, boxes2, backend=_backend())
        # fmt only when given: older torchvision versions take no fmt argument.
        return (
            tv["box_iou"](boxes1, boxes2) if fmt == "xyxy" else tv["box_iou"](boxes1, boxes2, fmt)
        )

    @functools.wraps(tv["roi_align"])
    def roi_align(input, boxes, output_size, spatial_scale=1.0, sampling_ratio=-1, aligned=False):
        if input.is_quantized:
            return tv["roi_align"](
                input, boxes, output_size, spatial_scale, sampling_ratio, aligned
            )
        return _cnnops_roi_align(
            input, boxes, output_size, spatial_scale, sampling_ratio, aligned, backend=_backend()
        )

    @functools.wraps(tv["roi_pool"])
    def roi_pool(input, boxes, output_size, spatial_scale=1.0):
        return _cnnops_roi_pool(input, boxes, output_size, spatial_scale, backend=_backend())

    return {
        "nms": nms,
        "batched_nms": batched_nms,
        "box_iou": box_iou,
        "roi_align": roi_align,
        "roi_pool": roi_pool,
    }


def _plain_boxes(boxes1, boxes2):
    """Whether box_iou's arguments are of the form cnnops.box_iou takes: two [N, 4] floating
    tensors of one dtype on one device (torchvision also takes [..., N, 4] batches, integer
    boxes and mixed dtypes)."""
    return (
        boxes1.dim() == 2
        and boxes2.dim() == 2
        and boxes1.is_floating_point()
        and boxes1.dtype == boxes2.dtype
        and boxes1.device == boxes2.device
    )


def _torchvision_modules():
    return [
        m
        for name, m in list(sys.modules.items())
        if m is not None and (name == "torchvision" or name.startswith("torchvision."))
    ]


def _apply():
    tv = _torchvision_functions()
    wrappers = _wrappers(tv)
    by_id = {id(fn): wrappers[name] for name, fn in tv.items()}
    for module in _torchvision_modules():
        for attr, value in list(vars(module).items()):
            wrapper = by_id.get(id(value))
            if wrapper is not None:
                _replaced.append((module, attr, value))
                setattr(module, attr, wrapper)
    _originals.update({id(wrappers[name]): fn for name, fn in tv.items()})


def _restore():
    for module, attr, original in reversed(_replaced):
        setattr(module, attr, original)
    # Modules imported while patched copied a wrapper into their globals.
    for module in _torchvision_modules():
        for attr, value in list(vars(module).items()):
            original = _originals.get(id(value))
            if original is not None:
                setattr(module, attr, original)
    _replaced.clear()
    _originals.clear()


class TorchvisionPatch:
    """An open patch_torchvision() call: a context manager whose exit closes it."""

    def __init__(self, backend):
        self.backend = backend
        self.closed = False

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        if not self.closed:
            _close(self)
        return False

    def __repr__(self):
        state = "closed" if self.closed else "open"
        return f"<cnnops torchvision patch, backend={self.backend!r}, {state}>"


def _close(patch):
    with _lock:
        _patches.remove(patch)
        patch.closed = True
        if not _patches:
            _restore()


def patch_torchvision(*, backend=None):
    """Routes torchvision.ops.nms, batched_nms, box_iou, roi_align and roi_pool, and every
    place in torchvision that calls them (its RoIAlign, RoIPool and MultiScaleRoIAlign modules,
    the detection models), through cnnops.nms, batched_nms, box_iou, roi_align and roi_pool.

        with cnnops.patch_torchvision():   # undone when the block ends, also on an exception
            detections = model(images)

        cnnops.patch_torchvision()         # or on until
        cnnops.unpatch_torchvision()

    The patched functions take torchvision's arguments and give its results; calls cnnops has
    no op for (quantized tensors; box_iou with fmt other than "xyxy" or batched boxes) still go
    to torchvision. Patches nest: each call opens one, and torchvision's functions come back,
    the same objects, when the last one is closed. The newest open patch's backend (None: see
    cnnops.use_backend; "cpu", "cuda" or "triton") is given to every patched call.

    Returns the open patch, a context manager. Process-wide, as the functions it replaces.
    """
    if backend is not None and backend not in BACKENDS:
        raise ValueError(
            f"cnnops.patch_torchvision: unknown backend {backend!r}; expected None or one of "
            f"{BACKENDS}"
        )
    patch = TorchvisionPatch(backend)
    with _lock:
        if not _patches:
            try:
                _apply()
            except BaseException:
                _restore()
                raise
        _patches.append(patch)
    return patch


def unpatch_torchvision():
    """Closes the newest open patch_torchvision() patch; when none is left open, torchvision's
    own functions are back. Raises RuntimeError if torchvision is not patched."""
    with _lock:
        if not _patches:
            raise RuntimeError(
                "cnnops.unpatch_torchvision: torchvision is not patched (more unpatch calls "
                "than patch_torchvision calls)"
            )
        _close(_patches[-1])

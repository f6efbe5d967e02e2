"""roi_pool benchmark cases against torchvision.ops.roi_pool: Fast R-CNN's RoI max pooling at the
size of bench_roi_align's Faster R-CNN head (512 RoIs, 7 x 7 bins, 256 channels, stride 16),
forward, or forward plus backward with --backward."""

import sys

import torchvision

import cnnops
from bench.bench_roi_align import build_roi_cases, roi_case

OP = "roi_pool"
# (name, batch, channels, height, width, RoIs, output size, spatial scale)
ROI_SETS = {
    "roi_pool": [
        ("faster-rcnn-head", 2, 256, 50, 68, 512, 7, 1 / 16),
    ],
}
SET_NAMES = tuple(ROI_SETS)


def make_case(set_name, spec, device, backends, channels_last, backward):
    size, scale = spec[6:]

    def reference(x, rois):
        return torchvision.ops.roi_pool(x, rois, size, scale)

    def ours(backend):
        return lambda x, rois: cnnops.roi_pool(x, rois, size, scale, backend=backend)

    return roi_case(OP, set_name, spec, device, backends, channels_last, backward, reference,
                    ours, {})  # fmt: skip


def build_cases(device, *, sets=None, channels_last=False, backward=False, quick=False,
                stream=sys.stderr, **_):  # fmt: skip
    """(the roi_pool cases for `device`, notes for the results header); see bench_roi_align."""
    return build_roi_cases(
        OP, ROI_SETS, make_case, device, sets, quick, channels_last, backward, stream
    )

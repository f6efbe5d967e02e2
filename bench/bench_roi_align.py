"""roi_align benchmark cases against torchvision.ops.roi_align: a Faster R-CNN RoI head's
pooling (512 RoIs of an 800 x 1088 image, 7 x 7 bins, sampling_ratio 2, on a stride-16 feature
map of 256 channels), forward, or forward plus backward with --backward."""

import sys
from functools import partial

import torch
import torchvision

import cnnops
from bench.harness import Case, Provider, close_error, cnnops_backends

OP = "roi_align"
# (name, batch, channels, height, width, RoIs, output size, spatial scale, sampling ratio)
ROI_SETS = {
    "roi_align": [
        ("faster-rcnn-head", 2, 256, 50, 68, 512, 7, 1 / 16, 2),
    ],
}
SET_NAMES = tuple(ROI_SETS)


def random_rois(k, batch, image_h, image_w, generator):
    """RoIs of 16 to 400 pixels a side, anywhere in the image."""
    wh = torch.rand(k, 2, generator=generator) * 384 + 16
    x1 = torch.rand(k, generator=generator) * (image_w - wh[:, 0])
    y1 = torch.rand(k, generator=generator) * (image_h - wh[:, 1])
    idx = torch.randint(0, batch, (k,), generator=generator).float()
    return torch.stack([idx, x1, y1, x1 + wh[:, 0], y1 + wh[:, 1]], 1)


def with_backward(pool):
    """Forward plus grad input for grad output go."""

    def run(x, rois, go):
        x = x.detach().requires_grad_()
        return torch.autograd.grad(pool(x, rois), x, go)[0]

    return run


def roi_case(op, set_name, spec, device, backends, channels_last, backward, reference, ours, shape):
    """A case of a RoI pooling op (roi_align or roi_pool) on the RoIs and map of `spec`:
    `reference(x, rois)` is torchvision's, `ours(backend)` cnnops' on that backend."""
    name, n, c, h, w, k, size, scale = spec[:8]

    def make_args():
        generator = torch.Generator().manual_seed(0)
        x = torch.randn(n, c, h, w, generator=generator)
        if channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        rois = random_rois(k, n, h / scale, w / scale, generator)
        args = (x, rois)
        if backward:
            args += (torch.randn(k, c, size, size, generator=generator),)
        return tuple(t.to(device) for t in args)

    def call(pool):
        return with_backward(pool) if backward else pool

    def expected(args):
        return call(reference)(*(t.double() for t in args))

    providers = (Provider("torchvision", call(reference)),) + tuple(
        Provider(f"cnnops-{backend}", call(ours(backend))) for backend in backends
    )
    return Case(
        op=f"{op} fwd+bwd" if backward else op,
        set_name=set_name,
        layer=name,
        batch=n,
        shape=dict(N=n, C=c, H=h, W=w, K=k, out=size, scale=scale, **shape),
        dtype=torch.float32,
        device=device,
        make_args=make_args,
        expected=expected,
        error=partial(close_error, tolerance=1e-4),
        providers=providers,
    )


def make_case(set_name, spec, device, backends, channels_last, backward):
    size, scale, ratio = spec[6:]

    def reference(x, rois):
        return torchvision.ops.roi_align(x, rois, size, scale, ratio)

    def ours(backend):
        return lambda x, rois: cnnops.roi_align(x, rois, size, scale, ratio, backend=backend)

    return roi_case(OP, set_name, spec, device, backends, channels_last, backward, reference,
                    ours, dict(ratio=ratio))  # fmt: skip


def build_roi_cases(op, roi_sets, make_case, device, sets, quick, channels_last, backward,
                    stream):  # fmt: skip
    """(the cases of `op` for `device`, notes for the results header). The shapes are fixed
    (batches and dtypes do not apply); quick runs the same cases with 64 RoIs."""
    device = torch.device(device)
    backends, notes = cnnops_backends((op,), device, op)
    for note in notes:
        print(note, file=stream)
    cases = []
    for set_name, specs in roi_sets.items():
        if sets is not None and set_name not in sets:
            continue
        for spec in specs:
            if quick:
                spec = spec[:5] + (64,) + spec[6:]
            cases.append(make_case(set_name, spec, device, backends, channels_last, backward))
    return cases, notes


def build_cases(device, *, sets=None, channels_last=False, backward=False, quick=False,
                stream=sys.stderr, **_):  # fmt: skip
    """(the roi_align cases for `device`, notes for the results header)."""
    return build_roi_cases(
        OP, ROI_SETS, make_case, device, sets, quick, channels_last, backward, stream
    )

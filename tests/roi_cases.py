"""Feature maps and RoIs shared by the roi_align and roi_pool tests of every backend."""

import torch


def random_rois(k, batch, size, seed=0, dtype=torch.float64):
    """[K, 5] RoIs inside (and some across the border of) a size x size image."""
    gen = torch.Generator().manual_seed(seed)
    xy = torch.rand(k, 2, generator=gen, dtype=torch.float64) * size * 1.1 - size * 0.1
    wh = torch.rand(k, 2, generator=gen, dtype=torch.float64) * size * 0.6
    idx = torch.randint(0, batch, (k, 1), generator=gen).double()
    return torch.cat([idx, xy, xy + wh], 1).to(dtype)


def problem(dtype=torch.float64, layout="nchw", k=12, seed=0):
    """A 2 x 5 x 11 x 13 map in `layout` and K RoIs in image coordinates (spatial_scale 0.5):
    random ones, and one across every border, one outside the map and one empty."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(2, 5, 11, 13, generator=gen, dtype=torch.float64).to(dtype)
    if layout == "channels_last":
        x = x.contiguous(memory_format=torch.channels_last)
    elif layout == "non_contiguous":
        wide = torch.zeros(2, 5, 11, 26, dtype=dtype)
        wide[..., ::2] = x
        x = wide[..., ::2]
    rois = random_rois(k, 2, 2 * 13, seed, dtype)  # image coordinates: spatial_scale 0.5
    rois[0, 1:] = torch.tensor([-30.0, -20.0, 60.0, 50.0], dtype=dtype)  # crosses every border
    rois[1, 1:] = torch.tensor([100.0, 100.0, 120.0, 130.0], dtype=dtype)  # outside the map
    rois[2, 3:] = rois[2, 1:3]  # empty
    return x, rois


# ---- GPU cases, shared by the CUDA tests of roi_align and roi_pool ----------------------------


def with_layout(x, layout):
    """x (on any device) in `layout`: nchw, channels_last or non_contiguous (every other column
    of a map twice as wide)."""
    if layout == "channels_last":
        return x.contiguous(memory_format=torch.channels_last)
    if layout == "non_contiguous":
        wide = torch.zeros(*x.shape[:3], 2 * x.shape[3], dtype=x.dtype, device=x.device)
        wide[..., ::2] = x
        return wide[..., ::2]
    return x.contiguous()


def cuda_problem(dtype=torch.float64, layout="nchw", k=12, seed=0):
    """problem() on the GPU: a 2 x 5 x 11 x 13 map, RoIs across, outside and empty."""
    x, rois = problem(torch.float64, "nchw", k, seed)
    return with_layout(x.cuda().to(dtype), layout), rois.cuda().to(dtype)


def wide_problem(dtype=torch.float32, layout="nchw", k=40, channels=70, seed=5):
    """On the GPU: more channels than one work item or one thread's share takes, on a 19 x 23
    map."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(2, channels, 19, 23, generator=gen, dtype=torch.float64)
    rois = random_rois(k, 2, 2 * 23, seed)
    return with_layout(x.cuda().to(dtype), layout), rois.cuda().to(dtype)


def random_like(t, seed=1):
    """A seeded standard-normal tensor of t's shape, dtype and device (drawn on the CPU)."""
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(t.shape, generator=gen, dtype=torch.float64).to(t.dtype).to(t.device)


class deterministic_algorithms:
    """torch.use_deterministic_algorithms(enabled) inside the block, the previous mode after it."""

    def __init__(self, enabled=True):
        self.enabled = enabled

    def __enter__(self):
        self.previous = (
            torch.are_deterministic_algorithms_enabled(),
            torch.is_deterministic_algorithms_warn_only_enabled(),
        )
        torch.use_deterministic_algorithms(self.enabled)

    def __exit__(self, *exc):
        enabled, warn_only = self.previous
        torch.use_deterministic_algorithms(enabled, warn_only=warn_only)
        return False


# The deterministic (gather) backward against the atomic one: the same terms in another order.
# float16 and bfloat16: both paths sum in float32 and round once, at most an ulp of the dtype
# apart.
DETERMINISTIC_TOLERANCE = {
    torch.float32: dict(atol=1e-5, rtol=1e-5),
    torch.float64: dict(atol=1e-12, rtol=1e-12),
    torch.float16: dict(atol=2e-3, rtol=2e-3),
    torch.bfloat16: dict(atol=1.6e-2, rtol=1.6e-2),
}

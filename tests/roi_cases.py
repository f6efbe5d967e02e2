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

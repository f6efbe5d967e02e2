"""RoI pooling modules with torchvision.ops' constructor arguments and forward signature."""

import math

import torch

from cnnops.ops._backend import BACKENDS
from cnnops.ops.roi_align import output_size_pair, roi_align, rois_from_boxes
from cnnops.ops.roi_pool import roi_pool


def _check_backend(backend, cls):
    if backend is not None and backend not in BACKENDS:
        raise ValueError(f"{cls}: unknown backend {backend!r}; expected None or one of {BACKENDS}")
    return backend


def _backend_repr(module):
    # Only when set, so that a module with the default prints as torchvision's does.
    return "" if module.backend is None else f", backend={module.backend!r}"


class RoIAlign(torch.nn.Module):
    """torchvision.ops.RoIAlign on cnnops.roi_align; backend: see cnnops.roi_align."""

    def __init__(self, output_size, spatial_scale, sampling_ratio, aligned=False, *, backend=None):
        super().__init__()
        self.output_size = output_size
        self.spatial_scale = spatial_scale
        self.sampling_ratio = sampling_ratio
        self.aligned = aligned
        self.backend = _check_backend(backend, "RoIAlign")

    def forward(self, input, rois):
        return roi_align(
            input,
            rois,
            self.output_size,
            self.spatial_scale,
            self.sampling_ratio,
            self.aligned,
            backend=self.backend,
        )

    def __repr__(self):
        return (
            f"{type(self).__name__}(output_size={self.output_size}, "
            f"spatial_scale={self.spatial_scale}, sampling_ratio={self.sampling_ratio}, "
            f"aligned={self.aligned}{_backend_repr(self)})"
        )


class RoIPool(torch.nn.Module):
    """torchvision.ops.RoIPool on cnnops.roi_pool; backend: see cnnops.roi_pool."""

    def __init__(self, output_size, spatial_scale, *, backend=None):
        super().__init__()
        self.output_size = output_size
        self.spatial_scale = spatial_scale
        self.backend = _check_backend(backend, "RoIPool")

    def forward(self, input, rois):
        return roi_pool(input, rois, self.output_size, self.spatial_scale, backend=self.backend)

    def __repr__(self):
        return (
            f"{type(self).__name__}(output_size={self.output_size}, "
            f"spatial_scale={self.spatial_scale}{_backend_repr(self)})"
        )


class LevelMapper:
    """The FPN level of each RoI (eq. 1 of Lin et al. 2017, "Feature Pyramid Networks"):
    floor(canonical_level + log2(sqrt(area) / canonical_scale) + eps), clamped to
    [k_min, k_max], minus k_min (the index of the level among the pooled feature maps).

    Its attributes are named as torchvision.ops.poolers.LevelMapper's, and calling it gives the
    same levels, so cnnops.swap / unswap can carry an inferred mapper from one class to the
    other."""

    def __init__(self, k_min, k_max, canonical_scale=224, canonical_level=4, eps=1e-6):
        self.k_min = k_min
        self.k_max = k_max
        self.s0 = canonical_scale
        self.lvl0 = canonical_level
        self.eps = eps

    def __call__(self, boxlists):
        return fpn_levels(boxlists, self)


def fpn_levels(boxlists, mapper):
    """The level index of every box in the [L_i, 4] tensors of `boxlists` (concatenated), by the
    rule of `mapper` (a LevelMapper, cnnops' or torchvision's: read through their shared
    attribute names). The arithmetic is torchvision's, op for op, in the boxes' dtype (float32
    for half types): a box whose level sits on a boundary must land where torchvision puts it."""
    boxes = torch.cat(list(boxlists))
    if boxes.dtype not in (torch.float32, torch.float64):
        boxes = boxes.float()
    areas = (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])
    eps = torch.tensor(mapper.eps, dtype=areas.dtype)
    levels = torch.floor(mapper.lvl0 + torch.log2(torch.sqrt(areas) / mapper.s0) + eps)
    levels = torch.clamp(levels, min=mapper.k_min, max=mapper.k_max)
    return levels.to(torch.int64) - mapper.k_min


def infer_scale(feature_height, image_height):
    """The power of two nearest (in log scale) to feature_height / image_height: the feature
    map's stride, as 1 / 2^k.

    torchvision rounds log2 of the ratio in float32, this in float64; the two can differ only for
    a ratio within float32 rounding of 2^(k + 1/2), which no stride-2 network produces."""
    return 2.0 ** round(math.log2(feature_height / image_height))


class MultiScaleRoIAlign(torch.nn.Module):
    """torchvision.ops.MultiScaleRoIAlign on cnnops.roi_align: RoIAlign over the feature maps
    of an FPN, each RoI pooled from the level its size maps to.

    featmap_names: the keys of the feature maps to pool from (taken in the order of the forward
        pass's dict, as torchvision does); output_size: an int or a pair; sampling_ratio,
        backend: see cnnops.roi_align; canonical_scale, canonical_level: eq. 1 of the FPN paper
        (a canonical_scale x canonical_scale RoI pools from level canonical_level).

    The first forward pass infers each level's spatial scale from its feature map's height and
    the largest image height, and keeps them (`scales`, `map_levels`) for later calls, as
    torchvision does; the attributes have torchvision's names, so cnnops.swap keeps a swapped
    module's inferred scales.
    """

    def __init__(
        self,
        featmap_names,
        output_size,
        sampling_ratio,
        *,
        canonical_scale=224,
        canonical_level=4,
        backend=None,
    ):
        super().__init__()
        if not isinstance(featmap_names, (list, tuple)) or not all(
            isinstance(name, str) for name in featmap_names
        ):
            raise TypeError(
                f"MultiScaleRoIAlign: featmap_names must be a list of str, got {featmap_names!r}"
            )
        if isinstance(sampling_ratio, bool) or not isinstance(sampling_ratio, int):
            raise TypeError(
                f"MultiScaleRoIAlign: sampling_ratio must be an int, got {sampling_ratio!r}"
            )
        self.featmap_names = featmap_names
        self.sampling_ratio = sampling_ratio
        self.output_size = output_size_pair(output_size, "MultiScaleRoIAlign")
        self.scales = None
        self.map_levels = None
        self.canonical_scale = canonical_scale
        self.canonical_level = canonical_level
        self.backend = _check_backend(backend, "MultiScaleRoIAlign")

    def _features(self, x):
        if not isinstance(x, dict):
            raise TypeError(
                f"MultiScaleRoIAlign: x must be a dict of feature maps, got {type(x).__name__}"
            )
        features = [v for k, v in x.items() if k in self.featmap_names]
        if not features:
            raise ValueError(
                f"MultiScaleRoIAlign: x has none of the feature maps {self.featmap_names!r} "
                f"(its keys: {list(x)!r})"
            )
        return features

    def _setup_scales(self, features, image_shapes):
        if not image_shapes:
            raise ValueError("MultiScaleRoIAlign: image_shapes is empty; pass one (h, w) per image")
        image_height = max(shape[0] for shape in image_shapes)
        self.scales = [infer_scale(f.shape[-2], image_height) for f in features]
        # The scales are exact powers of two, so these are exact integers.
        k_min = round(-math.log2(self.scales[0]))
        k_max = round(-math.log2(self.scales[-1]))
        self.map_levels = LevelMapper(k_min, k_max, self.canonical_scale, self.canonical_level)

    def forward(self, x, boxes, image_shapes):
        features = self._features(x)
        # Before the scales are inferred: a call with bad boxes leaves the module as it was.
        rois = rois_from_boxes(boxes, "MultiScaleRoIAlign")
        if self.scales is None or self.map_levels is None:
            self._setup_scales(features, image_shapes)
        pool = dict(
            output_size=self.output_size,
            sampling_ratio=self.sampling_ratio,
            backend=self.backend,
        )
        if len(features) == 1:
            return roi_align(features[0], rois, spatial_scale=self.scales[0], **pool)

        levels = fpn_levels(boxes, self.map_levels)
        first = features[0]
        result = first.new_zeros((rois.shape[0], first.shape[1], *self.output_size))
        for level, (feature, scale) in enumerate(zip(features, self.scales, strict=False)):
            index = torch.where(levels == level)[0]
            pooled = roi_align(feature, rois[index], spatial_scale=scale, **pool)
            # Levels may differ in dtype (autocast chooses per layer): the result takes the
            # first level's, as torchvision's does.
            result[index] = pooled.to(result.dtype)
        return result

    def __repr__(self):
        return (
            f"{type(self).__name__}(featmap_names={self.featmap_names}, "
            f"output_size={self.output_size}, sampling_ratio={self.sampling_ratio}"
            f"{_backend_repr(self)})"
        )

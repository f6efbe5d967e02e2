"""cnnops: hand-written CPU, CUDA and Triton kernels for convolutional networks and detectors."""

import torch  # noqa: F401  (the extension links against torch; import it first)

from cnnops import _ext

_C = _ext.load()
# Read once: a build's contents never change, and torch.compile cannot trace a call into _C.
_HAS_CUDA_KERNELS = bool(_C.has_cuda_kernels())

from cnnops import nn  # noqa: E402
from cnnops.ops._backend import available_backends, use_backend  # noqa: E402
from cnnops.ops.conv2d import conv2d  # noqa: E402
from cnnops.ops.conv_transpose2d import conv_transpose2d  # noqa: E402
from cnnops.ops.nms import batched_nms, box_iou, nms, soft_nms  # noqa: E402
from cnnops.ops.roi_align import roi_align  # noqa: E402
from cnnops.ops.roi_pool import roi_pool  # noqa: E402
from cnnops.patch import patch_torchvision, unpatch_torchvision  # noqa: E402
from cnnops.swap import SwapReport, swap, unswap  # noqa: E402

__version__ = "0.1.0"

# After every op above: it registers their Autocast kernels (an op not yet defined is skipped).
from cnnops import autocast  # noqa: E402, F401


def has_cuda_kernels() -> bool:
    """Whether this build contains the CUDA C++ kernels (they need a GPU to run)."""
    return _HAS_CUDA_KERNELS


__all__ = [
    "SwapReport",
    "__version__",
    "available_backends",
    "batched_nms",
    "box_iou",
    "conv2d",
    "conv_transpose2d",
    "has_cuda_kernels",
    "nms",
    "nn",
    "patch_torchvision",
    "roi_align",
    "roi_pool",
    "soft_nms",
    "swap",
    "unpatch_torchvision",
    "unswap",
    "use_backend",
]

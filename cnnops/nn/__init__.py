"""Drop-in nn.Modules that run on cnnops kernels and load the same state_dicts as torch's."""

from cnnops.nn.conv import Conv2d, ConvTranspose2d
from cnnops.nn.roi import MultiScaleRoIAlign, RoIAlign, RoIPool

__all__ = ["Conv2d", "ConvTranspose2d", "MultiScaleRoIAlign", "RoIAlign", "RoIPool"]

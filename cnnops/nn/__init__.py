"""Drop-in nn.Modules that run on cnnops kernels and load the same state_dicts as torch's."""

from cnnops.nn.conv import Conv2d

__all__ = ["Conv2d"]

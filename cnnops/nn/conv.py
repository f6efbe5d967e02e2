"""cnnops.nn.Conv2d: torch.nn.Conv2d with its convolution call routed through cnnops.conv2d."""

import torch

from cnnops.ops.conv2d import conv2d


class Conv2d(torch.nn.Conv2d):
    """A torch.nn.Conv2d (same arguments, parameters, init, state_dict and repr) whose
    convolution runs on cnnops kernels.

    algo and backend are passed to cnnops.conv2d on every call; they are plain attributes, not
    part of the state_dict, so torch's and cnnops' modules load each other's checkpoints.
    """

    def __init__(self, *args, algo="auto", backend=None, **kwargs):
        super().__init__(*args, **kwargs)
        self.algo = algo
        self.backend = backend

    def _conv_forward(self, input, weight, bias):
        if self.padding_mode != "zeros":
            # As torch does: pad explicitly with the mode, then convolve without padding.
            input = torch.nn.functional.pad(
                input, self._reversed_padding_repeated_twice, mode=self.padding_mode
            )
            padding = 0
        else:
            padding = self.padding
        return conv2d(
            input,
            weight,
            bias,
            self.stride,
            padding,
            self.dilation,
            self.groups,
            algo=self.algo,
            backend=self.backend,
        )

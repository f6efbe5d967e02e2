"""cnnops.nn.Conv2d and ConvTranspose2d: torch's modules with their convolution calls routed
through cnnops.conv2d and cnnops.conv_transpose2d."""

import torch

from cnnops.ops.conv2d import conv2d
from cnnops.ops.conv_transpose2d import conv_transpose2d


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


class ConvTranspose2d(torch.nn.ConvTranspose2d):
    """A torch.nn.ConvTranspose2d (same arguments, parameters, init, state_dict and repr) whose
    transposed convolution runs on cnnops kernels.

    algo and backend are passed to cnnops.conv_transpose2d on every call; they are plain
    attributes, not part of the state_dict, as in cnnops.nn.Conv2d.
    """

    def __init__(self, *args, algo="auto", backend=None, **kwargs):
        super().__init__(*args, **kwargs)
        self.algo = algo
        self.backend = backend

    def forward(self, input, output_size=None):
        if self.padding_mode != "zeros":
            # As torch does (its __init__ already refuses other modes; this catches a changed
            # attribute).
            raise ValueError("Only `zeros` padding mode is supported for ConvTranspose2d")
        # torch's own helper: picks the output_padding that gives output_size, and checks it.
        output_padding = self._output_padding(
            input, output_size, self.stride, self.padding, self.kernel_size, 2, self.dilation
        )
        return conv_transpose2d(
            input,
            self.weight,
            self.bias,
            self.stride,
            self.padding,
            output_padding,
            self.groups,
            self.dilation,
            algo=self.algo,
            backend=self.backend,
        )

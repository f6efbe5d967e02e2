import os

import pytest
import torch

# Without a GPU the Triton kernels run in Triton's interpreter, on CPU tensors. It is chosen when
# a kernel is defined, so it is set before anything imports cnnops.kernels.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU: no GPU on this machine (run in the GPU lane)")
    for item in items:
        if "cuda" in item.keywords:
            item.add_marker(skip)

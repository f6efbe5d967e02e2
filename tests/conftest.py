import pytest
import torch


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU: no GPU on this machine (run in the GPU lane)")
    for item in items:
        if "cuda" in item.keywords:
            item.add_marker(skip)

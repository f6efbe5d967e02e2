"""cnnops.swap on timm models: outputs in eval mode (float32) and a training step (float64) match
the unswapped model's, and timm's Conv2dSame is left alone with the reason."""

import copy

import pytest
import timm
import timm.layers
import torch
from swap_checks import (
    IMAGE,
    assert_eval_float32_matches,
    assert_training_step_matches,
    calibrate_batch_norm,
    conv_names,
)

import cnnops

# Model name -> how many of its convs are timm's Conv2dSame. The "tf_" models copy
# TensorFlow's "SAME" padding: their stride-2 convs pad in forward(), by an amount that depends
# on the input size, so they are a Conv2dSame (a torch.nn.Conv2d subclass with its own forward)
# and their stride-1 convs plain torch.nn.Conv2d with fixed padding.
MODELS = {
    "resnet18": 0,
    "efficientnet_b0": 0,
    "tf_mobilenetv3_small_minimal_100": 5,
}

CONV2D_SAME_REASON = "subclass of torch.nn.Conv2d with its own forward"


def create(name, dtype=torch.float32):
    torch.manual_seed(0)
    return timm.create_model(name, pretrained=False).to(dtype)


def swap_and_check_report(model, name):
    """Swaps `model`; asserts that every plain torch.nn.Conv2d was swapped and every Conv2dSame
    left alone, as it was, with the reason. Returns how many Conv2dSame there are."""
    convs = conv_names(model)
    same = conv_names(model, timm.layers.Conv2dSame)
    assert len(same) == MODELS[name]
    assert all(
        type(m) in (torch.nn.Conv2d, timm.layers.Conv2dSame)
        for m in model.modules()
        if isinstance(m, torch.nn.Conv2d)
    )

    report = cnnops.swap(model)

    assert [row[0] for row in report.swapped] == convs
    assert report.left_alone == [
        (n, "timm.layers.conv2d_same.Conv2dSame", CONV2D_SAME_REASON) for n in same
    ]
    assert conv_names(model, cnnops.nn.Conv2d) == convs
    assert conv_names(model, timm.layers.Conv2dSame) == same
    assert conv_names(model) == []
    return len(same)


@pytest.mark.parametrize("name", MODELS)
def test_eval_float32_matches(name):
    torch.manual_seed(0)
    x = torch.randn(IMAGE)
    reference = create(name)
    calibrate_batch_norm(reference, x)
    model = copy.deepcopy(reference)
    same = swap_and_check_report(model, name)
    # The Conv2dSame layers still run torch's convolution, once each.
    assert_eval_float32_matches(model, reference, x, torch_calls=same)


@pytest.mark.parametrize("name", MODELS)
def test_train_float64_step_matches(name):
    reference = create(name, torch.float64).train()
    model = copy.deepcopy(reference)
    same = swap_and_check_report(model, name)
    torch.manual_seed(2)
    x = torch.randn(IMAGE, dtype=torch.float64)
    assert_training_step_matches(model, reference, x, torch_calls=same)

"""cnnops.swap on torchvision's classification models: a swapped model computes what the
unswapped one does, in eval mode (float32) and in a training step (float64: outputs, the
gradient of every parameter and the batch-norm running statistics). alexnet and vgg16_bn get a
narrower dense head (see _narrow_classifier); their convs are torchvision's.
"""

import copy

import pytest
import torch
import torchvision
from swap_checks import (
    IMAGE,
    assert_eval_float32_matches,
    assert_float64_match,
    assert_training_step_matches,
    calibrate_batch_norm,
    conv_names,
)

import cnnops

# Keyword arguments beyond weights=None. GoogLeNet asks for init_weights when built without
# weights (a FutureWarning otherwise); aux_logits=True keeps its two auxiliary heads, so their
# convs are swapped and their gradients compared too.
MODELS = {
    "resnet50": {},
    "resnext50_32x4d": {},
    "mobilenet_v2": {},
    "mobilenet_v3_large": {},
    "shufflenet_v2_x1_0": {},
    "efficientnet_b0": {},
    "googlenet": {"aux_logits": True, "init_weights": True},
    "densenet121": {},
    "vgg16_bn": {},
    "alexnet": {},
}


def _narrow_classifier(model, width=64):
    """Gives alexnet's and vgg's dense head hidden layers `width` wide instead of 4096. That
    head holds 58M of alexnet's 61M parameters and 120M of vgg16_bn's 138M and has no conv in
    it; in vgg's float64 training step, with gradients and a second copy, it would take 4 GB."""
    linears = [i for i, m in enumerate(model.classifier) if isinstance(m, torch.nn.Linear)]
    for i in linears:
        old = model.classifier[i]
        in_features = old.in_features if i == linears[0] else width
        out_features = old.out_features if i == linears[-1] else width
        model.classifier[i] = torch.nn.Linear(in_features, out_features)


def build(name, dtype=torch.float32):
    torch.manual_seed(0)
    model = getattr(torchvision.models, name)(weights=None, **MODELS[name])
    if name in ("alexnet", "vgg16_bn"):
        _narrow_classifier(model)
    return model.to(dtype)


def swap_and_check_report(model):
    """Swaps `model` in place; asserts that every torch.nn.Conv2d became a cnnops.nn.Conv2d
    and that nothing was left alone (these models hold no other module swap knows)."""
    convs = conv_names(model)
    assert convs
    report = cnnops.swap(model)
    assert [row[0] for row in report.swapped] == convs
    assert {row[1:] for row in report.swapped} == {("torch.nn.Conv2d", "cnnops.nn.Conv2d")}
    assert report.left_alone == []
    assert conv_names(model, cnnops.nn.Conv2d) == convs
    assert conv_names(model) == []
    return report


@pytest.mark.parametrize("name", MODELS)
def test_eval_float32_matches(name):
    torch.manual_seed(0)
    x = torch.randn(IMAGE)
    reference = build(name)
    calibrate_batch_norm(reference, x)
    model = copy.deepcopy(reference)
    swap_and_check_report(model)
    assert_eval_float32_matches(model, reference, x)


@pytest.mark.parametrize("name", MODELS)
def test_train_float64_step_matches(name):
    reference = build(name, torch.float64).train()
    model = copy.deepcopy(reference)
    swap_and_check_report(model)
    torch.manual_seed(2)
    x = torch.randn(IMAGE, dtype=torch.float64)
    assert_training_step_matches(model, reference, x)


def test_state_dict_round_trips_both_ways():
    # mobilenet_v3_large: depthwise convs and squeeze-excitation convs, unlike resnet18
    # (tests/nn/test_swap.py). Calibrated, so that the running statistics loaded are not the
    # defaults both models start with.
    torch.manual_seed(3)
    x = torch.randn(IMAGE, dtype=torch.float64)
    torch_model = build("mobilenet_v3_large", torch.float64)
    calibrate_batch_norm(torch_model, x)
    cnnops_model = torchvision.models.mobilenet_v3_large(weights=None).to(torch.float64).eval()
    swap_and_check_report(cnnops_model)
    assert list(cnnops_model.state_dict()) == list(torch_model.state_dict())
    assert not torch.equal(cnnops_model.features[0][0].weight, torch_model.features[0][0].weight)

    # torch -> cnnops: the swapped model computes what the torch model does.
    cnnops_model.load_state_dict(torch_model.state_dict(), strict=True)
    for key, value in torch_model.state_dict().items():
        assert torch.equal(cnnops_model.state_dict()[key], value), key
    with torch.no_grad():
        out, out_ref = cnnops_model(x), torch_model(x)
    assert_float64_match({"logits": out}, {"logits": out_ref}, "output")

    # cnnops -> torch, from changed values so that the load is seen.
    with torch.no_grad():
        for p in cnnops_model.parameters():
            p.normal_()
    fresh = build("mobilenet_v3_large", torch.float64)
    fresh.load_state_dict(cnnops_model.state_dict(), strict=True)
    assert list(fresh.state_dict()) == list(cnnops_model.state_dict())
    for key, value in cnnops_model.state_dict().items():
        assert torch.equal(fresh.state_dict()[key], value), key

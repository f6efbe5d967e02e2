"""cnnops.swap on a hand-written model with what torchvision's models lack: padding modes other
than zeros, convs nested in a ModuleDict of Sequentials, and a conv module shared by two
parents and called twice. Swapped, it computes what it did; unswapped, it is what it was."""

import copy

import torch
from swap_checks import (
    ConvCalls,
    assert_float64_match,
    assert_training_step_matches,
    conv_names,
)
from tolerance import assert_close_to_reference

import cnnops

# Input: odd sizes, so that the stride-2 conv's output and the paddings are not symmetric.
IMAGE = (2, 3, 11, 13)


class UserModel(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.reflect = torch.nn.Conv2d(3, 6, 3, padding=1, padding_mode="reflect")
        self.circular = torch.nn.Conv2d(
            6, 6, (3, 5), padding=(1, 2), padding_mode="circular", groups=2
        )
        self.replicate = torch.nn.Conv2d(
            6, 8, 3, stride=2, padding=2, dilation=2, padding_mode="replicate"
        )
        # Shared: a child of the model and of heads["a"], and called from both.
        self.tied = torch.nn.Conv2d(8, 8, 3, padding=1, bias=False)
        self.heads = torch.nn.ModuleDict(
            {
                "a": torch.nn.Sequential(
                    torch.nn.Conv2d(8, 8, 3, padding=1), torch.nn.ReLU(), self.tied
                ),
                "b": torch.nn.Sequential(torch.nn.Conv2d(8, 4, 1), torch.nn.Tanh()),
            }
        )

    def forward(self, x):
        x = self.replicate(self.circular(self.reflect(x)).relu())
        return self.heads["b"](self.tied(self.heads["a"](x)))


# Convs in named_modules() order, each under its first name ("heads.a.2" is "tied").
CONVS = ["reflect", "circular", "replicate", "tied", "heads.a.0", "heads.b.0"]
CONV_CALLS = 7  # the tied conv runs twice
# The longest dot product: the 3x3 convs over 8 channels.
REDUCTION = 8 * 3 * 3


def build(dtype=torch.float32, seed=0):
    torch.manual_seed(seed)
    return UserModel().to(dtype)


def swap_and_check(model):
    params = dict(model.named_parameters())
    report = cnnops.swap(model)
    assert [row[0] for row in report.swapped] == CONVS
    assert report.left_alone == []
    assert conv_names(model, cnnops.nn.Conv2d) == CONVS
    assert conv_names(model) == []
    # The tied conv is one module in both places, with the very Parameter it had.
    assert model.tied is model.heads["a"][2]
    assert model.tied.weight is params["tied.weight"]
    assert all(p is params[name] for name, p in model.named_parameters())
    assert list(dict(model.named_parameters())) == list(params)


def test_float32_matches_float64_reference():
    model = build()
    reference = build(torch.float64)
    swap_and_check(model)
    torch.manual_seed(1)
    x = torch.randn(IMAGE, dtype=torch.float64)
    with torch.no_grad(), ConvCalls() as calls:
        out = model(x.float())
    assert calls.cnnops_forward() == CONV_CALLS and calls.torch_forward() == 0
    with torch.no_grad():
        expected = reference(x)
    assert expected.abs().max() > 0.1  # tanh of O(1) values: a meaningful comparison
    assert_close_to_reference(out, expected, REDUCTION)


def test_train_float64_step_matches():
    reference = build(torch.float64)
    model = copy.deepcopy(reference)
    swap_and_check(model)
    torch.manual_seed(1)
    x = torch.randn(IMAGE, dtype=torch.float64)
    # Checks that the cnnops kernels ran all seven conv calls forward and backward, the output
    # and every gradient (the tied weight's sums its two uses).
    assert_training_step_matches(model, reference, x)


def test_unswap_restores_torch_modules():
    model = build()
    types = {name: type(m) for name, m in model.named_modules()}
    params = dict(model.named_parameters())
    swap_and_check(model)

    assert cnnops.unswap(model) == len(CONVS)  # the tied conv counts once

    assert {name: type(m) for name, m in model.named_modules()} == types
    assert model.tied is model.heads["a"][2]
    assert not hasattr(model.tied, "algo") and not hasattr(model.tied, "backend")
    assert all(p is params[name] for name, p in model.named_parameters())
    torch.manual_seed(1)
    x = torch.randn(IMAGE)
    with torch.no_grad(), ConvCalls() as calls:
        out = model(x)
    assert calls.cnnops_forward() == 0 and calls.torch_forward() == CONV_CALLS
    # Torch's own modules with the same parameters: the same result, bit for bit.
    with torch.no_grad():
        assert torch.equal(out, build()(x))


def test_state_dict_round_trips_both_ways():
    torch_model = build(torch.float64, seed=0)
    cnnops_model = build(torch.float64, seed=1)
    swap_and_check(cnnops_model)
    # The tied weight is saved under both of its names, by both models.
    keys = list(torch_model.state_dict())
    assert "tied.weight" in keys and "heads.a.2.weight" in keys
    assert list(cnnops_model.state_dict()) == keys
    assert not torch.equal(cnnops_model.reflect.weight, torch_model.reflect.weight)

    # torch -> cnnops: the swapped model then computes what the torch model does.
    cnnops_model.load_state_dict(torch_model.state_dict(), strict=True)
    for key, value in torch_model.state_dict().items():
        assert torch.equal(cnnops_model.state_dict()[key], value), key
    assert cnnops_model.tied is cnnops_model.heads["a"][2]
    x = torch.randn(IMAGE, dtype=torch.float64)
    with torch.no_grad():
        assert_float64_match({"out": cnnops_model(x)}, {"out": torch_model(x)}, "output")

    # cnnops -> torch.
    fresh = build(torch.float64, seed=2)
    assert not torch.equal(fresh.reflect.weight, cnnops_model.reflect.weight)
    fresh.load_state_dict(cnnops_model.state_dict(), strict=True)
    assert list(fresh.state_dict()) == keys
    for key, value in cnnops_model.state_dict().items():
        assert torch.equal(fresh.state_dict()[key], value), key
    with torch.no_grad():
        assert_float64_match({"out": fresh(x)}, {"out": cnnops_model(x)}, "output")

"""cnnops.nn.Conv2d is a drop-in torch.nn.Conv2d."""

import pytest
import torch

import cnnops


@pytest.mark.parametrize(
    "kwargs",
    [
        pytest.param(dict(in_channels=4, out_channels=8, kernel_size=3, padding=1), id="3x3"),
        pytest.param(
            dict(
                in_channels=8,
                out_channels=8,
                kernel_size=3,
                stride=2,
                padding=1,
                groups=4,
                bias=False,
            ),
            id="grouped-no-bias",
        ),
        pytest.param(
            dict(in_channels=4, out_channels=6, kernel_size=(3, 5), dilation=2, padding="same"),
            id="same-dilated",
        ),
        pytest.param(
            dict(in_channels=4, out_channels=4, kernel_size=3, padding=2, padding_mode="reflect"),
            id="reflect",
        ),
        pytest.param(
            dict(
                in_channels=4,
                out_channels=4,
                kernel_size=3,
                padding=(1, 2),
                padding_mode="circular",
            ),
            id="circular",
        ),
        pytest.param(
            dict(in_channels=4, out_channels=4, kernel_size=3, padding=1, padding_mode="replicate"),
            id="replicate",
        ),
    ],
)
def test_loads_torch_state_dict_and_matches(kwargs):
    torch.manual_seed(0)
    ref = torch.nn.Conv2d(**kwargs).double()
    ours = cnnops.nn.Conv2d(**kwargs).double()
    ours.load_state_dict(ref.state_dict())
    assert list(ours.state_dict()) == list(ref.state_dict())
    assert repr(ours) == repr(ref)
    x = torch.randn(2, kwargs["in_channels"], 11, 10, dtype=torch.float64, requires_grad=True)
    torch.testing.assert_close(ours(x), ref(x))
    g_ours = torch.autograd.grad(ours(x).square().sum(), [x, *ours.parameters()])
    g_ref = torch.autograd.grad(ref(x).square().sum(), [x, *ref.parameters()])
    for a, b in zip(g_ours, g_ref, strict=True):
        torch.testing.assert_close(a, b)
    # And back: torch's module loads ours.
    ref.load_state_dict(ours.state_dict())


def test_same_init_as_torch():
    torch.manual_seed(3)
    ref = torch.nn.Conv2d(16, 32, 3)
    torch.manual_seed(3)
    ours = cnnops.nn.Conv2d(16, 32, 3)
    torch.testing.assert_close(ours.weight, ref.weight, rtol=0, atol=0)
    torch.testing.assert_close(ours.bias, ref.bias, rtol=0, atol=0)
    assert isinstance(ours, torch.nn.Conv2d)


@pytest.mark.parametrize("algo", ["direct", "im2col"])
def test_algo_is_passed_through(algo):
    conv = cnnops.nn.Conv2d(3, 4, 3, algo=algo).double()
    x = torch.randn(1, 3, 8, 8, dtype=torch.float64)
    torch.testing.assert_close(conv(x), torch.nn.functional.conv2d(x, conv.weight, conv.bias))
    with pytest.raises(ValueError, match="unknown algo"):
        cnnops.nn.Conv2d(3, 4, 3, algo="fft").double()(x)

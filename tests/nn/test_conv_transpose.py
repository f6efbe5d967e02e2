"""cnnops.nn.ConvTranspose2d is a drop-in torch.nn.ConvTranspose2d."""

import pytest
import torch

import cnnops


@pytest.mark.parametrize(
    "kwargs",
    [
        pytest.param(dict(in_channels=4, out_channels=3, kernel_size=2, stride=2), id="unet-2x2"),
        pytest.param(
            dict(
                in_channels=8,
                out_channels=4,
                kernel_size=3,
                stride=2,
                padding=1,
                output_padding=1,
                groups=4,
                bias=False,
            ),
            id="grouped-no-bias",
        ),
        pytest.param(
            dict(
                in_channels=4,
                out_channels=6,
                kernel_size=(3, 5),
                padding=(1, 2),
                output_padding=1,
                dilation=2,
            ),
            id="dilated-op-ge-stride",
        ),
    ],
)
def test_loads_torch_state_dict_and_matches(kwargs):
    torch.manual_seed(0)
    ref = torch.nn.ConvTranspose2d(**kwargs).double()
    ours = cnnops.nn.ConvTranspose2d(**kwargs).double()
    ours.load_state_dict(ref.state_dict())
    assert list(ours.state_dict()) == list(ref.state_dict())
    assert repr(ours) == repr(ref)
    x = torch.randn(2, kwargs["in_channels"], 6, 5, dtype=torch.float64, requires_grad=True)
    torch.testing.assert_close(ours(x), ref(x))
    g_ours = torch.autograd.grad(ours(x).square().sum(), [x, *ours.parameters()])
    g_ref = torch.autograd.grad(ref(x).square().sum(), [x, *ref.parameters()])
    for a, b in zip(g_ours, g_ref, strict=True):
        torch.testing.assert_close(a, b)
    # And back: torch's module loads ours.
    ref.load_state_dict(ours.state_dict())


def test_same_init_as_torch():
    torch.manual_seed(3)
    ref = torch.nn.ConvTranspose2d(16, 8, 2, stride=2)
    torch.manual_seed(3)
    ours = cnnops.nn.ConvTranspose2d(16, 8, 2, stride=2)
    torch.testing.assert_close(ours.weight, ref.weight, rtol=0, atol=0)
    torch.testing.assert_close(ours.bias, ref.bias, rtol=0, atol=0)
    assert isinstance(ours, torch.nn.ConvTranspose2d)


@pytest.mark.parametrize("output_size", [(9, 11), [2, 4, 10, 12], torch.Size([10, 11])])
def test_output_size_picks_output_padding(output_size):
    """output_size (H, W), or with the batch and channel dims too, as torch's module takes it."""
    torch.manual_seed(0)
    ref = torch.nn.ConvTranspose2d(4, 3, 3, stride=2, padding=1).double()
    ours = cnnops.nn.ConvTranspose2d(4, 3, 3, stride=2, padding=1).double()
    ours.load_state_dict(ref.state_dict())
    x = torch.randn(2, 4, 5, 6, dtype=torch.float64)
    out = ours(x, output_size=output_size)
    assert tuple(out.shape[2:]) == tuple(output_size)[-2:]
    torch.testing.assert_close(out, ref(x, output_size=output_size))


def test_output_size_out_of_range_raises_as_torch():
    ours = cnnops.nn.ConvTranspose2d(4, 3, 3, stride=2, padding=1)
    with pytest.raises(ValueError, match="requested an output size of"):
        ours(torch.randn(1, 4, 5, 6), output_size=(12, 12))


def test_padding_mode_other_than_zeros_raises():
    with pytest.raises(ValueError, match='Only "zeros" padding mode'):
        cnnops.nn.ConvTranspose2d(4, 3, 3, padding_mode="reflect")
    conv = cnnops.nn.ConvTranspose2d(4, 3, 3)
    conv.padding_mode = "circular"
    with pytest.raises(ValueError, match="Only `zeros` padding mode"):
        conv(torch.randn(1, 4, 5, 5))


@pytest.mark.parametrize("algo", ["direct", "im2col"])
def test_algo_is_passed_through(algo):
    conv = cnnops.nn.ConvTranspose2d(3, 4, 3, stride=2, algo=algo).double()
    assert conv.algo == algo and conv.backend is None
    x = torch.randn(1, 3, 5, 5, dtype=torch.float64)
    ref = torch.nn.functional.conv_transpose2d(x, conv.weight, conv.bias, stride=2)
    torch.testing.assert_close(conv(x), ref)
    assert "algo" not in conv.state_dict()
    with pytest.raises(ValueError, match="unknown algo"):
        cnnops.nn.ConvTranspose2d(3, 4, 3, algo="fft").double()(x)
    with pytest.raises(RuntimeError, match="backend 'cuda' cannot run"):
        cnnops.nn.ConvTranspose2d(3, 4, 3, backend="cuda").double()(x)

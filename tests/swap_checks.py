"""The checks the swap tests in tests/models share: that a swapped model computes what the
unswapped one does (float32 eval outputs, a float64 training step), that cnnops ran its convs
(ConvCalls), and the batch-norm calibration that makes random-init models worth comparing."""

import collections

import torch
from torch.utils._python_dispatch import TorchDispatchMode

# Batch 2 of 64 x 64 images: the smallest size at which every model runs (alexnet's three
# pools need at least 63) and the last stages still have 2 x 2 maps. At 1 x 1 a training-mode
# batch norm normalises two numbers per channel to exactly +-1, which magnifies rounding so
# much (gradients differ by 1e-5 relative in float64) that no tight comparison could hold.
IMAGE = (2, 3, 64, 64)

# A float64 training step of the two models differs by rounding only, which batch norm's
# backward pass magnifies: up to ~1e-10 relative in the smallest gradients seen. Values
# compared against the largest value of their kind (all outputs, all gradients) get an absolute
# tolerance of FLOAT64_ATOL times it: some gradients are rounding noise around an exact zero
# (a batch norm's bias when another batch norm follows) and match only that way.
FLOAT64_RTOL = 1e-8
FLOAT64_ATOL = 1e-10

# The most a swapped float32 model's error against the float64 model may exceed the unswapped
# float32 model's error (see assert_eval_float32_matches).
FLOAT32_ERROR_RATIO = 4


class ConvCalls(TorchDispatchMode):
    """Counts, by op name, the convolutions that run under it, forward and backward: cnnops'
    ops (cnnops::conv2d, cnnops::_conv2d_backward) and torch's (aten::convolution, ...)."""

    def __init__(self):
        super().__init__()
        self.counts = collections.Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if "conv" in func.name():
            self.counts[func.name()] += 1
        return func(*args, **(kwargs or {}))

    def cnnops_forward(self):
        return self.counts["cnnops::conv2d"]

    def torch_forward(self):
        return self.counts["aten::convolution"]


def conv_names(model, cls=torch.nn.Conv2d):
    return [name for name, m in model.named_modules() if type(m) is cls]


def calibrate_batch_norm(model, x):
    """Sets every batch norm's running statistics to those of the batch `x`. A random model's
    fresh statistics (mean 0, variance 1) let eval-mode activations shrink layer after layer:
    googlenet's logits come out near 1e-12, and matching them would prove nothing."""
    norms = [m for m in model.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]
    momenta = [m.momentum for m in norms]
    for m in norms:
        m.reset_running_stats()
        m.momentum = None  # a cumulative average: after one batch, that batch's statistics
    model.train()
    with torch.no_grad():
        model(x)
    for m, momentum in zip(norms, momenta, strict=True):
        m.momentum = momentum
    model.eval()


def outputs(result):
    """A model's outputs as a tuple of tensors (googlenet returns a namedtuple in training)."""
    return tuple(result) if isinstance(result, tuple) else (result,)


def assert_float64_match(actual, expected, what):
    """Compares two {name: tensor} dicts of float64 results (exact for integer tensors)."""
    assert list(actual) == list(expected), f"{what}: names differ"
    scale = max(
        (t.abs().max().item() for t in expected.values() if t.is_floating_point()), default=1.0
    )
    assert scale > 0, f"{what}: all zero, the comparison would prove nothing"
    for name, a in actual.items():
        torch.testing.assert_close(
            a,
            expected[name],
            rtol=FLOAT64_RTOL,
            atol=FLOAT64_ATOL * scale,
            msg=lambda m, n=name: f"{what} {n}: {m}",
        )


def assert_eval_float32_matches(model, reference, x, torch_calls=0):
    """Compares the eval-mode float32 outputs of `model` (swapped) and `reference` for the
    input `x`, and checks that cnnops ran every conv but `torch_calls` (convs swap left alone).
    Turns `reference` into float64 (its float64 output is the exact answer)."""
    assert not model.training and not reference.training
    with torch.no_grad(), ConvCalls() as calls:
        out = model(x)
    with torch.no_grad(), ConvCalls() as calls_ref:
        out_ref = reference(x)
    with torch.no_grad():
        exact = reference.double()(x.double())

    assert calls.torch_forward() == torch_calls
    assert calls.cnnops_forward() == calls_ref.torch_forward() - torch_calls > 0
    scale = exact.abs().max().item()
    # The input reaches the output: the two images get different logits.
    assert (exact[0] - exact[1]).abs().max() > 1e-3 * scale
    # Rounding error piles up layer after layer, by an amount that depends on the network, so
    # the bound is torch's own float32 error against float64 (as the design's rule for float16):
    # ours is 0.7x to 1.9x it on these models; a wrong term anywhere would be 1e3x or more.
    error = (out.double() - exact).abs().max().item()
    torch_error = (out_ref.double() - exact).abs().max().item()
    eps = torch.finfo(torch.float32).eps
    assert error <= FLOAT32_ERROR_RATIO * torch_error + eps * scale, (
        f"cnnops float32 error {error:.3g}, torch's {torch_error:.3g} (largest logit {scale:.3g})"
    )


def train_step(model, x, seed=1):
    """One forward and backward pass under ConvCalls; returns (outputs, ConvCalls). The seed
    makes dropout and stochastic depth draw the same masks in both models."""
    torch.manual_seed(seed)
    with ConvCalls() as calls:
        result = outputs(model(x))
        sum(out.square().sum() for out in result).backward()
    return result, calls


def assert_training_step_matches(model, reference, x, torch_calls=0):
    """Runs one float64 training step of `model` (swapped) and `reference` and compares all it
    produces: outputs, the gradient of every parameter, every buffer. cnnops must have run
    every conv, forward and backward, but `torch_calls` (convs swap left alone)."""
    assert model.training and reference.training
    out, calls = train_step(model, x)
    out_ref, calls_ref = train_step(reference, x)

    assert calls.torch_forward() == torch_calls
    assert calls.cnnops_forward() == calls_ref.torch_forward() - torch_calls > 0
    assert calls.counts["cnnops::_conv2d_backward"] == calls.cnnops_forward()

    assert_float64_match(dict(enumerate(out)), dict(enumerate(out_ref)), "output")
    params, params_ref = dict(model.named_parameters()), dict(reference.named_parameters())
    for name, p in params_ref.items():
        assert p.grad is not None and params[name].grad is not None, f"{name}: no gradient"
    assert_float64_match(
        {n: p.grad for n, p in params.items()},
        {n: p.grad for n, p in params_ref.items()},
        "gradient of",
    )
    assert_float64_match(dict(model.named_buffers()), dict(reference.named_buffers()), "buffer")

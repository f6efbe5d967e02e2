"""cnnops.conv_transpose2d against torch.nn.functional.conv_transpose2d, on every CPU algorithm."""

import pytest
import torch
import torch.nn.functional as F
from conv_transpose2d_cases import (
    CASES,
    DEPTHWISE_CASES,
    LAYOUTS,
    case,
    check_against_torch,
    conv_args,
    make_problem,
)

import cnnops

CPU_ALGOS = ["direct", "im2col"]
# "auto" goes to the kernels, which choose per shape (conv2d's grad-input choice): test it like
# an algorithm of its own.
ALGOS_AND_AUTO = [*CPU_ALGOS, "auto"]


def by_id(cases, *ids):
    return [next(c for c in cases if c.id == i) for i in ids]


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("algo", ALGOS_AND_AUTO)
@pytest.mark.parametrize("spec", CASES)
def test_forward_and_gradients_match_torch(spec, algo, layout):
    check_against_torch(
        lambda x, w, b: cnnops.conv_transpose2d(x, w, b, **conv_args(spec), algo=algo),
        spec,
        layout=layout,
    )


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("spec", DEPTHWISE_CASES)
def test_depthwise_algo_matches_torch(spec, layout):
    """algo="depthwise": conv2d's depthwise grad input (in channels_last with one filter per
    channel the NHWC kernels, at stride 1 the forward kernel on the flipped weight)."""
    for dtype in (torch.float32, torch.float64):
        check_against_torch(
            lambda x, w, b: cnnops.conv_transpose2d(x, w, b, **conv_args(spec), algo="depthwise"),
            spec,
            dtype,
            layout,
        )


@pytest.mark.parametrize("layout", ["nchw", "channels_last"])
@pytest.mark.parametrize("algo", ALGOS_AND_AUTO)
@pytest.mark.parametrize(
    "spec", by_id(CASES, "3x3-s2-op1", "op-ge-stride-s2", "groups4-s2", "depthwise", "asymmetric")
)
def test_float64_matches_torch_tightly(spec, algo, layout):
    x, w, b = make_problem(spec, torch.float64, layout)
    params = [t.requires_grad_() for t in (x, w, b)]
    out = cnnops.conv_transpose2d(x, w, b, **conv_args(spec), algo=algo)
    ref = F.conv_transpose2d(x, w, b, **conv_args(spec))
    torch.testing.assert_close(out, ref)
    grad = torch.randn_like(ref)
    for got, want in zip(
        torch.autograd.grad(out, params, grad), torch.autograd.grad(ref, params, grad), strict=True
    ):
        torch.testing.assert_close(got, want)


# Few channels: gradcheck perturbs every element of every input.
GRADCHECK_CASES = [
    case(1, 3, 3, 3, 2, 3, stride=2, padding=1, output_padding=1, id="3x3-s2-op1"),
    case(1, 2, 3, 3, 2, 2, stride=2, output_padding=2, dilation=3, id="op-ge-stride-s2"),
    case(1, 4, 3, 3, 2, 3, stride=2, padding=1, groups=2, id="groups2"),
    case(1, 3, 3, 3, 3, 3, padding=1, groups=3, id="depthwise"),
]


@pytest.mark.parametrize("algo", ALGOS_AND_AUTO)
@pytest.mark.parametrize("spec", GRADCHECK_CASES)
def test_gradcheck_float64(spec, algo):
    x, w, b = make_problem(spec, torch.float64)
    inputs = [t.requires_grad_() for t in (x, w, b)]

    def fn(x, w, b):
        return cnnops.conv_transpose2d(x, w, b, **conv_args(spec), algo=algo)

    assert torch.autograd.gradcheck(fn, inputs, eps=1e-6, atol=1e-5)


def test_only_needed_gradients_are_computed():
    """Each gradient alone (the others not requiring grad) is right; the ops it needs run."""
    spec = by_id(CASES, "op-ge-stride-s2")[0].values[0]
    x, w, b = make_problem(spec, torch.float64)
    ref_args = [t.clone().requires_grad_() for t in (x, w, b)]
    ref = F.conv_transpose2d(*ref_args, **conv_args(spec))
    grad = torch.randn_like(ref)
    ref_grads = torch.autograd.grad(ref, ref_args, grad)
    for i in range(3):
        args = [t.clone().requires_grad_(j == i) for j, t in enumerate((x, w, b))]
        out = cnnops.conv_transpose2d(*args, **conv_args(spec))
        (got,) = torch.autograd.grad(out, [args[i]], grad)
        torch.testing.assert_close(got, ref_grads[i])


def test_autograd_only_where_a_gradient_can_flow():
    x, w, b = make_problem(CASES[4].values[0], torch.float32)
    ref = F.conv_transpose2d(x, w, b, **conv_args(CASES[4].values[0]))
    w.requires_grad_()
    with_grad = cnnops.conv_transpose2d(x, w, b, **conv_args(CASES[4].values[0]))
    assert with_grad.grad_fn is not None
    with torch.no_grad():
        no_grad = cnnops.conv_transpose2d(x, w, b, **conv_args(CASES[4].values[0]))
    assert no_grad.grad_fn is None and not no_grad.requires_grad
    for out in (with_grad, no_grad):
        torch.testing.assert_close(out, ref, atol=1e-4, rtol=1e-4)


def test_batch0_gradients_are_zero():
    x = torch.randn(0, 4, 5, 5, requires_grad=True)
    w = torch.randn(4, 3, 3, 3, requires_grad=True)
    b = torch.randn(3, requires_grad=True)
    for algo in ALGOS_AND_AUTO:
        out = cnnops.conv_transpose2d(x, w, b, 2, 1, 1, algo=algo)
        assert out.shape == (0, 3, 10, 10)
        gx, gw, gb = torch.autograd.grad(out.sum(), (x, w, b))
        assert gx.shape == x.shape and gw.abs().sum() == 0 and gb.abs().sum() == 0


def test_positional_signature_as_torch():
    """(input, weight, bias, stride, padding, output_padding, groups, dilation), ints or pairs."""
    x = torch.randn(2, 4, 5, 5, dtype=torch.float64)
    w = torch.randn(4, 3, 3, 3, dtype=torch.float64)
    for args in ((2, 1, 1, 2, 2), ([2], (1, 1), [1, 0], 2, (2, 1)), (1, 0, 0, 1, 1)):
        b = torch.randn(3 * args[3], dtype=torch.float64)
        torch.testing.assert_close(
            cnnops.conv_transpose2d(x, w, b, *args), F.conv_transpose2d(x, w, b, *args)
        )


@pytest.mark.parametrize("algo", ALGOS_AND_AUTO)
def test_opcheck(algo):
    x, w, b = make_problem(by_id(CASES, "asymmetric")[0].values[0], torch.float32)
    x, w, b = (t.requires_grad_() for t in (x, w, b))
    op = torch.ops.cnnops.conv_transpose2d.default
    torch.library.opcheck(op, (x, w, b, [2, 1], [1, 2], [1, 0], [1, 2], 1, algo))
    # output_padding >= stride (extra rows), channels_last, no bias.
    xl = x.detach().contiguous(memory_format=torch.channels_last).requires_grad_()
    torch.library.opcheck(op, (xl, w, None, [1, 2], [0, 1], [1, 1], [2, 2], 1, algo))


@pytest.mark.parametrize("layout", ["nchw", "channels_last"])
def test_opcheck_depthwise(layout):
    spec = by_id(DEPTHWISE_CASES, "dw-16ch-s2")[0].values[0]
    x, w, b = (t.requires_grad_() for t in make_problem(spec, torch.float32, layout))
    args = (x, w, b, [2, 2], [1, 1], [1, 1], [1, 1], 16, "depthwise")
    torch.library.opcheck(torch.ops.cnnops.conv_transpose2d.default, args)


def test_torch_compile_fullgraph():
    spec = by_id(CASES, "groups4-s2")[0].values[0]
    x, w, b = make_problem(spec, torch.float32)

    @torch.compile(fullgraph=True, backend="inductor")
    def block(x, w, b):
        return torch.relu(cnnops.conv_transpose2d(x, w, b, **conv_args(spec))) * 2

    ref = torch.relu(F.conv_transpose2d(x, w, b, **conv_args(spec))) * 2
    torch.testing.assert_close(block(x, w, b), ref, atol=1e-5, rtol=1e-5)


def test_torch_compile_backward():
    spec = by_id(CASES, "op-ge-stride")[0].values[0]
    x, w, b = make_problem(spec, torch.float32)
    x.requires_grad_()
    w.requires_grad_()

    @torch.compile(fullgraph=True, backend="aot_eager")
    def loss(x, w, b):
        return cnnops.conv_transpose2d(x, w, b, **conv_args(spec)).square().sum()

    gx, gw = torch.autograd.grad(loss(x, w, b), (x, w))
    rx, rw = torch.autograd.grad(
        F.conv_transpose2d(x, w, b, **conv_args(spec)).square().sum(), (x, w)
    )
    torch.testing.assert_close(gx, rx, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(gw, rw, atol=1e-3, rtol=1e-4)


def test_torch_export():
    model = torch.nn.Sequential(cnnops.nn.ConvTranspose2d(4, 3, 2, stride=2), torch.nn.ReLU())
    x = torch.randn(2, 4, 5, 5)
    exported = torch.export.export(model, (x,))
    assert any(
        node.target is torch.ops.cnnops.conv_transpose2d.default for node in exported.graph.nodes
    )
    torch.testing.assert_close(exported.module()(x), model(x))


# ---- bad input: a clear exception, raised before any kernel runs ----


def _x():
    return torch.randn(2, 4, 5, 5)


def _w(c_in=4, c_out=3, r=3):
    return torch.randn(c_in, c_out, r, r)


def _call(**kwargs):
    args = dict(input=_x(), weight=_w())
    args.update(kwargs)
    return lambda: cnnops.conv_transpose2d(**args)


BAD_INPUTS = [
    pytest.param(_call(input=torch.randn(4, 5, 5)), ValueError, "input must be 4-D", id="rank"),
    pytest.param(
        _call(weight=torch.randn(4, 3, 3)), ValueError, "weight must be 4-D", id="weight-rank"
    ),
    pytest.param(
        _call(input=_x().long(), weight=_w().long()),
        TypeError,
        "floating-point",
        id="integer-dtype",
    ),
    pytest.param(_call(weight=_w().double()), TypeError, "weight dtype", id="dtype-mismatch"),
    pytest.param(
        _call(bias=torch.randn(3).double()), TypeError, "bias dtype", id="bias-dtype-mismatch"
    ),
    pytest.param(_call(bias=torch.randn(4)), ValueError, "bias must have shape", id="bias-shape"),
    pytest.param(
        _call(weight=_w().to("meta")),
        ValueError,
        "weight is on meta but input is on cpu",
        id="device-mismatch",
    ),
    pytest.param(
        _call(weight=_w(c_in=6)),
        ValueError,
        "weight.size(0) (6) must equal the input channels",
        id="channels-mismatch",
    ),
    pytest.param(
        _call(groups=3, weight=torch.randn(4, 1, 3, 3)),
        ValueError,
        "groups (3) must divide the input channels",
        id="groups-not-dividing-cin",
    ),
    pytest.param(_call(groups=0), ValueError, "groups must be >= 1", id="groups-zero"),
    pytest.param(_call(groups=1.0), TypeError, "groups must be an int", id="groups-float"),
    pytest.param(_call(stride=0), ValueError, "stride must be >= 1", id="stride-zero"),
    pytest.param(_call(padding=-1), ValueError, "padding must be >= 0", id="padding-negative"),
    pytest.param(
        _call(output_padding=-1), ValueError, "output_padding must be >= 0", id="op-negative"
    ),
    pytest.param(_call(dilation=0), ValueError, "dilation must be >= 1", id="dilation-zero"),
    pytest.param(
        _call(stride=2, output_padding=2),
        ValueError,
        "output_padding must be smaller than stride or dilation",
        id="op-not-smaller-than-stride",
    ),
    pytest.param(
        _call(stride=(2, 1), output_padding=(1, 1), dilation=(1, 1)),
        ValueError,
        "output_padding must be smaller than stride or dilation",
        id="op-not-smaller-in-width",
    ),
    pytest.param(
        _call(padding=5), ValueError, "output size (-3 x -3) must be positive", id="output-empty"
    ),
    pytest.param(
        _call(weight=torch.randn(4, 0, 3, 3)),
        ValueError,
        "no zero-sized dimension",
        id="weight-empty",
    ),
    pytest.param(
        _call(input=torch.randn(2, 4, 0, 5)),
        ValueError,
        "non-zero channels, height and width",
        id="input-empty",
    ),
    pytest.param(_call(padding="same"), TypeError, "pair of ints", id="padding-string"),
    pytest.param(_call(stride=(1, 2, 3)), TypeError, "pair of ints", id="stride-triple"),
    pytest.param(_call(algo="winograd"), ValueError, "unknown algo", id="unknown-algo"),
    pytest.param(
        _call(algo="implicit_gemm"),
        ValueError,
        "not available on the cpu backend",
        id="algo-not-on-backend",
    ),
    pytest.param(
        _call(algo="depthwise"),
        ValueError,
        "algo 'depthwise' needs a depthwise layer (groups == output channels",
        id="depthwise-algo-on-dense-layer",
    ),
    pytest.param(_call(backend="opencl"), ValueError, "unknown backend", id="unknown-backend"),
    pytest.param(
        _call(backend="cuda"), RuntimeError, "backend 'cuda' cannot run", id="backend-device"
    ),
    pytest.param(_call(input=_x().numpy()), TypeError, "input must be a Tensor", id="not-a-tensor"),
]


@pytest.mark.parametrize("call,error,message", BAD_INPUTS)
def test_bad_input_raises_clear_error(call, error, message):
    with pytest.raises(error, match=_escape(message)) as raised:
        call()
    if "unknown backend" not in message:  # (_backend's message names the argument, not the op)
        assert "conv_transpose2d" in str(raised.value)


def _escape(message):
    return message.replace("(", r"\(").replace(")", r"\)")


def raw_args(x_shape=(2, 4, 5, 5), w_shape=(4, 3, 3, 3), **kwargs):
    """Arguments of torch.ops.cnnops.conv_transpose2d; kwargs override them."""
    args = dict(
        input=torch.randn(x_shape),
        weight=torch.randn(w_shape),
        bias=None,
        stride=[1, 1],
        padding=[0, 0],
        output_padding=[0, 0],
        dilation=[1, 1],
        groups=1,
        algo="direct",
    )
    args.update(kwargs)
    return tuple(args.values())


@pytest.mark.parametrize(
    "args,message",
    [
        pytest.param(raw_args(w_shape=(5, 3, 3, 3)), "weight.size(0) (5)", id="channels"),
        pytest.param(raw_args(stride=[0, 1]), "stride must be >= 1", id="stride"),
        pytest.param(
            raw_args(stride=[2, 2], output_padding=[0, 2]),
            "output_padding must be smaller than stride or dilation",
            id="output-padding",
        ),
        pytest.param(raw_args(padding=[4, 0]), "output size (-1 x 7)", id="output-size"),
        pytest.param(raw_args(groups=3), "groups (3) must divide", id="groups"),
        pytest.param(raw_args(bias=torch.randn(4)), "bias must have shape (3,)", id="bias"),
        pytest.param(raw_args(algo="fft"), "algo 'fft' is not available", id="algo"),
        pytest.param(
            raw_args(algo="depthwise"), "algo 'depthwise' needs a depthwise layer", id="depthwise"
        ),
        pytest.param(
            raw_args(input=torch.randn(2, 4, 5, 5).half(), weight=torch.randn(4, 3, 3, 3).half()),
            "float32 or float64",
            id="half-on-cpu",
        ),
    ],
)
def test_raw_op_checks_its_arguments(args, message):
    """torch.ops.cnnops.conv_transpose2d called directly, skipping the Python checks, still
    raises."""
    with pytest.raises(RuntimeError, match=_escape(message)):
        torch.ops.cnnops.conv_transpose2d(*args)

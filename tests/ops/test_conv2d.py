"""cnnops.conv2d against torch.nn.functional.conv2d in float64, on every CPU algorithm."""

import pytest
import torch
import torch.nn.functional as F
from conv2d_cases import (
    CASES,
    DEPTHWISE_CASES,
    LAYOUTS,
    check_against_torch,
    conv_args,
    make_problem,
)
from tolerance import assert_close_to_reference

import cnnops

CPU_ALGOS = ["direct", "im2col"]
# "auto" is passed to the kernels, which choose per pass (direct forward, im2col backward for
# grouped convolutions): test it like an algorithm of its own.
ALGOS_AND_AUTO = [*CPU_ALGOS, "auto"]


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("algo", ALGOS_AND_AUTO)
@pytest.mark.parametrize("spec", CASES)
def test_forward_and_gradients_match_torch(spec, algo, layout):
    check_against_torch(
        lambda x, w, b: cnnops.conv2d(x, w, b, **conv_args(spec), algo=algo), spec, layout=layout
    )


@pytest.mark.parametrize("algo", CPU_ALGOS)
@pytest.mark.parametrize("spec", [CASES[i] for i in (2, 6, 9, 12, 13, 15, 21)])
def test_gradcheck_float64(spec, algo):
    small = dict(spec, n=min(spec["n"], 1))
    x, w, b = make_problem(small, torch.float64)
    inputs = [t.requires_grad_() for t in (x, w, b) if t is not None]

    def fn(*args):
        return cnnops.conv2d(
            args[0], args[1], args[2] if b is not None else None, **conv_args(small), algo=algo
        )

    assert torch.autograd.gradcheck(fn, inputs, eps=1e-6, atol=1e-5)


@pytest.mark.parametrize("algo", CPU_ALGOS)
def test_float64_matches_torch_tightly(algo):
    spec = CASES[4].values[0]
    x, w, b = make_problem(spec, torch.float64)
    torch.testing.assert_close(
        cnnops.conv2d(x, w, b, **conv_args(spec), algo=algo), F.conv2d(x, w, b, **conv_args(spec))
    )


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("stride,padding", [(1, 0), (1, 1), (2, 0), (2, 1), (2, 2), (3, 1)])
@pytest.mark.parametrize("outputs_per_group", [2, 8])
def test_direct_forward_every_row_width(outputs_per_group, stride, padding, dtype):
    """The direct forward copies input rows with vectors of the widest size that fits each row,
    the last aligned to the row's end; stride 2 splits even and odd columns. Widths around every
    vector size (and odd ones, whose last column the split handles apart) must all be right.
    The widths also end the output planes in tails of every size: with 8 outputs per group the
    AVX-512 kernel runs 32- or 48-wide tiles and covers a plane's tail with a 16-, 32- or 48-wide
    one."""
    for width in (1, 2, 3, 4, 5, 7, 8, 9, 15, 16, 17, 31, 32, 33, 34, 63, 64, 65, 66, 97):
        x = torch.randn(2, 4, 5, width, dtype=dtype)
        w = torch.randn(2 * outputs_per_group, 2, 3, 3, dtype=dtype)
        if (width + 2 * padding - 3) // stride + 1 < 1:
            continue
        out = cnnops.conv2d(x, w, None, stride, padding, 1, 2, algo="direct")
        ref = F.conv2d(x.double(), w.double(), None, stride, padding, 1, 2)
        assert_close_to_reference(out, ref, 2 * 9, f"output (width {width})")


@pytest.mark.parametrize("channels_per_group", [1, 3, 16, 17])
@pytest.mark.parametrize(
    "size,stride,padding,dilation",
    [
        ((7, 7), 1, 1, 1),  # ResNeXt's layer 4: one 2-row tile pair, an odd last row
        ((14, 14), 2, 1, 1),  # its stride-2 layer
        ((14, 14), 1, 1, 1),  # two tiles of 7 columns per row
        ((13, 11), 2, 1, 1),  # 7 x 6 output: the last tile's column outside the plane is dropped
        ((6, 13), 1, 1, 1),  # 13 columns: a full tile, then 6 of 7
        ((2, 9), 1, 1, 1),  # 2 rows of 9 columns
        ((7, 7), 1, 2, 2),  # dilated
        ((5, 5), 1, 1, 1),  # fewer columns than a tile
    ],
)
def test_direct_forward_channel_tiles(size, stride, padding, dilation, channels_per_group):
    """With 32 or 64 outputs per group on small planes, the AVX-512 direct forward vectorises over
    32 output channels in tiles of 2 rows x 7 columns (use_channel_tiles); these planes all take
    that path on such a CPU, and are correct on any. Tap counts below, at and past the 16-tap
    squares of the weight repack."""
    for outputs_per_group, bias in ((32, True), (64, False)):
        x = torch.randn(3, 2 * channels_per_group, *size)
        w = torch.randn(2 * outputs_per_group, channels_per_group, 3, 3)
        b = torch.randn(2 * outputs_per_group) if bias else None
        args = (stride, padding, dilation, 2)
        out = cnnops.conv2d(x, w, b, *args, algo="direct")
        ref = F.conv2d(x.double(), w.double(), None if b is None else b.double(), *args)
        label = f"output ({outputs_per_group} per group)"
        assert_close_to_reference(out, ref, channels_per_group * 9, label)


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("spec", DEPTHWISE_CASES)
def test_depthwise_algo_matches_torch(spec, layout):
    """algo="depthwise": in channels_last the NHWC kernel (vectors over channels, with blocks of
    4 vectors, single vectors and scalar channels for the rest), in NCHW the direct kernel; the
    backward passes are the direct ones. A channel multiplier goes through NCHW."""
    for dtype in (torch.float32, torch.float64):
        check_against_torch(
            lambda x, w, b: cnnops.conv2d(x, w, b, **conv_args(spec), algo="depthwise"),
            spec,
            dtype,
            layout,
        )


def test_depthwise_gradcheck_channels_last():
    x = torch.randn(1, 5, 6, 7, dtype=torch.float64).contiguous(memory_format=torch.channels_last)
    w = torch.randn(5, 1, 3, 3, dtype=torch.float64)
    b = torch.randn(5, dtype=torch.float64)
    inputs = [t.requires_grad_() for t in (x, w, b)]
    fn = lambda x, w, b: cnnops.conv2d(x, w, b, 2, 1, 1, 5, algo="depthwise")  # noqa: E731
    assert torch.autograd.gradcheck(fn, inputs, eps=1e-6, atol=1e-5)


@pytest.mark.parametrize(
    "shape,k,stride,padding,dilation,dtype",
    [
        ((2, 4, 520, 520), 2, 1, 1, 1, torch.float32),  # tiles of whole rows, several per sample
        ((1, 4, 1030, 1030), 3, 2, 1, 1, torch.float32),  # strided taps
        ((1, 3, 400, 400), 2, 1, 2, 2, torch.float64),  # dilated; float64's larger elements
        ((1, 8, 32, 4200), 2, 1, 1, 1, torch.float32),  # one row is wider than a tile
    ],
)
def test_im2col_forward_in_cache_tiles(shape, k, stride, padding, dilation, dtype):
    """A dense NCHW forward whose column matrix would exceed the 32 MB column buffer runs in
    cache-sized tiles (conv2d_im2col_forward_tiled). The named cases are too small to reach it,
    except through 2-D padding blocks ("aspp-blocks-dense"); these are just large enough."""
    x = torch.randn(shape, dtype=dtype)
    w = torch.randn(k, shape[1], 3, 3, dtype=dtype)
    b = torch.randn(k, dtype=dtype)
    out = cnnops.conv2d(x, w, b, stride, padding, dilation, algo="im2col")
    ref = F.conv2d(x.double(), w.double(), b.double(), stride, padding, dilation)
    assert_close_to_reference(out, ref, shape[1] * 9)


@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("inference_mode", [False, True])
def test_auto_tiles_from_one_tile_of_output_pixels(bias, inference_mode):
    """algo="auto" tiles a dense NCHW layer once a sample's output fills a tile (48 x 48 >= 2048
    pixels), also under torch.inference_mode(), whose state the tiles' worker threads must carry
    (an in-place op on an inference tensor outside it raises)."""
    x = torch.randn(2, 24, 48, 48)
    w = torch.randn(8, 24, 3, 3)
    b = torch.randn(8) if bias else None
    with torch.inference_mode(inference_mode):
        out = cnnops.conv2d(x, w, b, 1, 1)
    ref = F.conv2d(x.double(), w.double(), None if b is None else b.double(), 1, 1)
    assert_close_to_reference(out, ref, 24 * 9)


def test_autograd_only_where_a_gradient_can_flow():
    """Calls that need no gradient skip the autograd kernel; those that do get a grad_fn."""
    x, w, b = make_problem(CASES[2].values[0], torch.float32)
    w.requires_grad_()
    ref = F.conv2d(x, w, b, padding=1)
    with_grad = cnnops.conv2d(x, w, b, padding=1)
    assert with_grad.grad_fn is not None
    with torch.no_grad():
        no_grad = cnnops.conv2d(x, w, b, padding=1)
    with torch.inference_mode():
        inference = cnnops.conv2d(x, w, b, padding=1)
    plain = cnnops.conv2d(x, w.detach(), b, padding=1)
    for out in (no_grad, inference, plain):
        assert out.grad_fn is None and not out.requires_grad
    for out in (with_grad, no_grad, inference, plain):
        torch.testing.assert_close(out, ref, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize(
    "c_in,c_out,stride,padding,dilation,size",
    [(128, 128, 1, 1, 1, 7), (128, 256, 2, 1, 1, 9), (64, 64, 1, 2, 2, 8), (64, 128, 3, 0, 1, 11)],
)
def test_grouped_grad_weight_every_tile_shape(c_in, c_out, stride, padding, dilation, size, dtype):
    """algo="auto" reduces a grouped grad weight in register tiles of 4 output channels x 6 taps
    (1 x 12 when a group has fewer than 4 outputs) over the polyphase copies; 64 groups make it
    run whatever the thread count, and odd tap counts leave remainders."""
    groups = 64
    x = torch.randn(3, c_in, size, size, dtype=dtype)
    w = torch.randn(c_out, c_in // groups, 3, 3, dtype=dtype)
    args = ([stride] * 2, [padding] * 2, [dilation] * 2, groups)
    go = torch.randn_like(F.conv2d(x, w, None, *args))
    _, gw, _ = torch.ops.cnnops._conv2d_backward(go, x, w, *args, "auto", [False, True, False])
    x64, w64 = x.double(), w.double().requires_grad_()
    (ref,) = torch.autograd.grad(F.conv2d(x64, w64, None, *args), w64, go.double())
    assert_close_to_reference(gw, ref, 3 * go.shape[2] * go.shape[3], "grad_weight")


def test_batch0_gradients_are_zero():
    x = torch.randn(0, 4, 9, 9, requires_grad=True)
    w = torch.randn(5, 4, 3, 3, requires_grad=True)
    b = torch.randn(5, requires_grad=True)
    for algo in CPU_ALGOS:
        out = cnnops.conv2d(x, w, b, padding=1, algo=algo)
        assert out.shape == (0, 5, 9, 9)
        gx, gw, gb = torch.autograd.grad(out.sum(), (x, w, b))
        assert gx.shape == x.shape and gw.abs().sum() == 0 and gb.abs().sum() == 0


@pytest.mark.parametrize("padding", ["same", "valid"])
@pytest.mark.parametrize("kernel,dilation", [(3, 1), (4, 1), (4, 3), ((2, 5), (2, 1))])
@pytest.mark.filterwarnings("ignore:Using padding='same':UserWarning")  # torch's own, the reference
def test_string_padding(padding, kernel, dilation):
    kh, kw = (kernel, kernel) if isinstance(kernel, int) else kernel
    x = torch.randn(2, 3, 11, 12, dtype=torch.float64)
    w = torch.randn(4, 3, kh, kw, dtype=torch.float64)
    for algo in CPU_ALGOS:
        torch.testing.assert_close(
            cnnops.conv2d(x, w, None, 1, padding, dilation, algo=algo),
            F.conv2d(x, w, None, 1, padding, dilation),
        )


def test_auto_algo_and_positional_signature():
    x, w, b = make_problem(CASES[2].values[0], torch.float64)
    torch.testing.assert_close(cnnops.conv2d(x, w, b, 1, 1, 1, 1), F.conv2d(x, w, b, 1, 1, 1, 1))
    torch.testing.assert_close(cnnops.conv2d(x, w, b, [1], (1, 1)), F.conv2d(x, w, b, [1], (1, 1)))


@pytest.mark.parametrize("algo", ALGOS_AND_AUTO)
def test_opcheck(algo):
    x, w, b = make_problem(CASES[13].values[0], torch.float32)
    x.requires_grad_()
    w.requires_grad_()
    b.requires_grad_()
    torch.library.opcheck(
        torch.ops.cnnops.conv2d.default, (x, w, b, [1, 2], [2, 1], [2, 1], 1, algo)
    )
    xl = x.detach().contiguous(memory_format=torch.channels_last).requires_grad_()
    torch.library.opcheck(
        torch.ops.cnnops.conv2d.default, (xl, w, None, [2, 2], [1, 1], [1, 1], 1, algo)
    )


@pytest.mark.parametrize("layout", ["nchw", "channels_last"])
def test_opcheck_depthwise(layout):
    spec = next(c.values[0] for c in DEPTHWISE_CASES if c.id == "dw-32ch")
    x, w, b = make_problem(spec, torch.float32, layout)
    args = (x.requires_grad_(), w.requires_grad_(), b.requires_grad_(), [1, 1], [1, 1], [1, 1])
    torch.library.opcheck(torch.ops.cnnops.conv2d.default, (*args, 32, "depthwise"))


def test_torch_compile_fullgraph():
    x, w, b = make_problem(CASES[9].values[0], torch.float32)

    @torch.compile(fullgraph=True, backend="inductor")
    def block(x, w, b):
        return torch.relu(cnnops.conv2d(x, w, b, padding=1, groups=4)) * 2

    torch.testing.assert_close(
        block(x, w, b), torch.relu(F.conv2d(x, w, b, padding=1, groups=4)) * 2, atol=1e-5, rtol=1e-5
    )


def test_torch_compile_sees_use_backend_changes():
    """A compiled call re-reads use_backend(): a block that names an unusable backend raises."""
    x, w, b = make_problem(CASES[2].values[0], torch.float32)
    block = torch.compile(
        lambda x, w, b: cnnops.conv2d(x, w, b, padding=1), fullgraph=True, backend="aot_eager"
    )
    with cnnops.use_backend("cpu"):
        torch.testing.assert_close(
            block(x, w, b), F.conv2d(x, w, b, padding=1), atol=1e-4, rtol=1e-4
        )
    with cnnops.use_backend("cuda"), pytest.raises(Exception, match="backend 'cuda' cannot run"):
        block(x, w, b)


def test_torch_compile_backward():
    x, w, b = make_problem(CASES[2].values[0], torch.float32)
    x.requires_grad_()
    w.requires_grad_()

    @torch.compile(fullgraph=True, backend="aot_eager")
    def loss(x, w, b):
        return cnnops.conv2d(x, w, b, padding=1).square().sum()

    gx, gw = torch.autograd.grad(loss(x, w, b), (x, w))
    rx, rw = torch.autograd.grad(F.conv2d(x, w, b, padding=1).square().sum(), (x, w))
    torch.testing.assert_close(gx, rx, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(gw, rw, atol=1e-3, rtol=1e-4)


# ---- bad input: a clear exception, raised before any kernel runs ----


def _x():
    return torch.randn(2, 4, 9, 9)


def _w(k=6, c=4, r=3):
    return torch.randn(k, c, r, r)


BAD_INPUTS = [
    pytest.param(
        lambda: cnnops.conv2d(torch.randn(4, 9, 9), _w()),
        ValueError,
        "input must be 4-D",
        id="input-rank",
    ),
    pytest.param(
        lambda: cnnops.conv2d(_x(), torch.randn(6, 4, 3)),
        ValueError,
        "weight must be 4-D",
        id="weight-rank",
    ),
    pytest.param(
        lambda: cnnops.conv2d(_x().long(), _w().long()),
        TypeError,
        "floating-point",
        id="integer-dtype",
    ),
    pytest.param(
        lambda: cnnops.conv2d(_x(), _w().double()), TypeError, "weight dtype", id="dtype-mismatch"
    ),
    pytest.param(
        lambda: cnnops.conv2d(_x(), _w(), torch.randn(6).double()),
        TypeError,
        "bias dtype",
        id="bias-dtype",
    ),
    pytest.param(
        lambda: cnnops.conv2d(_x(), _w(), torch.randn(5)),
        RuntimeError,
        "bias must have shape",
        id="bias-shape",
    ),
    pytest.param(
        lambda: cnnops.conv2d(_x(), _w(), None, 1, 0, 1, 1, algo="im2col", backend="cuda"),
        RuntimeError,
        "backend 'cuda' cannot run",
        id="backend-device",
    ),
    pytest.param(
        lambda: cnnops.conv2d(_x(), _w().to("meta")),
        ValueError,
        "weight is on meta but input is on cpu",
        id="device-mismatch",
    ),
    pytest.param(
        lambda: cnnops.conv2d(_x(), _w(c=3)), ValueError, "weight.size(1)", id="channels-mismatch"
    ),
    pytest.param(
        lambda: cnnops.conv2d(_x(), _w(k=5, c=2), groups=2),
        ValueError,
        "divide the output channels",
        id="groups-not-dividing-cout",
    ),
    pytest.param(
        lambda: cnnops.conv2d(_x(), _w(k=6, c=1), groups=3),
        ValueError,
        "divide the input channels",
        id="groups-not-dividing-cin",
    ),
    pytest.param(
        lambda: cnnops.conv2d(_x(), _w(), groups=0),
        ValueError,
        "groups must be >= 1",
        id="groups-zero",
    ),
    pytest.param(
        lambda: cnnops.conv2d(_x(), _w(), stride=0),
        ValueError,
        "stride must be >= 1",
        id="stride-zero",
    ),
    pytest.param(
        lambda: cnnops.conv2d(_x(), _w(), stride=(1, -2)),
        ValueError,
        "stride must be >= 1",
        id="stride-negative",
    ),
    pytest.param(
        lambda: cnnops.conv2d(_x(), _w(), dilation=0),
        ValueError,
        "dilation must be >= 1",
        id="dilation-zero",
    ),
    pytest.param(
        lambda: cnnops.conv2d(_x(), _w(), padding=-1),
        ValueError,
        "padding must be >= 0",
        id="padding-negative",
    ),
    pytest.param(
        lambda: cnnops.conv2d(_x(), _w(), padding="full"),
        ValueError,
        "padding must be 'same'",
        id="padding-unknown",
    ),
    pytest.param(
        lambda: cnnops.conv2d(_x(), _w(), stride=2, padding="same"),
        ValueError,
        "needs stride 1",
        id="same-strided",
    ),
    pytest.param(
        lambda: cnnops.conv2d(_x(), _w(r=11)),
        ValueError,
        "larger than the padded input",
        id="kernel-too-large",
    ),
    pytest.param(
        lambda: cnnops.conv2d(_x(), _w(), dilation=5),
        ValueError,
        "larger than the padded input",
        id="dilated-kernel-too-large",
    ),
    pytest.param(
        lambda: cnnops.conv2d(_x(), _w(), algo="winograd"),
        ValueError,
        "unknown algo",
        id="unknown-algo",
    ),
    pytest.param(
        lambda: cnnops.conv2d(_x(), _w(), algo="implicit_gemm"),
        ValueError,
        "not available on the cpu backend",
        id="algo-not-on-backend",
    ),
    pytest.param(
        lambda: cnnops.conv2d(_x(), _w(), algo="depthwise"),
        ValueError,
        "algo 'depthwise' needs a depthwise layer (groups == input channels",
        id="depthwise-algo-on-dense-layer",
    ),
    pytest.param(
        lambda: cnnops.conv2d(_x(), _w(), backend="opencl"),
        ValueError,
        "unknown backend",
        id="unknown-backend",
    ),
    pytest.param(
        lambda: cnnops.conv2d(_x(), _w(), stride=(1, 2, 3)),
        TypeError,
        "pair of ints",
        id="stride-triple",
    ),
    pytest.param(
        lambda: cnnops.conv2d(_x().numpy(), _w()),
        TypeError,
        "input must be a Tensor",
        id="not-a-tensor",
    ),
    pytest.param(
        lambda: cnnops.conv2d(torch.randn(2, 4, 0, 9), _w()),
        ValueError,
        "non-zero channels, height and width",
        id="empty-spatial",
    ),
]


@pytest.mark.parametrize("call,error,message", BAD_INPUTS)
def test_bad_input_raises_clear_error(call, error, message):
    with pytest.raises(error, match=message.replace("(", r"\(").replace(")", r"\)")):
        call()


def raw_args(x_shape, w_shape, stride=(1, 1), algo="direct", dtype=torch.float32):
    """Arguments of torch.ops.cnnops.conv2d: no bias, no padding, dilation 1, groups 1."""
    x, w = torch.randn(x_shape, dtype=dtype), torch.randn(w_shape, dtype=dtype)
    return (x, w, None, list(stride), [0, 0], [1, 1], 1, algo)


@pytest.mark.parametrize(
    "args,message",
    [
        pytest.param(
            raw_args((2, 4, 9, 9), (6, 3, 3, 3), algo="im2col"), "weight.size(1)", id="channels"
        ),
        pytest.param(
            raw_args((2, 4, 9, 9), (6, 4, 3, 3), stride=(0, 1)), "stride must be >= 1", id="stride"
        ),
        pytest.param(
            raw_args((2, 4, 9, 9), (6, 4, 3, 3), algo="fft"),
            "algo 'fft' is not available",
            id="algo",
        ),
        pytest.param(
            raw_args((2, 4, 9, 9), (6, 4, 3, 3), algo="depthwise"),
            "algo 'depthwise' needs a depthwise layer",
            id="depthwise-on-dense",
        ),
        pytest.param(
            raw_args((2, 4, 2, 2), (6, 4, 3, 3)),
            "larger than the padded input",
            id="kernel-too-large",
        ),
        pytest.param(
            raw_args((2, 4, 9, 9), (6, 4, 3, 3), dtype=torch.half),
            "float32 or float64",
            id="half-on-cpu",
        ),
    ],
)
def test_raw_op_checks_its_arguments(args, message):
    """torch.ops.cnnops.conv2d called directly, skipping the Python checks, still raises."""
    with pytest.raises(RuntimeError, match=message.replace("(", r"\(").replace(")", r"\)")):
        torch.ops.cnnops.conv2d(*args)

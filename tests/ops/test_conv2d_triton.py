"""The triton backend's conv2d (so far the depthwise algorithm) against F.conv2d.

Without a GPU the kernels run in Triton's interpreter on CPU tensors (tests/conftest.py sets
TRITON_INTERPRET=1), on small shapes; with one, natively on CUDA tensors.
"""

import pytest
import torch
import torch.nn.functional as F
from conv2d_cases import LAYOUTS, case, check_against_torch, conv_args, make_problem

import cnnops

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
# On a GPU machine these run natively and belong to the GPU lane (`pytest -m cuda`).
pytestmark = [pytest.mark.cuda] if DEVICE == "cuda" else []

TRITON_DEPTHWISE_CASES = [
    case(2, 6, 11, 11, 6, 3, padding=1, groups=6, id="3x3"),
    case(2, 6, 11, 11, 12, 3, stride=2, padding=1, groups=6, id="mult2-s2"),
    case(1, 40, 9, 8, 40, 3, stride=2, padding=1, groups=40, id="two-channel-blocks-s2"),
    case(1, 5, 9, 9, 5, 5, padding=2, groups=5, bias=False, id="5x5-no-bias"),
    case(1, 4, 13, 13, 4, 7, stride=2, padding=3, groups=4, id="7x7-s2"),
    case(2, 4, 9, 9, 4, 3, padding=2, dilation=2, groups=4, id="dil2"),
    case(1, 3, 8, 10, 3, (3, 5), stride=(1, 2), padding=(2, 1), groups=3, id="asymmetric"),
    case(1, 3, 18, 19, 3, 3, padding=1, groups=3, id="several-column-blocks"),
    case(0, 4, 5, 5, 4, 3, padding=1, groups=4, id="batch0"),
]


@pytest.mark.parametrize(
    "layout,dtype", [*((layout, torch.float32) for layout in LAYOUTS), ("nchw", torch.float64)]
)
@pytest.mark.parametrize("spec", TRITON_DEPTHWISE_CASES)
def test_depthwise_matches_torch(spec, layout, dtype):
    check_against_torch(
        lambda x, w, b: cnnops.conv2d(x, w, b, **conv_args(spec), backend="triton"),
        spec,
        dtype,
        layout,
        DEVICE,
    )


def test_depthwise_gradcheck():
    # fast_mode: a few random directions, not one interpreted launch per input element.
    x = torch.randn(1, 2, 5, 6, dtype=torch.float64, device=DEVICE)
    w = torch.randn(4, 1, 3, 3, dtype=torch.float64, device=DEVICE)
    b = torch.randn(4, dtype=torch.float64, device=DEVICE)
    inputs = [t.requires_grad_() for t in (x, w, b)]

    def fn(x, w, b):
        return cnnops.conv2d(x, w, b, 2, 1, 1, 2, backend="triton")

    assert torch.autograd.gradcheck(fn, inputs, eps=1e-6, atol=1e-5, fast_mode=True)


# In the interpreter, tracing through triton_op's kernel launches (opcheck's AOT-dispatch test)
# reaches fake tensors' data; that part runs on a GPU only.
INTERPRETER_OPCHECK = ("test_schema", "test_autograd_registration", "test_faketensor")


@pytest.mark.parametrize("layout", ["nchw", "channels_last"])
def test_opcheck(layout):
    x, w, b = make_problem(TRITON_DEPTHWISE_CASES[1].values[0], torch.float32, layout)
    x, w, b = (t.to(DEVICE).requires_grad_() for t in (x, w, b))
    args = (x, w, b, [2, 2], [1, 1], [1, 1], 6, "depthwise")
    utils = "ALL" if DEVICE == "cuda" else INTERPRETER_OPCHECK
    torch.library.opcheck(torch.ops.cnnops.conv2d_triton.default, args, test_utils=utils)


@pytest.mark.parametrize(
    "call,message",
    [
        pytest.param(
            lambda x: cnnops.conv2d(x, torch.randn(8, 4, 3, 3, device=DEVICE), backend="triton"),
            r"the triton backend \(so far only its depthwise algorithm\) needs a depthwise layer",
            id="dense-layer",
        ),
        pytest.param(
            lambda x: cnnops.conv2d(
                x, torch.randn(4, 1, 3, 3, device=DEVICE), groups=4, backend="triton", algo="direct"
            ),
            "algo 'direct' is not available on the triton backend",
            id="algo-not-on-triton",
        ),
    ],
)
def test_bad_input_raises_clear_error(call, message):
    with pytest.raises(ValueError, match=message):
        call(torch.randn(1, 4, 6, 6, device=DEVICE))


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_torch_compile_fullgraph_on_gpu(dtype):
    """torch.compile sees through triton_op to the kernels (a GPU only: Inductor does not run
    Triton's interpreter)."""
    x = torch.randn(2, 32, 14, 14, device="cuda", dtype=dtype).contiguous(
        memory_format=torch.channels_last
    )
    w = torch.randn(32, 1, 3, 3, device="cuda", dtype=dtype)

    @torch.compile(fullgraph=True)
    def block(x, w):
        return torch.relu(cnnops.conv2d(x, w, padding=1, groups=32, backend="triton"))

    want = torch.relu(F.conv2d(x.float(), w.float(), padding=1, groups=32))
    torch.testing.assert_close(block(x, w).float(), want, atol=2e-2, rtol=2e-2)


@pytest.mark.cuda
@pytest.mark.parametrize("memory_format", [torch.contiguous_format, torch.channels_last])
def test_large_tensor_is_indexed_in_int64(memory_format):
    """Input and output past 2^31 elements: their last rows lie past 2^31, where 32-bit offsets
    would wrap (in NCHW, channel 1's plane; in channels_last, the last rows of both)."""
    x = torch.randn(1, 2, 33000, 33000, device="cuda", dtype=torch.float16)
    x = x.contiguous(memory_format=memory_format)
    w = torch.randn(2, 1, 3, 3, device="cuda", dtype=torch.float16)
    assert x.numel() > 2**31
    out = cnnops.conv2d(x, w, padding=1, groups=2, backend="triton")
    # Output rows 1..4 and the last rows but one, from the input rows they read, in float32.
    for first in (1, x.shape[2] - 5):
        want = F.conv2d(x[:, :, first - 1 : first + 5].float(), w.float(), padding=(0, 1), groups=2)
        torch.testing.assert_close(out[:, :, first : first + 4].float(), want, atol=2e-2, rtol=2e-2)


@pytest.mark.cuda
def test_cuda_graph_capture():
    x = torch.randn(4, 64, 28, 28, device="cuda").contiguous(memory_format=torch.channels_last)
    w = torch.randn(64, 1, 3, 3, device="cuda")
    b = torch.randn(64, device="cuda")
    conv = lambda: cnnops.conv2d(x, w, b, 2, 1, 1, 64, backend="triton")  # noqa: E731
    want = conv()
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        conv()  # warm-up: compile outside the capture
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        captured = conv()
    x.copy_(torch.randn_like(x))
    graph.replay()
    torch.testing.assert_close(captured, conv())
    assert not torch.equal(captured, want)


@pytest.mark.cuda
@pytest.mark.parametrize("layout", ["nchw", "channels_last"])
def test_cuda_and_triton_agree(layout):
    spec = TRITON_DEPTHWISE_CASES[2].values[0]
    x, w, b = (t.cuda() for t in make_problem(spec, torch.float32, layout))
    triton_out = cnnops.conv2d(x, w, b, **conv_args(spec), backend="triton")
    cuda_out = cnnops.conv2d(x, w, b, **conv_args(spec), backend="cuda", algo="direct")
    torch.testing.assert_close(triton_out, cuda_out, atol=1e-5, rtol=1e-5)

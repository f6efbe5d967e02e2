"""cnnops' ops and swapped models with the PyTorch features people use: autocast, channels_last
end to end, torch.compile, torch.export, DDP and deterministic algorithms."""

import copy
import math
import os
import subprocess
import sys
import time

import pytest
import torch
import torch.nn.functional as F
import torchvision
from roi_cases import deterministic_algorithms, problem
from tolerance import assert_close_to_reference

import cnnops
from cnnops import autocast as cnnops_autocast

# The longest reduction in resnet18: a 3x3 conv over 512 channels.
RESNET18_REDUCTION = 512 * 3 * 3
BF16 = torch.bfloat16


def _seeded(ctor, dtype=torch.float32, **kwargs):
    torch.manual_seed(0)
    return ctor(weights=None, **kwargs).to(dtype)


def _swapped_pair(ctor, dtype=torch.float32, mode="eval", **kwargs):
    """(torchvision model, the same model swapped to cnnops), identical parameters."""
    reference = _seeded(ctor, dtype, **kwargs).train(mode == "train")
    model = copy.deepcopy(reference)
    report = cnnops.swap(model)
    assert len(report) > 0 and report.left_alone == []
    return reference, model


def _relative_error(actual, reference):
    reference = reference.double()
    return ((actual.double() - reference).norm() / reference.norm()).item()


class SmallCNN(torch.nn.Module):
    """Dense, grouped-and-strided, depthwise and pointwise convolutions, batch norm and a linear
    head: the layer kinds of the models people swap, small enough for DDP and compile tests."""

    def __init__(self):
        super().__init__()
        self.features = torch.nn.Sequential(
            torch.nn.Conv2d(3, 8, 3, padding=1, bias=False),
            torch.nn.BatchNorm2d(8),
            torch.nn.ReLU(),
            torch.nn.Conv2d(8, 16, 3, stride=2, padding=1, groups=2),
            torch.nn.BatchNorm2d(16),
            torch.nn.ReLU(),
            torch.nn.Conv2d(16, 16, 3, padding=1, groups=16, bias=False),
            torch.nn.Conv2d(16, 12, 1),
            torch.nn.ReLU(),
        )
        self.head = torch.nn.Linear(12, 5)

    def forward(self, x):
        return self.head(self.features(x).mean((2, 3)))


def _small_cnn_pair(dtype=torch.float32):
    torch.manual_seed(0)
    reference = SmallCNN().to(dtype)
    model = copy.deepcopy(reference)
    assert len(cnnops.swap(model)) == 4
    return reference, model


# ---- autocast --------------------------------------------------------------------------------


def test_every_op_has_an_autocast_policy_and_kernels():
    """A new public op (conv_transpose2d, say) must get a row in cnnops.autocast.AUTOCAST_OPS:
    without one, autocast hands it mixed or bfloat16 inputs its kernels reject."""
    ops = [
        name.split("::")[1]
        for name in torch._C._dispatch_get_all_op_names()
        if name.startswith("cnnops::") and not name.split("::")[1].startswith("_")
    ]
    assert "conv2d" in ops and "roi_align_triton" in ops
    missing = [op for op in ops if op not in cnnops_autocast.AUTOCAST_OPS]
    assert missing == [], f"ops with no autocast policy: {missing}"
    for op in ops:
        for key in cnnops_autocast.AUTOCAST_KEYS.values():
            assert torch._C._dispatch_has_kernel_for_dispatch_key(f"cnnops::{op}", key), (op, key)


CONV_CASES = [
    pytest.param(dict(stride=1, padding=1, groups=1), 8, 3, True, id="dense3x3-bias"),
    pytest.param(dict(stride=2, padding=1, groups=2), 8, 3, False, id="grouped-s2"),
    pytest.param(dict(stride=1, padding=1, groups=8), 8, 3, True, id="depthwise"),
    pytest.param(dict(stride=1, padding=0, groups=1), 8, 1, False, id="pointwise"),
]


def _conv_problem(args, k, kernel, bias, device="cpu", seed=0):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(2, 8, 9, 11, generator=gen)
    w = torch.randn(k, 8 // args["groups"], kernel, kernel, generator=gen) / math.sqrt(8 * 9)
    b = torch.randn(k, generator=gen) if bias else None
    return [t.to(device).requires_grad_() if t is not None else None for t in (x, w, b)]


def _conv_under_autocast(conv, x, w, b, args, device_type, dtype, input_dtype=None):
    """conv's output and the gradients of (x, w, b) under autocast, x first cast to input_dtype
    (the output of an earlier layer under autocast) inside the graph."""
    with torch.autocast(device_type, dtype=dtype):
        out = conv(x if input_dtype is None else x.to(input_dtype), w, b, **args)
    grad = torch.randn(out.shape, generator=torch.Generator().manual_seed(1)).to(out.device)
    params = [t for t in (x, w, b) if t is not None]
    return out, torch.autograd.grad(out, params, grad.to(out.dtype))


@pytest.mark.parametrize("input_dtype", [None, BF16], ids=["float32-input", "bfloat16-input"])
@pytest.mark.parametrize("args,k,kernel,bias", CONV_CASES)
def test_autocast_conv2d_cpu_matches_torch(args, k, kernel, bias, input_dtype):
    x, w, b = _conv_problem(args, k, kernel, bias)
    out, grads = _conv_under_autocast(cnnops.conv2d, x, w, b, args, "cpu", BF16, input_dtype)
    ref, ref_grads = _conv_under_autocast(F.conv2d, x, w, b, args, "cpu", BF16, input_dtype)
    assert out.dtype == ref.dtype == BF16
    # The same arithmetic as torch's (bfloat16 products summed in float32, rounded once), in
    # another order: at most an ulp of bfloat16 apart.
    torch.testing.assert_close(out, ref, atol=2**-7, rtol=2**-7)
    for name, got, want in zip(("input", "weight", "bias"), grads, ref_grads, strict=False):
        # Gradients come back in each input's own dtype (float32 parameters get float32).
        assert got.dtype == want.dtype, name
        torch.testing.assert_close(got, want, atol=2**-6, rtol=2**-6, msg=lambda m, n=name: n + m)


def test_autocast_leaves_float64_alone_and_float16_cpu_autocast_works():
    x, w, b = _conv_problem(CONV_CASES[0].values[0], 8, 3, True)
    x64, w64, b64 = (t.detach().double() for t in (x, w, b))
    with torch.autocast("cpu", dtype=BF16):
        out = cnnops.conv2d(x64, w64, b64, padding=1)
    assert out.dtype == torch.float64
    torch.testing.assert_close(out, F.conv2d(x64, w64, b64, padding=1))
    with torch.autocast("cpu", dtype=torch.float16):
        half = cnnops.conv2d(x, w, b, padding=1)
        ref = F.conv2d(x, w, b, padding=1)
    assert half.dtype == ref.dtype == torch.float16
    torch.testing.assert_close(half, ref, atol=2e-3, rtol=2e-3)


def test_autocast_conv2d_bad_input_still_raises_clearly():
    # float64 is never cast, so float64 input with float32 weight stays a mismatch.
    x, w, _ = _conv_problem(CONV_CASES[0].values[0], 8, 3, False)
    with torch.autocast("cpu", dtype=BF16), pytest.raises(TypeError, match="weight dtype"):
        cnnops.conv2d(x.detach().double(), w, padding=1)


def _grad_of(op, x, rois, *args, autocast):
    leaf = x.detach().requires_grad_()
    with torch.autocast("cpu", dtype=BF16, enabled=autocast):
        out = op(leaf, rois, *args)
    (grad,) = torch.autograd.grad(out.float().square().sum(), leaf)
    return out, grad


@pytest.mark.parametrize(
    "features,boxes", [(BF16, torch.float32), (torch.float32, BF16)], ids=["bf16-map", "bf16-rois"]
)
@pytest.mark.parametrize(
    "ours,theirs,args",
    [
        pytest.param(
            cnnops.roi_align, torchvision.ops.roi_align, ((3, 3), 0.5, 2, True), id="align"
        ),
        pytest.param(cnnops.roi_pool, torchvision.ops.roi_pool, ((3, 2), 0.5), id="pool"),
    ],
)
def test_autocast_roi_align_and_roi_pool_follow_torchvision(ours, theirs, args, features, boxes):
    """torchvision's autocast policy (its roi_align has it on the CPU, its roi_pool only on
    CUDA): computed in float32, the output in the feature map's dtype."""
    x, rois = problem(torch.float32, k=10)
    x, rois = x.to(features), rois.to(boxes)

    def in_float32(x, rois, *args):
        return theirs(x.float(), rois.float(), *args).to(x.dtype)

    out, grad = _grad_of(ours, x, rois, *args, autocast=True)
    ref, ref_grad = _grad_of(in_float32, x, rois, *args, autocast=False)
    assert out.dtype == ref.dtype == features and grad.dtype == features
    torch.testing.assert_close(out, ref)
    torch.testing.assert_close(grad, ref_grad)
    if theirs is torchvision.ops.roi_align:
        torch.testing.assert_close(out, _grad_of(theirs, x, rois, *args, autocast=True)[0])


def _boxes(n, seed=0):
    gen = torch.Generator().manual_seed(seed)
    xy = torch.rand(n, 2, generator=gen) * 40
    boxes = torch.cat([xy, xy + torch.rand(n, 2, generator=gen) * 15 + 1], 1)
    return boxes, torch.rand(n, generator=gen)


def test_autocast_box_ops_run_in_float32():
    boxes, scores = _boxes(80)
    # Float32 boxes rounded to bfloat16, as a bfloat16 box head gives them.
    boxes16 = boxes.to(BF16)
    classes = torch.randint(0, 3, (80,), generator=torch.Generator().manual_seed(2))
    with torch.autocast("cpu", dtype=BF16):
        keep = cnnops.nms(boxes16, scores, 0.5)
        batched = cnnops.batched_nms(boxes16, scores, classes, 0.5)
        iou = cnnops.box_iou(boxes16, boxes)
        soft_keep, soft_scores = cnnops.soft_nms(boxes16, scores.to(BF16))
        want = torchvision.ops.nms(boxes16, scores, 0.5)  # torchvision's autocast: float32
    assert torch.equal(keep, want)
    assert torch.equal(batched, torchvision.ops.batched_nms(boxes16.float(), scores, classes, 0.5))
    assert iou.dtype == BF16  # the op's contract: the IoU in the boxes' dtype
    torch.testing.assert_close(iou, torchvision.ops.box_iou(boxes16.float(), boxes).to(BF16))
    want_keep, want_scores = cnnops.soft_nms(boxes16.float(), scores.to(BF16).float())
    assert torch.equal(soft_keep, want_keep) and soft_scores.dtype == BF16
    torch.testing.assert_close(soft_scores, want_scores.to(BF16))


def test_autocast_swapped_resnet18_cpu():
    """A swapped resnet18 under CPU autocast: torch's dtypes, and error against float64 at most
    twice torch's own autocast error (the design's rule for half precision), gradients too."""
    reference, model = _swapped_pair(torchvision.models.resnet18)
    exact = copy.deepcopy(reference).double()
    x = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(0))

    def run(m, autocast=True, dtype=torch.float32):
        m.zero_grad()
        with torch.autocast("cpu", dtype=BF16, enabled=autocast):
            out = m(x.to(dtype))
        out.double().square().sum().backward()
        return out, {name: p.grad for name, p in m.named_parameters()}

    out, grads = run(model)
    ref, ref_grads = run(reference)
    want, want_grads = run(exact, autocast=False, dtype=torch.float64)
    with torch.no_grad():
        float32 = reference(x)
    assert out.dtype == ref.dtype == BF16
    assert _relative_error(out, want) <= 2 * _relative_error(ref, want)
    scale = want.abs().max().item()
    torch.testing.assert_close(out.float(), ref.float(), atol=2**-6 * scale, rtol=2**-6)
    torch.testing.assert_close(out.float(), float32, atol=2**-6 * scale, rtol=2**-6)
    for name, grad in grads.items():
        assert grad.dtype == torch.float32, name
        ours, torchs = (_relative_error(g[name], want_grads[name]) for g in (grads, ref_grads))
        # Plus 1%: bfloat16 gradients of the last layers (2 x 2 maps) are a few noisy terms.
        assert ours <= 2 * torchs + 0.01, f"{name}: {ours:.4f} vs torch's {torchs:.4f}"


# ---- channels_last ---------------------------------------------------------------------------

_COPIES = ("aten::copy_", "aten::clone", "aten::contiguous")


def _copies_inside_cnnops_ops(prof):
    """(op event, copy event, names of the events between them) for every copy, clone or
    contiguous that runs inside a cnnops op, forward or backward."""
    found = []

    def walk(event, op, chain):
        for child in event.cpu_children:
            if op is not None and child.name in _COPIES:
                found.append((op, child, chain))
            if op is None and child.name.startswith("cnnops::"):
                walk(child, child, [])
            else:
                walk(child, op, chain + [child.name] if op is not None else chain)

    for root in prof.events():
        if root.cpu_parent is None:
            if root.name.startswith("cnnops::"):
                walk(root, root, [])
            else:
                walk(root, None, [])
    return found


def _weight_numel(op_event):
    # cnnops::conv2d(input, weight, ...), cnnops::_conv2d_backward(grad_output, input, weight,..)
    shapes = op_event.input_shapes
    return math.prod(shapes[1] if op_event.name == "cnnops::conv2d" else shapes[2])


@pytest.mark.parametrize("arch", ["resnet18", "mobilenet_v2"])
def test_channels_last_end_to_end(arch):
    """A swapped model in channels_last stays in it: every conv output is channels_last, the
    results match torch's channels_last model, and no activation is copied inside a cnnops op.

    The copies that do run inside the conv ops, all known and listed here so that a new kind
    fails: weight-sized ones (the im2col kernels repack the weight, and call weight.contiguous()
    on a channels_last weight, csrc/ops/cpu/conv2d_kernel.cpp: conv2d_cpu and
    conv2d_backward_cpu), and torch's own: its CPU baddbmm_ computes into a temporary and copies
    the result over (an output tile, or the packed weight gradient)."""
    reference, model = _swapped_pair(getattr(torchvision.models, arch))
    reference.to(memory_format=torch.channels_last)
    model.to(memory_format=torch.channels_last)
    batch = 2
    x = torch.randn(batch, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    x = x.contiguous(memory_format=torch.channels_last)
    layouts = {}

    def record_layout(module, inputs, output):
        layouts[module] = output.is_contiguous(memory_format=torch.channels_last)

    for module in model.modules():
        if isinstance(module, cnnops.nn.Conv2d):
            module.register_forward_hook(record_layout)
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU],
                                record_shapes=True) as prof:  # fmt: skip
        out = model(x)
        out.square().sum().backward()
    ref = reference(x)
    ref.square().sum().backward()

    assert len(layouts) == sum(isinstance(m, torch.nn.Conv2d) for m in reference.modules())
    assert all(layouts.values()), [m for m, channels_last in layouts.items() if not channels_last]
    assert_close_to_reference(out, ref, RESNET18_REDUCTION)
    for (name, p), q in zip(model.named_parameters(), reference.parameters(), strict=True):
        scale = q.grad.abs().max().item()
        torch.testing.assert_close(p.grad, q.grad, atol=1e-4 * scale, rtol=1e-3,
                                   msg=lambda m, n=name: f"{n}: {m}")  # fmt: skip

    copies = _copies_inside_cnnops_ops(prof)
    assert any(op.name == "cnnops::_conv2d_backward" for op, _, _ in copies)  # the walk works
    unexplained = []
    for op, copy_event, chain in copies:
        shape = copy_event.input_shapes[0] if copy_event.input_shapes else []
        activation = len(shape) == 4 and shape[0] == batch
        by_torch_gemm = "aten::baddbmm_" in chain
        weight_sized = math.prod(shape) <= _weight_numel(op)
        if activation or not (by_torch_gemm or weight_sized):
            unexplained.append((op.name, op.input_shapes[:3], copy_event.name, shape, chain))
    assert unexplained == []


# ---- torch.compile and torch.export ----------------------------------------------------------


def test_compile_swapped_resnet18_fullgraph_inductor():
    """Inductor compiles the swapped resnet18 whole (about 10 s here at 1 x 3 x 32 x 32; the
    compile time grows little with the input size, the run does)."""
    reference, model = _swapped_pair(torchvision.models.resnet18)
    x = torch.randn(1, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    compiled = torch.compile(model, fullgraph=True)
    with torch.no_grad():
        got = compiled(x)
        want, eager = reference(x), model(x)
    assert_close_to_reference(got, want, RESNET18_REDUCTION)
    assert_close_to_reference(got, eager, RESNET18_REDUCTION)


def test_compile_training_step_of_a_swapped_cnn():
    """A training step (forward and backward) compiled by inductor, against eager. A small CNN:
    resnet18's training graph takes over 80 s to compile on the 2-core CI machine."""
    reference, model = _small_cnn_pair(torch.float64)
    eager = copy.deepcopy(model)
    x = torch.randn(4, 3, 12, 12, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    compiled = torch.compile(model, fullgraph=True)
    for m in (compiled, eager, reference):
        m(x).square().mean().backward()
    for (name, p), e, r in zip(
        model.named_parameters(), eager.parameters(), reference.parameters(), strict=True
    ):
        torch.testing.assert_close(p.grad, e.grad, msg=lambda m, n=name: f"{n}: {m}")
        torch.testing.assert_close(p.grad, r.grad, msg=lambda m, n=name: f"{n}: {m}")
    for name, buffer in reference.named_buffers():  # batch norm's running statistics
        torch.testing.assert_close(model.get_buffer(name), buffer)


def test_compile_and_autocast_together():
    reference, model = _small_cnn_pair()
    x = torch.randn(2, 3, 12, 12, generator=torch.Generator().manual_seed(0))

    @torch.compile(fullgraph=True, backend="aot_eager")
    def run(x):
        with torch.autocast("cpu", dtype=BF16):
            return model(x)

    got = run(x)
    with torch.autocast("cpu", dtype=BF16):
        want = model(x)
    assert got.dtype == want.dtype == BF16
    torch.testing.assert_close(got, want)


def _detector_head(features, boxes, scores, nms, roi_align):
    """nms, then roi_align of the kept boxes: a data-dependent number of RoIs."""
    keep = nms(boxes, scores, 0.5)
    kept = boxes[keep]
    rois = torch.cat([torch.zeros_like(kept[:, :1]), kept], dim=1)
    return roi_align(features, rois, (3, 3), 0.5, 2, True).relu(), keep


class DetectorHead(torch.nn.Module):
    def forward(self, features, boxes, scores):
        return _detector_head(features, boxes, scores, cnnops.nms, cnnops.roi_align)


def _head_inputs():
    boxes, scores = _boxes(60)
    features = torch.randn(1, 4, 16, 16, generator=torch.Generator().manual_seed(3))
    return features, boxes, scores


def test_compile_nms_then_roi_align_inductor():
    # tests/ops/test_nms.py and test_roi_align.py compile each op alone with the eager backend;
    # here inductor compiles them together, the RoI count an unbacked size from nms.
    inputs = _head_inputs()
    want, want_keep = _detector_head(*inputs, torchvision.ops.nms, torchvision.ops.roi_align)
    compiled = torch.compile(DetectorHead(), fullgraph=True)
    # config.patch, not monkeypatch (see tests/ops/test_nms.py: test_torch_compile_fullgraph).
    with torch._dynamo.config.patch(capture_dynamic_output_shape_ops=True):
        got, keep = compiled(*inputs)
    assert 0 < keep.numel() < 60
    assert torch.equal(keep, want_keep)
    torch.testing.assert_close(got, want)


def test_export_swapped_resnet18():
    reference, model = _swapped_pair(torchvision.models.resnet18)
    x = torch.randn(1, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    program = torch.export.export(model, (x,))
    convs = [n for n in program.graph.nodes if n.target is torch.ops.cnnops.conv2d.default]
    assert len(convs) == 20
    assert not any(n.target is torch.ops.aten.convolution.default for n in program.graph.nodes)
    with torch.no_grad():
        assert_close_to_reference(program.module()(x), reference(x), RESNET18_REDUCTION)


def test_export_nms_then_roi_align():
    # tests/ops/test_nms.py exports nms alone; this adds roi_align on its data-dependent output.
    inputs = _head_inputs()
    program = torch.export.export(DetectorHead(), inputs)
    targets = {n.target for n in program.graph.nodes}
    assert {torch.ops.cnnops.nms.default, torch.ops.cnnops.roi_align.default} <= targets
    got, keep = program.module()(*inputs)
    want, want_keep = _detector_head(*inputs, torchvision.ops.nms, torchvision.ops.roi_align)
    assert torch.equal(keep, want_keep)
    torch.testing.assert_close(got, want)


# ---- DDP -------------------------------------------------------------------------------------

DDP_STEPS = 3


def _ddp_worker(rank, world_size, store, out_dir):
    """One DDP rank: trains the swapped and the torch SmallCNN side by side (float64, SGD with
    momentum) and saves, after each step, both models' gradients and parameters."""
    import datetime

    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel as DDP

    torch.set_num_threads(1)
    dist.init_process_group(
        "gloo", init_method=f"file://{store}", rank=rank, world_size=world_size,
        timeout=datetime.timedelta(seconds=60),
    )  # fmt: skip
    try:
        reference, model = _small_cnn_pair(torch.float64)
        runs = {}
        for name, m in (("cnnops", model), ("torch", reference)):
            ddp = DDP(m)
            opt = torch.optim.SGD(ddp.parameters(), lr=0.1, momentum=0.9)
            gen = torch.Generator().manual_seed(100 + rank)  # each rank its own batches
            steps = []
            for _ in range(DDP_STEPS):
                x = torch.randn(2, 3, 12, 12, generator=gen, dtype=torch.float64)
                target = torch.randn(2, 5, generator=gen, dtype=torch.float64)
                opt.zero_grad()
                F.mse_loss(ddp(x), target).backward()
                grads = [p.grad.clone() for p in m.parameters()]
                opt.step()
                steps.append((grads, [p.detach().clone() for p in m.parameters()]))
            runs[name] = steps
        torch.save(runs, os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


def test_ddp_two_processes_match_torch(tmp_path):
    world_size = 2
    here = os.path.abspath(__file__)
    tests_dir = os.path.dirname(os.path.dirname(here))
    code = (
        "import importlib.util, sys\n"
        f"spec = importlib.util.spec_from_file_location('torch_features', {here!r})\n"
        "module = importlib.util.module_from_spec(spec)\n"
        "spec.loader.exec_module(module)\n"
        f"module._ddp_worker(int(sys.argv[1]), {world_size}, {str(tmp_path / 'store')!r}, "
        f"{str(tmp_path)!r})\n"
    )
    env = dict(
        os.environ, PYTHONPATH=os.pathsep.join([tests_dir, os.environ.get("PYTHONPATH", "")])
    )
    # Loopback: the machine may have no other interface, and the ranks share it.
    env.setdefault("GLOO_SOCKET_IFNAME", "lo")
    workers = [
        subprocess.Popen(
            [sys.executable, "-c", code, str(rank)],
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
        )  # fmt: skip
        for rank in range(world_size)
    ]
    logs = []
    deadline = time.monotonic() + 120  # a hung rendezvous fails the test instead of hanging it
    try:
        for worker in workers:
            remaining = max(1.0, deadline - time.monotonic())
            logs.append(worker.communicate(timeout=remaining)[0].decode(errors="replace"))
    finally:
        for worker in workers:
            if worker.poll() is None:
                worker.kill()
                worker.wait()
    for rank, (worker, log) in enumerate(zip(workers, logs, strict=True)):
        assert worker.returncode == 0, f"rank {rank} failed:\n{log[-3000:]}"
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in range(world_size)]
    for step in range(DDP_STEPS):
        for rank, runs in enumerate(ranks):
            for kind, what in enumerate(("grad", "param")):
                ours, theirs = runs["cnnops"][step][kind], runs["torch"][step][kind]
                first_rank = ranks[0]["cnnops"][step][kind]
                for i, (a, b, c) in enumerate(zip(ours, theirs, first_rank, strict=True)):
                    where = f"{what} {i}, step {step}, rank {rank}"
                    torch.testing.assert_close(a, b, msg=lambda m, w=where: f"{w}: {m}")
                    # DDP keeps the replicas equal: every rank has the same values.
                    torch.testing.assert_close(a, c, msg=lambda m, w=where: f"{w}: {m}")


# ---- deterministic algorithms ----------------------------------------------------------------


def _fwd_bwd(model, x, rois):
    """Loss and gradients of the conv layers of a swapped SmallCNN with a RoI head (the linear
    head left out: on the GPU it is a cuBLAS GEMM, torch's, not ours)."""
    model.zero_grad()
    x = x.detach().requires_grad_()
    features = model.features(x)
    pooled = cnnops.roi_align(features, rois, (2, 2), 0.5, 2, True)
    pooled_max = cnnops.roi_pool(features, rois, (2, 2), 0.5)
    loss = features.square().mean() + pooled.sum() + pooled_max.sum()
    loss.backward()
    return [loss.detach(), x.grad] + [p.grad.clone() for p in model.features.parameters()]


def test_deterministic_algorithms_cpu_bitwise_repeatable():
    """CPU: every cnnops kernel is deterministic, so the flag raises nothing, and forward and
    backward repeat bitwise (grouped, depthwise and dense convs, roi_align, roi_pool)."""
    _, model = _small_cnn_pair()
    model.train()
    x = torch.randn(3, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    rois = problem(torch.float32, k=20)[1]
    rois[:, 0] = rois[:, 0].clamp(max=2)
    with deterministic_algorithms():
        first = _fwd_bwd(model, x, rois)
        second = _fwd_bwd(model, x, rois)
    for a, b in zip(first, second, strict=True):
        assert torch.equal(a, b)


# ---- GPU -------------------------------------------------------------------------------------

GPU_BACKENDS = ["cuda", "triton"]
HALF_DTYPES = [torch.float16, torch.bfloat16]


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", HALF_DTYPES)
@pytest.mark.parametrize("backend", GPU_BACKENDS)
@pytest.mark.parametrize("args,k,kernel,bias", CONV_CASES)
def test_autocast_conv2d_cuda(args, k, kernel, bias, backend, dtype):
    """Under CUDA autocast the kernels run in its dtype: torch's output dtype, and error against
    float64 at most twice torch's own (cuDNN's) in that dtype, gradients too."""
    x, w, b = _conv_problem(args, k, kernel, bias, device="cuda")

    def ours(*tensors, **kw):
        return cnnops.conv2d(*tensors, **kw, backend=backend)

    out, grads = _conv_under_autocast(ours, x, w, b, args, "cuda", dtype)
    ref, ref_grads = _conv_under_autocast(F.conv2d, x, w, b, args, "cuda", dtype)
    exact = [t.detach().double().requires_grad_() if t is not None else None for t in (x, w, b)]
    want, want_grads = _conv_under_autocast(F.conv2d, *exact, args, "cuda", dtype)
    assert want.dtype == torch.float64  # float64 is never cast
    assert out.dtype == ref.dtype == dtype
    floor = torch.finfo(dtype).eps / 4
    assert _relative_error(out, want) <= 2 * _relative_error(ref, want) + floor
    for name, got, theirs, exact_grad in zip(
        ("input", "weight", "bias"), grads, ref_grads, want_grads, strict=False
    ):
        assert got.dtype == torch.float32, name
        ours_error = _relative_error(got, exact_grad)
        assert ours_error <= 2 * _relative_error(theirs, exact_grad) + floor, name


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", HALF_DTYPES)
@pytest.mark.parametrize("backend", GPU_BACKENDS)
def test_autocast_roi_and_box_ops_cuda(backend, dtype):
    x, rois = problem(torch.float32, k=10)
    x, rois = x.cuda().to(dtype), rois.cuda()
    for ours, theirs, args in (
        (cnnops.roi_align, torchvision.ops.roi_align, ((3, 3), 0.5, 2, True)),
        (cnnops.roi_pool, torchvision.ops.roi_pool, ((3, 2), 0.5)),
    ):
        with torch.autocast("cuda", dtype=dtype):
            out = ours(x, rois, *args, backend=backend)
            ref = theirs(x, rois, *args)
        assert out.dtype == ref.dtype == dtype
        torch.testing.assert_close(out, ref)
    boxes, scores = _boxes(200)
    boxes, scores = boxes.cuda().to(dtype), scores.cuda()
    with torch.autocast("cuda", dtype=dtype):
        keep = cnnops.nms(boxes, scores, 0.5, backend=backend)
        want = torchvision.ops.nms(boxes, scores, 0.5)
    assert torch.equal(keep, want)


def _conv_fwd_bwd(x, w, b, args, algo, backend):
    x, w, b = (t.detach().requires_grad_() if t is not None else None for t in (x, w, b))
    out = cnnops.conv2d(x, w, b, **args, algo=algo, backend=backend)
    grad = torch.randn(out.shape, generator=torch.Generator().manual_seed(1)).to(out.device)
    return [out.detach(), *torch.autograd.grad(out, [t for t in (x, w, b) if t is not None], grad)]


def _cublas_is_deterministic():
    return os.environ.get("CUBLAS_WORKSPACE_CONFIG") in (":4096:8", ":16:8")


@pytest.mark.cuda
@pytest.mark.parametrize(
    "backend,algo",
    [("cuda", "direct"), ("cuda", "im2col"), ("cuda", "depthwise"),
     ("triton", "direct"), ("triton", "implicit_gemm"), ("triton", "depthwise")],
)  # fmt: skip
def test_deterministic_conv2d_cuda(backend, algo):
    """No conv2d kernel uses atomics. The CUDA im2col path runs its GEMMs in cuBLAS (at::bmm),
    which under the flag raises torch's error unless CUBLAS_WORKSPACE_CONFIG is set; every other
    path repeats bitwise."""
    groups = 8 if algo == "depthwise" else 2
    x, w, b = _conv_problem(dict(stride=1, padding=1, groups=groups), 8, 3, True, "cuda")
    args = dict(stride=1, padding=1, groups=groups)
    with deterministic_algorithms():
        if backend == "cuda" and algo == "im2col" and not _cublas_is_deterministic():
            with pytest.raises(RuntimeError, match="CUBLAS_WORKSPACE_CONFIG"):
                _conv_fwd_bwd(x, w, b, args, algo, backend)
            return
        first = _conv_fwd_bwd(x, w, b, args, algo, backend)
        second = _conv_fwd_bwd(x, w, b, args, algo, backend)
    for a, c in zip(first, second, strict=True):
        assert torch.equal(a, c)


@pytest.mark.cuda
@pytest.mark.parametrize("backend", GPU_BACKENDS)
def test_deterministic_swapped_cnn_cuda(backend):
    """A swapped CNN with a RoI head on the GPU under the flag: the RoI backward passes take
    their gather kernels, and everything repeats bitwise (on the cuda backend the dense layers
    run cuBLAS GEMMs: torch's error without CUBLAS_WORKSPACE_CONFIG)."""
    _, model = _small_cnn_pair()
    model.cuda().train()
    x = torch.randn(3, 3, 16, 16, generator=torch.Generator().manual_seed(0)).cuda()
    rois = problem(torch.float32, k=40)[1].cuda()
    rois[:, 0] = rois[:, 0].clamp(max=2)
    with cnnops.use_backend(backend), deterministic_algorithms():
        if backend == "cuda" and not _cublas_is_deterministic():
            with pytest.raises(RuntimeError, match="CUBLAS_WORKSPACE_CONFIG"):
                _fwd_bwd(model, x, rois)
            return
        first = _fwd_bwd(model, x, rois)
        second = _fwd_bwd(model, x, rois)
    for a, c in zip(first, second, strict=True):
        assert torch.equal(a, c)

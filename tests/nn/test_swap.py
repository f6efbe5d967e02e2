"""cnnops.swap / cnnops.unswap put cnnops modules into existing models and take them out."""

import collections
import copy

import pytest
import torch
import torchvision
from op_counter import OpCounter
from roi_cases import problem as roi_problem
from tolerance import assert_close_to_reference

import cnnops

# The longest reduction in resnet18: a 3x3 conv over 512 channels.
RESNET18_REDUCTION = 512 * 3 * 3


def _resnet18(dtype=torch.float32):
    torch.manual_seed(0)
    return torchvision.models.resnet18(weights=None).to(dtype)


def _types(model):
    return {name: type(m) for name, m in model.named_modules()}


class ReflectAndNested(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.reflect = torch.nn.Conv2d(3, 4, 3, padding=1, padding_mode="reflect")
        self.heads = torch.nn.ModuleDict(
            {"a": torch.nn.Sequential(torch.nn.Conv2d(4, 4, 3, padding=1), torch.nn.ReLU())}
        )
        self.tied = torch.nn.Conv2d(4, 4, 3, padding=1, bias=False)
        self.again = self.tied

    def forward(self, x):
        x = self.heads["a"](self.reflect(x))
        return self.again(self.tied(x))


class OwnForwardConv(torch.nn.Conv2d):
    def forward(self, input):
        return super().forward(input) * 2


class WithOwnForward(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.own = OwnForwardConv(3, 4, 3)
        self.plain = torch.nn.Conv2d(4, 4, 1)

    def forward(self, x):
        return self.plain(self.own(x))


class RoIHead(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.align = torchvision.ops.RoIAlign(3, spatial_scale=0.5, sampling_ratio=2, aligned=True)
        self.pool = torchvision.ops.RoIPool((2, 3), spatial_scale=0.5)
        self.multi = torchvision.ops.MultiScaleRoIAlign(["0"], 3, 2)
        self.up = torch.nn.ConvTranspose2d(2, 2, 2)

    def forward(self, x, rois):
        return self.align(x, rois), self.pool(x, rois)


def _rois(dtype=torch.float32):
    return torch.tensor(
        [[0, 1.0, 2.0, 9.5, 11.0], [1, 0.0, 0.0, 15.0, 15.0], [0, 4.2, 3.1, 6.0, 7.7]],
        dtype=dtype,
    )


def test_resnet18_eval_matches_and_keeps_parameters():
    model = _resnet18().eval()
    reference = copy.deepcopy(model)
    params = {name: p for name, p in model.named_parameters()}
    buffers = {name: b for name, b in model.named_buffers()}

    report = cnnops.swap(model)

    assert len(report) == 20 and report.left_alone == []
    convs = [name for name, m in reference.named_modules() if isinstance(m, torch.nn.Conv2d)]
    assert [row[0] for row in report.swapped] == convs
    assert all(type(model.get_submodule(n)) is cnnops.nn.Conv2d for n in convs)
    assert all(p is params[name] for name, p in model.named_parameters())
    assert all(b is buffers[name] for name, b in model.named_buffers())
    assert not any(m.training for m in model.modules())
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        assert_close_to_reference(model(x), reference(x), RESNET18_REDUCTION)


def test_resnet18_train_gradients_match():
    # float64: in train mode batch norm over 2x2 maps magnifies float32 rounding differences.
    model = _resnet18(torch.float64).train()
    reference = copy.deepcopy(model)
    cnnops.swap(model)
    assert all(m.training for m in model.modules())
    assert next(model.parameters()).dtype == torch.float64
    x = torch.randn(1, 3, 64, 64, dtype=torch.float64)
    out, out_ref = model(x), reference(x)
    torch.testing.assert_close(out, out_ref)
    out.square().sum().backward()
    out_ref.square().sum().backward()
    named_ref = dict(reference.named_parameters())
    for name, p in model.named_parameters():
        torch.testing.assert_close(p.grad, named_ref[name].grad, msg=lambda m, n=name: f"{n}: {m}")
    for name, b in reference.named_buffers():
        torch.testing.assert_close(model.get_buffer(name), b)


def test_state_dict_round_trips_both_ways():
    torch_model = _resnet18()
    cnnops_model = _resnet18()
    cnnops.swap(cnnops_model)
    torch.manual_seed(1)
    for p in cnnops_model.parameters():
        p.data.normal_()
    assert list(cnnops_model.state_dict()) == list(torch_model.state_dict())

    torch_model.load_state_dict(cnnops_model.state_dict())
    for k, a in torch_model.state_dict().items():
        assert torch.equal(a, cnnops_model.state_dict()[k]), k

    fresh = _resnet18()
    cnnops.swap(fresh)
    expected = _resnet18().state_dict()
    fresh.load_state_dict(expected)
    for k, a in fresh.state_dict().items():
        assert torch.equal(a, expected[k]), k


def test_hooks_optimizer_and_attributes_kept():
    model = ReflectAndNested()
    conv = model.heads["a"][0]
    conv.tag = "mine"
    calls = []
    conv.register_forward_pre_hook(lambda m, args: calls.append("pre"))
    handle = conv.register_forward_hook(lambda m, args, out: calls.append(type(m).__name__))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)

    cnnops.swap(model)

    new = model.heads["a"][0]
    assert type(new) is cnnops.nn.Conv2d and new.tag == "mine"
    model(torch.randn(1, 3, 6, 6)).sum().backward()
    assert calls == ["pre", "Conv2d"]
    assert new.weight.grad is not None
    before = new.weight.detach().clone()
    optimizer.step()
    assert not torch.equal(new.weight, before)
    # The handle from before the swap still removes the hook from the new module.
    handle.remove()
    model(torch.randn(1, 3, 6, 6))
    assert calls == ["pre", "Conv2d", "pre"]


def test_user_model_reflect_nested_and_tied():
    torch.manual_seed(0)
    model = ReflectAndNested().double()
    reference = copy.deepcopy(model)

    report = cnnops.swap(model, algo="direct", backend="cpu")

    # cnnops.nn.Conv2d pads with padding_mode itself, so reflect convs are swapped too.
    assert {row[0] for row in report.swapped} == {"reflect", "heads.a.0", "tied"}
    assert type(model.reflect) is cnnops.nn.Conv2d
    assert type(model.heads["a"][0]) is cnnops.nn.Conv2d
    assert model.tied is model.again and type(model.tied) is cnnops.nn.Conv2d
    assert (model.tied.algo, model.tied.backend) == ("direct", "cpu")
    x = torch.randn(2, 3, 7, 9, dtype=torch.float64)
    torch.testing.assert_close(model(x), reference(x))


def test_subclass_with_own_forward_left_alone():
    model = WithOwnForward()
    report = cnnops.swap(model)
    assert type(model.own) is OwnForwardConv
    assert type(model.plain) is cnnops.nn.Conv2d
    [(name, type_name, reason)] = report.left_alone
    assert name == "own" and type_name.endswith("OwnForwardConv")
    assert "own forward" in reason


def test_unsupported_dtype_and_lazy_left_alone():
    model = torch.nn.Sequential(torch.nn.Conv2d(2, 2, 1).half(), torch.nn.LazyConv2d(2, 1))
    report = cnnops.swap(model)
    assert len(report) == 0
    reasons = dict((name, reason) for name, _, reason in report.left_alone)
    assert "float16" in reasons["0"] and "cpu" in reasons["0"]
    assert "lazy" in reasons["1"]
    assert type(model[0]) is torch.nn.Conv2d


def test_depthwise_algo_left_alone_where_it_cannot_serve():
    model = torch.nn.Sequential(torch.nn.Conv2d(4, 4, 3, groups=4), torch.nn.Conv2d(4, 4, 1))
    report = cnnops.swap(model, algo="depthwise")
    assert [row[0] for row in report.swapped] == ["0"]
    assert [row[0] for row in report.left_alone] == ["1"]
    assert "groups == in_channels" in report.left_alone[0][2]


@pytest.mark.parametrize(
    "include, exclude, swapped",
    [
        pytest.param(["layer1.*"], None, 4, id="include"),
        pytest.param(None, ["layer*"], 1, id="exclude"),
        pytest.param(["layer1.*", "conv1"], ["layer1.1.*"], 3, id="exclude-wins"),
        pytest.param("layer4.0.downsample.0", None, 1, id="one-string"),
    ],
)
def test_include_exclude(include, exclude, swapped):
    model = _resnet18()
    report = cnnops.swap(model, include=include, exclude=exclude)
    assert len(report) == swapped
    assert len(report.left_alone) == 20 - swapped
    for name, _, _ in report.swapped:
        assert type(model.get_submodule(name)) is cnnops.nn.Conv2d
    for name, _, reason in report.left_alone:
        assert type(model.get_submodule(name)) is torch.nn.Conv2d
        assert "include" in reason or "excluded" in reason


def test_roi_modules_swapped_and_match_torchvision():
    model = RoIHead()
    reference = copy.deepcopy(model)
    report = cnnops.swap(model)
    assert type(model.align) is cnnops.nn.RoIAlign and type(model.pool) is cnnops.nn.RoIPool
    align = model.align
    assert (align.output_size, align.sampling_ratio, align.aligned) == (3, 2, True)
    assert type(model.multi) is cnnops.nn.MultiScaleRoIAlign
    assert type(model.up) is cnnops.nn.ConvTranspose2d
    assert report.left_alone == []
    torch.manual_seed(0)
    x = torch.randn(2, 3, 9, 10)
    for ours, theirs in zip(model(x, _rois()), reference(x, _rois()), strict=True):
        torch.testing.assert_close(ours, theirs)

    assert cnnops.unswap(model) == 4  # align, pool, multi and up
    assert type(model.multi) is torchvision.ops.MultiScaleRoIAlign
    assert type(model.up) is torch.nn.ConvTranspose2d
    assert type(model.align) is torchvision.ops.RoIAlign
    assert type(model.pool) is torchvision.ops.RoIPool


def test_unswap_restores_torch_modules():
    model = ReflectAndNested()
    original = _types(model)
    params = list(model.parameters())
    reference = copy.deepcopy(model)
    calls = []
    model.tied.register_forward_hook(lambda m, args, out: calls.append(type(m)))
    cnnops.swap(model)
    model.train(False)

    assert cnnops.unswap(model) == 3
    assert _types(model) == original
    assert model.tied is model.again
    assert not hasattr(model.tied, "algo")
    assert all(a is b for a, b in zip(model.parameters(), params, strict=True))
    assert not model.training and not model.tied.training
    x = torch.randn(1, 3, 5, 5)
    torch.testing.assert_close(model(x), reference(x))
    assert calls == [torch.nn.Conv2d, torch.nn.Conv2d]
    assert cnnops.unswap(model) == 0


def test_report_str_and_swapping_twice_is_a_no_op():
    model = WithOwnForward()
    text = str(cnnops.swap(model))
    assert "1 swapped, 1 left alone" in text
    assert "plain" in text and "cnnops.nn.Conv2d" in text
    assert "own" in text and "own forward" in text

    plain = model.plain
    again = cnnops.swap(model, algo="im2col")
    assert len(again) == 0
    assert model.plain is plain and plain.algo == "auto"
    assert ("plain", "cnnops.nn.Conv2d", "already a cnnops module") in again.left_alone


def test_bad_arguments():
    with pytest.raises(ValueError, match="algo"):
        cnnops.swap(torch.nn.Sequential(), algo="winograd")
    with pytest.raises(ValueError, match="backend"):
        cnnops.swap(torch.nn.Sequential(), backend="tpu")
    with pytest.raises(ValueError, match="implicit_gemm"):
        cnnops.swap(torch.nn.Sequential(), algo="implicit_gemm", backend="cpu")
    with pytest.raises(TypeError, match="Module"):
        cnnops.swap(object())


def test_model_itself_is_not_replaced():
    conv = torch.nn.Conv2d(2, 2, 1)
    report = cnnops.swap(conv)
    assert type(conv) is torch.nn.Conv2d and len(report) == 0
    assert report.left_alone[0][0] == "" and "model itself" in report.left_alone[0][2]
    assert "(model)" in str(report)


# ---- RoI modules: backend, MultiScaleRoIAlign ---------------------------------------------


def _pyramid(dtype, extra=True):
    """FPN-like features of a batch padded to 384 x 320 (strides 4, 8, 16) in an OrderedDict
    whose order differs from featmap_names, with a map that is not pooled; boxes of every
    level, some exactly on a level boundary (sqrt(area) = 224 * 2^k); the images' sizes."""
    gen = torch.Generator().manual_seed(3)
    x = collections.OrderedDict()
    x["p2"] = torch.randn(2, 3, 96, 80, generator=gen, dtype=torch.float64)
    if extra:
        x["pool"] = torch.randn(2, 3, 3, 3, generator=gen, dtype=torch.float64)
    x["p3"] = torch.randn(2, 3, 48, 40, generator=gen, dtype=torch.float64)
    x["p4"] = torch.randn(2, 3, 24, 20, generator=gen, dtype=torch.float64)
    boxes = []
    for n in (12, 7):
        xy = torch.rand(n, 2, generator=gen, dtype=torch.float64) * 250
        wh = torch.rand(n, 2, generator=gen, dtype=torch.float64) * 300 + 2
        boxes.append(torch.cat([xy, xy + wh], 1))
    boxes[0][:4] = torch.tensor(
        [[0, 0, 224, 224], [10, 5, 122, 117], [1, 2, 57, 58], [3, 4, 115, 116 - 1e-9]],
        dtype=torch.float64,
    )
    x = collections.OrderedDict((k, v.to(dtype)) for k, v in x.items())
    return x, [b.to(dtype) for b in boxes], [(380, 320), (384, 300)]


def _assert_same_mapping(ours, theirs):
    assert ours.scales == theirs.scales
    for attr in ("k_min", "k_max", "s0", "lvl0", "eps"):
        assert getattr(ours.map_levels, attr) == getattr(theirs.map_levels, attr), attr


MULTISCALE_CASES = [
    pytest.param(["p2", "p3", "p4"], 3, 2, {}, id="three-levels"),
    pytest.param(["p4", "p2"], (2, 3), -1, {}, id="two-levels-adaptive"),
    pytest.param(["p3"], 4, 2, {}, id="one-level"),
    pytest.param(["p2", "p3", "p4"], 2, 1, dict(canonical_scale=64, canonical_level=3), id="canon"),
]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["float32", "float64"])
@pytest.mark.parametrize("names,output_size,sampling_ratio,canonical", MULTISCALE_CASES)
def test_multiscale_roi_align_matches_torchvision(
    names, output_size, sampling_ratio, canonical, dtype
):
    x, boxes, image_shapes = _pyramid(dtype)
    theirs = torchvision.ops.MultiScaleRoIAlign(names, output_size, sampling_ratio, **canonical)
    ours = cnnops.nn.MultiScaleRoIAlign(names, output_size, sampling_ratio, **canonical)
    leaves = {name: [v.clone().requires_grad_() for v in x.values()] for name in ("ours", "theirs")}
    outputs = {}
    for name, module in (("ours", ours), ("theirs", theirs)):
        with OpCounter() as ops:
            outputs[name] = module(dict(zip(x, leaves[name], strict=True)), boxes, image_shapes)
        expected_ops = {"ours": {"cnnops::roi_align"}, "theirs": {"torchvision::roi_align"}}
        assert ops.names == expected_ops[name]
        outputs[name].backward(torch.ones_like(outputs[name]))
    torch.testing.assert_close(outputs["ours"], outputs["theirs"])
    _assert_same_mapping(ours, theirs)
    for mine, reference in zip(leaves["ours"], leaves["theirs"], strict=True):
        assert (mine.grad is None) == (reference.grad is None)
        if mine.grad is not None:
            torch.testing.assert_close(mine.grad, reference.grad)


def test_multiscale_roi_align_levels_match_torchvision_on_boundaries():
    """Boxes whose level is exactly a boundary of eq. 1 (and a hair either side) land on the
    level torchvision puts them on."""
    sides = torch.tensor([224.0 * 2.0**k for k in range(-3, 3)], dtype=torch.float64)
    sides = torch.cat([sides, sides * (1 - 1e-7), sides * (1 + 1e-7), sides * (1 - 1e-15)])
    boxes = torch.zeros(len(sides), 4, dtype=torch.float64)
    boxes[:, 2:] = sides[:, None]
    for dtype in (torch.float32, torch.float64):
        theirs = torchvision.ops.poolers.LevelMapper(2, 5)
        ours = cnnops.nn.roi.LevelMapper(2, 5)
        assert torch.equal(ours([boxes.to(dtype)]), theirs([boxes.to(dtype)]))


def test_multiscale_roi_align_swap_keeps_inferred_scales():
    x, boxes, image_shapes = _pyramid(torch.float64)
    model = torch.nn.ModuleDict({"pool": torchvision.ops.MultiScaleRoIAlign(["p2", "p3"], 3, 2)})
    reference = model["pool"](x, boxes, image_shapes)  # infers the scales
    scales, mapper = model["pool"].scales, model["pool"].map_levels

    report = cnnops.swap(model, backend="cpu")
    swapped = model["pool"]
    assert report.swapped == [
        ("pool", "torchvision.ops.MultiScaleRoIAlign", "cnnops.nn.MultiScaleRoIAlign")
    ]
    assert type(swapped) is cnnops.nn.MultiScaleRoIAlign and swapped.backend == "cpu"
    assert swapped.scales is scales and swapped.map_levels is mapper
    # Other image sizes would infer other scales: the kept ones are used, as torchvision does.
    with OpCounter() as ops:
        got = swapped(x, boxes, [(100, 100)])
    assert ops.names == {"cnnops::roi_align"}
    torch.testing.assert_close(got, reference)
    assert "backend='cpu'" in repr(swapped)

    assert cnnops.unswap(model) == 1
    restored = model["pool"]
    assert type(restored) is torchvision.ops.MultiScaleRoIAlign
    assert not hasattr(restored, "backend") and restored.scales is scales
    torch.testing.assert_close(restored(x, boxes, image_shapes), reference)

    # A cnnops module's own mapper becomes torchvision's LevelMapper when unswapped.
    model["pool"] = cnnops.nn.MultiScaleRoIAlign(["p2", "p3"], 3, 2)
    model["pool"](x, boxes, image_shapes)
    assert cnnops.unswap(model) == 1
    assert type(model["pool"].map_levels) is torchvision.ops.poolers.LevelMapper
    _assert_same_mapping(model["pool"], restored)
    torch.testing.assert_close(model["pool"](x, boxes, image_shapes), reference)


def test_multiscale_roi_align_compiles_fullgraph():
    x, boxes, image_shapes = _pyramid(torch.float32)
    module = cnnops.nn.MultiScaleRoIAlign(["p2", "p3", "p4"], 3, 2)
    expected = cnnops.nn.MultiScaleRoIAlign(["p2", "p3", "p4"], 3, 2)(x, boxes, image_shapes)
    torch._dynamo.reset()
    compiled = torch.compile(module, fullgraph=True, backend="aot_eager")
    torch.testing.assert_close(compiled(x, boxes, image_shapes), expected)  # infers the scales
    torch.testing.assert_close(compiled(x, boxes, image_shapes), expected)  # uses them
    assert module.scales == [0.25, 0.125, 0.0625]


def test_multiscale_roi_align_bad_input():
    x, boxes, image_shapes = _pyramid(torch.float32)
    module = cnnops.nn.MultiScaleRoIAlign(["p2", "p3"], 3, 2)
    with pytest.raises(TypeError, match="x must be a dict"):
        module(list(x.values()), boxes, image_shapes)
    with pytest.raises(ValueError, match="none of the feature maps"):
        cnnops.nn.MultiScaleRoIAlign(["p9"], 3, 2)(x, boxes, image_shapes)
    with pytest.raises(ValueError, match="image_shapes"):
        module(x, boxes, [])
    with pytest.raises(ValueError, match=r"boxes\[1\]"):
        module(x, [boxes[0], boxes[1][:, :3]], image_shapes)
    assert module.scales is None  # failed calls infer nothing
    with pytest.raises(TypeError, match="featmap_names"):
        cnnops.nn.MultiScaleRoIAlign("p2", 3, 2)
    with pytest.raises(TypeError, match="sampling_ratio"):
        cnnops.nn.MultiScaleRoIAlign(["p2"], 3, 2.0)
    with pytest.raises(ValueError, match="output_size"):
        cnnops.nn.MultiScaleRoIAlign(["p2"], (3, 0), 2)
    for cls, args in (
        (cnnops.nn.MultiScaleRoIAlign, (["p2"], 3, 2)),
        (cnnops.nn.RoIAlign, (3, 0.5, 2)),
        (cnnops.nn.RoIPool, (3, 0.5)),
    ):
        with pytest.raises(ValueError, match="backend"):
            cls(*args, backend="tpu")


def test_roi_modules_take_backend():
    """backend= on the modules, and from swap(), reaches the ops (triton: Triton's interpreter
    on CPU tensors here); the default prints as torchvision's module does."""
    x, rois = roi_problem(torch.float32)
    pyramid, boxes, image_shapes = _pyramid(torch.float32, extra=False)
    calls = [
        ("RoIAlign", (3, 0.5, 2), (x, rois), "roi_align"),
        ("RoIPool", ((2, 3), 0.5), (x, rois), "roi_pool"),
        ("MultiScaleRoIAlign", (["p2", "p3"], 2, 2), (pyramid, boxes, image_shapes), "roi_align"),
    ]
    for name, args, inputs, op in calls:
        theirs = getattr(torchvision.ops, name)(*args)
        expected = theirs(*inputs)
        assert repr(getattr(cnnops.nn, name)(*args)) == repr(theirs)
        ours = getattr(cnnops.nn, name)(*args, backend="triton")
        assert "backend='triton'" in repr(ours)
        with OpCounter() as ops:
            got = ours(*inputs)
        assert ops.names == {f"cnnops::{op}_triton"}, name
        torch.testing.assert_close(got, expected)

        model = torch.nn.Sequential(theirs)
        cnnops.swap(model, backend="triton")
        assert model[0].backend == "triton"
        with OpCounter() as ops:
            model[0](*inputs)
        assert ops.names == {f"cnnops::{op}_triton"}, name


# ---- ConvTranspose2d ----


class UpBlock(torch.nn.Module):
    """A U-Net decoder step: up-convolution, then a 3x3 convolution."""

    def __init__(self):
        super().__init__()
        self.up = torch.nn.ConvTranspose2d(8, 4, 2, stride=2)
        self.conv = torch.nn.Conv2d(4, 4, 3, padding=1)
        self.grouped_up = torch.nn.ConvTranspose2d(4, 4, 3, stride=2, padding=1, groups=4)

    def forward(self, x):
        y = self.conv(torch.relu(self.up(x)))
        return self.grouped_up(y, output_size=(2 * y.shape[2], 2 * y.shape[3]))


class OwnForwardUp(torch.nn.ConvTranspose2d):
    def forward(self, input, output_size=None):
        return super().forward(input, output_size) * 2


def test_conv_transpose_swapped_matches_and_unswaps():
    torch.manual_seed(0)
    model = UpBlock().double()
    reference = copy.deepcopy(model)
    params = list(model.parameters())

    report = cnnops.swap(model, algo="direct")

    assert [row[0] for row in report.swapped] == ["up", "conv", "grouped_up"]
    assert ("up", "torch.nn.ConvTranspose2d", "cnnops.nn.ConvTranspose2d") in report.swapped
    assert type(model.up) is cnnops.nn.ConvTranspose2d and model.up.algo == "direct"
    assert type(model.grouped_up) is cnnops.nn.ConvTranspose2d
    assert all(a is b for a, b in zip(model.parameters(), params, strict=True))
    x = torch.randn(2, 8, 5, 6, dtype=torch.float64)
    out, out_ref = model(x), reference(x)
    assert out.shape == (2, 4, 20, 24)
    torch.testing.assert_close(out, out_ref)
    grads = torch.autograd.grad(out.square().sum(), list(model.parameters()))
    grads_ref = torch.autograd.grad(out_ref.square().sum(), list(reference.parameters()))
    for got, want in zip(grads, grads_ref, strict=True):
        torch.testing.assert_close(got, want)

    assert cnnops.unswap(model) == 3
    assert _types(model) == _types(reference)
    assert not hasattr(model.up, "algo")
    torch.testing.assert_close(model(x), out_ref)


def test_conv_transpose_left_alone_where_cnnops_cannot_serve():
    model = torch.nn.Sequential(
        torch.nn.ConvTranspose2d(2, 2, 2).half(),
        torch.nn.LazyConvTranspose2d(2, 2),
        OwnForwardUp(2, 2, 2),
        torch.nn.ConvTranspose2d(4, 4, 3, groups=4),  # depthwise
        torch.nn.ConvTranspose2d(4, 8, 3, groups=4),  # groups == in_channels, not out_channels
    )
    report = cnnops.swap(model, algo="depthwise")
    reasons = dict((name, reason) for name, _, reason in report.left_alone)
    assert [row[0] for row in report.swapped] == ["3"]
    assert "float16" in reasons["0"] and "cpu" in reasons["0"]
    assert "lazy" in reasons["1"]
    assert "subclass of torch.nn.ConvTranspose2d with its own forward" in reasons["2"]
    assert "groups == out_channels" in reasons["4"]
    assert type(model[0]) is torch.nn.ConvTranspose2d and type(model[2]) is OwnForwardUp
    again = cnnops.swap(model)
    assert ("3", "cnnops.nn.ConvTranspose2d", "already a cnnops module") in again.left_alone

"""cnnops.patch_torchvision / unpatch_torchvision: torchvision.ops' functions, and the places
torchvision calls them from, run on cnnops while patched and are torchvision's own again after."""

import importlib
import inspect
import subprocess
import sys
import types

import pytest
import torch
import torchvision
from op_counter import OpCounter
from roi_cases import problem

import cnnops

NAMES = ("nms", "batched_nms", "box_iou", "roi_align", "roi_pool")
ORIGINAL = {name: getattr(torchvision.ops, name) for name in NAMES}

# Every place torchvision's own code (and its detection models) calls the five functions from
# (grep torchvision for them): (module, global name).
CALL_SITES = [
    *[("torchvision.ops", name) for name in NAMES],
    ("torchvision.ops.boxes", "nms"),  # batched_nms's helpers call it from the module globals
    ("torchvision.ops.boxes", "batched_nms"),  # box_ops.batched_nms: rpn, roi_heads, retinanet
    ("torchvision.ops.boxes", "box_iou"),  # box_ops.box_iou: roi_heads, fcos, ssd
    ("torchvision.ops.roi_align", "roi_align"),  # RoIAlign.forward
    ("torchvision.ops.roi_pool", "roi_pool"),  # RoIPool.forward
    ("torchvision.ops.poolers", "roi_align"),  # MultiScaleRoIAlign
    ("torchvision.models.detection.roi_heads", "roi_align"),  # mask targets
    ("torchvision.transforms.v2._geometry", "box_iou"),  # RandomIoUCrop
]


def _site(module, name):
    return getattr(importlib.import_module(module), name)


@pytest.fixture(autouse=True)
def no_patch_left_open():
    """Every test starts and ends with torchvision's own functions in place."""
    assert all(getattr(torchvision.ops, n) is ORIGINAL[n] for n in NAMES)
    yield
    while any(getattr(torchvision.ops, n) is not ORIGINAL[n] for n in NAMES):
        cnnops.unpatch_torchvision()  # a failed test's patch: close it for the next test
        pytest.fail("a patch was left open")


def _assert_original():
    for module, name in CALL_SITES:
        assert _site(module, name) is ORIGINAL[name], f"{module}.{name} not restored"


def _assert_patched():
    for module, name in CALL_SITES:
        assert _site(module, name) is not ORIGINAL[name], f"{module}.{name} not patched"
        assert _site(module, name) is getattr(torchvision.ops, name)


def _boxes(n, dtype, seed=0, size=100.0):
    gen = torch.Generator().manual_seed(seed)
    xy = torch.rand(n, 2, generator=gen, dtype=torch.float64) * size
    wh = torch.rand(n, 2, generator=gen, dtype=torch.float64) * size / 4
    return torch.cat([xy, xy + wh], 1).to(dtype)


def _scores(n, dtype, seed=1):
    return torch.rand(n, generator=torch.Generator().manual_seed(seed), dtype=torch.float64).to(
        dtype
    )


def _calls(dtype):
    """(name, args) of a call of each function."""
    boxes, scores = _boxes(300, dtype), _scores(300, dtype)
    classes = torch.randint(0, 4, (300,), generator=torch.Generator().manual_seed(2))
    x, rois = problem(dtype)
    return [
        ("nms", (boxes, scores, 0.5)),
        ("batched_nms", (boxes, scores, classes, 0.4)),
        ("box_iou", (boxes, _boxes(70, dtype, seed=3))),
        ("roi_align", (x, rois, (3, 4), 0.5, 2, True)),
        ("roi_align", (x, rois, 3, 0.5, -1, False)),
        ("roi_pool", (x, rois, (2, 3), 0.5)),
    ]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["float32", "float64"])
def test_each_function_matches_torchvision_on_cnnops(dtype):
    for name, args in _calls(dtype):
        expected = ORIGINAL[name](*args)
        with cnnops.patch_torchvision(), OpCounter() as ops:
            got = getattr(torchvision.ops, name)(*args)
        assert ops.namespaces() == {"cnnops"}, f"{name}: ran {ops.counts}"
        if name in ("nms", "batched_nms"):
            assert got.dtype == torch.int64 and torch.equal(got, expected), name
        else:
            torch.testing.assert_close(got, expected, msg=lambda m, n=name: f"{n}: {m}")


def test_every_call_site_patched_and_restored():
    _assert_original()
    with cnnops.patch_torchvision():
        _assert_patched()
        # torchvision's signature: keyword calls and introspection work as before.
        for name in NAMES:
            patched = getattr(torchvision.ops, name)
            assert inspect.signature(patched) == inspect.signature(ORIGINAL[name])
            assert patched.__name__ == name
    _assert_original()

    cnnops.patch_torchvision()
    _assert_patched()
    cnnops.unpatch_torchvision()
    _assert_original()


def test_keyword_and_list_of_boxes_calls():
    x, rois = problem(torch.float64)
    per_image = [rois[rois[:, 0] == i, 1:] for i in range(x.shape[0])]
    expected = ORIGINAL["roi_align"](x, per_image, 3, 0.5, 2, True)
    expected_pool = ORIGINAL["roi_pool"](x, per_image, 2, 0.5)
    with cnnops.patch_torchvision(), OpCounter() as ops:
        got = torchvision.ops.roi_align(
            input=x, boxes=per_image, output_size=3, spatial_scale=0.5, sampling_ratio=2,
            aligned=True,
        )  # fmt: skip
        got_pool = torchvision.ops.roi_pool(x, boxes=per_image, output_size=2, spatial_scale=0.5)
    assert ops.namespaces() == {"cnnops"}
    torch.testing.assert_close(got, expected)
    torch.testing.assert_close(got_pool, expected_pool)


def test_roi_align_gradients_match():
    x, rois = problem(torch.float64)
    grads = []
    for patched in (False, True):
        leaf = x.clone().requires_grad_()
        with cnnops.patch_torchvision() if patched else torch.enable_grad():
            out = torchvision.ops.roi_align(leaf, rois, (3, 3), 0.5, 2, True)
        out.backward(torch.ones_like(out))
        grads.append(leaf.grad)
    torch.testing.assert_close(grads[1], grads[0])


def test_batched_nms_and_nms_empty_input():
    boxes, scores = torch.zeros(0, 4), torch.zeros(0)
    classes = torch.zeros(0, dtype=torch.int64)
    with cnnops.patch_torchvision():
        kept = torchvision.ops.batched_nms(boxes, scores, classes, 0.5)
        kept_nms = torchvision.ops.nms(boxes, scores, 0.5)
    for got, expected in (
        (kept, ORIGINAL["batched_nms"](boxes, scores, classes, 0.5)),
        (kept_nms, ORIGINAL["nms"](boxes, scores, 0.5)),
    ):
        assert got.shape == (0,) and got.dtype == expected.dtype == torch.int64


def test_box_iou_forms_cnnops_lacks_go_to_torchvision():
    a, b = _boxes(20, torch.float32), _boxes(30, torch.float32, seed=4)
    batched = torch.stack([a, _boxes(20, torch.float32, seed=5)])
    calls = [
        ((a, b, "cxcywh"), {}),  # another box format
        ((a, b), {"fmt": "xywh"}),
        ((batched, batched), {}),  # a batch of box sets
        ((a.round().int(), b.round().int()), {}),  # integer boxes
        ((a, b.double()), {}),  # mixed dtypes
    ]
    for args, kwargs in calls:
        expected = ORIGINAL["box_iou"](*args, **kwargs)
        with cnnops.patch_torchvision(), OpCounter() as ops:
            got = torchvision.ops.box_iou(*args, **kwargs)
        assert not ops.counts
        torch.testing.assert_close(got, expected, rtol=0, atol=0, equal_nan=True)


@pytest.mark.filterwarnings("ignore:torch.quantize_per_tensor:UserWarning")
def test_quantized_nms_and_roi_align_go_to_torchvision():
    boxes, scores = _boxes(50, torch.float32), _scores(50, torch.float32)
    qboxes = torch.quantize_per_tensor(boxes, 0.5, 0, torch.quint8)
    qscores = torch.quantize_per_tensor(scores, 0.01, 0, torch.quint8)
    x, rois = problem(torch.float32)
    qx = torch.quantize_per_tensor(x[:1], 0.05, 128, torch.quint8)
    qrois = torch.quantize_per_tensor(rois[rois[:, 0] == 0], 0.125, 0, torch.quint8)
    expected_nms = ORIGINAL["nms"](qboxes, qscores, 0.5)
    expected_align = ORIGINAL["roi_align"](qx, qrois, 2, 0.5, 2)
    with cnnops.patch_torchvision(), OpCounter() as ops:
        got_nms = torchvision.ops.nms(qboxes, qscores, 0.5)
        got_align = torchvision.ops.roi_align(qx, qrois, 2, 0.5, 2)
    assert "cnnops" not in ops.namespaces()
    assert torch.equal(got_nms, expected_nms)
    assert torch.equal(got_align.int_repr(), expected_align.int_repr())


def test_exception_in_the_block_unpatches():
    with pytest.raises(KeyError, match="inside"):
        with cnnops.patch_torchvision():
            _assert_patched()
            raise KeyError("inside")
    _assert_original()


def test_nested_patches_are_counted():
    with cnnops.patch_torchvision() as outer:
        patched = torchvision.ops.nms
        with cnnops.patch_torchvision():
            assert torchvision.ops.nms is patched  # the same wrappers: nothing re-patched
        _assert_patched()  # the inner block's end leaves the outer patch on
        assert not outer.closed
    assert outer.closed
    _assert_original()

    cnnops.patch_torchvision()
    cnnops.patch_torchvision()
    cnnops.unpatch_torchvision()
    _assert_patched()
    cnnops.unpatch_torchvision()
    _assert_original()


def test_unpatch_closing_a_with_patch_is_not_closed_twice():
    with cnnops.patch_torchvision() as patch:
        cnnops.unpatch_torchvision()  # closes the block's own patch
        assert patch.closed
        _assert_original()
    _assert_original()  # the block's end did not raise or unpatch again


def test_unpatch_without_patch_raises():
    with pytest.raises(RuntimeError, match="not patched"):
        cnnops.unpatch_torchvision()
    _assert_original()


def test_module_imported_while_patched_is_restored():
    """A torchvision module imported during the patch copies the wrappers into its globals
    (`from torchvision.ops import nms`); unpatching puts torchvision's functions there too."""
    name = "torchvision._cnnops_patch_test"
    with cnnops.patch_torchvision():
        late = types.ModuleType(name)
        late.nms, late.roi_align = torchvision.ops.nms, torchvision.ops.roi_align
        sys.modules[name] = late
    try:
        assert late.nms is ORIGINAL["nms"] and late.roi_align is ORIGINAL["roi_align"]
    finally:
        del sys.modules[name]


def test_backend_goes_to_the_ops():
    """The newest open patch's backend is the one used (the triton backend runs CPU tensors in
    Triton's interpreter here)."""
    boxes, scores = _boxes(40, torch.float32), _scores(40, torch.float32)
    expected = ORIGINAL["nms"](boxes, scores, 0.5)
    with cnnops.patch_torchvision(backend="triton"):
        with OpCounter() as ops:
            got = torchvision.ops.nms(boxes, scores, 0.5)
        assert ops.counts == {"cnnops::nms_triton": 1}
        assert torch.equal(got, expected)
        with cnnops.patch_torchvision(backend="cpu"), OpCounter() as ops:
            torchvision.ops.nms(boxes, scores, 0.5)
        assert ops.counts == {"cnnops::nms": 1}
        with OpCounter() as ops:
            torchvision.ops.nms(boxes, scores, 0.5)
        assert ops.counts == {"cnnops::nms_triton": 1}


def test_bad_backend_raises_before_patching():
    with pytest.raises(ValueError, match="backend"):
        cnnops.patch_torchvision(backend="tpu")
    _assert_original()


def test_bad_input_raises_cnnops_error():
    with cnnops.patch_torchvision():
        with pytest.raises(ValueError, match="scores"):
            torchvision.ops.nms(_boxes(5, torch.float32), torch.rand(4), 0.5)
        with pytest.raises(RuntimeError, match="batch index"):
            x, rois = problem(torch.float64)
            rois[0, 0] = 7
            torchvision.ops.roi_align(x, rois, 2)


def test_torchvision_roi_modules_run_on_cnnops():
    x, rois = problem(torch.float64)
    features = {"a": x, "b": torch.nn.functional.avg_pool2d(x, 2, ceil_mode=True)}
    per_image = [rois[rois[:, 0] == i, 1:].abs() + 1 for i in range(2)]
    per_image[0][:, 2:] *= 3  # large boxes, which map to the coarser level
    modules = [
        (torchvision.ops.RoIAlign((3, 3), 0.5, 2, aligned=True), (x, rois)),
        (torchvision.ops.RoIPool(2, 0.5), (x, rois)),
        (torchvision.ops.MultiScaleRoIAlign(["a", "b"], 3, 2), (features, per_image, [(22, 26)])),
    ]
    for module, args in modules:
        expected = module(*args)
        with cnnops.patch_torchvision(), OpCounter() as ops:
            got = module(*args)
        assert ops.namespaces() == {"cnnops"}, f"{module}: ran {ops.counts}"
        torch.testing.assert_close(got, expected)


def test_import_cnnops_does_not_import_torchvision():
    code = "import sys, cnnops; sys.exit('torchvision' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code], check=False).returncode == 0

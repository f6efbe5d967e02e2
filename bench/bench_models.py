"""Whole-model inference, swapped against unswapped: what a user of `cnnops.swap` gets.

Each case is one torchvision model at random init (seeded) in eval mode, called under
torch.inference_mode(). The reference provider is the model as torchvision builds it; the cnnops
providers are deep copies passed through `cnnops.swap(model, backend=...)` (every Conv2d, and the
RoI poolers), and for the detection model also run under `cnnops.patch_torchvision()`, so nms,
batched_nms, box_iou and roi_align go through cnnops too. Everything else (BatchNorm, ReLU,
linear layers, the detection model's Python glue) is torch's on both sides, so the speedup is the
share of the model cnnops serves, diluted by the rest.

The ground truth is the unswapped model in float64 on the same inputs.
"""

import copy
import sys

import torch
import torchvision

import cnnops
from bench.harness import Case, Provider, close_error, cnnops_backends

OP = "models"

# (torchvision builder name, batches on the CPU, batches on the GPU, image size)
MODEL_SETS = {
    "classification": [
        ("resnet50", (1, 8), (32,), 224),
        ("mobilenet_v2", (1, 8), (32,), 224),
        ("resnext50_32x4d", (1, 8), (32,), 224),
    ],
    # One 480 x 640 photo; the model resizes it to 320 on its shorter side.
    "detection": [
        ("fasterrcnn_mobilenet_v3_large_320_fpn", (1,), (1,), (480, 640)),
    ],
}
SET_NAMES = tuple(MODEL_SETS)
# --quick: the cheapest model of each set, at its first batch size.
QUICK_MODELS = ("mobilenet_v2", "fasterrcnn_mobilenet_v3_large_320_fpn")

# The ops a swapped model calls: a backend serves the models only if it has all of them.
SWAPPED_OPS = ("conv2d", "roi_align", "nms", "box_iou")


def build_model(name, set_name, dtype=torch.float32):
    """torchvision's model `name` at a fixed random init, its batch norms calibrated, in eval
    mode."""
    torch.manual_seed(0)
    builder = getattr(torchvision.models.detection if set_name == "detection" else
                      torchvision.models, name)  # fmt: skip
    kwargs = dict(weights=None)
    if set_name == "detection":
        kwargs["weights_backbone"] = None
    model = builder(**kwargs)
    calibrate_batch_norms(model.backbone if set_name == "detection" else model)
    return model.eval().to(dtype)


def calibrate_batch_norms(module, size=224):
    """Sets every batch norm's running statistics to those of one seeded batch. With a fresh
    init's statistics (mean 0, variance 1) a random network's activations shrink layer after
    layer (MobileNetV2's logits to ~1e-13), and the float64 check would pass whatever the
    convolutions computed."""
    norms = [m for m in module.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]
    momenta = [norm.momentum for norm in norms]
    for norm in norms:
        norm.reset_running_stats()
        norm.momentum = None  # a cumulative average: after one batch, that batch's statistics
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        module.train()(torch.randn(2, 3, size, size, generator=generator))
    for norm, momentum in zip(norms, momenta, strict=True):
        norm.momentum = momentum


def run_model(model, patched):
    """model(x) without autograd, with torchvision's ops routed through cnnops if `patched`."""

    def run(x):
        with torch.inference_mode():
            if not patched:
                return _flat_output(model(x))
            with cnnops.patch_torchvision():
                return _flat_output(model(x))

    return run


def _flat_output(out):
    """A classifier's logits as they are; a detector's per-image dicts as one flat tensor
    (boxes, scores, labels per image, in order), so that one error check covers all of it."""
    if isinstance(out, torch.Tensor):
        return out
    parts = []
    for image in out:
        parts += [image["boxes"].flatten(), image["scores"], image["labels"].to(image["scores"])]
    return torch.cat(parts) if parts else torch.empty(0)


def model_error(actual, expected):
    """(max abs error, tolerance) against the float64 model's output. Float32 rounding through
    ~50 layers stays far below 1e-3 of the output's magnitude; a wrong layer does not. A detector
    that keeps a different number of boxes than the float64 one gives a shape mismatch (inf)."""
    scale = expected.abs().max().item() if expected.numel() else 1.0
    return close_error(actual, expected, tolerance=1e-3 * scale)


def model_providers(name, set_name, device, backends, memory_format):
    """The providers of one model: torchvision's, then a swapped copy per cnnops backend."""
    reference = build_model(name, set_name).to(device, memory_format=memory_format)
    providers = [Provider("torch", run_model(reference, patched=False))]
    for backend in backends:
        swapped = copy.deepcopy(reference)
        cnnops.swap(swapped, backend=backend)
        providers.append(
            Provider(f"cnnops-{backend}", run_model(swapped, patched=set_name == "detection"))
        )
    return tuple(providers)


def make_case(set_name, spec, batch, device, providers, memory_format):
    name, _, _, size = spec
    height, width = (size, size) if isinstance(size, int) else size

    def make_args():
        generator = torch.Generator().manual_seed(0)
        x = torch.rand(batch, 3, height, width, generator=generator)
        x = x.to(device).contiguous(memory_format=memory_format)
        return (list(x),) if set_name == "detection" else (x,)

    def expected(args):
        # Built when needed and dropped after: a float64 ResNet-50 is 200 MB.
        model = build_model(name, set_name, torch.float64).to(device)
        (x,) = args
        x = [image.double() for image in x] if set_name == "detection" else x.double()
        return run_model(model, patched=False)(x).double()

    return Case(
        op=OP,
        set_name=set_name,
        layer=name,
        batch=batch,
        shape=dict(image=f"{height}x{width}"),
        dtype=torch.float32,
        device=device,
        make_args=make_args,
        expected=expected,
        error=model_error,
        providers=providers,
    )


def build_cases(device, *, sets=None, batches=None, channels_last=False, backward=False,
                quick=False, stream=sys.stderr, **_):  # fmt: skip
    """(the whole-model cases for `device`, notes for the results header). Inference only:
    with --backward there are none."""
    device = torch.device(device)
    if backward:
        return [], ["models: inference only, no cases with --backward"]
    backends, notes = cnnops_backends(SWAPPED_OPS, device, OP)
    if device.type == "cpu" and "triton" in backends:
        # Triton's interpreter (TRITON_INTERPRET=1) runs on CPU tensors, but a whole model in it
        # takes minutes per call: it checks kernels, it does not benchmark them.
        backends.remove("triton")
        notes.append(f"{OP} provider cnnops-triton skipped: Triton's interpreter is not timed")
    for note in notes:
        print(note, file=stream)
    gpu = device.type == "cuda"
    memory_format = torch.channels_last if channels_last else torch.contiguous_format
    cases = []
    for set_name, specs in MODEL_SETS.items():
        if sets is not None and set_name not in sets:
            continue
        for spec in specs:
            if quick and spec[0] not in QUICK_MODELS:
                continue
            model_batches = batches or (spec[2] if gpu else spec[1])
            if quick:
                model_batches = model_batches[:1]
            providers = model_providers(spec[0], set_name, device, backends, memory_format)
            for batch in model_batches:
                cases.append(make_case(set_name, spec, batch, device, providers, memory_format))
    return cases, notes

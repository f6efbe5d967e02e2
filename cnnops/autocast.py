"""What torch.autocast does to the cnnops ops: Autocast kernels (dispatch keys AutocastCPU and
AutocastCUDA) for every op in AUTOCAST_OPS.

Custom ops are in none of autocast's cast lists, so without these kernels an op under autocast
gets its inputs as they come: mixed float32 / bfloat16 tensors, which the kernels reject, or
bfloat16 ones, which the CPU kernels have no code for. The dispatcher runs an Autocast kernel
before the Autograd one, so autograd records the casts made here and gradients flow back
through them to each input in its own dtype, as with torch's own ops.

Policies (torch's and torchvision's):
- LOWER_PRECISION (the convolutions, as torch's conv2d): on CUDA the floating inputs are cast to
  torch.get_autocast_dtype("cuda") and the kernels run in it (they accumulate in float32). On
  the CPU the output is in torch.get_autocast_dtype("cpu") too, as torch's conv2d gives, but the
  CPU kernels have no bfloat16 (or float16) arithmetic. So the inputs are rounded to that dtype,
  as autocast rounds them for torch's conv, then widened to float32 (exactly), the kernel runs
  in float32 and its output is rounded once. That is the arithmetic of oneDNN's bfloat16
  convolution, which torch's conv runs on the CPU under autocast: products of bfloat16 values,
  exact in float32, summed in float32, one rounding at the end; and the gradients, which flow
  back through the same casts, are rounded to bfloat16 as torch's are.
- FLOAT32 (the RoI and box ops, as torchvision's roi_align, roi_pool and nms): the floating
  inputs are cast to float32 and the op runs in float32; floating outputs go back to the dtype
  of the argument named in the table (roi_align's features in bfloat16 give bfloat16 features).
As in torch, float64 tensors are never cast, and non-floating ones (nms's class ids) neither.
"""

import torch

LOWER_PRECISION = "lower_precision"
FLOAT32 = "float32"

# op name in the cnnops namespace -> (policy, index of the argument whose dtype the floating
# outputs are returned in, or None to leave them in the dtype the op computed them in). The
# triton ops have their own entries: they are separate ops. An op that does not exist (yet) is
# skipped, so an op being added needs only its row here.
AUTOCAST_OPS = {
    "conv2d": (LOWER_PRECISION, None),
    "conv2d_triton": (LOWER_PRECISION, None),
    "conv_transpose2d": (LOWER_PRECISION, None),
    "conv_transpose2d_triton": (LOWER_PRECISION, None),
    "roi_align": (FLOAT32, 0),  # (input, rois, ...): output in the input's dtype
    "roi_align_triton": (FLOAT32, 0),
    "roi_pool": (FLOAT32, 0),  # (output, argmax): argmax is int32 and stays so
    "roi_pool_triton": (FLOAT32, 0),
    "nms": (FLOAT32, None),  # int64 indices
    "nms_triton": (FLOAT32, None),
    "soft_nms": (FLOAT32, 1),  # (boxes, scores, ...) -> (keep, scores in the scores' dtype)
    "soft_nms_triton": (FLOAT32, 1),
    "box_iou": (FLOAT32, 0),  # (boxes1, boxes2): IoU in boxes1's dtype, as without autocast
    "box_iou_triton": (FLOAT32, 0),
}

# The devices whose autocast the ops follow, and their Autocast dispatch keys.
AUTOCAST_KEYS = {"cpu": "AutocastCPU", "cuda": "AutocastCUDA"}


def _castable(value):
    """Whether autocast casts `value`: a floating tensor other than float64 (torch's rule)."""
    return (
        isinstance(value, torch.Tensor)
        and value.is_floating_point()
        and value.dtype != torch.float64
    )


def _cast_outputs(result, dtype):
    """`result` (a tensor or a tuple of them) with its floating tensors cast to `dtype`."""
    if isinstance(result, torch.Tensor):
        return result.to(dtype) if result.is_floating_point() else result
    return type(result)(_cast_outputs(r, dtype) for r in result)


def _run_lower_precision(op, device_type, args):
    dtype = torch.get_autocast_dtype(device_type)
    if not any(_castable(a) for a in args):
        return op(*args)
    if device_type == "cuda":
        return op(*(a.to(dtype) if _castable(a) else a for a in args))
    # The CPU: see the module docstring. The float32 kernel's output is rounded to `dtype`.
    args = [a.to(dtype).to(torch.float32) if _castable(a) else a for a in args]
    return _cast_outputs(op(*args), dtype)


def _run_float32(op, args, restore):
    result = op(*(a.to(torch.float32) if _castable(a) else a for a in args))
    if restore is None:
        return result
    return _cast_outputs(result, args[restore].dtype)


def _autocast_kernel(op, device_type, policy, restore):
    # The op is called again from inside its Autocast kernel: with this device's Autocast key
    # excluded, the call goes on to the next key (Autograd) instead of coming back here.
    excluded = torch._C.DispatchKeySet(getattr(torch._C.DispatchKey, AUTOCAST_KEYS[device_type]))

    def kernel(*args):
        with torch._C._ExcludeDispatchKeyGuard(excluded):
            if policy == LOWER_PRECISION:
                return _run_lower_precision(op, device_type, args)
            return _run_float32(op, args, restore)

    return kernel


def _register():
    library = torch.library.Library("cnnops", "IMPL")
    for name, (policy, restore) in AUTOCAST_OPS.items():
        if not hasattr(torch.ops.cnnops, name):
            continue
        op = getattr(torch.ops.cnnops, name).default
        for device_type, key in AUTOCAST_KEYS.items():
            library.impl(name, _autocast_kernel(op, device_type, policy, restore), key)
    return library


# Kept for the life of the process: the registrations last as long as the Library object.
_LIBRARY = _register()

"""Backend resolution for every cnnops op, in one place.

Order: the call's `backend=` argument, then a `use_backend(...)` context, then the
CNNOPS_BACKEND environment variable, then the device default. A backend that cannot serve the
call raises; nothing falls back silently.
"""

import contextlib
import os

import torch

BACKENDS = ("cpu", "cuda", "triton")

# The use_backend() blocks now open, innermost last. A plain module global, not a ContextVar:
# torch.compile (Dynamo, torch 2.11) cannot trace ContextVar.get, but reads and guards globals.
# So, like torch.backends.cudnn.flags(), the setting is process-wide, not per thread.
_backend_stack = []

# Backends each op has kernels for. An op module adds itself when its kernels exist.
_OP_BACKENDS = {
    "conv2d": ("cpu", "cuda", "triton"),
    "conv_transpose2d": ("cpu", "cuda", "triton"),
    "nms": ("cpu", "cuda", "triton"),
    "box_iou": ("cpu", "cuda", "triton"),
    "roi_align": ("cpu", "cuda", "triton"),
    "roi_pool": ("cpu", "cuda", "triton"),
}


def autocast_unifies(*tensors):
    """Whether torch.autocast is on for the tensors' device and casts them all to one dtype
    before the op's kernel runs (cnnops/autocast.py): floating tensors other than float64. The
    public functions then take mixed dtypes, as torch's own ops do under autocast; inside the
    op autocast is off, and the kernels' checks see the cast tensors."""
    device = tensors[0].device.type
    return (
        device in ("cpu", "cuda")
        and torch.is_autocast_enabled(device)
        and all(t.is_floating_point() and t.dtype != torch.float64 for t in tensors)
    )


def _check_name(backend, source):
    if backend not in BACKENDS:
        raise ValueError(f"unknown backend {backend!r} from {source}; expected one of {BACKENDS}")
    return backend


@contextlib.contextmanager
def use_backend(backend):
    """Runs the ops inside the block on `backend` ("cpu", "cuda" or "triton"), unless a call
    names one."""
    _backend_stack.append(_check_name(backend, "use_backend()"))
    try:
        yield
    finally:
        _backend_stack.pop()


def has_cuda_kernels():
    import cnnops

    return cnnops.has_cuda_kernels()


def available_backends(device=None):
    """The backends that can run ops on `device` (default: every device present)."""
    devices = (
        [torch.device(device)]
        if device is not None
        else [torch.device("cpu")] + ([torch.device("cuda")] if torch.cuda.is_available() else [])
    )
    found = []
    for dev in devices:
        for backend in BACKENDS:
            if backend not in found and _unavailable_reason(backend, dev) is None:
                found.append(backend)
    return found


def _unavailable_reason(backend, device):
    """Why `backend` cannot run on `device`, or None if it can."""
    if backend == "cpu":
        return None if device.type == "cpu" else f"the cpu backend needs CPU tensors, got {device}"
    if backend == "cuda":
        if device.type != "cuda":
            return f"the cuda backend needs CUDA tensors, got {device}"
        if not has_cuda_kernels():
            return "this build of cnnops has no CUDA kernels (rebuild with nvcc, CNNOPS_CUDA=1)"
        return None
    # triton
    if device.type == "cpu" and os.environ.get("TRITON_INTERPRET") != "1":
        return "the triton backend runs on CPU tensors only under TRITON_INTERPRET=1"
    if device.type not in ("cpu", "cuda"):
        return f"the triton backend needs CUDA tensors, got {device}"
    return None


def resolve_backend(op, device, backend=None):
    """The backend that runs `op` on tensors on `device`; raises if the choice cannot serve it."""
    if backend is not None:
        backend = _check_name(backend, "the backend= argument")
    elif _backend_stack:
        backend = _backend_stack[-1]
    elif os.environ.get("CNNOPS_BACKEND"):
        backend = _check_name(os.environ["CNNOPS_BACKEND"], "the CNNOPS_BACKEND variable")
    else:
        backend = "cpu" if device.type == "cpu" else "cuda"
    reason = _unavailable_reason(backend, device)
    if reason is None and backend not in _OP_BACKENDS[op]:
        reason = f"{op} has no {backend} kernels (it has: {', '.join(_OP_BACKENDS[op])})"
    if reason is not None:
        raise RuntimeError(f"cnnops.{op}: backend {backend!r} cannot run this call: {reason}")
    return backend

"""The machine a benchmark runs on: its name, a file-name slug for it, and its roofline peaks."""

import platform
import re
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class Peak:
    """Datasheet peaks: FLOP/s per math mode and memory bandwidth in bytes/s."""

    flops: dict  # "fp16" / "bf16" / "tf32" / "fp32" -> FLOP/s (dense, no sparsity)
    bytes_per_s: float


_H100_COMPUTE = {"fp16": 989e12, "bf16": 989e12, "tf32": 495e12, "fp32": 67e12}

# (pattern matched against torch.cuda.get_device_name(), peaks). First match wins. Only parts
# whose figures we have are listed: a GPU not matched gets a blank roofline column, which is
# better than a wrong one (the H100 PCIe and NVL parts have lower clocks and bandwidth).
GPU_PEAKS = (
    (r"H200", Peak(_H100_COMPUTE, 4.8e12)),
    (r"H100 (SXM|80GB HBM3)", Peak(_H100_COMPUTE, 3.35e12)),  # the SXM part reports "80GB HBM3"
)


def best_device():
    return torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")


def device_name(device):
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    try:
        with open("/proc/cpuinfo") as cpuinfo:
            for line in cpuinfo:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "cpu"


def device_slug(name):
    """A file-name-safe device name: 'Intel(R) Xeon(R) Processor' -> 'intel-xeon-processor'."""
    name = re.sub(r"\((r|tm)\)", "", name.lower())
    name = re.sub(r"\bcpu @ .*", "", name)  # the clock is noise in a file name
    return re.sub(r"[^a-z0-9]+", "-", name).strip("-") or "unknown-device"


def peak_for(device):
    """The datasheet Peak of a CUDA device, or None (CPUs and GPUs not in GPU_PEAKS)."""
    device = torch.device(device)
    if device.type != "cuda":
        return None
    name = device_name(device)
    for pattern, peak in GPU_PEAKS:
        if re.search(pattern, name):
            return peak
    return None


def math_mode(dtype):
    """The Peak.flops key for convolutions in `dtype` under torch's current settings."""
    if dtype == torch.float16:
        return "fp16"
    if dtype == torch.bfloat16:
        return "bf16"
    if dtype == torch.float32:
        # cuDNN convolutions run fp32 on TF32 tensor cores unless that is turned off.
        return "tf32" if torch.backends.cudnn.allow_tf32 else "fp32"
    return None


def roofline_percent(seconds, flops, min_bytes, peak, dtype):
    """Percent of roofline: the time the compute or memory bound allows over the time taken."""
    mode = math_mode(dtype)
    if peak is None or mode not in peak.flops or not seconds:
        return None
    bound_s = max(
        flops / peak.flops[mode] if flops else 0.0,
        min_bytes / peak.bytes_per_s if min_bytes else 0.0,
    )
    return 100.0 * bound_s / seconds if bound_s else None

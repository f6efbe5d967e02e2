"""Compiles every Triton kernel specialisation the ops launch for sm_90 and reports ptxas's
registers and spills, one JSON line per kernel. Run as a script, in a process of its own:
Triton's interpreter (TRITON_INTERPRET=1, which the tests set without a GPU) and real compilation
cannot share a process. tests/kernels/test_triton_aot.py runs it."""

import json
import os
import re
import subprocess
import sys
import tempfile
from dataclasses import dataclass, field


@dataclass
class Case:
    id: str
    kernel: object
    dtype: str  # of the pointers, unless `pointers` says otherwise
    constexprs: dict
    options: dict = field(default_factory=dict)  # num_warps, num_stages
    pointers: dict = field(default_factory=dict)  # pointer name -> dtype
    divisible: tuple = ()  # integer arguments Triton sees as multiples of 16


# The stride arguments of the GEMM-shaped kernels: per activation tensor (n, c, h, w), and the
# weight's, whose last one is 1 (the launcher passes the weight permuted and contiguous).
GEMM_STRIDES = {
    "conv2d_forward_kernel": (
        [("sxn", "sxc", "sxh", "sxw"), ("syn", "syc", "syh", "syw")],
        ("swr", "sws", "swc", "swk"),
    ),
    "conv2d_grad_input_kernel": (
        [("son", "soc", "soh", "sow"), ("sin_", "sic", "sih", "siw")],
        ("swr", "sws", "swk", "swc"),
    ),
    "conv2d_grad_weight_kernel": ([("son", "soc", "soh", "sow"), ("sxn", "sxc", "sxh", "sxw")], ()),
}


def gemm_specialisation(kernel_name):
    """(arguments equal to 1, arguments divisible by 16) of a launch on a typical ResNet layer
    (channels a multiple of 16, aligned tensors): Triton specialises on both, and they decide
    how it lays out the loads. The launcher passes every activation in channels_last (the
    channel stride is 1, every other stride a multiple of the channels) and the weight
    permuted, its last stride 1."""
    activations, weight = GEMM_STRIDES[kernel_name]
    ones, divisible = [], ["CG", "KG", "PIX_PER_SPLIT"]
    for n, c, h, w in activations:
        ones.append(c)
        divisible += [n, h, w]
    if weight:
        ones.append(weight[-1])
        divisible += weight[:-1]
    return {name: 1 for name in ones}, tuple(divisible)


def cases():
    """The specialisations the conv2d and box ops launch."""
    from cnnops.kernels import conv2d as conv2d_kernels

    from cnnops.ops.conv2d import TRITON_CONFIGS

    yield from depthwise_cases(conv2d_kernels, TRITON_CONFIGS)
    yield from gemm_cases(conv2d_kernels, TRITON_CONFIGS)
    yield from box_cases()
    yield from roi_cases()


def box_cases():
    """The nms kernels (the IoU mask in float32 and float64, with and without class ids; the
    greedy pass), soft_nms (float32 and float64, both methods) and box_iou in every dtype, each
    with its GPU config."""
    from cnnops.kernels import nms as nms_kernels

    from cnnops.ops.nms import TRITON_CONFIGS

    def split(config):
        config = dict(config)
        return config, {"num_warps": config.pop("num_warps")}

    word_bits = TRITON_CONFIGS["word_bits"]
    mask_blocks, mask_options = split(TRITON_CONFIGS["nms_iou_mask"]["gpu"])
    for dtype in ("fp32", "fp64"):
        for has_classes in (False, True):
            yield Case(
                f"nms_iou_mask-{dtype}-{'classes' if has_classes else 'no-classes'}",
                nms_kernels.nms_iou_mask_kernel,
                dtype,
                dict(
                    HAS_CLASSES=has_classes,
                    FP64=dtype == "fp64",
                    WORD_BITS=word_bits,
                    **mask_blocks,
                ),
                mask_options,
                {"classes_ptr": "i64", "mask_ptr": "i64"},
            )
    greedy_blocks, greedy_options = split(TRITON_CONFIGS["nms_greedy"]["gpu"])
    yield Case(
        "nms_greedy",
        nms_kernels.nms_greedy_kernel,
        "i64",
        dict(WORD_BITS=word_bits, **greedy_blocks),
        greedy_options,
        {"valid_ptr": "i8", "keep_ptr": "i8"},
    )
    soft_blocks, soft_options = split(TRITON_CONFIGS["soft_nms"]["gpu"])
    for dtype in ("fp32", "fp64"):
        for method in ("gaussian", "linear"):
            yield Case(
                f"soft_nms-{dtype}-{method}",
                nms_kernels.soft_nms_kernel,
                dtype,
                dict(GAUSSIAN=method == "gaussian", FP64=dtype == "fp64", **soft_blocks),
                soft_options,
                {"keep_ptr": "i64", "count_ptr": "i32"},
            )
    iou_blocks, iou_options = split(TRITON_CONFIGS["box_iou"]["gpu"])
    for dtype in ("fp32", "fp64", "fp16", "bf16"):
        yield Case(
            f"box_iou-{dtype}",
            nms_kernels.box_iou_kernel,
            dtype,
            dict(FP64=dtype == "fp64", **iou_blocks),
            iou_options,
        )


# The strides a launch passes as 1 (Triton specialises them), per layout of the tensors: the
# channels' in channels_last, the columns' in NCHW; the RoIs are [K, 5] and contiguous.
ROI_ONES = {
    "channels_last": ("s_in_c", "s_out_c", "s_g_c", "s_gi_c", "s_a_c", "s_roi_c"),
    "nchw": ("s_in_w", "s_out_w", "s_g_w", "s_gi_w", "s_a_w", "s_roi_c"),
}
# Integer arguments that are multiples of 16 on the Faster R-CNN head (2 x 256 x 50 x 68, 512
# RoIs, 7 x 7): the channels and, in channels_last, every stride but the channels'.
ROI_DIVISIBLE = {
    "channels_last": ("C", "K", "s_in_n", "s_in_h", "s_in_w", "s_out_k", "s_out_h", "s_out_w",
                      "s_g_k", "s_g_h", "s_g_w", "s_gi_n", "s_gi_h", "s_gi_w", "s_a_k",
                      "s_a_h", "s_a_w"),
    "nchw": ("C", "K", "s_in_n", "s_out_k", "s_g_k", "s_gi_n", "s_a_k"),
}  # fmt: skip


def roi_cases():
    """The roi_align and roi_pool kernels with their GPU configs: the RoI check, the forwards
    and the atomic backwards (one config per layout), the deterministic backwards (and roi_pool's
    bin boxes), in float32, float16 and bfloat16, each with the strides a launch in that layout
    specialises to 1."""
    from cnnops.kernels import roi_align as align_kernels
    from cnnops.kernels import roi_pool as pool_kernels

    from cnnops.ops.roi_align import TRITON_CONFIGS as ALIGN_CONFIGS
    from cnnops.ops.roi_pool import TRITON_CONFIGS as POOL_CONFIGS

    def split(config):
        config = dict(config)
        return config, {"num_warps": config.pop("num_warps")}

    def specialised(kernel, layout):
        names = kernel.arg_names
        ones = {name: 1 for name in ROI_ONES[layout] if name in names}
        return ones, tuple(name for name in ROI_DIVISIBLE[layout] if name in names)

    for dtype in ("fp32", "fp16", "bf16"):
        blocks, options = split(ALIGN_CONFIGS["roi_check"]["gpu"])
        for check_grid in (False, True):  # roi_pool's, roi_align's
            yield Case(
                f"roi_check-{dtype}{'-grid' if check_grid else ''}",
                align_kernels.roi_check_kernel, dtype,
                dict(FP64=False, CHECK_GRID=check_grid, ALIGNED=False, **blocks), options,
                {"result_ptr": "i32"},
            )  # fmt: skip
    for layout in ("channels_last", "nchw"):
        for dtype in ("fp32", "fp16", "bf16"):
            for aligned in (False, True) if dtype == "fp32" else (False,):
                kernel = align_kernels._roi_align_fwd_kernel
                ones, divisible = specialised(kernel, layout)
                blocks, options = split(ALIGN_CONFIGS["roi_align_fwd"]["gpu"][layout])
                yield Case(
                    f"roi_align_fwd-{layout}-{dtype}{'-aligned' if aligned else ''}",
                    kernel, dtype,
                    dict(ALIGNED=aligned, FP64=False, CHANNELS_FAST=layout == "channels_last",
                         **blocks, **ones),
                    options, {}, divisible,
                )  # fmt: skip
            kernel = align_kernels._roi_align_bwd_kernel
            ones, divisible = specialised(kernel, layout)
            blocks, options = split(ALIGN_CONFIGS["roi_align_bwd"]["gpu"][layout])
            yield Case(
                f"roi_align_bwd-{layout}-{dtype}", kernel, dtype,
                dict(ALIGNED=False, FP64=False, CHANNELS_FAST=layout == "channels_last",
                     **blocks, **ones),
                options, {"gi_ptr": "fp32"}, divisible,
            )  # fmt: skip
            kernel = align_kernels._roi_align_bwd_deterministic_kernel
            ones, divisible = specialised(kernel, layout)
            blocks, options = split(ALIGN_CONFIGS["roi_align_bwd_deterministic"]["gpu"])
            yield Case(
                f"roi_align_bwd_deterministic-{layout}-{dtype}", kernel, dtype,
                dict(ALIGNED=False, FP64=False, **blocks, **ones), options, {}, divisible,
            )  # fmt: skip
            kernel = pool_kernels._roi_pool_fwd_kernel
            ones, divisible = specialised(kernel, layout)
            blocks, options = split(POOL_CONFIGS["roi_pool_fwd"]["gpu"][layout])
            yield Case(
                f"roi_pool_fwd-{layout}-{dtype}", kernel, dtype,
                dict(FP64=False, CHANNELS_FAST=layout == "channels_last", **blocks, **ones),
                options, {"argmax_ptr": "i32"}, divisible,
            )  # fmt: skip
            kernel = pool_kernels._roi_pool_bwd_kernel
            ones, divisible = specialised(kernel, layout)
            blocks, options = split(POOL_CONFIGS["roi_pool_bwd"]["gpu"][layout])
            yield Case(
                f"roi_pool_bwd-{layout}-{dtype}", kernel, dtype,
                dict(FP64=False, CHANNELS_FAST=layout == "channels_last", **blocks, **ones),
                options, {"argmax_ptr": "i32", "gi_ptr": "fp32"}, divisible,
            )  # fmt: skip
            kernel = pool_kernels._roi_pool_bwd_deterministic_kernel
            ones, divisible = specialised(kernel, layout)
            blocks, options = split(POOL_CONFIGS["roi_pool_bwd_deterministic"]["gpu"])
            yield Case(
                f"roi_pool_bwd_deterministic-{layout}-{dtype}", kernel, dtype,
                dict(FP64=False, **blocks, **ones), options,
                {"argmax_ptr": "i32", "boxes_ptr": "i32"}, divisible,
            )  # fmt: skip
        kernel = pool_kernels._roi_pool_bin_boxes_kernel
        ones, divisible = specialised(kernel, layout)
        blocks, options = split(POOL_CONFIGS["roi_pool_bin_boxes"]["gpu"])
        yield Case(
            f"roi_pool_bin_boxes-{layout}", kernel, "i32", dict(**blocks, **ones), options, {},
            divisible,
        )  # fmt: skip


def gemm_cases(conv2d_kernels, configs):
    """Every autotune config of direct and implicit_gemm, for each of their three kernels, in
    float32 (implicit GEMM as TF32, torch's default), float16 and bfloat16."""
    for algo in ("implicit_gemm", "direct"):
        for index, config in enumerate(configs[algo]["autotune"]):
            blocks = {k: v for k, v in config.items() if k.startswith("BLOCK_")}
            options = dict(num_warps=config["num_warps"], num_stages=config["num_stages"])
            for dtype in ("fp32", "fp16", "bf16"):
                precision = "tf32" if dtype == "fp32" else "ieee"
                gemm = dict(
                    USE_DOT=algo == "implicit_gemm", INPUT_PRECISION=precision, FP64=False, **blocks
                )
                for name in ("conv2d_forward", "conv2d_grad_input", "conv2d_grad_weight"):
                    kernel = f"{name}_kernel"
                    ones, divisible = gemm_specialisation(kernel)
                    extra = dict(HAS_BIAS=True) if name == "conv2d_forward" else {}
                    yield Case(
                        f"{name}-{algo}-config{index}-{dtype}",
                        getattr(conv2d_kernels, kernel),
                        dtype,
                        dict(gemm, **extra, **ones),
                        options,
                        # grad weight writes float32 partial sums, whatever the dtype.
                        {"gw_ptr": "fp32"} if name == "conv2d_grad_weight" else {},
                        divisible,
                    )


def depthwise_cases(conv2d_kernels, configs):
    """The depthwise kernels, with their one block shape each, unspecialised (any layout): the
    forward for every kernel size and stride it has specialisations for (its input tile sized
    for dilation 1), and once without a staged tile (large dilations); the gradients at 3x3,
    and grad input at 4x4 stride 2 too (conv_transpose2d's up-sampling)."""
    from cnnops.ops.conv2d import depthwise_tile_columns

    forward = dict(configs["depthwise_forward"])
    del forward["MAX_BLOCK_X"]  # the launcher's, not the kernel's
    options = dict(num_warps=forward.pop("num_warps"))
    for dtype in ("fp32", "fp16", "bf16"):
        for size in (3, 5, 7):
            for stride in (1, 2):
                taps = dict(R=size, S=size, STRIDE_H=stride, STRIDE_W=stride, FP64=False)
                block_x = depthwise_tile_columns(forward["BLOCK_Q"], size, stride, 1)
                yield Case(
                    f"depthwise_forward-{dtype}-{size}x{size}-s{stride}",
                    conv2d_kernels.depthwise_forward_kernel,
                    dtype,
                    dict(taps, HAS_BIAS=True, BLOCK_X=block_x, **forward),
                    options,
                )
        taps = dict(R=3, S=3, STRIDE_H=1, STRIDE_W=1, FP64=False)
        yield Case(
            f"depthwise_forward-{dtype}-3x3-s1-unstaged",
            conv2d_kernels.depthwise_forward_kernel,
            dtype,
            dict(taps, HAS_BIAS=True, BLOCK_X=0, **forward),
            options,
        )
        for stride in (1, 2):
            taps = dict(R=3, S=3, STRIDE_H=stride, STRIDE_W=stride, FP64=False)
            for name in ("depthwise_grad_input", "depthwise_grad_weight"):
                yield Case(
                    f"{name}-{dtype}-3x3-s{stride}",
                    getattr(conv2d_kernels, f"{name}_kernel"),
                    dtype,
                    dict(taps, **configs[name]),
                )
        # conv_transpose2d's usual depthwise layer, a learned 2x bilinear up-sampling (4x4,
        # stride 2), runs the grad-input kernel at a kernel size conv2d's layers do not use.
        taps = dict(R=4, S=4, STRIDE_H=2, STRIDE_W=2, FP64=False)
        yield Case(
            f"depthwise_grad_input-{dtype}-4x4-s2",
            conv2d_kernels.depthwise_grad_input_kernel,
            dtype,
            dict(taps, **configs["depthwise_grad_input"]),
        )


def compile_one(case):
    """(registers, spilled bytes) of the case's kernel compiled for sm_90."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    fn = case.kernel

    def kind(name):
        if name in case.constexprs:
            return "constexpr"
        return f"*{case.pointers.get(name, case.dtype)}" if name.endswith("_ptr") else "i32"

    signature = {name: kind(name) for name in fn.arg_names}
    # ASTSource takes constexpr values and attributes keyed by argument position.
    values = {(fn.arg_names.index(name),): value for name, value in case.constexprs.items()}
    attrs = {
        (i,): [["tt.divisibility", 16]]
        for i, name in enumerate(fn.arg_names)
        if name not in case.constexprs and (name.endswith("_ptr") or name in case.divisible)
    }
    compiled = triton.compile(
        ASTSource(fn, signature=signature, constexprs=values, attrs=attrs),
        target=GPUTarget("cuda", 90, 32),
        options=case.options,
    )
    ptx = compiled.asm["ptx"]
    arch = re.search(r"^\.target\s+(sm_\w+)", ptx, re.MULTILINE).group(1)
    bundled = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "ptxas")
    ptxas = bundled if os.path.exists(bundled) else "ptxas"
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "kernel.ptx")
        with open(path, "w") as f:
            f.write(ptx)
        report = subprocess.run(
            [ptxas, "-v", f"--gpu-name={arch}", path, "-o", os.devnull],
            capture_output=True,
            text=True,
            check=True,
        ).stderr
    registers = int(re.search(r"Used (\d+) registers", report).group(1))
    spilled = sum(int(v) for v in re.findall(r"(\d+) bytes spill (?:stores|loads)", report))
    return registers, spilled


def main():
    if os.environ.get("TRITON_INTERPRET") == "1":
        sys.exit("aot_compile.py: run it without TRITON_INTERPRET=1")
    for case in cases():
        row = {"id": case.id}
        try:
            row["registers"], row["spilled_bytes"] = compile_one(case)
        except Exception as error:  # reported per kernel; the test fails on it
            row["error"] = f"{type(error).__name__}: {error}"
        print(json.dumps(row), flush=True)


if __name__ == "__main__":
    main()

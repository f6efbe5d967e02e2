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


def cases():
    """(id, kernel, pointer dtype, constexprs): the specialisations the conv2d ops launch."""
    from cnnops.kernels import conv2d as conv2d_kernels

    from cnnops.ops.conv2d import TRITON_CONFIGS

    for dtype in ("fp32", "fp16", "bf16"):
        for size in (3, 5, 7):
            for stride in (1, 2):
                taps = dict(R=size, S=size, STRIDE_H=stride, STRIDE_W=stride, FP64=False)
                yield (
                    f"depthwise_forward-{dtype}-{size}x{size}-s{stride}",
                    conv2d_kernels.depthwise_forward_kernel,
                    dtype,
                    dict(taps, HAS_BIAS=True, **TRITON_CONFIGS["depthwise_forward"]),
                )
        for stride in (1, 2):
            taps = dict(R=3, S=3, STRIDE_H=stride, STRIDE_W=stride, FP64=False)
            yield (
                f"depthwise_grad_input-{dtype}-3x3-s{stride}",
                conv2d_kernels.depthwise_grad_input_kernel,
                dtype,
                dict(taps, **TRITON_CONFIGS["depthwise_grad_input"]),
            )
            yield (
                f"depthwise_grad_weight-{dtype}-3x3-s{stride}",
                conv2d_kernels.depthwise_grad_weight_kernel,
                dtype,
                dict(taps, **TRITON_CONFIGS["depthwise_grad_weight"]),
            )


def compile_one(fn, dtype, constexprs):
    """(registers, spilled bytes) of `fn` compiled for sm_90 with these constexprs."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    def kind(name):
        if name in constexprs:
            return "constexpr"
        return f"*{dtype}" if name.endswith("_ptr") else "i32"

    signature = {name: kind(name) for name in fn.arg_names}
    # ASTSource takes constexpr values keyed by argument position.
    values = {(fn.arg_names.index(name),): value for name, value in constexprs.items()}
    compiled = triton.compile(
        ASTSource(fn, signature=signature, constexprs=values), target=GPUTarget("cuda", 90, 32)
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
    for name, kernel, dtype, constexprs in cases():
        row = {"id": name}
        try:
            row["registers"], row["spilled_bytes"] = compile_one(kernel, dtype, constexprs)
        except Exception as error:  # reported per kernel; the test fails on it
            row["error"] = f"{type(error).__name__}: {error}"
        print(json.dumps(row), flush=True)


if __name__ == "__main__":
    main()

"""Builds cnnops and its extension module cnnops._C.

The C++ sources are always built. The CUDA sources are added when nvcc is found, or when
CNNOPS_CUDA=1; CNNOPS_CUDA=0 leaves them out. TORCH_CUDA_ARCH_LIST picks the architectures
(default 9.0). Nothing is downloaded: build with `pip install --no-build-isolation -e .`.
"""

import glob
import os
import re
import shutil
import subprocess
import sys

from setuptools import setup

ROOT = os.path.dirname(os.path.abspath(__file__))


def nvcc_toolkit_root():
    """The CUDA toolkit behind `nvcc`, or None.

    `nvcc` on the PATH may be a wrapper script, from whose location torch guesses a wrong
    CUDA_HOME (and linking -lcudart then fails). nvcc's dry run prints its real TOP folder.
    """
    nvcc = shutil.which("nvcc")
    if nvcc is None:
        return None
    try:
        out = subprocess.run(
            [nvcc, "--dryrun", "-x", "cu", "-c", os.devnull, "-o", os.devnull],
            capture_output=True,
            text=True,
            timeout=60,
        )
    except (OSError, subprocess.SubprocessError):
        return None
    match = re.search(r"^#\$ TOP=(.*)$", out.stdout + out.stderr, re.MULTILINE)
    root = (
        os.path.realpath(match.group(1).strip())
        if match
        else os.path.dirname(os.path.dirname(os.path.realpath(nvcc)))
    )
    return root if os.path.isfile(os.path.join(root, "bin", "nvcc")) else None


def want_cuda(toolkit):
    flag = os.environ.get("CNNOPS_CUDA")
    if flag == "0":
        return False
    if flag == "1":
        if toolkit is None and not os.environ.get("CUDA_HOME"):
            sys.exit("CNNOPS_CUDA=1 but no nvcc was found; put nvcc on the PATH or set CUDA_HOME")
        return True
    return toolkit is not None


def extension_modules():
    toolkit = nvcc_toolkit_root()
    with_cuda = want_cuda(toolkit)
    if with_cuda and toolkit and not os.environ.get("CUDA_HOME"):
        # Must be set before torch.utils.cpp_extension is imported: it reads CUDA_HOME once.
        os.environ["CUDA_HOME"] = toolkit
    os.environ.setdefault("TORCH_CUDA_ARCH_LIST", "9.0")

    from torch.utils import cpp_extension

    sources = sorted(
        glob.glob("csrc/*.cpp") + glob.glob("csrc/ops/*.cpp") + glob.glob("csrc/ops/cpu/*.cpp")
    )
    define_macros = []
    extra = {"cxx": ["-O3", "-fopenmp"]}
    if with_cuda:
        sources += sorted(glob.glob("csrc/ops/cuda/*.cu"))
        define_macros.append(("CNNOPS_WITH_CUDA", None))
        extra["nvcc"] = ["-O3", "-Xptxas", "-v", "--expt-relaxed-constexpr"]
        include_dirs = [os.path.join(ROOT, "csrc")]
        # Minimal toolkits lack the cuBLAS/cuSPARSE headers that some torch headers include;
        # torch's nvidia wheels ship them. A full toolkit's own headers are used as they are.
        if not os.path.isfile(os.path.join(os.environ["CUDA_HOME"], "include", "cublas_v2.h")):
            include_dirs += nvidia_wheel_includes()
        ext_class = cpp_extension.CUDAExtension
    else:
        include_dirs = [os.path.join(ROOT, "csrc")]
        ext_class = cpp_extension.CppExtension
    print(
        f"cnnops: building cnnops._C {'with' if with_cuda else 'without'} CUDA kernels", flush=True
    )
    return [
        ext_class(
            name="cnnops._C",
            sources=sources,
            include_dirs=include_dirs,
            define_macros=define_macros,
            extra_compile_args=extra,
            extra_link_args=["-fopenmp"],
        )
    ], cpp_extension.BuildExtension.with_options(use_ninja=True)


def nvidia_wheel_includes():
    import site

    dirs = []
    for base in site.getsitepackages():
        dirs += glob.glob(os.path.join(base, "nvidia", "*", "include"))
    return sorted(d for d in dirs if os.path.isdir(d))


ext_modules, build_ext = extension_modules()

setup(
    packages=["cnnops", "cnnops.ops", "cnnops.nn", "cnnops.kernels"],
    package_dir={"cnnops": "cnnops", "cnnops.kernels": "kernels"},
    ext_modules=ext_modules,
    cmdclass={"build_ext": build_ext},
)

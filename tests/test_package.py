"""The package surface: version, build information, backends, and the missing-extension error."""

import importlib
import shutil

import pytest
import torch

import cnnops
from cnnops import _ext


def test_version():
    assert isinstance(cnnops.__version__, str) and cnnops.__version__.count(".") == 2


def test_available_backends_on_cpu(monkeypatch):
    # Triton serves CPU tensors only in its interpreter (tests/conftest.py turns it on without a
    # GPU).
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert cnnops.available_backends("cpu") == ["cpu", "triton"]
    monkeypatch.delenv("TRITON_INTERPRET")
    assert cnnops.available_backends("cpu") == ["cpu"]
    assert "cpu" in cnnops.available_backends()
    assert ("cuda" in cnnops.available_backends()) == (
        torch.cuda.is_available() and cnnops.has_cuda_kernels()
    )


@pytest.mark.skipif(
    shutil.which("nvcc") is None, reason="no nvcc on this machine: the build leaves CUDA out"
)
def test_build_includes_cuda_kernels_when_nvcc_is_present():
    """CI has nvcc: the extension must have been built with the CUDA sources, so that a .cu
    file that does not compile fails CI instead of being left out quietly."""
    assert cnnops.has_cuda_kernels()


def test_missing_extension_says_how_to_build(monkeypatch):
    def fail(name):
        raise ImportError(f"No module named {name!r}")

    monkeypatch.setattr(importlib, "import_module", fail)
    with pytest.raises(ImportError, match="make install"):
        _ext.load()


def test_use_backend_context_and_environment(monkeypatch):
    x, w = torch.randn(1, 2, 5, 5), torch.randn(3, 2, 3, 3)
    with cnnops.use_backend("cpu"):
        cnnops.conv2d(x, w)
    with cnnops.use_backend("cuda"), pytest.raises(RuntimeError, match="backend 'cuda' cannot run"):
        cnnops.conv2d(x, w)
    with pytest.raises(ValueError, match="unknown backend"):
        with cnnops.use_backend("tpu"):
            pass
    monkeypatch.setenv("CNNOPS_BACKEND", "triton")
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    with pytest.raises(RuntimeError, match="backend 'triton' cannot run"):
        cnnops.conv2d(x, w)
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    torch.testing.assert_close(cnnops.conv2d(x, w), torch.nn.functional.conv2d(x, w))


def test_backend_resolution_traces_under_torch_compile():
    """torch.compile(fullgraph=True) must trace the whole resolution path, for CUDA tensors too
    (it is pure Python, so no GPU is needed to trace it)."""
    from cnnops.ops._backend import resolve_backend

    expected = "cuda" if cnnops.has_cuda_kernels() else None

    @torch.compile(fullgraph=True, backend="eager")
    def resolve(x):
        chosen = resolve_backend("conv2d", torch.device("cuda")) if expected else "cpu"
        return x + 1, chosen

    x = torch.zeros(2)
    out, chosen = resolve(x)
    torch.testing.assert_close(out, x + 1)
    assert chosen == (expected or "cpu")

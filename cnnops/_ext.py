"""Loads cnnops._C, the compiled extension that registers the `cnnops::` C++ and CUDA ops."""

import importlib

_BUILD_HINT = (
    "cnnops._C, the compiled extension, could not be imported. Build it from the repository root "
    "with `make install` (or `pip install --no-build-isolation -e .` in an environment that has "
    "torch). Cause: {cause}"
)


def load():
    try:
        return importlib.import_module("cnnops._C")
    except ImportError as exc:
        raise ImportError(_BUILD_HINT.format(cause=exc)) from exc

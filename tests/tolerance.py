"""Tolerances against float64 references, as in the design: fp32 error grows with the reduction."""

import math

import torch


def assert_close_to_reference(actual, reference, reduction_length, name="output"):
    """Compares a float32/float64 result with its float64 reference.

    Rounding error of a length-L float32 dot product of O(1) terms grows like sqrt(L) * eps on
    average; 16x that, scaled by the reference's magnitude, is loose enough never to flake and
    tight enough that one wrong or missing term (an O(1) error) fails.
    """
    assert actual.shape == reference.shape, f"{name}: shape {actual.shape} != {reference.shape}"
    eps = torch.finfo(actual.dtype).eps
    scale = max(1.0, reference.abs().max().item()) if reference.numel() else 1.0
    tol = 16 * eps * math.sqrt(max(1, reduction_length)) * scale
    torch.testing.assert_close(
        actual.double(), reference.double(), atol=tol, rtol=tol, msg=lambda m: f"{name}: {m}"
    )

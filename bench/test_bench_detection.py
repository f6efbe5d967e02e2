"""The detection ops' cases of `python -m bench` (box ops, roi_align, roi_pool) as
pytest-benchmark tests: `pytest bench/ --benchmark-only`. Same case definitions as the bench
modules' build_cases."""

import pytest

from bench import bench_nms, bench_roi_align, bench_roi_pool, hardware
from bench.harness import synchronized

DEVICE = hardware.best_device()
MODULES = (bench_nms, bench_roi_align, bench_roi_pool)
CASES = [case for module in MODULES for case in module.build_cases(DEVICE)[0]]

PARAMS = [
    pytest.param(case, provider, id=f"{case.op}-{case.layer}-{provider.name}")
    for case in CASES
    for provider in case.providers
]


@pytest.mark.parametrize(("case", "provider"), PARAMS)
def test_detection_op(benchmark, case, provider):
    args = provider.arguments(case.make_args())
    benchmark.extra_info.update(shape=case.shape_text)
    out = benchmark(synchronized(provider.fn, DEVICE), *args)
    error, tolerance = case.error(out, case.expected(args))
    assert error <= tolerance, f"{provider.name}: error {error:.3g} > tolerance {tolerance:.3g}"

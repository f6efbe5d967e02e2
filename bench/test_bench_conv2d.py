"""The conv2d cases of `python -m bench` as pytest-benchmark tests:
`pytest bench/ --benchmark-only`.

Same case definitions (bench_conv2d.build_cases), so the two never drift apart; the interleaved
harness remains the source of the reported ratios.
"""

import pytest

from bench import bench_conv2d, hardware
from bench.harness import synchronized

DEVICE = hardware.best_device()
CASES, _ = bench_conv2d.build_cases(DEVICE)

PARAMS = [
    pytest.param(case, provider, id=f"{case.set_name}-{case.layer}-N{case.batch}-{provider.name}")
    for case in CASES
    for provider in case.providers
]


@pytest.mark.parametrize(("case", "provider"), PARAMS)
def test_conv2d(benchmark, case, provider):
    args = provider.arguments(case.make_args())
    benchmark.extra_info.update(
        shape=case.shape_text, dtype=str(case.dtype), gflop=case.flops / 1e9
    )
    out = benchmark(synchronized(provider.fn, DEVICE), *args)
    error, tolerance = case.error(out, case.expected(args))
    assert error <= tolerance, (
        f"{provider.name}: max abs error {error:.3g} > tolerance {tolerance:.3g}"
    )

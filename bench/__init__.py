"""cnnops benchmarks: bench_<op>.py files on one harness; `python -m bench` runs them."""

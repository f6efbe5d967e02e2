"""cnnops benchmarks: one bench_<op>.py per op on the shared harness; `python -m bench` runs them."""

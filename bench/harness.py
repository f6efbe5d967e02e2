"""The shared, op-agnostic benchmark harness.

A Case is one problem (one layer shape, batch and dtype) with its providers: the torch reference
first, then the cnnops implementations. For each case the harness

1. checks every provider's output once against a float64 ground truth, so a fast wrong kernel is
   reported as wrong rather than fast;
2. warms every provider up and estimates its time per call;
3. times them interleaved, round-robin, in this process: machine noise (turbo, another job on the
   machine) then hits all providers alike, and the ratios stay meaningful even when absolute
   times drift. The round starts at a different provider each time so no provider always runs
   right after the same neighbour.

The number of rounds adapts: at least `min_samples`, more while the round fits the per-case time
budget. Calls shorter than `min_sample_s` are repeated inside one sample so the timer's
resolution and the Python overhead of one sample do not dominate.
"""

import math
import os
import resource
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

from bench import hardware
from bench.stats import median, percentile


@dataclass(frozen=True)
class Provider:
    name: str
    fn: Callable[..., Any]  # fn(*args) -> output
    # Turns the case's arguments into this provider's (e.g. channels_last copies); runs once,
    # outside the timing.
    prepare: Callable[[tuple], tuple] | None = None

    def arguments(self, args):
        return self.prepare(args) if self.prepare is not None else args


@dataclass
class Case:
    op: str
    set_name: str
    layer: str
    batch: int
    shape: dict  # the problem's sizes, written out as `key=value` in the results
    dtype: torch.dtype
    device: torch.device
    make_args: Callable[[], tuple]  # fresh, seeded inputs on `device`
    expected: Callable[[tuple], torch.Tensor]  # the float64 ground truth for those inputs
    # (actual, expected) -> (max abs error, tolerance). The harness widens the tolerance to twice
    # the reference provider's own error, so a reference in reduced precision (fp16, TF32) sets
    # the bar the others are held to.
    error: Callable[[torch.Tensor, torch.Tensor], tuple]
    providers: tuple  # providers[0] is the reference the speedups are measured against
    flops: float | None = None
    min_bytes: float | None = None

    @property
    def shape_text(self):
        return " ".join(f"{key}={value}" for key, value in self.shape.items())


@dataclass(frozen=True)
class TimingPlan:
    budget_s: float = 1.0  # timed-loop budget per case; slow cases exceed it to reach min_samples
    min_samples: int = 5
    max_samples: int = 100
    warmup_s: float = 0.05  # warm-up per provider for calls faster than this
    min_sample_s: float = 1e-3  # calls faster than this are repeated within one sample


QUICK_PLAN = TimingPlan(budget_s=0.05, min_samples=3, max_samples=10, warmup_s=0.01)

COLUMNS = (
    "op",
    "set",
    "layer",
    "batch",
    "shape",
    "dtype",
    "device",
    "provider",
    "median_ms",
    "p20_ms",
    "p80_ms",
    "gflops",
    "gbps",
    "speedup",
    "roofline_pct",
    "max_err",
    "tolerance",
    "correct",
    "samples",
    "others_cpu_pct",
)


class OtherProcessesCpuMeter:
    """Share of the machine's CPU time that other processes used since the meter started.

    On a small shared machine a compile next door disturbs timings badly (thread-pool barriers wait
    for a core), so every row says how busy the machine was while it was measured. Linux only
    (/proc/stat); elsewhere the share is None.
    """

    def __init__(self):
        self._start = self._read()

    @staticmethod
    def _read():
        try:
            with open("/proc/stat") as stat:
                ticks = [int(v) for v in stat.readline().split()[1:9]]  # user .. steal
        except (OSError, ValueError):
            return None
        usage = resource.getrusage(resource.RUSAGE_SELF)
        return (
            sum(ticks),
            ticks[3] + ticks[4],
            usage.ru_utime + usage.ru_stime,
        )  # total, idle+iowait, ours

    def percent(self):
        end = self._read()
        if self._start is None or end is None or end[0] == self._start[0]:
            return None
        hz = os.sysconf("SC_CLK_TCK")
        total_s = (end[0] - self._start[0]) / hz
        busy_s = total_s - (end[1] - self._start[1]) / hz
        own_s = end[2] - self._start[2]
        return 100.0 * min(1.0, max(0.0, busy_s - own_s) / total_s)


def synchronize(device):
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


def synchronized(fn, device):
    """fn followed by a device synchronisation, for timers that only see the host."""

    def call(*args):
        out = fn(*args)
        synchronize(device)
        return out

    return call


def time_calls(fn, args, repeats, device):
    """Seconds per call of fn(*args), averaged over `repeats` back-to-back calls."""
    if torch.device(device).type == "cuda":
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(repeats):
            fn(*args)
        end.record()
        end.synchronize()
        return start.elapsed_time(end) / 1e3 / repeats
    begin = time.perf_counter()
    for _ in range(repeats):
        fn(*args)
    return (time.perf_counter() - begin) / repeats


def cnnops_backends(ops, device, label):
    """The cnnops backends that run every op of `ops` on `device`, and a note for each one that
    cannot (labelled `label`, e.g. the benchmark's op); the cpu backend on a GPU goes unnoted."""
    from cnnops.ops._backend import resolve_backend

    usable, notes = [], []
    for backend in ("cpu", "cuda", "triton"):
        try:
            for op in ops:
                resolve_backend(op, device, backend)
        except RuntimeError as exc:
            if backend != "cpu" or device.type == "cpu":
                notes.append(f"{label} provider cnnops-{backend} skipped: {exc}")
            continue
        usable.append(backend)
    return usable, notes


def close_error(actual, expected, tolerance):
    """(max abs error, tolerance) of `actual` against the float64 `expected`; inf if unusable."""
    if actual.shape != expected.shape:
        return math.inf, tolerance
    error = (actual.double() - expected).abs().max().item() if actual.numel() else 0.0
    return (error if math.isfinite(error) else math.inf), tolerance


def _check(case, provider_args, expected):
    """First call of every provider: warm-up, per-call time, and error against the ground truth."""
    first_call_s, errors, failures = {}, {}, {}
    for provider, args in zip(case.providers, provider_args, strict=True):
        try:
            begin = time.perf_counter()
            out = provider.fn(*args)
            synchronize(case.device)
            first_call_s[provider.name] = time.perf_counter() - begin
            errors[provider.name] = case.error(out, expected)
        except Exception as exc:  # a failing provider is a result to report, not a reason to stop
            failures[provider.name] = f"{type(exc).__name__}: {exc}".splitlines()[0][:200]
        out = None
    return first_call_s, errors, failures


def _estimate_call_s(provider, args, first_call_s, plan, device):
    """Warms up; returns the time of one call. A call much slower than warmup_s is warm already."""
    if first_call_s >= 4 * plan.warmup_s:
        return first_call_s
    per_call = time_calls(provider.fn, args, 1, device)
    if per_call < plan.warmup_s:
        per_call = time_calls(
            provider.fn, args, math.ceil(plan.warmup_s / max(per_call, 1e-7)), device
        )
    return per_call


def run_case(case, plan):
    """Checks and times one case; returns one result row (a dict keyed by COLUMNS) per provider."""
    meter = OtherProcessesCpuMeter()
    args = case.make_args()
    expected = case.expected(args)
    provider_args = [provider.arguments(args) for provider in case.providers]
    first_call_s, errors, failures = _check(case, provider_args, expected)
    del expected

    live = [
        (p, a) for p, a in zip(case.providers, provider_args, strict=True) if p.name not in failures
    ]
    repeats, samples = {}, {p.name: [] for p, _ in live}
    if live:
        per_call = {
            p.name: _estimate_call_s(p, a, first_call_s[p.name], plan, case.device) for p, a in live
        }
        repeats = {
            name: max(1, math.ceil(plan.min_sample_s / max(t, 1e-9)))
            for name, t in per_call.items()
        }
        round_s = sum(per_call[name] * repeats[name] for name in per_call)
        rounds = int(
            min(plan.max_samples, max(plan.min_samples, plan.budget_s // max(round_s, 1e-9)))
        )
        for round_index in range(rounds):
            start = round_index % len(live)
            for provider, provider_arguments in live[start:] + live[:start]:
                samples[provider.name].append(
                    time_calls(provider.fn, provider_arguments, repeats[provider.name], case.device)
                )
    rows = _rows(case, samples, errors, failures)
    others = meter.percent()
    for row in rows:
        row["others_cpu_pct"] = others
    return rows


def _rows(case, samples, errors, failures):
    reference = case.providers[0].name
    reference_median = median(samples[reference]) if samples.get(reference) else None
    reference_error = errors.get(reference, (0.0, 0.0))[0]
    peak = hardware.peak_for(case.device)
    rows = []
    for provider in case.providers:
        row = {
            "op": case.op,
            "set": case.set_name,
            "layer": case.layer,
            "batch": case.batch,
            "shape": case.shape_text,
            "dtype": str(case.dtype).replace("torch.", ""),
            "device": case.device.type,
            "provider": provider.name,
            "median_ms": None,
            "p20_ms": None,
            "p80_ms": None,
            "gflops": None,
            "gbps": None,
            "speedup": None,
            "roofline_pct": None,
            "max_err": None,
            "tolerance": None,
            "correct": "error",
            "samples": 0,
            "others_cpu_pct": None,
            "reference": provider.name == reference,  # not a column: lets summaries skip it
        }
        if provider.name in failures:
            row["error_message"] = failures[provider.name]
            rows.append(row)
            continue
        error, tolerance = errors[provider.name]
        tolerance = max(tolerance, 2 * reference_error)
        seconds = median(samples[provider.name])
        row.update(
            median_ms=seconds * 1e3,
            p20_ms=percentile(samples[provider.name], 20) * 1e3,
            p80_ms=percentile(samples[provider.name], 80) * 1e3,
            gflops=case.flops / seconds / 1e9 if case.flops else None,
            gbps=case.min_bytes / seconds / 1e9 if case.min_bytes else None,
            speedup=reference_median / seconds if reference_median else None,
            roofline_pct=hardware.roofline_percent(
                seconds, case.flops, case.min_bytes, peak, case.dtype
            ),
            max_err=error,
            tolerance=tolerance,
            correct="yes" if error <= tolerance else "NO",
            samples=len(samples[provider.name]),
        )
        rows.append(row)
    return rows


def progress_line(index, total, case, rows, elapsed_s):
    parts = []
    for row in rows:
        if row["correct"] == "error":
            parts.append(f"{row['provider']} ERROR ({row.get('error_message', '')})")
        elif row["provider"] == case.providers[0].name:
            parts.append(f"{row['provider']} {row['median_ms']:.3f} ms")
        else:
            wrong = "" if row["correct"] == "yes" else " WRONG"
            parts.append(f"{row['provider']} {row['speedup']:.2f}x{wrong}")
    others = rows[0]["others_cpu_pct"] if rows else None
    busy = (
        f", other processes used {others:.0f}% of the CPU"
        if others is not None and others >= 10
        else ""
    )
    return (
        f"[{index}/{total}] {case.set_name} {case.layer} N={case.batch} "
        f"{str(case.dtype).replace('torch.', '')}: {'; '.join(parts)} ({elapsed_s:.1f} s{busy})"
    )


@dataclass
class SuiteResult:
    rows: list = field(default_factory=list)
    wall_s: float = 0.0
    others_cpu_pct: float | None = None  # over the whole run
    cases_done: int = 0
    interrupted: bool = False  # stopped by Ctrl-C / SIGTERM: the rows of the finished cases remain


def run_suite(cases, plan, stream=sys.stderr):
    """Runs every case, printing a progress line per case to `stream`."""
    result = SuiteResult()
    meter = OtherProcessesCpuMeter()
    suite_begin = time.perf_counter()
    try:
        for index, case in enumerate(cases, 1):
            begin = time.perf_counter()
            rows = run_case(case, plan)
            result.rows.extend(rows)
            result.cases_done = index
            print(
                progress_line(index, len(cases), case, rows, time.perf_counter() - begin),
                file=stream,
                flush=True,
            )
            if case.device.type == "cuda":
                # The next case's large buffers should not meet a fragmented cache.
                torch.cuda.empty_cache()
    except KeyboardInterrupt:
        result.interrupted = True
        print(
            f"interrupted after {result.cases_done} of {len(cases)} cases", file=stream, flush=True
        )
    result.wall_s = time.perf_counter() - suite_begin
    result.others_cpu_pct = meter.percent()
    return result

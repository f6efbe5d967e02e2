"""`python -m bench` (what `make bench` runs): every bench_<op>.py on the best device present.

Results go to <out>/<device-slug>.md and .csv (with a -quick, -channels-last or -backward
suffix for those runs, so a smoke test never overwrites a full run). Exit status 1 if any row
is not correct.
"""

import argparse
import importlib
import os
import pkgutil
import shlex
import signal
import sys

import torch

import bench
from bench import hardware
from bench.harness import QUICK_PLAN, TimingPlan, run_suite
from bench.report import (
    SUMMARY_COLUMNS,
    environment,
    markdown_table,
    record_machine_load,
    summarize,
    write_results,
)


def bench_modules():
    """The bench_<op> modules of this package, by name."""
    names = sorted(
        m.name for m in pkgutil.iter_modules(bench.__path__) if m.name.startswith("bench_")
    )
    return [importlib.import_module(f"bench.{name}") for name in names]


def default_threads():
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()


def parse_args(argv, modules):
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__.splitlines()[0])
    parser.add_argument(
        "--op", nargs="+", choices=[m.OP for m in modules], help="ops to run (default: all)"
    )
    parser.add_argument(
        "--set",
        nargs="+",
        dest="sets",
        metavar="SET",
        choices=sorted({s for m in modules for s in m.SET_NAMES}),
        help="shape sets to run (default: all of the device's)",
    )
    parser.add_argument(
        "--batch",
        nargs="+",
        type=int,
        dest="batches",
        help="batch sizes (default per device: 1 8 on CPU, 32 on GPU)",
    )
    parser.add_argument(
        "--dtype",
        nargs="+",
        dest="dtypes",
        choices=("float32", "float16", "bfloat16"),
        help="dtypes (default per device: float32 on CPU, float32 float16 on GPU)",
    )
    parser.add_argument(
        "--quick", action="store_true", help="a few small cases, few repetitions (smoke test)"
    )
    parser.add_argument(
        "--threads",
        type=int,
        default=default_threads(),
        help="CPU threads for torch and cnnops alike (default: all cores)",
    )
    parser.add_argument(
        "--out",
        default=os.path.join(os.path.dirname(__file__), "results"),
        help="results folder (default: bench/results)",
    )
    parser.add_argument(
        "--channels-last", action="store_true", help="channels_last inputs for every provider"
    )
    parser.add_argument(
        "--backward",
        action="store_true",
        help="time forward plus backward (grad input and weight) instead of the forward pass",
    )
    parser.add_argument(
        "--device", choices=("cpu", "cuda"), help="default: cuda if present, else cpu"
    )
    parser.add_argument(
        "--budget",
        type=float,
        default=None,
        help="seconds of timed loop per case (default 1 on CPU; --quick: 0.05)",
    )
    return parser.parse_args(argv)


def _interrupt(signum, frame):
    raise KeyboardInterrupt  # SIGTERM ends the run like Ctrl-C: finished cases are still written


def main(argv=None):
    modules = bench_modules()
    args = parse_args(sys.argv[1:] if argv is None else argv, modules)
    device = torch.device(args.device) if args.device else hardware.best_device()
    torch.set_num_threads(args.threads)  # the reference and cnnops share the same thread pool size

    cases, notes = [], []
    for module in modules:
        if args.op and module.OP not in args.op:
            continue
        if args.sets and not set(args.sets) & set(module.SET_NAMES):
            continue
        module_cases, module_notes = module.build_cases(
            device,
            sets=args.sets,
            batches=args.batches,
            dtypes=args.dtypes,
            quick=args.quick,
            channels_last=args.channels_last,
            backward=args.backward,
        )
        cases += module_cases
        notes += module_notes

    plan = QUICK_PLAN if args.quick else TimingPlan()
    if args.budget is not None:
        plan = TimingPlan(**{**plan.__dict__, "budget_s": args.budget})
    print(
        f"{len(cases)} cases on {hardware.device_name(device)}, {torch.get_num_threads()} threads",
        file=sys.stderr,
        flush=True,
    )
    command = "python -m bench " + shlex.join(sys.argv[1:] if argv is None else argv)
    env = environment(device, command.strip(), notes)
    signal.signal(signal.SIGTERM, _interrupt)
    result = run_suite(cases, plan)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    if result.interrupted:
        env.setdefault("notes", []).append(
            f"interrupted: only {result.cases_done} of {len(cases)} cases ran"
        )
    busy_warning = record_machine_load(env, result.others_cpu_pct)

    suffix = ("-quick" if args.quick else "") + ("-channels-last" if args.channels_last else "")
    suffix += "-backward" if args.backward else ""
    suffix += "-partial" if result.interrupted else ""  # never overwrite a complete run's results
    md_path, csv_path = write_results(
        args.out, hardware.device_slug(env["device"]) + suffix, env, result.rows, result.wall_s
    )
    print(
        markdown_table(
            result.rows,
            (
                "set",
                "layer",
                "batch",
                "provider",
                "median_ms",
                "p20_ms",
                "p80_ms",
                "gflops",
                "speedup",
                "roofline_pct",
                "correct",
            ),
        )
    )
    print()
    print(markdown_table(summarize(result.rows), SUMMARY_COLUMNS))
    print(
        f"\n{result.cases_done} of {len(cases)} cases in {result.wall_s:.0f} s; "
        f"wrote {md_path} and {csv_path}"
    )
    if busy_warning:
        print("WARNING: " + busy_warning, file=sys.stderr)
    not_correct = [r for r in result.rows if r["correct"] != "yes"]
    if not_correct:
        print(f"{len(not_correct)} rows not correct (see the 'correct' column)", file=sys.stderr)
    if result.interrupted:
        return 128 + signal.SIGTERM
    return 1 if not_correct else 0


if __name__ == "__main__":
    sys.exit(main())

"""Benchmark results: the environment header, the table, the geomean summary, md and csv files."""

import csv
import datetime
import os
import subprocess
from pathlib import Path

import torch

from bench import hardware
from bench.harness import COLUMNS
from bench.stats import geomean

REPO_ROOT = Path(__file__).resolve().parents[1]


def git_commit():
    """Short HEAD commit, '-dirty' when tracked files differ from it (as `git describe --dirty`)."""

    def git(*args):
        return subprocess.run(
            ["git", *args], cwd=REPO_ROOT, capture_output=True, text=True, timeout=30, check=True
        ).stdout.strip()

    try:
        commit = git("rev-parse", "--short", "HEAD")
        dirty = git("status", "--porcelain", "--untracked-files=no")
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return commit + ("-dirty" if dirty else "")


def environment(device, command, notes=()):
    """The header fields of a results file, in display order."""
    import cnnops

    device = torch.device(device)
    env = {
        "device": hardware.device_name(device),
        "device type": device.type,
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "cnnops": cnnops.__version__,
        "git commit": git_commit(),
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "command": command,
    }
    if device.type == "cpu":
        env["cpus"] = (
            len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
        )
        # Another job on a small machine shows here and explains noisy numbers.
        env["load average at start"] = " ".join(f"{x:.2f}" for x in os.getloadavg())
    else:
        env["cuda"] = torch.version.cuda
        env["cudnn.allow_tf32"] = torch.backends.cudnn.allow_tf32
        peak = hardware.peak_for(device)
        env["roofline peaks"] = (
            "none known for this GPU"
            if peak is None
            else ", ".join(f"{k} {v / 1e12:g} TFLOP/s" for k, v in peak.flops.items())
            + f", {peak.bytes_per_s / 1e12:g} TB/s"
        )
    for note in notes:
        env.setdefault("notes", []).append(note)
    return env


def record_machine_load(env, others_cpu_pct):
    """Adds how busy other processes kept a CPU machine during the run, with a warning when they
    took a noticeable share: threads then wait for cores and times (and ratios) are disturbed."""
    if env.get("device type") != "cpu":
        return None
    env["load average at end"] = " ".join(f"{x:.2f}" for x in os.getloadavg())
    if others_cpu_pct is None:
        return None
    env["CPU used by other processes"] = f"{others_cpu_pct:.0f}%"
    if others_cpu_pct < 10:
        return None
    warning = (
        f"other processes used {others_cpu_pct:.0f}% of the CPU during the run: timings are "
        "disturbed (see the others_cpu_pct column per case)"
    )
    env.setdefault("notes", []).append(warning)
    return warning


def summarize(rows):
    """Geomean speedup per (op, set, batch, dtype, provider) over the cases the provider got right;
    the reference (1.0 by definition) is left out.

    Wrong or failed rows are counted, not averaged in: a fast wrong kernel must not raise the mean.
    """
    groups = {}
    for row in rows:
        if row.get("reference"):
            continue
        key = (row["op"], row["set"], row["batch"], row["dtype"], row["provider"])
        groups.setdefault(key, []).append(row)
    summary = []
    for (op, set_name, batch, dtype, provider), group in groups.items():
        speedups = [r["speedup"] for r in group if r["correct"] == "yes" and r["speedup"]]
        summary.append(
            {
                "op": op,
                "set": set_name,
                "batch": batch,
                "dtype": dtype,
                "provider": provider,
                "cases": len(group),
                "not correct": len(group) - len(speedups),
                "geomean speedup": geomean(speedups) if speedups else None,
            }
        )
    return summary


def _cell(value):
    if value is None:
        return ""
    if isinstance(value, float):
        if value == 0:
            return "0"
        if abs(value) >= 100:
            return f"{value:.0f}"
        if abs(value) >= 0.01:
            return f"{value:.3g}" if abs(value) < 10 else f"{value:.1f}"
        return f"{value:.2e}"
    return str(value)


def markdown_table(records, columns):
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(_cell(r.get(c)) for c in columns) + " |" for r in records]
    return "\n".join(lines)


SUMMARY_COLUMNS = (
    "op",
    "set",
    "batch",
    "dtype",
    "provider",
    "cases",
    "not correct",
    "geomean speedup",
)


def markdown_report(env, rows, wall_s):
    header = ["# cnnops benchmark: " + env["device"], ""]
    for key, value in env.items():
        if key == "notes":
            header += [f"- note: {note}" for note in value]
        else:
            header.append(f"- {key}: {value}" if key != "command" else f"- {key}: `{value}`")
    header.append(f"- wall time: {wall_s:.0f} s")
    errors = [
        f"- {r['set']} {r['layer']} N={r['batch']} {r['provider']}: {r['error_message']}"
        for r in rows
        if r.get("error_message")
    ]
    body = [
        "",
        "Speedup = torch reference median / provider median, timed interleaved in one process. "
        "`correct`: max abs error against a float64 reference within tolerance.",
        "",
        "## Summary (geometric-mean speedup over the correct cases)",
        "",
        markdown_table(summarize(rows), SUMMARY_COLUMNS),
        "",
        "## All cases",
        "",
        markdown_table(rows, COLUMNS),
        "",
    ]
    if errors:
        body += ["## Errors", "", *errors, ""]
    return "\n".join(header + body)


def _csv_cell(value):
    if value is None:
        return ""
    return f"{value:.6g}" if isinstance(value, float) else value


def write_results(out_dir, stem, env, rows, wall_s):
    """Writes <stem>.md and <stem>.csv (the csv's header is '# key: value' comment lines)."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    md_path, csv_path = out_dir / f"{stem}.md", out_dir / f"{stem}.csv"
    md_path.write_text(markdown_report(env, rows, wall_s))
    with open(csv_path, "w", newline="") as f:
        for key, value in env.items():
            for item in value if key == "notes" else [value]:
                f.write(f"# {key}: {item}\n")
        f.write(f"# wall time: {wall_s:.0f} s\n")
        writer = csv.DictWriter(f, fieldnames=COLUMNS, extrasaction="ignore")
        writer.writeheader()
        for row in rows:
            writer.writerow({k: _csv_cell(v) for k, v in row.items()})
    return md_path, csv_path

"""Every Triton kernel, with every launch configuration the ops use, compiled ahead of time for
sm_90 (H100) with triton.compile(ASTSource(...), target=GPUTarget("cuda", 90, 32)). This needs no
GPU, and it catches what the interpreter lets through (tile shapes, dtypes, tl.dot limits). The
compiles run in a process of their own (aot_compile.py); a kernel that fails to compile or spills
registers fails here, and each kernel's registers are printed (pytest -s) and recorded."""

import json
import os
import subprocess
import sys

import pytest
from aot_compile import cases

SCRIPT = os.path.join(os.path.dirname(__file__), "aot_compile.py")


@pytest.fixture(scope="module")
def report():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    paths = [os.path.dirname(__file__), env.get("PYTHONPATH")]
    env["PYTHONPATH"] = os.pathsep.join(p for p in paths if p)
    done = subprocess.run(
        [sys.executable, SCRIPT], env=env, capture_output=True, text=True, timeout=900
    )
    assert done.returncode == 0, done.stderr[-4000:]
    return {row["id"]: row for row in map(json.loads, done.stdout.splitlines())}


@pytest.mark.parametrize("name", [case.id for case in cases()])
def test_compiles_for_sm90_without_spills(name, report, record_property):
    row = report[name]
    assert "error" not in row, f"{name}: {row.get('error')}"
    record_property("registers", row["registers"])
    print(f"{name}: {row['registers']} registers, {row['spilled_bytes']} bytes spilled")
    assert row["spilled_bytes"] == 0, f"{name} spills {row['spilled_bytes']} bytes"

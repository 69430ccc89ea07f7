"""benchmarks/gpu_check.sh --dry: the GPU check's plumbing, end to end on the CPU.

With --dry the script runs every part with NumPy in place of CuPy and tiny
sizes (the gpu tests of tests/gpu_util.py's RUNS_DRY modules, a sample; the
benchmarks on the CPU), then prints the summary table. This test runs it and
reads the table: every part is there, passed (or skipped: no torch), the
million-way run's parts each have a row, and the script's exit status is 0.
Nothing here measures anything.
"""
import json
import os
import subprocess
import sys

import pytest

from mpi_run import ROOT

pytestmark = [pytest.mark.slow, pytest.mark.mpi]

PARTS = ("env", "tests-layers", "tests-method", "tests-train", "tests-oracle", "mpi-cuda",
         "classifier",
         "resnet", "million", "train-e2e")
MILLION = ("setup", "prior", "neighbours", "steps", "knn", "ring2")


def test_gpu_check_dry_runs_end_to_end_and_prints_the_table(tmp_path):
    out = tmp_path / "check"
    env = dict(os.environ, OUT=str(out), PYTHON=sys.executable)
    env.pop("REFIMPL_GPU_CHECK_DRY", None)
    proc = subprocess.run(["bash", str(ROOT / "benchmarks" / "gpu_check.sh"), "--dry"],
                          capture_output=True, text=True, env=env, cwd=ROOT, timeout=600)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-2000:]
    table = (out / "summary.md").read_text()
    assert table in proc.stdout                       # printed, and kept
    rows = {line.split("|")[1].strip(): line.split("|")[2].strip()
            for line in table.splitlines()[2:]}
    for part in PARTS:
        assert rows.get(part) in ("passed", "skipped"), (part, table)
    for part in MILLION:
        assert rows.get(f"million: {part}") == "passed", (part, table)
    assert rows["**total**"] == "passed"
    assert "4 passed" in table                       # the sample of tests-method ran
    assert rows["tests-train"] == "passed" and "1 passed" in table
    summary = json.loads((out / "summary.json").read_text())
    assert summary["failed"] == [] and len(summary["parts"]) == len(PARTS)
    for part in PARTS:
        assert (out / f"{part}.log").exists()
    assert (out / "million.jsonl").exists() and (out / "train_e2e.json").exists()


def test_gpu_check_rejects_an_unknown_flag():
    proc = subprocess.run(["bash", str(ROOT / "benchmarks" / "gpu_check.sh"), "--fast"],
                          capture_output=True, text=True, cwd=ROOT, timeout=60)
    assert proc.returncode == 2 and "unknown argument --fast" in proc.stderr

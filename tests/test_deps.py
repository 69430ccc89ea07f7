"""refimpl.deps: a command's missing packages are one line and exit 2; the version
line of every command, and the one recorded in a run directory, a checkpoint and a trace."""
import argparse
import io
import json
import re
import subprocess
import sys

import pytest

import refimpl
from refimpl import deps

from mpi_run import ENV, ROOT


def test_require_names_the_package_and_the_extra_then_exits_2(capsys):
    deps.require("prog", ["json"])                      # installed: nothing happens
    with pytest.raises(SystemExit) as e:
        deps.require("prog", ["json", "no_such_module_xyz", "sklearn_missing_xyz"], "testing")
    assert e.value.code == deps.EXIT_MISSING == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1
    assert err.startswith("prog: error: no_such_module_xyz and sklearn_missing_xyz are not "
                          "installed (testing): pip install")


def test_require_maps_import_names_to_extras(monkeypatch):
    monkeypatch.setattr(deps, "missing", lambda modules: list(modules))
    stream = io.StringIO()
    with pytest.raises(SystemExit):
        deps.require("refimpl-train", ["tqdm", "matplotlib"], stream=stream)
    assert stream.getvalue() == ("refimpl-train: error: tqdm and matplotlib are not installed: "
                                 "pip install 'refimpl[train]'\n")
    stream = io.StringIO()
    with pytest.raises(SystemExit):
        deps.require("x", ["PIL", "sklearn"], stream=stream)
    assert "pillow and scikit-learn are not installed: pip install 'refimpl[data]'" \
        in stream.getvalue()


def test_version_line_names_refimpl_python_numpy_and_the_commit():
    import numpy as np
    v = deps.versions(mpi=False)
    assert v["refimpl"] == refimpl.__version__ and v["numpy"] == np.__version__
    line = deps.version_line(mpi=False)
    assert line.startswith(f"refimpl {refimpl.__version__}") and f"NumPy {np.__version__}" in line
    if (ROOT / ".git").exists():                         # run from a clone: the commit
        assert re.search(r"\(git [0-9a-f]{7,}(-dirty)?\)", line), line


def test_setup_reads_the_one_version_string():
    out = subprocess.run([sys.executable, "setup.py", "--version"], cwd=ROOT,
                         capture_output=True, text=True)
    assert out.stdout.strip().splitlines()[-1] == refimpl.__version__


def test_version_argument_prints_and_exits_0(capsys):
    p = argparse.ArgumentParser(prog="prog")
    deps.add_version_argument(p)
    with pytest.raises(SystemExit) as e:
        p.parse_args(["--version"])
    assert e.value.code == 0
    assert capsys.readouterr().out.startswith(f"prog: refimpl {refimpl.__version__}")


def test_run_directory_checkpoint_and_trace_record_the_version(tmp_path):
    run, trace = tmp_path / "run", tmp_path / "trace"
    tiny = ["train=synthetic:n=32,size=8,classes=4,seed=0", "test=", "width=2",
            "head_hidden=8", "dim=8", "batch_size=8", "epochs=1", "k=2", "lr=0.1",
            "eval_every=0", "threads=1", "linear_probe=false"]
    proc = subprocess.run([sys.executable, "-m", "refimpl.train", *tiny, f"out={run}",
                           "--trace", str(trace)], capture_output=True, text=True, env=ENV,
                          cwd=ROOT, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    line = deps.version_line()
    assert (run / "config.toml").read_text().splitlines()[0] == f"# made with {line}"
    ckpt = run / (run / "latest").read_text().strip()
    assert json.loads((ckpt / "meta.json").read_text())["made_with"] == line
    assert json.loads((trace / "meta.json").read_text())["made_with"] == line
    from refimpl.train.config import load_config
    assert load_config(run / "config.toml").epochs == 1    # the comment keeps it loadable


def test_oracle_replay_on_a_gpu_without_cupy_says_what_to_install():
    if not deps.missing(["cupy"]):
        pytest.skip("CuPy is installed here")
    proc = subprocess.run([sys.executable, "-m", "refimpl.oracle", "replay",
                           str(ROOT / "tests" / "golden" / "trace"), "--device", "gpu"],
                          capture_output=True, text=True, env=ENV, cwd=ROOT, timeout=120)
    assert proc.returncode == 2 and proc.stdout == ""
    assert proc.stderr == ("refimpl-oracle: error: cupy is not installed (--device gpu): "
                           "pip install 'refimpl[gpu]'\n")

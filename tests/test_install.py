"""refimpl installed the way Python users install it: the wheel, in a fresh venv.

The wheel is built from this checkout (``pip wheel . --no-deps``) and
installed into a new virtual environment with its core requirements only
(NumPy, threadpoolctl). Every console script and data tool must answer
``--help`` and ``--version``; a command that needs an optional package must
stop at once with one line naming it and the ``pip install`` that brings it
(exit 2, no traceback, nothing written). Then the ``train`` extra is installed
from the same wheel, and a 2-epoch run of the packaged demo config (found by
name, from a folder that holds no refimpl) trains and writes curves.png and a
checkpoint.

Packages come from the package index (pip's cache after the first run).
"""
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPTS = ["refimpl-train", "refimpl-eval", "refimpl-export", "refimpl-oracle", "refimpl-finetune"]
TOOLS = ["cifar", "clutter", "digits", "pack_folder", "preview", "synthetic"]
TINY = ["train=synthetic:n=64,size=16,classes=4,seed=3", "test=", "epochs=2", "batch_size=16",
        "width=4", "head_hidden=16", "dim=16", "k=2", "eval_every=0", "threads=1",
        "linear_probe=false"]

pytestmark = pytest.mark.slow


def sh(cmd, cwd, env, timeout=600):
    return subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)


def one_line_error(proc, *words):
    """The process ended with exit 2 and exactly one stderr line holding ``words``."""
    lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
    assert proc.returncode == 2, (proc.returncode, proc.stdout[-2000:], proc.stderr[-3000:])
    assert len(lines) == 1 and "Traceback" not in proc.stderr, proc.stderr
    for w in words:
        assert w in lines[0], (w, lines[0])
    return lines[0]


@pytest.fixture(scope="module")
def venv(tmp_path_factory):
    """(bin folder, environment, wheel path) of a fresh venv with the wheel and its
    core requirements only."""
    tmp = tmp_path_factory.mktemp("install")
    build = sh([sys.executable, "-m", "pip", "wheel", str(ROOT), "--no-deps", "-q",
                "--disable-pip-version-check", "-w", str(tmp / "dist")], ROOT, os.environ)
    assert build.returncode == 0, build.stderr[-3000:]
    wheel = next((tmp / "dist").glob("refimpl-*.whl"))
    made = sh([sys.executable, "-m", "venv", str(tmp / "venv")], tmp, os.environ)
    assert made.returncode == 0, made.stderr
    bin_ = tmp / "venv" / "bin"
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    env.update(PATH=f"{bin_}{os.pathsep}{env.get('PATH', '')}", OMP_NUM_THREADS="1",
               OPENBLAS_NUM_THREADS="1", MPLBACKEND="Agg")
    pip = [str(bin_ / "python"), "-m", "pip", "install", "-q", "--disable-pip-version-check"]
    core = sh(pip + [str(wheel)], tmp, env)
    assert core.returncode == 0, core.stderr[-3000:]
    work = tmp / "work"          # a folder without refimpl in it: the installed one runs
    work.mkdir()
    return bin_, env, wheel, pip, work


def test_the_wheel_carries_the_packaged_configs_and_the_licence(venv):
    import zipfile
    _, _, wheel, _, _ = venv
    names = zipfile.ZipFile(wheel).namelist()
    assert all(f"refimpl/{c}.toml" in names for c in ("train/demo", "train/digits",
                                                       "finetune/demo"))
    assert any(n.endswith("licenses/LICENSE") or n.endswith("LICENSE") for n in names), names


def test_every_command_answers_help_and_version_with_core_requirements_only(venv):
    bin_, env, _, _, work = venv
    commands = [[str(bin_ / s)] for s in SCRIPTS] + \
        [[str(bin_ / "python"), "-m", f"data_tools.{t}"] for t in TOOLS]
    for cmd in commands:
        helped = sh(cmd + ["--help"], work, env, timeout=120)
        assert helped.returncode == 0 and "usage:" in helped.stdout, (cmd, helped.stderr)
        version = sh(cmd + ["--version"], work, env, timeout=120)
        assert version.returncode == 0, (cmd, version.stderr)
        assert "refimpl 0.1.0" in version.stdout and "NumPy" in version.stdout, version.stdout
    listed = sh([str(bin_ / "python"), "-m", "data_tools", "--version"], work, env)
    assert listed.returncode == 0 and "refimpl 0.1.0" in listed.stdout


def test_missing_extras_stop_at_once_with_one_line(venv):
    bin_, env, _, _, work = venv
    train = sh([str(bin_ / "refimpl-train"), "demo", *TINY, "out=run-core"], work, env)
    one_line_error(train, "refimpl-train", "tqdm", "matplotlib", "pip install 'refimpl[train]'")
    assert not (work / "run-core").exists()                  # nothing written, no work lost
    tune = sh([str(bin_ / "refimpl-finetune"), "demo", "init=scratch", "out=tune-core"], work,
              env)
    one_line_error(tune, "refimpl-finetune", "tqdm", "matplotlib", "pip install 'refimpl[train]'")
    assert not (work / "tune-core").exists()
    digits = sh([str(bin_ / "python"), "-m", "data_tools.digits", "out"], work, env)
    one_line_error(digits, "data_tools.digits", "scikit-learn", "pip install 'refimpl[data]'")
    assert not (work / "out").exists()
    export = sh([str(bin_ / "refimpl-export"), "no-such-run", "encoder.pt"], work, env)
    one_line_error(export, "refimpl-export", "torch", "pip install torch")
    dry = sh([str(bin_ / "refimpl-train"), "demo", *TINY, "--dry-run"], work, env)
    assert dry.returncode == 0 and "dry run" in dry.stdout, dry.stderr[-2000:]


def test_with_the_train_extra_the_packaged_demo_config_trains(venv):
    bin_, env, wheel, pip, work = venv
    extra = sh(pip + [f"{wheel}[train]"], work, env)
    assert extra.returncode == 0, extra.stderr[-3000:]
    run = sh([str(bin_ / "refimpl-train"), "demo", *TINY, "out=run"], work, env)
    assert run.returncode == 0, run.stdout[-2000:] + run.stderr[-3000:]
    assert "Traceback" not in run.stderr
    out = work / "run"
    assert (out / "curves.png").stat().st_size > 0
    assert list(out.glob("ckpt-*/meta.json")), sorted(p.name for p in out.iterdir())
    assert (out / "config.toml").read_text().startswith("# made with refimpl 0.1.0")

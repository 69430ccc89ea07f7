"""What a command needs installed, checked before it does any work; and versions.

    require("refimpl-train", ["tqdm", "matplotlib"])   # exit 2 with one line if one is missing
    versions(mpi=True)     {"refimpl": "0.1.0", "git": "615d107", "python": ..., "numpy": ...}
    version_line()         "refimpl 0.1.0 (git 615d107) | Python 3.11.7 | NumPy 2.4.6 | ..."
    add_version_argument(parser, mpi=True)             --version on a console script

The core needs NumPy and threadpoolctl only. Everything else is an extra of
``setup.py`` (the EXTRAS table below says which), and each command asks for
what it will use before it starts: a missing package ends the command at once
with one line naming it and the ``pip install 'refimpl[extra]'`` that brings
it, exit status 2, never a traceback after an hour of training.

The version line goes into every run directory (``config.toml``), checkpoint
(``meta.json``) and trace (``meta.json``), so a result can be traced to the
code that made it: refimpl's version, the git commit when refimpl runs from a
clone (with ``-dirty`` when its files differ from that commit), Python,
NumPy, and mpi4py with the MPI library when MPI is in use.
"""
import importlib.metadata
import importlib.util
import os
import platform
import subprocess
import sys

import refimpl

# import name -> (the name pip installs it under, the refimpl extra that brings it)
EXTRAS = {
    "mpi4py": ("mpi4py", "mpi"),
    "PIL": ("pillow", "data"),
    "sklearn": ("scikit-learn", "data"),
    "tqdm": ("tqdm", "train"),
    "matplotlib": ("matplotlib", "train"),
    "tomli": ("tomli", "train"),
    "torch": ("torch", "torch"),
    "cupy": ("cupy", "gpu"),
}
EXIT_MISSING = 2


def missing(modules):
    """The import names in ``modules`` that cannot be found (without importing them)."""
    return [m for m in modules if importlib.util.find_spec(m) is None]


def require(prog, modules, why=None, stream=None):
    """Exit with status 2 and one line unless every module in ``modules`` is installed.

    prog: the command's name, for the message; why: what the packages are
    for (e.g. "the plot and the progress bar"). The line names each missing
    package and the ``pip install`` of the extra that brings it; it goes to
    ``stream`` (default stderr: under mpirun, ranks but 0 pass os.devnull).
    """
    gone = missing(modules)
    if not gone:
        return
    packages = [EXTRAS.get(m, (m, None))[0] for m in gone]
    extras = sorted({EXTRAS[m][1] for m in gone if m in EXTRAS})
    if "torch" in gone:
        how = ("pip install torch (the CPU build: pip install torch --index-url "
               "https://download.pytorch.org/whl/cpu)")
    else:
        how = (f"pip install 'refimpl[{','.join(extras)}]'" if extras
               else f"pip install {' '.join(packages)}")
    print(f"{prog}: error: {' and '.join(packages)} {'is' if len(packages) == 1 else 'are'} "
          f"not installed{f' ({why})' if why else ''}: {how}", file=stream or sys.stderr,
          flush=True)
    sys.exit(EXIT_MISSING)


def _git_commit():
    """``git describe --always --dirty`` of the clone refimpl runs from, or None."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(refimpl.__file__)))
    if not os.path.exists(os.path.join(root, ".git")):
        return None
    try:
        out = subprocess.run(["git", "-C", root, "describe", "--always", "--dirty",
                              "--abbrev=12"], capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return None
    return (out.stdout.strip() or None) if out.returncode == 0 else None


def _installed(dist):
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return None


_cache = {}


def versions(mpi=None):
    """{what: version} of the code that runs: refimpl (and its git commit), Python,
    NumPy; mpi4py and the MPI library when ``mpi`` is True (imports mpi4py.MPI,
    which starts MPI), or when None and mpi4py.MPI is already running."""
    if "base" not in _cache:
        import numpy as np
        base = {"refimpl": refimpl.__version__}
        commit = _git_commit()
        if commit:
            base["git"] = commit
        base.update(python=platform.python_version(), numpy=np.__version__)
        _cache["base"] = base
    out = dict(_cache["base"])
    if mpi is None:
        mpi = "mpi4py.MPI" in sys.modules
    if mpi:
        try:
            from mpi4py import MPI
            out["mpi4py"] = _installed("mpi4py") or "?"
            out["mpi"] = MPI.Get_library_version().split(",")[0].strip()
        except ImportError:
            out["mpi4py"] = "not installed"
    return out


def version_line(mpi=None):
    """One line of ``versions``: "refimpl 0.1.0 (git 615d107) | Python 3.11.7 | NumPy 2.4.6"."""
    v = versions(mpi)
    head = f"refimpl {v['refimpl']}" + (f" (git {v['git']})" if "git" in v else "")
    parts = [head, f"Python {v['python']}", f"NumPy {v['numpy']}"]
    if "mpi4py" in v:
        parts.append(f"mpi4py {v['mpi4py']}")
    if "mpi" in v:
        parts.append(v["mpi"])
    return " | ".join(parts)


def add_version_argument(parser, mpi=False):
    """``--version`` on an argparse parser: prints ``version_line(mpi)`` and exits 0.

    The line is made only when asked (mpi=True starts MPI to ask its library)."""
    import argparse

    class VersionAction(argparse.Action):
        def __init__(self, option_strings, dest, **kw):
            super().__init__(option_strings, dest, nargs=0, default=argparse.SUPPRESS,
                             help="print refimpl's version (and NumPy's, Python's"
                                  + (", mpi4py's and the MPI library's" if mpi else "")
                                  + ") and exit")

        def __call__(self, parser, namespace, values, option_string=None):
            print(f"{parser.prog}: {version_line(mpi and not missing(['mpi4py']))}")
            parser.exit()

    parser.add_argument("--version", action=VersionAction)

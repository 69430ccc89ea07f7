"""How every data_tools command ends: one line on stderr and an exit status.

A converter raises ValueError (bad input, named) or OSError (missing,
unreadable or existing paths) and writes nothing; the command then prints
``<tool>: error: <message>`` and exits 1 instead of a traceback. A
MemoryError (an allocation the converter's own estimate did not foresee)
ends the same way, as ``<tool>: error: out of memory: <message>``. On success
it prints ``<tool>: <what it did>`` and exits 0.

Before any work a tool checks the optional packages it needs (``require``:
one line naming the package and ``pip install 'refimpl[data]'``, exit 2),
and every tool answers ``--version`` (``add_version``).
"""
import sys

from refimpl import deps


def run(tool, work, quiet=False):
    """Exit status of ``work()``, which does the job and returns a report line."""
    try:
        report = work()
    except (ValueError, OSError) as e:
        print(f"{tool}: error: {e}", file=sys.stderr)
        return 1
    except MemoryError as e:
        text = str(e) or "MemoryError"
        if not text.startswith("out of memory"):
            text = f"out of memory: {text}"
        print(f"{tool}: error: {text}", file=sys.stderr)
        return 1
    if not quiet:
        print(f"{tool}: {report}", file=sys.stderr)
    return 0


def add_version(parser):
    """``--version`` on a tool's parser: refimpl's version line, then exit 0."""
    deps.add_version_argument(parser)
    return parser


def require(tool, modules, why=None):
    """Exit 2 with one line unless ``modules`` are installed (``refimpl.deps.require``)."""
    deps.require(f"python -m data_tools.{tool}", modules, why)

"""Memory checks before a data tool allocates: an estimate against what is available.

Linux overcommits memory: a NumPy allocation larger than the free memory
often succeeds, and the process is killed later by the kernel's OOM killer,
with no message at all. So a tool that builds images in memory first calls
``check_memory(what, nbytes)`` with its own estimate of the bytes it is about
to use; too much is a ValueError naming the argument and both sizes, and the
command ends with one line (``data_tools.cli.run``).

``available_memory()`` is MemAvailable from /proc/meminfo, lowered to the
room left under a control group's limit (cgroup v2 ``memory.max`` minus
``memory.current``, or v1 ``memory.limit_in_bytes`` minus
``memory.usage_in_bytes``) when a container sets one. Where none of these
can be read (not Linux) it is None and the check passes: an estimate is a
guard against typos like ``--size 100000``, not an allocator.

    check_memory(what, nbytes)       raise ValueError if nbytes > available
    available_memory() -> int or None
"""
from pathlib import Path


def _read_int(path):
    try:
        text = Path(path).read_text().strip()
    except OSError:
        return None
    return int(text) if text.isdigit() else None  # "max" (no limit) -> None


def available_memory():
    """Bytes this process can still allocate, as far as the system says; None if unknown."""
    found = []
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                found.append(int(line.split()[1]) * 1024)  # the value is in kB
    except (OSError, ValueError, IndexError):
        pass
    for limit, usage in (("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory.current"),
                         ("/sys/fs/cgroup/memory/memory.limit_in_bytes",
                          "/sys/fs/cgroup/memory/memory.usage_in_bytes")):
        cap, used = _read_int(limit), _read_int(usage)
        if cap is not None and used is not None and cap < 1 << 60:  # v1 "no limit" is ~2**63
            found.append(max(0, cap - used))
    return min(found) if found else None


def format_bytes(n):
    """A byte count for a message, in GiB with 3 significant digits."""
    return f"{n / 2**30:.3g} GiB"


def check_memory(what, nbytes):
    """ValueError if ``what`` (its estimated ``nbytes``) exceeds the available memory."""
    available = available_memory()
    if available is not None and nbytes > available:
        raise ValueError(f"{what} needs about {format_bytes(nbytes)} of memory, more than the "
                         f"{format_bytes(available)} available")

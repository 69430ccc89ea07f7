"""What this machine has and what this process uses: memory, read from Linux's /proc.

    resident_mb(key)     a VmRSS / VmHWM line of /proc/self/status in MB (None elsewhere)
    reset_peak_memory()  start a peak measurement: VmHWM restarts from the
                         current resident size (writing 5 to /proc/self/clear_refs);
                         returns the resident MB now
    peak_memory_mb(start_mb)  peak resident MB since reset_peak_memory returned start_mb
    available_bytes(device, ranks)  memory free for one rank: a GPU's free
                         memory / the ranks that share that GPU, or
                         MemAvailable / the ranks on the node

The peak counts every allocation after the reset, NumPy's and PyTorch's alike,
in one process (no allocator hooks). Used by the dry run, the benchmarks and
tutorial 11.
"""


def resident_mb(key):
    """A VmXXX line of /proc/self/status in MB (Linux), or None."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(key + ":"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return None


def reset_peak_memory():
    """Start a peak-memory measurement; returns the resident memory now (MB).

    Where clear_refs cannot be written the peak is since the process
    started: an upper bound.
    """
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        pass
    return resident_mb("VmRSS")


def peak_memory_mb(start_mb):
    """Peak resident memory since ``reset_peak_memory`` returned start_mb, in MB."""
    peak = resident_mb("VmHWM")
    return None if peak is None or start_mb is None else peak - start_mb


def available_bytes(device="cpu", ranks_on_node=1):
    """Memory free for one rank: the current GPU's free memory / ranks_on_node
    (the ranks that share that GPU), or MemAvailable / ranks_on_node."""
    if device == "gpu":
        from refimpl.backend import xp_for
        free, _ = xp_for("gpu").cuda.runtime.memGetInfo()
        return int(free) // max(ranks_on_node, 1)
    try:
        with open("/proc/meminfo") as fh:
            for line in fh:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024 // max(ranks_on_node, 1)
    except OSError:
        pass
    return None

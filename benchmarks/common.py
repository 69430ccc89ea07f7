"""Shared benchmark plumbing: thread count, a median timer, JSON lines.

Benchmarks run refimpl and PyTorch side by side in one process on the same
machine and report ratios; absolute times on shared machines are noise.
"""
import json
import os
import subprocess
import sys
import time

import numpy as np


def set_threads(n):
    """Use ``n`` threads in refimpl and in PyTorch alike.

    refimpl: ``threads.set_num_threads(n, single_blas=True)``, which runs conv
    chunks on n worker threads and holds NumPy's OpenBLAS at 1 thread (see
    refimpl/threads.py for why), also at n = 1; PyTorch:
    ``torch.set_num_threads(n)``.
    """
    from refimpl import threads
    # single_blas: at n = 1 NumPy's BLAS would otherwise keep a thread per
    # core, and "1 thread" would run refimpl's GEMMs on all of them.
    threads.set_num_threads(n, single_blas=True)
    try:
        import torch
        torch.set_num_threads(n)
    except ImportError:
        pass


def median_time(fn, repeat=5, warmup=1, reduce=np.median):
    """Median (or ``reduce``) wall time of ``fn()`` in seconds over ``repeat`` runs after warm-up."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return float(reduce(times))


def best_call(fn, repeat):
    """After one warm-up, ``repeat`` calls of ``fn()``; -> the fastest call's
    {"s": wall, "user_s", "sys_s": this process's CPU time, all threads}.

    The minimum, not the median: other processes on a shared machine only
    ever add time, so the fastest call is the most repeatable estimate.

    System time is what the kernel spent for the process (page faults of
    fresh allocations, mostly): a third of the classifier step once.
    """
    fn()
    best = None
    for _ in range(repeat):
        t0, w0 = os.times(), time.perf_counter()
        fn()
        w, t1 = time.perf_counter() - w0, os.times()
        if best is None or w < best["s"]:
            best = {"s": w, "user_s": t1.user - t0.user, "sys_s": t1.system - t0.system}
    return best


def sgemm_rate(shapes, parts, repeat=30):
    """GFLOP/s of float32 GEMMs as a blocked algorithm runs them on ``parts`` threads.

    shapes: [(m, k, n), ...], the products of one tile; each of ``parts``
    threads (``threads.parallel_map``) runs all of them on its own operands
    into its own outputs, concurrently. Best of ``repeat`` (each call takes
    milliseconds: with 5, one make bench run measured the classifier's
    tile 35% slower than the run before, and its "fraction" jumped from
    0.54 to 0.79 with the step no faster). The rate that a benchmark's
    "fraction of the GEMM limit" divides by.
    """
    from refimpl.threads import parallel_map
    g = np.random.default_rng(0)
    ops = [[(g.standard_normal((m, k), dtype=np.float32),
             g.standard_normal((k, n), dtype=np.float32), np.empty((m, n), np.float32))
            for m, k, n in shapes] for _ in range(parts)]

    def tile(i):
        for a, b, out in ops[i]:
            np.matmul(a, b, out=out)

    best = np.inf
    for _ in range(repeat + 1):  # the first call warms up
        t = time.perf_counter()
        parallel_map(tile, range(parts))
        best = min(best, time.perf_counter() - t)
    return parts * sum(2 * m * k * n for m, k, n in shapes) / best / 1e9


def compare_times(sides, rounds=5, per_round=2, warmup=1):
    """Time step functions in alternating blocks; robust to a noisy machine.

    sides: {name: step function}; the first is the one the others are
    compared with (refimpl). Each round runs ``per_round`` calls of each side
    in turn (blocks, not single interleaved calls: one library's spinning
    worker threads would otherwise slow the next one down) and keeps the
    fastest call of each block, in wall time and in CPU time
    (``time.process_time``: every thread of this process). Alternating means
    a burst of load from another process hits every side rather than one.

    Returns a dict: per side ``<name>_s``, ``<name>_cpu_s`` (medians over
    rounds) and ``<name>_spread_s``, ``<name>_cpu_spread_s`` ([min, max]);
    per other side the median over rounds of other / first, in wall time
    ``ratio_<name>`` and CPU time ``cpu_ratio_<name>`` (above 1: the first
    side is faster).
    """
    for _ in range(warmup):
        for fn in sides.values():
            fn()
    times = {name: ([], []) for name in sides}
    for _ in range(rounds):
        for name, fn in sides.items():
            best_wall = best_cpu = float("inf")
            for _ in range(per_round):
                w0, c0 = time.perf_counter(), time.process_time()
                fn()
                best_wall = min(best_wall, time.perf_counter() - w0)
                best_cpu = min(best_cpu, time.process_time() - c0)
            times[name][0].append(best_wall)
            times[name][1].append(best_cpu)
    out = {}
    for name, (wall, cpu) in times.items():
        out[f"{name}_s"] = float(np.median(wall))
        out[f"{name}_spread_s"] = [float(min(wall)), float(max(wall))]
        out[f"{name}_cpu_s"] = float(np.median(cpu))
        out[f"{name}_cpu_spread_s"] = [float(min(cpu)), float(max(cpu))]
    first, *others = sides
    (fw, fc) = times[first]
    for name in others:
        ow, oc = times[name]
        out[f"ratio_{name}"] = float(np.median([b / a for a, b in zip(fw, ow)]))
        out[f"cpu_ratio_{name}"] = float(np.median([b / a for a, b in zip(fc, oc)]))
    return out


def load_average():
    """The 1-minute load average (os.getloadavg), or None where there is none."""
    try:
        return os.getloadavg()[0]
    except (AttributeError, OSError):
        return None


def machine_cpu():
    """(busy, steal): CPU seconds all processes of the machine have used since
    boot, and the seconds the hypervisor took away from this machine's CPUs
    (/proc/stat); (None, None) where there is no /proc/stat."""
    try:
        with open("/proc/stat") as f:
            fields = [int(v) for v in f.readline().split()[1:9]]
    except (OSError, ValueError):
        return None, None
    user, nice, system, _idle, _iowait, irq, softirq, steal = fields
    tick = os.sysconf("SC_CLK_TCK")
    return (user + nice + system + irq + softirq) / tick, steal / tick


def own_cpu():
    """CPU seconds of this process and of the children it has waited for."""
    t = os.times()
    return t.user + t.system + t.children_user + t.children_system


def snapshot():
    """What ``load_record`` compares against: load average, machine and own CPU, wall time."""
    busy, steal = machine_cpu()
    return {"load": load_average(), "busy": busy, "steal": steal, "own": own_cpu(),
            "wall": time.perf_counter()}


def load_record(before, threads):
    """How busy the machine was while a benchmark ran, since ``before = snapshot()``.

    load_before / load_after: the 1-minute load average (the benchmark's own
    threads count in it, and on some virtual machines so does a constant
    background of tasks that use no CPU). other_cpu_cores: CPU time that
    other processes used meanwhile (the machine's busy time minus this
    process's and its children's), per second of wall time; steal_cores: time
    the hypervisor gave to other machines. ``loaded``: other processes or the
    hypervisor took more than half a core, which is enough to flip a 2-thread
    ratio on a 2-core machine (PyTorch's OpenMP threads suffer more); without
    /proc/stat, a load average above the benchmark's threads + 0.5.
    """
    after = snapshot()
    record = {"load_before": before["load"], "load_after": after["load"]}
    wall = after["wall"] - before["wall"]
    if before["busy"] is not None and after["busy"] is not None and wall > 0:
        other = (after["busy"] - before["busy"]) - (after["own"] - before["own"])
        record["other_cpu_cores"] = round(max(other, 0.0) / wall, 3)
        record["steal_cores"] = round((after["steal"] - before["steal"]) / wall, 3)
        record["loaded"] = record["other_cpu_cores"] > 0.5 or record["steal_cores"] > 0.5
    else:
        known = [x for x in (before["load"], after["load"]) if x is not None]
        record["loaded"] = None if not known else bool(max(known) > threads + 0.5)
    return record


def emit(record):
    """Print one JSON object per line (flushed, so partial runs still report)."""
    print(json.dumps(record), flush=True)


def machine_info():
    """What the numbers were measured on."""
    from refimpl import threads
    info = {"cpus": os.cpu_count(), "python": sys.version.split()[0],
            "numpy": np.__version__,
            "OPENBLAS_CORETYPE": os.environ.get("OPENBLAS_CORETYPE"),
            "refimpl_threads": threads.get_num_threads()}
    try:  # NumPy's BLAS: its kernel, version and threads now (1 while refimpl_threads > 1)
        from threadpoolctl import threadpool_info
        info["blas"] = [{k: lib.get(k) for k in ("prefix", "internal_api", "version",
                                                  "architecture", "num_threads")}
                        for lib in threadpool_info() if lib["user_api"] == "blas"]
    except ImportError:
        pass
    try:
        import torch
        info["torch"] = torch.__version__
        info["torch_threads"] = torch.get_num_threads()
    except ImportError:
        pass
    return info


def run_child(cmd, cwd=None, blas_threads=None):
    """Run a benchmark worker process; return the JSON of its last stdout line.

    On failure its output is passed through and the benchmark stops.
    REFIMPL_NUM_THREADS=1 so that a worker sets its own thread count.
    blas_threads: OpenBLAS/OpenMP threads per process. Set it for P ranks on
    one machine (cores / P): otherwise every rank's BLAS starts one thread
    per core and P ranks fight over the cores (the classifier step slows
    down by more than half: docs/benchmarks.md, Threads).
    """
    env = dict(os.environ, REFIMPL_NUM_THREADS="1")
    if blas_threads is not None:
        env.update(OPENBLAS_NUM_THREADS=str(blas_threads), OMP_NUM_THREADS=str(blas_threads))
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=cwd, env=env)
    if proc.returncode != 0:
        sys.stderr.write(proc.stdout + proc.stderr)
        raise SystemExit(f"benchmark worker failed: {' '.join(map(str, cmd))}")
    return json.loads(proc.stdout.strip().splitlines()[-1])

"""Run tests under every OpenBLAS kernel this CPU can execute, at several refimpl thread counts.

    python tests/kernel_matrix.py                 # the kernel-sensitive tests, kernels x threads 1, 2, 4
    python tests/kernel_matrix.py --full          # the whole suite once per kernel, and at threads 1, 2, 4
    python tests/kernel_matrix.py --kernels Haswell,SkylakeX --threads 2 -- -k golden

(`make test-kernels` is the first line.) NumPy's OpenBLAS picks its kernels
for the CPU it finds; ``OPENBLAS_CORETYPE`` forces another. Kernels sum in
different orders (and with or without FMA), so float64 results move by a
few units of rounding from one to another: a test that passes on one CPU
and fails on another has a tolerance that was never derived (docs/testing.md,
Tolerances). A kernel whose instructions this CPU lacks would die of SIGILL,
so the CPU's flags decide which are run. ``REFIMPL_NUM_THREADS`` changes how
refimpl splits its sums (convolution weight gradients, the classifier's dZ
parts), which moves float64 results the same way.

The table it prints (markdown, also written to ``--out``) gives for every
kernel (and the name OpenBLAS reports for it: ``Zen`` runs Haswell's code)
and thread count the pytest summary and the tests that failed.
"""
import argparse
import os
import re
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

# OpenBLAS kernels for x86-64 (OPENBLAS_CORETYPE values, oldest first) and the
# CPU flags (/proc/cpuinfo names) the kernel's code needs.
KERNELS = [
    ("Prescott", {"pni"}),                      # pni: Linux's name for SSE3
    ("Nehalem", {"ssse3", "sse4_1", "sse4_2"}),
    ("Sandybridge", {"avx"}),
    ("Haswell", {"avx2", "fma"}),
    ("Zen", {"avx2", "fma"}),
    ("SkylakeX", {"avx512f", "avx512dq", "avx512cd", "avx512bw", "avx512vl"}),
    ("Cooperlake", {"avx512f", "avx512dq", "avx512cd", "avx512bw", "avx512vl", "avx512_bf16"}),
    ("SapphireRapids", {"avx512f", "avx512bw", "avx512vl", "avx512_bf16", "avx512_fp16",
                        "amx_tile", "amx_bf16"}),
]

# The tests whose results depend on summation order across processes, runs
# or stored files: the golden trace, P ranks against 1, the oracle's replays,
# resume and the fault drill.
SENSITIVE = ["tests/test_oracle_golden.py", "tests/test_parallel_mpi.py", "tests/test_prior_mpi.py",
             "tests/test_features_mpi.py", "tests/test_train.py", "tests/test_oracle.py",
             "tests/test_oracle_mpi.py", "tests/test_oracle_torch.py",
             "tests/test_oracle_distributed.py", "tests/test_resume.py",
             "tests/test_fault_drill.py"]


def cpu_flags():
    """The flags of the first processor in /proc/cpuinfo (an empty set where there is none)."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return set()
    m = re.search(r"^flags\s*:(.*)$", text, re.M)
    return set(m.group(1).split()) if m else set()


def runnable_kernels(flags):
    """The KERNELS names whose flags this CPU has, and the others."""
    ok = [name for name, need in KERNELS if need <= flags]
    return ok, [name for name, _ in KERNELS if name not in ok]


def reported_architecture(env, python):
    """The kernel name OpenBLAS reports (threadpoolctl) under ``env``."""
    code = ("import threadpoolctl, numpy; print(','.join(sorted({str(i.get('architecture')) "
            "for i in threadpoolctl.threadpool_info() if i['user_api'] == 'blas'})))")
    p = subprocess.run([python, "-c", code], env=env, capture_output=True, text=True)
    return p.stdout.strip() or f"? ({p.stderr.strip().splitlines()[-1:]})"


def run_pytest(python, kernel, threads, args):
    """pytest under one kernel and thread count: (summary line, failed test ids, seconds)."""
    env = dict(os.environ, REFIMPL_NUM_THREADS=str(threads))
    if kernel:
        env["OPENBLAS_CORETYPE"] = kernel
    start = time.monotonic()
    p = subprocess.run([python, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-rf", *args],
                       env=env, capture_output=True, text=True, cwd=ROOT)
    lines = p.stdout.strip().splitlines()
    summary = lines[-1].strip("= ") if lines else f"no output (exit {p.returncode})"
    failed = [ln.split(" ", 1)[1].split(" - ")[0] for ln in lines if ln.startswith("FAILED ")]
    return summary, failed, time.monotonic() - start, p.returncode


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--full", action="store_true",
                    help="the whole suite once per kernel (threads 1) and once per thread count "
                         "(the CPU's own kernel), instead of the kernel-sensitive tests at every pair")
    ap.add_argument("--kernels", help="comma-separated OPENBLAS_CORETYPE values (default: all "
                                      "this CPU can run)")
    ap.add_argument("--threads", default="1,2,4", help="refimpl thread counts (default 1,2,4)")
    ap.add_argument("--out", default=str(ROOT / "runs" / "kernels" / "table.md"),
                    help="where to write the markdown table (default runs/kernels/table.md)")
    ap.add_argument("pytest_args", nargs="*", help="after --: passed to pytest (default: the "
                                                    "kernel-sensitive test files)")
    a = ap.parse_args(argv)
    python = sys.executable
    flags = cpu_flags()
    runnable, skipped = runnable_kernels(flags)
    kernels = a.kernels.split(",") if a.kernels else runnable
    bad = [k for k in kernels if k not in runnable]
    if bad:
        ap.error(f"this CPU cannot run the OpenBLAS kernel(s) {', '.join(bad)} "
                 f"(it runs {', '.join(runnable)})")
    threads = [int(t) for t in a.threads.split(",")]
    files = a.pytest_args or ([] if a.full else SENSITIVE)
    if a.full:
        pairs = [(k, 1) for k in kernels] + [(None, t) for t in threads if t != 1]
    else:
        pairs = [(k, t) for k in kernels for t in threads]
    print(f"CPU kernels runnable: {', '.join(runnable)}; not runnable here: "
          f"{', '.join(skipped) or 'none'}", flush=True)
    print(f"tests: {' '.join(files) or 'the whole suite'}", flush=True)
    rows, all_ok = [], True
    for kernel, t in pairs:
        env = dict(os.environ, **({"OPENBLAS_CORETYPE": kernel} if kernel else {}))
        arch = reported_architecture(env, python)
        summary, failed, seconds, rc = run_pytest(python, kernel, t, files)
        all_ok &= rc == 0
        name = kernel or f"(own: {arch})"
        row = (f"| {name} | {arch} | {t} | {summary} | {seconds:.0f} s | "
               f"{', '.join(failed) if failed else ''} |")
        print(row, flush=True)
        rows.append(row)
    table = "\n".join(["| OPENBLAS_CORETYPE | OpenBLAS reports | refimpl threads | pytest | time "
                       "| failed |", "|---|---|---|---|---|---|", *rows])
    out = Path(a.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(table + "\n")
    print(f"\n{table}\n\nwritten to {out}")
    return 0 if all_ok else 1


if __name__ == "__main__":
    sys.exit(main())

"""Cost of the method's two passes: the contrastive prior and the neighbour search.

For each N and P (one process per rank, under mpirun for P > 1; D = 128,
float32, each rank given cores / P threads):

    neighbours  ``method.neighbours.hardest_neighbours`` (K = 5) on a random W:
                seconds, peak resident memory per rank, against
                - the dense alternative: an N x N float32 similarity matrix,
                  N^2 * 4 bytes (by formula; never allocated),
                - the GEMM limit: 2 N^2 D / P FLOPs per rank at this machine's
                  measured sgemm rate with the same threads (one (2048 x 128) x
                  (128 x 4096) product, the tile the search multiplies).
    prior       ``method.prior.contrastive_prior`` over a synthetic dataset of N
                8 x 8 images with a tiny network (ResNet-18 at width 2, head 16
                -> 128), B = 512: seconds, instances/s, peak memory per rank,
                bytes routed. The network is tiny on purpose: the pass's own
                cost (reading, routing, writing W, the coverage check) shows;
                with a real network the forward dominates (time = N / its
                forward throughput).

    python benchmarks/bench_method_cost.py [--n 100000 1281167] [--ranks 1 2]
        [--neighbours-max-n 100000]

Prints one JSON object per (pass, N, P). The neighbour search is quadratic in
N: runs above --neighbours-max-n are skipped and say so (at N = 1,281,167 it is
2 N^2 D = 4.2e14 FLOPs, over an hour at this machine's GEMM rate).
"""
import argparse
import json
import os
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


from benchmarks.common import emit, run_child, sgemm_rate  # noqa: E402
from refimpl.parallel.launch import mpirun_command  # noqa: E402
from refimpl.sysinfo import peak_memory_mb, reset_peak_memory  # noqa: E402

D, K = 128, 5


def worker(args):
    from refimpl import threads
    from refimpl.parallel.comm import MPIComm, SelfComm
    if args.mpi:
        from mpi4py import MPI
        comm = MPIComm(MPI.COMM_WORLD)
    else:
        comm = SelfComm()
    n_threads = max(1, (os.cpu_count() or 1) // comm.size)
    threads.set_num_threads(n_threads, single_blas=comm.size > 1)
    N = args.n[0]
    if args.what == "neighbours":
        from refimpl.method.neighbours import hardest_neighbours
        from refimpl.parallel.classifier import CosineClassifier
        start_mb = reset_peak_memory()
        clf = CosineClassifier(N, D, comm, seed=0)
        comm.barrier()
        t = time.perf_counter()
        table = hardest_neighbours(clf, comm, K)
        seconds = time.perf_counter() - t
        extra = {"table_shape": list(table.shape), "gflops_per_s_rank": None}
        flops = 2 * N * N * D / comm.size
        extra["gflops_per_s_rank"] = flops / seconds / 1e9
        # the search splits its 2048-row tile over the threads
        extra["gemm_rate_gflops"] = sgemm_rate([(2048 // n_threads, 128, 4096)], n_threads)
        extra["fraction_of_gemm_limit"] = extra["gflops_per_s_rank"] / extra["gemm_rate_gflops"]
    else:
        from refimpl.data.synthetic import SyntheticDataset
        from refimpl.method.prior import contrastive_prior
        from refimpl.models.network import build_model
        from refimpl.parallel.classifier import CosineClassifier
        from refimpl.parallel.data_parallel import set_batchnorm_mode
        start_mb = reset_peak_memory()
        net = build_model("resnet18", "cifar", 2, 16, D, "float32", "cpu", 0)
        set_batchnorm_mode(net, comm, "local")
        clf = CosineClassifier(N, D, comm, seed=0)
        ds = SyntheticDataset(N, size=8, num_classes=10, seed=0)
        comm.barrier()
        t = time.perf_counter()
        report = contrastive_prior(net, clf, ds, comm, 512, seed=0)
        seconds = time.perf_counter() - t
        extra = {"instances_per_s": N / seconds, "bytes_sent": report["bytes_sent"],
                 "bytes_received": report["bytes_received"]}
    mine = {"rank": comm.rank, "seconds": seconds, "peak_mb": peak_memory_mb(start_mb), **extra}
    everyone = [mine] if not args.mpi else comm.comm.gather(mine, root=0)  # plumbing only
    if comm.rank == 0:
        print(json.dumps({"ranks": everyone, "threads": n_threads}), flush=True)


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--n", type=int, nargs="+", default=[100_000, 1_281_167])
    p.add_argument("--ranks", type=int, nargs="+", default=[1, 2])
    p.add_argument("--neighbours-max-n", type=int, default=100_000)
    p.add_argument("--what", choices=("neighbours", "prior"), help=argparse.SUPPRESS)
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--mpi", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker:
        return worker(args)
    here = Path(__file__).resolve()
    for what in ("neighbours", "prior"):
        for N in args.n:
            for P in args.ranks:
                if what == "neighbours" and N > args.neighbours_max_n:
                    emit({"benchmark": "method_cost", "pass": what, "N": N, "P": P,
                          "skipped": f"N > --neighbours-max-n {args.neighbours_max_n}: "
                                     f"{2 * N * N * D:.2e} FLOPs"})
                    continue
                argv = [here, "--worker", "--what", what, "--n", N]
                load_before = os.getloadavg()
                cpu_before = os.times()
                if P == 1:
                    job = run_child([sys.executable, *map(str, argv)], cwd=ROOT)
                else:
                    job = run_child(mpirun_command(P, *argv, "--mpi"), cwd=ROOT, blas_threads=1)
                cpu = os.times()
                slowest = max(job["ranks"], key=lambda r: r["seconds"])
                row = {"benchmark": "method_cost", "pass": what, "N": N, "P": P, "D": D,
                       "seconds": slowest["seconds"],
                       "peak_mb_per_rank": max(r["peak_mb"] for r in job["ranks"]),
                       "threads_per_rank": job["threads"],
                       "children_cpu_s": (cpu.children_user + cpu.children_system)
                       - (cpu_before.children_user + cpu_before.children_system),
                       "load_before": load_before, "load_after": os.getloadavg(),
                       "ranks": job["ranks"]}
                if what == "neighbours":
                    row["dense_matrix_mb"] = N * N * 4 / 2**20
                    row["table_mb"] = N * K * 8 / 2**20
                emit(row)


if __name__ == "__main__":
    main()

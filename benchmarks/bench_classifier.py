"""The 1,281,167-way classifier step, refimpl's sharded softmax vs PyTorch's dense one.

What is measured, per step, float32: the cosine classifier of DESIGN.md
(N = 1,281,167 ImageNet-1k instances, D = 128, global batch B = 256,
tau = 0.15) -- forward, backward (to the features and the weight) and an
SGD update (momentum 0.9, weight decay 1e-4) of the weight.

    refimpl  P ranks under mpirun, each holding its shard W_r (N/P x D),
             ``CosineClassifier`` + ``SGD`` (the step table, rows 2-7 and 10)
    PyTorch  one process, the whole W as a parameter:
             F.cross_entropy(F.normalize(z) @ F.normalize(W).T / tau, y),
             loss.backward(), torch.optim.SGD.step()

Both start from the same W (``init_shard``) and the same batch, so the
losses they print agree. Time: the fastest of ``--repeat`` steps after one warm-up (per rank: the
slowest rank). Peak memory: the peak resident memory of the process during
setup + steps, minus what it held before (``common.reset_peak_memory``),
so the weight, its gradient and momentum are included on both sides. Both
sides use the machine's cores: PyTorch all of them, refimpl cores / P threads
per rank (and as many BLAS threads per rank: ``common.run_child``).

    python benchmarks/bench_classifier.py [--ranks 1 2 4] [--classes N] [--repeat 3]
    python benchmarks/bench_classifier.py --device gpu --batch 1024 --ranks 1

Prints one JSON object per P: refimpl_s, torch_s, ratio (= torch_s /
refimpl_s: above 1 refimpl is faster), refimpl_peak_mb, torch_peak_mb,
memory_ratio (= refimpl / torch). On the GPU, time is measured with the
stream synchronized and peak memory is what the caching allocators hold
(CuPy's memory pool total, torch.cuda.max_memory_reserved).
"""
import argparse
import json
import os
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402

from benchmarks.common import best_time, emit, run_child  # noqa: E402
from refimpl.parallel.launch import mpirun_command  # noqa: E402
from refimpl.sysinfo import peak_memory_mb, reset_peak_memory  # noqa: E402

TAU, LR, MOMENTUM, WD = 0.15, 0.1, 0.9, 1e-4


def global_problem(N, D, B):
    """The global batch's features (B, D) and labels (B,), the same for every P."""
    g = np.random.default_rng(0)
    return g.standard_normal((B, D)).astype(np.float32), g.integers(0, N, B)


def refimpl_worker(args):
    """One rank: time the sharded step; rank 0 prints the job's JSON line."""
    from refimpl import backend, threads
    from refimpl.parallel import CosineClassifier, MPIComm, SelfComm
    from refimpl.optim.sgd import SGD
    if args.mpi:
        from mpi4py import MPI
        comm = MPIComm(MPI.COMM_WORLD)
    else:
        comm = SelfComm()
    device = args.device
    if device == "gpu":
        from refimpl.parallel import select_gpu
        select_gpu(comm)
    else:
        threads.set_num_threads(max(1, (os.cpu_count() or 1) // comm.size))
    xp = backend.xp_for(device)
    z, y = global_problem(args.classes, args.dim, args.batch)
    b = args.batch // comm.size
    z = backend.asarray(z[comm.rank * b:(comm.rank + 1) * b], device=device)
    y = y[comm.rank * b:(comm.rank + 1) * b]

    start = reset_peak_memory()
    if device == "gpu":
        xp.get_default_memory_pool().free_all_blocks()
    clf = CosineClassifier(args.classes, args.dim, comm, tau=TAU, device=device, seed=0)
    opt = SGD(clf.weight.ravel(), clf.grad.ravel(), lr=LR, momentum=MOMENTUM, weight_decay=WD)

    def step():
        loss, _ = clf.forward(z, y)
        clf.backward()
        opt.step()
        return loss

    losses = []

    def timed_step():  # every rank starts together; the GPU has finished at the end
        comm.barrier()
        losses.append(step())
        backend.synchronize()

    seconds = best_time(timed_step, args.repeat)
    loss = losses[-1]
    if device == "gpu":
        # What CuPy's pool holds (it keeps freed blocks): comparable to
        # PyTorch's reserved, not allocated, memory.
        peak = xp.get_default_memory_pool().total_bytes() / 2**20
    else:
        peak = peak_memory_mb(start)
    mine = {"rank": comm.rank, "s": seconds, "peak_mb": peak,
            "loss": float(backend.to_numpy(loss))}
    everyone = [mine] if not args.mpi else comm.comm.gather(mine, root=0)  # plumbing only
    if comm.rank == 0:
        print(json.dumps({"P": comm.size, "ranks": everyone,
                          "threads": threads.get_num_threads()}), flush=True)


def torch_worker(args):
    """PyTorch's dense step on the whole weight; prints one JSON line."""
    import torch
    import torch.nn.functional as F
    dev = "cuda" if args.device == "gpu" else "cpu"
    if dev == "cpu":
        torch.set_num_threads(os.cpu_count() or 1)
    z, y = global_problem(args.classes, args.dim, args.batch)
    z = torch.tensor(z, device=dev, requires_grad=True)
    y = torch.tensor(y, device=dev)
    start = reset_peak_memory()
    if dev == "cuda":
        torch.cuda.reset_peak_memory_stats()
    # refimpl's initial W, so both sides report the same first loss.
    from refimpl.parallel.sharding import init_shard
    W = torch.nn.Parameter(torch.from_numpy(
        init_shard(args.classes, args.dim, 0, args.classes, dtype=np.float32)).to(dev))
    opt = torch.optim.SGD([W], lr=LR, momentum=MOMENTUM, weight_decay=WD)

    def step():
        opt.zero_grad(set_to_none=False)
        loss = F.cross_entropy(F.normalize(z) @ F.normalize(W).t() / TAU, y)
        loss.backward()
        opt.step()
        return loss

    losses = []

    def timed_step():
        losses.append(step())
        if dev == "cuda":
            torch.cuda.synchronize()

    seconds = best_time(timed_step, args.repeat)
    loss = losses[-1]
    peak = (torch.cuda.max_memory_reserved() / 2**20 if dev == "cuda"
            else peak_memory_mb(start))
    print(json.dumps({"s": seconds, "peak_mb": peak, "loss": float(loss.detach()),
                      "threads": torch.get_num_threads()}), flush=True)


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--classes", type=int, default=1_281_167)
    p.add_argument("--dim", type=int, default=128)
    p.add_argument("--batch", type=int, default=256)
    p.add_argument("--ranks", type=int, nargs="+", default=[1, 2, 4])
    p.add_argument("--repeat", type=int, default=3)
    p.add_argument("--device", choices=["cpu", "gpu"], default="cpu")
    p.add_argument("--worker", choices=["refimpl", "torch"], help=argparse.SUPPRESS)
    p.add_argument("--mpi", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker == "refimpl":
        return refimpl_worker(args)
    if args.worker == "torch":
        return torch_worker(args)

    common = [f"--classes={args.classes}", f"--dim={args.dim}", f"--batch={args.batch}",
              f"--repeat={args.repeat}", f"--device={args.device}"]
    me = [sys.executable, str(Path(__file__).resolve())]
    theirs = run_child(me + ["--worker", "torch"] + common)
    for P in args.ranks:
        if args.batch % P:
            raise SystemExit(f"--batch {args.batch} does not split over {P} ranks")
        if P == 1:  # no MPI needed for one rank: the size-1 communicator
            ours = run_child(me + ["--worker", "refimpl"] + common)
        else:
            ours = run_child(mpirun_command(P, *me[1:], "--worker", "refimpl", "--mpi", *common),
                             blas_threads=max(1, (os.cpu_count() or 1) // P))
        t = max(r["s"] for r in ours["ranks"])
        peak = max(r["peak_mb"] for r in ours["ranks"])
        emit({"benchmark": "classifier_step", "device": args.device, "N": args.classes,
              "D": args.dim, "B": args.batch, "P": P,
              "refimpl_s": round(t, 4), "torch_s": round(theirs["s"], 4),
              "ratio": round(theirs["s"] / t, 3),
              "refimpl_peak_mb": round(peak, 1), "torch_peak_mb": round(theirs["peak_mb"], 1),
              "memory_ratio": round(peak / theirs["peak_mb"], 3),
              "loss": ours["ranks"][0]["loss"], "torch_loss": theirs["loss"],
              "refimpl_threads_per_rank": ours["threads"], "torch_threads": theirs["threads"]})


if __name__ == "__main__":
    main()

"""The 1,281,167-way classifier step, refimpl's sharded softmax vs PyTorch's dense one.

What is measured, per step, float32: the cosine classifier of docs/design.md
(N = 1,281,167 ImageNet-1k instances, D = 128, global batch B = 256,
tau = 0.15) -- forward, backward (to the features and the weight) and an
SGD update (momentum 0.9, weight decay 1e-4) of the weight.

    refimpl  P ranks under mpirun, each holding its shard W_r (N/P x D),
             ``CosineClassifier`` + ``SGD`` (the step table, rows 2-7 and 10)
    PyTorch  one process, the whole W as a parameter, twice:
             dense    what users write: F.cross_entropy(F.normalize(z) @
                      F.normalize(W).T / tau, y), loss.backward(),
                      torch.optim.SGD.step()
             blocked  refimpl's algorithm in PyTorch (``blocked_cosine_softmax``:
                      blocks of --block classes, gradients by hand), so that
                      the algorithm's share and the framework's are told apart

All start from the same W (``init_shard``) and the same batch, so the
losses they print agree. Time: the fastest of ``--repeat`` steps after one
warm-up (per rank: the slowest rank). Peak memory: the peak resident memory of the process during
setup + steps, minus what it held before (``common.reset_peak_memory``),
so the weight, its gradient and momentum are included on both sides. Both
sides use the machine's cores: PyTorch all of them, refimpl cores / P threads
per rank (and as many BLAS threads per rank: ``common.run_child``).

    python benchmarks/bench_classifier.py [--ranks 1 2 4] [--classes N] [--repeat 3]
    python benchmarks/bench_classifier.py --device gpu --batch 1024 --ranks 1

Prints the machine (BLAS kernel, versions), then one JSON object per P:
refimpl_s, torch_s, ratio (= torch_s / refimpl_s: above 1 refimpl is
faster), torch_blocked_s and ratio_blocked (CPU); user and system CPU seconds of that step on each side (system time
is the kernel's: page faults of fresh allocations, mostly); on the CPU
gemm_limit_s, the time the step's three GEMMs per block of classes (6 B N_r D
FLOPs) need alone at this machine's sgemm rate on that tile with the rank's
threads, and fraction_of_gemm_limit = gemm_limit_s / refimpl_s;
refimpl_peak_mb, torch_peak_mb, memory_ratio (= refimpl / torch); the load
average before and after, the CPU other processes used meanwhile
(``common.load_record``) and ``loaded`` when it was over half a core. On
the GPU, time is measured with the
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

from benchmarks.common import (best_call, emit, load_record, machine_info, run_child,  # noqa: E402
                               sgemm_rate, snapshot)
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

    best = best_call(timed_step, args.repeat)
    loss = losses[-1]
    if device == "gpu":
        # What CuPy's pool holds (it keeps freed blocks): comparable to
        # PyTorch's reserved, not allocated, memory.
        peak = xp.get_default_memory_pool().total_bytes() / 2**20
    else:
        peak = peak_memory_mb(start)
    mine = {"rank": comm.rank, **best, "peak_mb": peak, "loss": float(backend.to_numpy(loss))}
    if device == "cpu":
        # The GEMM limit: the step's three products per block of classes
        # (logits, dW_hat, dZ_hat: 6 B N_r D FLOPs) at the sgemm rate of
        # that tile with this rank's threads, each thread on its own block.
        from refimpl.parallel.classifier import BLOCK
        B, D, n = args.batch, args.dim, BLOCK["cpu"]
        rate = sgemm_rate([(B, D, n), (n, B, D), (B, n, D)], threads.get_num_threads())
        mine["gemm_limit_s"] = 6 * B * (clf.hi - clf.lo) * D / rate / 1e9
    everyone = [mine] if not args.mpi else comm.comm.gather(mine, root=0)  # plumbing only
    if comm.rank == 0:
        print(json.dumps({"P": comm.size, "ranks": everyone,
                          "threads": threads.get_num_threads()}), flush=True)


def blocked_cosine_softmax(z, y, W, block):
    """refimpl's algorithm written in PyTorch: -> (loss, dW (N, D)).

    The second PyTorch comparator, so that "algorithm" and "framework" are
    told apart: the logits block by block, each block's exp(l - m_k) kept in
    one (B, N) buffer with its row maxima m_k (online max / sum of exp), the
    label logits read while the block exists, W_hat recomputed in the
    backward pass, whose softmax is one multiply, E exp(m_k - M) / S; the
    gradients by hand (no autograd graph over N); PyTorch's own threads
    inside each operation. Only dW is formed (the features' gradient, B x D,
    costs one more GEMM per block: ``dL @ w_hat``, included to keep the work
    equal, its result dropped).
    """
    import torch
    import torch.nn.functional as F
    B, N = z.shape[0], W.shape[0]
    Zt = F.normalize(z) / TAU
    E = torch.empty((B, N), dtype=z.dtype, device=z.device)
    rows = torch.arange(B, device=z.device)
    t = torch.zeros((B,), dtype=z.dtype, device=z.device)
    ms, ss = [], []
    for a in range(0, N, block):
        c = min(a + block, N)
        L = Zt @ F.normalize(W[a:c]).t()
        m = L.amax(1)
        mine = (y >= a) & (y < c)
        t[mine] = L[rows[mine], y[mine] - a]
        torch.exp(L - m[:, None], out=E[:, a:c])
        ms.append(m)
        ss.append(E[:, a:c].sum(1))
    m_blocks = torch.stack(ms)                                       # (n_blocks, B)
    M = m_blocks.amax(0)
    S = (torch.stack(ss) * torch.exp(m_blocks - M)).sum(0)
    loss = (M + torch.log(S) - t).mean()
    g = torch.exp(m_blocks - M) / (S * B)                            # (n_blocks, B)
    dW = torch.empty_like(W)
    dZ = torch.zeros_like(z)
    for k, a in enumerate(range(0, N, block)):
        c = min(a + block, N)
        dL = E[:, a:c] * g[k][:, None]
        mine = (y >= a) & (y < c)
        dL[rows[mine], y[mine] - a] -= 1.0 / B
        norm = W[a:c].norm(dim=1, keepdim=True).clamp_min(1e-12)
        what = W[a:c] / norm
        gw = dL.t() @ Zt
        dW[a:c] = (gw - what * (gw * what).sum(1, keepdim=True)) / norm
        dZ += dL @ what
    return loss, dW


def torch_worker(args):
    """PyTorch's step on the whole weight, dense or blocked; prints one JSON line."""
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

    def dense_step():
        opt.zero_grad(set_to_none=False)
        loss = F.cross_entropy(F.normalize(z) @ F.normalize(W).t() / TAU, y)
        loss.backward()
        opt.step()
        return loss

    def blocked_step():
        with torch.no_grad():
            loss, W.grad = blocked_cosine_softmax(z.detach(), y, W.detach(), args.block)
            opt.step()
        return loss

    step = blocked_step if args.worker == "torch-blocked" else dense_step
    losses = []

    def timed_step():
        losses.append(step())
        if dev == "cuda":
            torch.cuda.synchronize()

    best = best_call(timed_step, args.repeat)
    loss = losses[-1]
    peak = (torch.cuda.max_memory_reserved() / 2**20 if dev == "cuda"
            else peak_memory_mb(start))
    print(json.dumps({**best, "peak_mb": peak, "loss": float(loss.detach()),
                      "threads": torch.get_num_threads()}), flush=True)


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--classes", type=int, default=1_281_167)
    p.add_argument("--dim", type=int, default=128)
    p.add_argument("--batch", type=int, default=256)
    p.add_argument("--ranks", type=int, nargs="+", default=[1, 2, 4])
    p.add_argument("--repeat", type=int, default=3)
    p.add_argument("--device", choices=["cpu", "gpu"], default="cpu")
    p.add_argument("--block", type=int, default=4096,
                   help="classes per block of the blocked PyTorch comparator")
    p.add_argument("--no-blocked", action="store_true",
                   help="skip the blocked PyTorch comparator (CPU)")
    p.add_argument("--worker", choices=["refimpl", "torch", "torch-blocked"],
                   help=argparse.SUPPRESS)
    p.add_argument("--mpi", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker == "refimpl":
        return refimpl_worker(args)
    if args.worker in ("torch", "torch-blocked"):
        return torch_worker(args)

    common = [f"--classes={args.classes}", f"--dim={args.dim}", f"--batch={args.batch}",
              f"--repeat={args.repeat}", f"--device={args.device}"]
    me = [sys.executable, str(Path(__file__).resolve())]
    emit({"benchmark": "classifier_machine", **machine_info()})
    load = snapshot()
    theirs = run_child(me + ["--worker", "torch"] + common)
    blocked = (run_child(me + ["--worker", "torch-blocked", f"--block={args.block}"] + common)
               if args.device == "cpu" and not args.no_blocked else None)
    for P in args.ranks:
        if args.batch % P:
            raise SystemExit(f"--batch {args.batch} does not split over {P} ranks")
        if P == 1:  # no MPI needed for one rank: the size-1 communicator
            ours = run_child(me + ["--worker", "refimpl"] + common)
        else:
            ours = run_child(mpirun_command(P, *me[1:], "--worker", "refimpl", "--mpi", *common),
                             blas_threads=max(1, (os.cpu_count() or 1) // P))
        slowest = max(ours["ranks"], key=lambda r: r["s"])
        t = slowest["s"]
        peak = max(r["peak_mb"] for r in ours["ranks"])
        gemm = ({"gemm_limit_s": round(slowest["gemm_limit_s"], 4),
                 "fraction_of_gemm_limit": round(slowest["gemm_limit_s"] / t, 3)}
                if "gemm_limit_s" in slowest else {})
        emit({"benchmark": "classifier_step", "device": args.device, "N": args.classes,
              "D": args.dim, "B": args.batch, "P": P,
              "refimpl_s": round(t, 4), "torch_s": round(theirs["s"], 4),
              "ratio": round(theirs["s"] / t, 3), **gemm,
              "refimpl_user_s": round(slowest["user_s"], 3),
              "refimpl_sys_s": round(slowest["sys_s"], 3),
              "torch_user_s": round(theirs["user_s"], 3), "torch_sys_s": round(theirs["sys_s"], 3),
              **({"torch_blocked_s": round(blocked["s"], 4),
                  "ratio_blocked": round(blocked["s"] / t, 3),
                  "torch_blocked_peak_mb": round(blocked["peak_mb"], 1),
                  "torch_blocked_loss": blocked["loss"]} if blocked else {}),
              "refimpl_peak_mb": round(peak, 1), "torch_peak_mb": round(theirs["peak_mb"], 1),
              "memory_ratio": round(peak / theirs["peak_mb"], 3),
              "loss": ours["ranks"][0]["loss"], "torch_loss": theirs["loss"],
              "refimpl_threads_per_rank": ours["threads"], "torch_threads": theirs["threads"],
              **load_record(load, os.cpu_count() or 1)})


if __name__ == "__main__":
    main()

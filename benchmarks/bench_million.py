"""The million-way run on one GPU, measured part by part.

N = 1,281,167 instances (ImageNet-1k's count) of 16 x 16 images, a small
network (ResNet-18, CIFAR stem, width 8: the classifier and the method
dominate), D = 128, B = 1024, float32, K = 5, alpha = 0.2, on one GPU:

    prior         the contrastive prior over all N (the eval transform,
                  train-mode BN, every row of W written once)
    neighbours    the neighbour table over all N on 1 rank (the ring with
                  P = 1), against its GEMM limit: N^2 D multiply-adds at
                  this device's measured fp32 rate (``gemm_rate``); SAMPLE
                  rows checked by brute force (their K best cosines)
    steps         training steps of epoch 2 (smoothed targets from that
                  table, augmentation on the device, SGD): --steps of them,
                  fewer when the budget would not hold them and ring2 (not
                  below MIN_STEPS: then ring2 is skipped; said either way)
    knn           the kNN monitor on a subset: features of --knn-bank
                  training-like images and --knn-queries labeled ones
    ring2         the neighbour table of the same W on 2 ranks sharing the
                  GPU (mpirun): its rows' similarities against the 1-rank
                  table's (an exact comparison of ids would fail on a
                  near-tie that two GEMM shapes round apart)

Each part reports seconds and the device memory CuPy's pool holds at its end
(every block is kept until freed, so that is the part's peak; W, its
gradient and momentum included), beside the dry run's formula
(``refimpl.train.dry_run.cost``: what ``refimpl-train --dry-run`` prints
for device = "gpu"). The images: 65,536 random base images; image i is base
i mod 65,536 XOR a byte from i // 65,536, so all N differ and one read is a
gather (the synthetic renderer would take the prior's time on the host).

--budget-s bounds the whole run: steps and ring2 are cut or skipped (said,
never silently) when what is left would not hold them, so a slow part
cannot take a caller's time. --device cpu with small sizes (gpu_check.sh
--dry) runs the same code on NumPy.

    python benchmarks/bench_million.py [--out DIR] [--budget-s 120] [--steps 200]

Prints one JSON object per part (and writes them to DIR/million.jsonl).
"""
import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402

from refimpl import backend  # noqa: E402

BASE = 65536  # distinct random base images
MIN_STEPS = 100  # the steps are cut for ring2 down to this many, not further
SAMPLE = 256     # rows of the 1-rank table checked by brute force


class XorImages:
    """N distinct uint8 (S, S, 3) images from BASE random ones (module docstring);
    the reader interface of ``PackedDataset`` (read, len, image_size, labels)."""

    def __init__(self, n, size, seed=0):
        g = np.random.default_rng(seed)
        self.base = g.integers(0, 256, size=(min(BASE, n), size, size, 3), dtype=np.uint8)
        self.n, self.image_size = n, (size, size)
        self.labels = np.full(n, -1, dtype=np.int64)  # unlabeled

    def __len__(self):
        return self.n

    def read(self, ids):
        ids = np.asarray(ids)
        flip = ((ids // len(self.base)) * 97 % 256).astype(np.uint8)   # (n,)
        return self.base[ids % len(self.base)] ^ flip[:, None, None, None]


def pool_mb(device):
    """MiB that CuPy's memory pool holds now (None on the CPU)."""
    if device != "gpu":
        return None
    return backend.xp_for("gpu").get_default_memory_pool().total_bytes() / 2**20


def fresh_pool(device):
    """Return the pool's unused blocks, so that what it holds at a part's end is its peak."""
    if device == "gpu":
        backend.synchronize()
        backend.xp_for("gpu").get_default_memory_pool().free_all_blocks()


def gemm_rate(device, rows, cols, dim, repeat=5):
    """fp32 FLOP/s of the search's tile product (rows x dim) @ (dim x cols), best of repeat."""
    xp = backend.xp_for(device)
    a = backend.asarray(np.random.default_rng(0).standard_normal((rows, dim), np.float32),
                        device=device)
    b = backend.asarray(np.random.default_rng(1).standard_normal((cols, dim), np.float32),
                        device=device)
    best = np.inf
    for _ in range(repeat + 1):
        backend.synchronize()
        t = time.perf_counter()
        s = a @ b.T
        backend.synchronize()
        best = min(best, time.perf_counter() - t)
    del s, a, b
    fresh_pool(device)
    return 2.0 * rows * cols * dim / best, xp


def dry_run_formula(args, N, P, rank):
    """The dry run's memory parts (bytes) for this run's config (``dry_run.cost``)."""
    from refimpl.train.config import Config
    from refimpl.train.dry_run import cost, neighbour_search_bytes
    cfg = Config(width=args.width, dim=args.dim, batch_size=args.batch, k=args.k,
                 alpha=args.alpha, device=args.device, dtype="float32", bn="sync")
    memory, _, _ = cost(cfg, N, P, rank, args.size)
    fresh_pool(args.device)
    return memory, neighbour_search_bytes(N, P, rank, args.dim, 4)


class Report:
    """JSON lines to stdout and DIR/million.jsonl, one per part, as each ends."""

    def __init__(self, out, start):
        self.path = Path(out) / "million.jsonl" if out else None
        if self.path:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self.path.write_text("")
        self.start = start

    def __call__(self, record):
        record["elapsed_s"] = round(time.perf_counter() - self.start, 2)
        line = json.dumps(record)
        print(line, flush=True)
        if self.path:
            with open(self.path, "a") as f:
                f.write(line + "\n")


def mb(nbytes):
    return None if nbytes is None else round(nbytes / 2**20, 1)


def run(args):
    from refimpl.data.augment import AugmentConfig, augment_batch
    from refimpl.data.sampler import global_batches
    from refimpl.data.synthetic import SyntheticDataset
    from refimpl.evaluate.features import extract_features
    from refimpl.evaluate.knn import weighted_knn_accuracy
    from refimpl.method.neighbours import TILE, hardest_neighbours
    from refimpl.method.prior import contrastive_prior
    from refimpl.method.targets import target_entries
    from refimpl.models import build_model
    from refimpl.optim.sgd import SGD
    from refimpl.parallel import CosineClassifier, SelfComm, set_batchnorm_mode
    from refimpl.train.step import forward_backward, update

    start = time.perf_counter()
    report = Report(args.out, start)
    deadline = start + args.budget_s
    device, N, B, D = args.device, args.n, args.batch, args.dim
    comm = SelfComm()
    if device == "gpu":
        backend.use_gpu(0)
    t = time.perf_counter()
    data = XorImages(N, args.size)
    net = build_model("resnet18", "cifar", args.width, None, D, np.float32, device, seed=0)
    set_batchnorm_mode(net, comm, "sync")
    clf = CosineClassifier(N, D, comm, tau=0.15, dtype=np.float32, device=device, seed=0)
    net_opt = SGD(net.store.data, net.store.grad, 0.1, 0.9, 1e-4)
    clf_opt = SGD(clf.weight.ravel(), clf.grad.ravel(), 0.1, 0.9, 1e-4)
    R, C = TILE[device]
    rate, xp = gemm_rate(device, min(R, N), min(C, N), D)
    memory, search_bytes = dry_run_formula(args, N, 1, 0)
    info = {"device": device, "N": N, "size": args.size, "width": args.width, "D": D, "B": B,
            "K": args.k, "alpha": args.alpha, "fp32_gemm_tflops": round(rate / 1e12, 2),
            "dry_run_mb": {name: mb(v) for name, v in memory.items()},
            "dry_run_total_mb": mb(sum(memory.values())),
            "neighbour_search_formula_mb": mb(search_bytes)}
    if device == "gpu":
        cp = xp
        props = cp.cuda.runtime.getDeviceProperties(cp.cuda.Device().id)
        info["gpu"] = props["name"].decode() if isinstance(props["name"], bytes) else props["name"]
        info["cupy"] = cp.__version__
        info["tf32"] = os.environ.get("CUPY_TF32", "unset")
    report({"part": "setup", "seconds": round(time.perf_counter() - t, 2), **info})
    shard_mb = 3 * N * D * 4 / 2**20   # W, its gradient and momentum

    # ---- the contrastive prior over all N
    fresh_pool(device)
    t = time.perf_counter()
    prior = contrastive_prior(net, clf, data, comm, B, seed=0)
    backend.synchronize()
    seconds = time.perf_counter() - t
    report({"part": "prior", "ok": prior["rows"] == N, "seconds": round(seconds, 2),
            "instances_per_s": round(N / seconds), "peak_mb": mb2(pool_mb(device)),
            "formula_mb": round(shard_mb + memory_part(memory, "activations") / 2**20, 1),
            "formula": "classifier shard + the dry run's activations (forward and backward)"})

    # ---- the neighbour table over all N, one rank
    fresh_pool(device)
    t = time.perf_counter()
    table = hardest_neighbours(clf, comm, args.k)
    backend.synchronize()
    seconds = p1_seconds = time.perf_counter() - t
    limit = 2.0 * N * N * D / rate
    ok = table.shape == (N, args.k) and not np.any(table == np.arange(N)[:, None])
    worst = sample_check(clf, table, args.k)
    ok = bool(ok and worst <= 1e-5)
    report({"part": "neighbours", "P": 1, "ok": bool(ok), "seconds": round(seconds, 2),
            "gemm_limit_s": round(limit, 2), "fraction_of_gemm_limit": round(limit / seconds, 3),
            "peak_mb": mb2(pool_mb(device)),
            "formula_mb": round(shard_mb + search_bytes / 2**20, 1),
            "formula": "classifier shard + the dry run's neighbour search (rows, one tile)",
            "sample_rows": SAMPLE, "sample_worst_similarity_difference": worst})
    tmp = tempfile.mkdtemp(prefix="million-")
    w_path = Path(tmp) / "W.npy"
    np.save(w_path, backend.to_numpy(clf.weight))   # for ring2: the same W

    # ---- training steps of epoch 2 with smoothed targets
    aug = AugmentConfig()
    batches = global_batches(N, B, 0, 1)
    fresh_pool(device)
    times, losses = [], []
    planned, done = min(args.steps, len(batches)), 0
    # kept for what follows: the kNN monitor (15 s), and ring2 (the 1-rank search's
    # work again, shared by two processes: about 1.2 times its time, + 15 s to start); the steps are cut for ring2 down to MIN_STEPS,
    # below that ring2 is skipped instead
    knn_s, ring_s = 15.0, (0.0 if args.no_ring2 else 1.2 * p1_seconds + 15)
    t = time.perf_counter()
    for s in range(planned):
        t0 = time.perf_counter()
        ids = batches[s]
        x = augment_batch(data.read(ids), ids, 0, 1, args.size, aug, device, np.float32)
        targets = target_entries(ids, N, table, args.alpha)
        out = forward_backward(net, clf, x, ids, comm, targets, topk=(1, 5))
        update(net, comm, net_opt, clf_opt, 0.1)
        backend.synchronize()
        times.append(time.perf_counter() - t0)
        losses.append(out.loss)
        done += 1
        if s == 4:  # the first steps compile; from the next ones, do the rest fit?
            per = float(np.median(times[1:]))
            left = deadline - time.perf_counter()
            if args.reserve_s is not None:
                fit = int((left - args.reserve_s) / per)
            else:
                fit = int((left - knn_s - ring_s) / per)
                if done + fit < min(MIN_STEPS, planned):   # ring2 will not fit: steps first
                    fit = int((left - knn_s) / per)
            planned = max(done, min(planned, done + fit))
        if done >= planned:
            break
    seconds = time.perf_counter() - t
    steady = float(np.median(times[min(2, len(times) - 1):]))
    report({"part": "steps", "ok": bool(np.all(np.isfinite(losses))), "steps": done,
            "asked": min(args.steps, len(batches)), "cut_by_budget": done < min(args.steps,
                                                                                len(batches)),
            "seconds": round(seconds, 2), "step_s": round(steady, 4),
            "img_per_s": round(B / steady, 1), "loss_first": losses[0], "loss_last": losses[-1],
            "peak_mb": mb2(pool_mb(device)),
            "formula_mb": mb(sum(memory.values()) - memory_part(memory, "neighbour search")),
            "formula": "the dry run's total on rank 0 less its neighbour search"})

    # ---- the kNN monitor on a subset
    fresh_pool(device)
    t = time.perf_counter()
    bank = SyntheticDataset(args.knn_bank, args.size, 10, seed=0)
    queries = SyntheticDataset(args.knn_queries, args.size, 10, seed=1)
    fb = extract_features(net, bank, comm, batch_size=B)["pooled"]
    fq = extract_features(net, queries, comm, batch_size=B)["pooled"]
    acc = weighted_knn_accuracy(fb, bank.labels, fq, queries.labels, ks=(20,))
    report({"part": "knn", "ok": 0.0 <= acc[20] <= 1.0, "seconds": round(time.perf_counter() - t, 2),
            "bank": args.knn_bank, "queries": args.knn_queries, "knn20": round(acc[20], 4),
            "peak_mb": mb2(pool_mb(device))})

    # ---- the ring on 2 ranks sharing the device
    status = report_ring2(args, w_path, table, p1_seconds, deadline, report, rate)
    os.remove(w_path)
    os.rmdir(tmp)
    return status


def sample_check(clf, table, k):
    """Brute force on SAMPLE rows: max |the K best cosines of row i against every
    other row - the cosines of its table entries| (the same float32 products)."""
    xp = backend.get_array_module(clf.weight)
    N = clf.num_classes
    w = clf.weight / xp.maximum(xp.linalg.norm(clf.weight, axis=1, keepdims=True), 1e-12)
    rows = np.random.default_rng(0).choice(N, size=min(SAMPLE, N), replace=False)
    S = w[xp.asarray(rows)] @ w.T                                   # (s, N)
    S[xp.arange(len(rows)), xp.asarray(rows)] = -xp.inf            # j != i
    best = xp.sort(S, axis=1)[:, ::-1][:, :k]                       # (s, K) descending
    picked = xp.take_along_axis(S, xp.asarray(table[rows]), axis=1)  # (s, K)
    return float(backend.to_numpy(xp.abs(best - picked).max()))


def memory_part(memory, prefix):
    """Bytes of the dry run's memory part whose name starts with ``prefix`` (0 if none)."""
    return sum(v for k, v in memory.items() if k.startswith(prefix))


def mb2(x):
    return None if x is None else round(x, 1)


def report_ring2(args, w_path, table, p1_seconds, deadline, report, rate):
    """ring2 (module docstring): skipped when the 1-rank search's time would not fit."""
    from refimpl.parallel.launch import mpirun_command, run_mpirun
    left = deadline - time.perf_counter()
    need = 1.2 * p1_seconds + 15
    if args.no_ring2 or left < need:
        report({"part": "ring2", "ok": None, "skipped": "--no-ring2" if args.no_ring2 else
                f"budget: {left:.0f} s left, about {need:.0f} s needed"})
        return 0
    fresh_pool(args.device)
    out = Path(w_path).with_name("table2.npy")
    cmd = mpirun_command(2, str(Path(__file__).resolve()), "--worker-ring", str(w_path),
                         str(out), f"--device={args.device}", f"--k={args.k}")
    env = dict(os.environ, OPENBLAS_NUM_THREADS="1", OMP_NUM_THREADS="1")
    try:
        proc = run_mpirun(cmd, timeout=max(left - 10, 10), env=env)
    except Exception as e:  # subprocess.TimeoutExpired
        report({"part": "ring2", "ok": False, "error": str(e)[-300:]})
        return 1
    if proc.returncode != 0:
        report({"part": "ring2", "ok": False, "error": (proc.stdout + proc.stderr)[-1500:]})
        return 1
    ranks = json.loads(proc.stdout.strip().splitlines()[-1])
    table2 = np.load(out)
    os.remove(out)
    # the similarities each table picks (float64), where the tables differ
    W = np.load(w_path, mmap_mode="r")
    differ = np.nonzero(np.any(table2 != table, axis=1))[0]          # (m,) rows
    worst, same = 0.0, len(table) - differ.size
    if differ.size:
        w = unit(W[differ])                                         # (m, D)
        one, two = (np.einsum("nd,nkd->nk", w, unit(W[t[differ].ravel()]).reshape(
            differ.size, args.k, -1)) for t in (table, table2))    # (m, K) each
        worst = float(np.abs(one - two).max())
    seconds = max(r["seconds"] for r in ranks)
    limit = 2.0 * args.n * args.n * args.dim / rate
    report({"part": "ring2", "P": 2, "ok": worst <= 1e-5, "seconds": round(seconds, 2),
            "gemm_limit_s": round(limit, 2), "fraction_of_gemm_limit": round(limit / seconds, 3),
            "peak_mb_per_rank": [r["peak_mb"] for r in ranks],
            "formula_mb_per_rank": [r["formula_mb"] for r in ranks],
            "rows_equal_to_P1": round(same / len(table), 6),
            "worst_similarity_difference": worst})
    return 0


def unit(rows):
    """Rows in float64, each of norm 1."""
    rows = np.asarray(rows, np.float64)
    return rows / np.maximum(np.linalg.norm(rows, axis=1, keepdims=True), 1e-12)


def ring_worker(args):
    """One rank of ring2: its rows of W.npy, the search, rank 0 saves the table."""
    from mpi4py import MPI

    from refimpl.method.neighbours import hardest_neighbours
    from refimpl.parallel import CosineClassifier, MPIComm, abort_on_error, select_gpu
    from refimpl.train.dry_run import neighbour_search_bytes
    comm = MPIComm(MPI.COMM_WORLD)
    with abort_on_error(comm):
        if args.device == "gpu":
            select_gpu(comm)
        W = np.load(args.worker_ring[0], mmap_mode="r")
        N, D = W.shape
        clf = CosineClassifier(N, D, comm, dtype=np.float32, device=args.device)
        clf.weight[...] = backend.asarray(np.ascontiguousarray(W[clf.lo:clf.hi]),
                                          device=args.device)
        fresh_pool(args.device)
        comm.barrier()
        t = time.perf_counter()
        table = hardest_neighbours(clf, comm, args.k)
        backend.synchronize()
        seconds = time.perf_counter() - t
        mine = {"rank": comm.rank, "seconds": seconds, "peak_mb": mb2(pool_mb(args.device)),
                "formula_mb": mb(3 * (clf.hi - clf.lo) * D * 4 + neighbour_search_bytes(
                    N, comm.size, comm.rank, D, 4))}
        everyone = comm.comm.gather(mine, root=0)   # plumbing: a few numbers
        if comm.rank == 0:
            np.save(args.worker_ring[1], table)
            print(json.dumps(everyone), flush=True)
        comm.barrier()


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--device", choices=["gpu", "cpu"], default="gpu")
    p.add_argument("--n", type=int, default=1_281_167)
    p.add_argument("--size", type=int, default=16)
    p.add_argument("--width", type=int, default=8)
    p.add_argument("--dim", type=int, default=128)
    p.add_argument("--batch", type=int, default=1024)
    p.add_argument("--k", type=int, default=5)
    p.add_argument("--alpha", type=float, default=0.2)
    p.add_argument("--steps", type=int, default=200)
    p.add_argument("--knn-bank", type=int, default=8192)
    p.add_argument("--knn-queries", type=int, default=2048)
    p.add_argument("--budget-s", type=float, default=120.0,
                   help="the whole run's seconds: steps are cut, ring2 skipped to fit")
    p.add_argument("--reserve-s", type=float, default=None,
                   help="seconds kept for knn and ring2 when the steps are planned (default: "
                        "15 s for knn, + 1.2 x the 1-rank search + 15 s for ring2 while at "
                        "least MIN_STEPS steps fit)")
    p.add_argument("--no-ring2", action="store_true")
    p.add_argument("--out", default=None, help="folder for million.jsonl")
    p.add_argument("--worker-ring", nargs=2, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker_ring:
        return ring_worker(args)
    return run(args)


if __name__ == "__main__":
    sys.exit(main())

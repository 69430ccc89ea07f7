"""An independent 2-process PyTorch implementation: DDP encoder, row-sharded classifier.

Contract. ``distributed_training_steps`` runs, on every rank of a
torch.distributed process group (gloo on CPU here, NCCL alike), the method's
training step the way a PyTorch user writes it at scale, Partial FC style,
and records it through the ``writer_class`` it is handed
(``refimpl.oracle.torch_writer.DistributedTraceWriter``); the oracle's tests
and tutorial 14 replay it in refimpl. It shares no code with refimpl's
NumPy step: plain torch, ``TorchNetwork`` (``torch_resnet.py``) as the
encoder + head, and the CPU ``SyncBatchNorm`` (``torch_sync_bn.py``) for
``bn = "sync"``. Seven classic bugs can be planted (``BUGS``).

One step on rank r of P (b = B / P rows each; W_r = rows [lo, hi) of W):

    z   = DDP(net)(x_r)                          (b, D)    the encoder + head
    Z   = AllGather(z)                           (B, D)    backward: the sum over the
                                                           ranks of dZ, rank r's rows, x P
    l   = normalize(Z) @ normalize(W_r).T / tau  (B, n_r)  this rank's classes
    m   = all_reduce MAX (max_j l)               (B,)      the softmax's max
    s   = AllReduceSum(sum_j exp(l - m))         (B,)      and sum over all classes
    lse = m + log s
    y_r = (1 - alpha) e_i + alpha/K e_j for i, j in NK(i) that this rank owns
    loss = mean_b( AllReduceSum(sum_j y_bj) lse_b - AllReduceSum(sum_j y_bj l_bj) )
    loss.backward(); SGD (the 1-D parameters without weight decay)

Every rank computes the same global-mean loss; ``AllReduceSum``'s backward is
the identity (each rank's partial sum enters the one loss once), so W_r's
gradient is the global-mean loss's; ``AllGather``'s backward multiplies the
feature gradient by P because DDP then averages the network's gradients
(``DistributedTraceWriter(..., gradients="averaged")`` records dz / P). The
classifier is split by Partial FC's rule (the first N mod P ranks one row
more), not refimpl's: a trace holds the whole W, so the split is free.

``record_on_ranks`` starts P processes on a FileStore and records several
variants (clean ones and planted bugs) in one process group, one folder each;
``python -m refimpl.oracle.torch_distributed_steps ROOT [--bn sync] [--bug B]``
does it from the shell.
"""
import datetime
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from torch import nn
import torch.nn.functional as F

from refimpl.oracle.torch_resnet import TorchNetwork, hardest_neighbours
from refimpl.oracle.torch_sync_bn import convert_sync_batchnorm

BUGS = {
    "no_times_P": "AllGather's backward without x P, DDP still averaging (dz and every "
                  "network gradient 1/P of the global-mean loss's)",
    "rank_max": "the softmax's row max taken over this rank's classes only (no all_reduce MAX)",
    "rank_sum": "the softmax's row sum over this rank's classes only (no all_reduce SUM)",
    "rank_smoothing": "the smoothing weight alpha spread over the neighbours this rank owns "
                      "(alpha / K_r instead of alpha / K)",
    "tau_x1.01": "the logits divided by 1.01 tau instead of the declared tau",
    "bn_swapped": "BatchNorm in the other mode than the trace declares (sync declared, the "
                  "SyncBatchNorm conversion forgotten; local declared, converted)",
    "decay_swapped": "a weight-decay schedule that sets every param group's weight_decay, "
                     "the 1-D parameters' zero included (the trace declares no_bn_bias)",
}


def partial_fc_range(N, P, r):
    """Rows [lo, hi) of rank r under Partial FC's rule: the first N mod P ranks one more."""
    base, extra = divmod(N, P)
    lo = r * base + min(r, extra)
    return lo, lo + base + (r < extra)


class AllGather(torch.autograd.Function):
    """(b, D) -> (B, D), the ranks' rows in rank order. Backward: the all-reduced
    (summed) gradient's rows of this rank, times ``scale`` (P for DDP's average)."""

    @staticmethod
    def forward(ctx, z, group, scale):
        P, r = dist.get_world_size(group), dist.get_rank(group)
        parts = [torch.empty_like(z) for _ in range(P)]
        dist.all_gather(parts, z.contiguous(), group=group)
        ctx.group, ctx.scale, ctx.rows = group, scale, slice(r * z.shape[0], (r + 1) * z.shape[0])
        return torch.cat(parts)                                         # (B, D)

    @staticmethod
    def backward(ctx, dZ):
        dZ = dZ.contiguous().clone()
        dist.all_reduce(dZ, group=ctx.group)        # every rank's classes' share, summed
        return dZ[ctx.rows] * ctx.scale, None, None                      # (b, D)


class AllReduceSum(torch.autograd.Function):
    """Sum over the ranks; backward the identity: every rank computes the same loss
    from the sum, and each rank's addend enters it once."""

    @staticmethod
    def forward(ctx, v, group):
        v = v.clone()
        dist.all_reduce(v, group=group)
        return v

    @staticmethod
    def backward(ctx, dv):
        return dv, None


def distributed_training_steps(out, writer_class, bn="local", bug=None, lrs=(0.1,),
                               dtype=torch.float64, num_classes=16, dim=16, batch_size=8, k=3,
                               tau=0.15, alpha=0.2, width=2, seed=0, group=None,
                               classifier_mode="auto"):
    """One step per learning rate in ``lrs`` on this rank, traced into ``out``.

    Inputs: out (the trace folder, the same on every rank), writer_class
    (``DistributedTraceWriter`` or one like it, called as writer_class(out,
    model, opt, W_r, (lo, hi), hparams, gradients="averaged", group=group,
    classifier_mode=...)),
    bn ("local" or "sync": the mode the trace declares), bug (None or one of
    ``BUGS``), the run's sizes (N, D, B, K), tau, alpha, the ResNet-18's
    width (CIFAR stem, 8 x 8 images, head_hidden 8), seed (the same on every
    rank: the global batch, W and the initial network), group (None: the
    default process group), classifier_mode (the writer's: "auto", "full"
    or "rows"). Returns out.
    """
    if bug is not None and bug not in BUGS:
        raise ValueError(f"bug must be None or one of {sorted(BUGS)}, got {bug!r}")
    rank, P = dist.get_rank(group), dist.get_world_size(group)
    N, D, B, K = num_classes, dim, batch_size, k
    b = B // P
    g = np.random.default_rng(seed)            # one stream, the same on every rank
    torch.manual_seed(seed)
    net = TorchNetwork("resnet18", "cifar", width=width, head_hidden=8, dim=D).to(dtype)
    if (bn == "sync") != (bug == "bn_swapped"):
        net = convert_sync_batchnorm(net, group)
    model = nn.parallel.DistributedDataParallel(net, process_group=group)
    W_full = torch.tensor(g.choice([-0.5, 0.5], size=(N, D)), dtype=dtype)
    lo, hi = partial_fc_range(N, P, rank)
    W = nn.Parameter(W_full[lo:hi].clone())                            # (n_r, D)
    decayed = [p for p in net.parameters() if p.dim() > 1]
    opt = torch.optim.SGD([{"params": decayed + [W]},
                           {"params": [p for p in net.parameters() if p.dim() <= 1],
                            "weight_decay": 0.0}],
                          lr=lrs[0], momentum=0.9, weight_decay=5e-4, nesterov=True)
    writer = writer_class(out, model, opt, W, (lo, hi),
                          {"tau": tau, "alpha": alpha, "K": K, "bn": bn,
                           "neighbours": "initial_weight", "seed": seed},
                          gradients="averaged", group=group, classifier_mode=classifier_mode)
    table = hardest_neighbours(W_full, K)                              # (N, K), once
    tau_used = tau * 1.01 if bug == "tau_x1.01" else tau
    for lr in lrs:
        x_all = torch.tensor(g.normal(size=(B, 3, 8, 8)), dtype=dtype)
        ids_all = torch.tensor(g.permutation(N)[:B])
        x, ids = x_all[rank * b:(rank + 1) * b], ids_all[rank * b:(rank + 1) * b]   # mine
        writer.begin_step(ids, neighbours=table[ids])
        z = model(x)                                                   # (b, D)
        Z = AllGather.apply(z, group, 1.0 if bug == "no_times_P" else float(P))
        labels = [torch.empty_like(ids) for _ in range(P)]
        dist.all_gather(labels, ids, group=group)
        labels = torch.cat(labels)                                     # (B,)
        nbs = table[labels]                                            # (B, K)
        z_hat = F.normalize(Z, dim=1)
        logits = z_hat @ F.normalize(W, dim=1).T / tau_used            # (B, n_r)
        m = logits.detach().max(dim=1).values                          # (B,)
        if bug != "rank_max":
            dist.all_reduce(m, op=dist.ReduceOp.MAX, group=group)
        s = torch.exp(logits - m[:, None]).sum(dim=1)
        if bug != "rank_sum":
            s = AllReduceSum.apply(s, group)
        lse = m + torch.log(s)                                         # (B,)
        y = torch.zeros(B, hi - lo, dtype=dtype)                       # my classes' targets
        mine = (labels >= lo) & (labels < hi)
        y[mine, labels[mine] - lo] = 1 - alpha
        own = (nbs >= lo) & (nbs < hi)                                 # (B, K) mine
        share = torch.full((B, 1), alpha / K, dtype=dtype)
        if bug == "rank_smoothing":                 # BUG: normalized over my neighbours
            share = alpha / own.sum(dim=1, keepdim=True).clamp(min=1).to(dtype)
        rows, cols = own.nonzero(as_tuple=True)
        y.index_put_((rows, nbs[rows, cols] - lo), share[rows, 0], accumulate=True)
        ysum = AllReduceSum.apply(y.sum(dim=1), group)                 # 1 without the bug
        t = AllReduceSum.apply((y * logits).sum(dim=1), group)         # sum_j y_bj l_bj
        loss = (ysum * lse - t).mean()
        writer.log(loss=loss, z_hat=z_hat, row_max=m, logsumexp=lse)
        opt.zero_grad()
        loss.backward()
        if bug == "decay_swapped":                  # BUG: the schedule decays every group
            for group_ in opt.param_groups:
                group_["weight_decay"] = 5e-4
        for group_ in opt.param_groups:
            group_["lr"] = lr
        opt.step()                                                     # the step is written
    writer.close()
    return out


def _worker(rank, world, store, root, variants, timeout):
    """One rank: join the gloo group on the FileStore, record every variant."""
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank,
                            world_size=world, timeout=datetime.timedelta(seconds=timeout))
    try:
        from refimpl.oracle.torch_writer import DistributedTraceWriter
        for name, bn, bug, kwargs in variants:
            kwargs = dict(kwargs)
            if "dtype" in kwargs:
                kwargs["dtype"] = getattr(torch, kwargs["dtype"])
            distributed_training_steps(os.path.join(root, name), DistributedTraceWriter, bn,
                                       bug, **kwargs)
    finally:
        dist.destroy_process_group()


def record_on_ranks(root, variants, world=2, timeout=300):
    """Record each variant on ``world`` fresh processes, all in one gloo process group.

    variants: [(name, bn, bug)] or [(name, bn, bug, kwargs)], kwargs for
    ``distributed_training_steps`` (JSON values; dtype as "float32" or
    "float64"); each goes to root/name. The ranks are ``python -m
    refimpl.oracle.torch_distributed_steps --worker`` processes (so this works
    from any script or notebook, where multiprocessing's spawn would re-run
    the caller's module) on a FileStore in root; a failing rank stops the
    others and raises RuntimeError with its output. timeout: seconds for
    the whole recording and for any one collective. Returns root as a Path.
    """
    root = os.path.abspath(root)
    os.makedirs(root, exist_ok=True)
    store = os.path.join(root, "filestore")
    if os.path.exists(store):
        os.unlink(store)
    todo = [list(v) + [{}] * (4 - len(v)) for v in variants]
    spec = json.dumps({"root": root, "store": store, "variants": todo, "timeout": timeout})
    env = dict(os.environ, OMP_NUM_THREADS="1", OPENBLAS_NUM_THREADS="1")
    procs = [subprocess.Popen([sys.executable, "-m", __name__, "--worker", str(r), str(world),
                               spec], stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                              text=True, env=env)
             for r in range(world)]
    deadline = time.monotonic() + timeout
    try:
        while any(p.poll() is None for p in procs):
            failed = [p for p in procs if p.poll() not in (None, 0)]
            if failed or time.monotonic() > deadline:
                break
            time.sleep(0.05)
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
        outputs = [p.communicate()[0] for p in procs]
    bad = [(r, p.returncode) for r, p in enumerate(procs) if p.returncode != 0]
    if bad:
        r = bad[0][0]
        raise RuntimeError(f"record_on_ranks: rank {r} of {world} exited with "
                           f"{procs[r].returncode}:\n{outputs[r][-4000:]}")
    return Path(root)


if __name__ == "__main__":
    import argparse
    if sys.argv[1:2] == ["--worker"]:
        spec = json.loads(sys.argv[4])
        _worker(int(sys.argv[2]), int(sys.argv[3]), spec["store"], spec["root"],
                spec["variants"], spec["timeout"])
        sys.exit(0)
    ap = argparse.ArgumentParser(description="Record the independent P-process PyTorch "
                                             "step as traces: ROOT/clean and ROOT/<bug>")
    ap.add_argument("root")
    ap.add_argument("--bn", default="local", choices=("local", "sync"))
    ap.add_argument("--bug", action="append", default=[], choices=sorted(BUGS))
    ap.add_argument("--ranks", type=int, default=2)
    a = ap.parse_args()
    todo = [("clean", a.bn, None)] + [(bug, a.bn, bug) for bug in a.bug]
    record_on_ranks(a.root, todo, a.ranks)
    print("\n".join(os.path.join(a.root, name) for name, _, _ in todo))

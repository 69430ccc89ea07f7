"""Convolution speed: refimpl vs PyTorch, every conv shape of ResNet-18 (CIFAR).

For ResNet-18 with the CIFAR stem (3x3 stride-1 conv, no max-pool, 32x32
input) at (width 16, batch 128) and (width 64, batch 64), each distinct conv
shape is timed forward and backward (dx and dw) in refimpl and in PyTorch
(``F.conv2d`` + autograd), float32, 2 threads for both, in one process.
Each timing is the fastest of ``--repeat`` calls after a warm-up call, best
over ``--rounds`` passes through all shapes (shared machines are noisy).

One JSON line per shape:
    refimpl_fwd_ms, torch_fwd_ms, fwd_speed_ratio = torch_fwd_ms / refimpl_fwd_ms
    refimpl_bwd_ms, torch_bwd_ms, bwd_speed_ratio = torch_bwd_ms / refimpl_bwd_ms
    total_speed_ratio = (torch fwd + bwd) / (refimpl fwd + bwd)
A speed ratio > 1 means refimpl is faster; 0.5 means it takes twice as long.
Then one summary line per config: the same ratios over all convs of the
network, each shape weighted by how often it occurs (``count``).

    .venv/bin/python benchmarks/bench_conv.py [--repeat 3] [--rounds 3] [--threads 2]
"""
import argparse
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks.common import (best_call, emit, load_record, machine_info,  # noqa: E402
                               set_threads, snapshot)
from refimpl.layers.conv import conv2d_backward, conv2d_forward  # noqa: E402


def resnet18_cifar_convs(width, batch):
    """(name, count, (N, C, H, W), (F, C, K, K), stride, pad) for each distinct conv."""
    shapes = [("stem", 1, (batch, 3, 32, 32), (width, 3, 3, 3), 1, 1),
              ("layer1.conv", 4, (batch, width, 32, 32), (width, width, 3, 3), 1, 1)]
    c, h = width, 32
    for i, mult in enumerate((2, 4, 8)):
        f = width * mult
        shapes += [(f"layer{i + 2}.0.conv1", 1, (batch, c, h, h), (f, c, 3, 3), 2, 1),
                   (f"layer{i + 2}.conv", 3, (batch, f, h // 2, h // 2), (f, f, 3, 3), 1, 1),
                   (f"layer{i + 2}.0.downsample", 1, (batch, c, h, h), (f, c, 1, 1), 2, 0)]
        c, h = f, h // 2
    return shapes


def bench_one(torch, x_shape, w_shape, stride, pad, repeat):
    """Median ms of refimpl and torch forward ("rf", "tf") and backward ("rb", "tb")."""
    rng = np.random.default_rng(0)
    x = rng.standard_normal(x_shape, dtype=np.float32)
    w = rng.standard_normal(w_shape, dtype=np.float32) * 0.1
    out, cache = conv2d_forward(x, w, stride, pad)
    dout = rng.standard_normal(out.shape, dtype=np.float32)

    xt = torch.from_numpy(x).requires_grad_(True)
    wt = torch.from_numpy(w).requires_grad_(True)
    doutt = torch.from_numpy(dout)
    F = torch.nn.functional

    def ref_fwd():
        return conv2d_forward(x, w, stride, pad)

    def ref_bwd():
        conv2d_backward(dout, cache)

    def torch_fwd():
        with torch.no_grad():
            F.conv2d(xt, wt, stride=stride, padding=pad)

    outt = F.conv2d(xt, wt, stride=stride, padding=pad)

    def torch_bwd():
        torch.autograd.grad(outt, (xt, wt), doutt, retain_graph=True)

    # Each function runs in its own block after a warm-up call: interleaving
    # single calls would charge each library for the other's spinning idle
    # threads (OpenMP in PyTorch, pthreads in OpenBLAS).
    return {key: 1e3 * best_call(fn, repeat)["s"] for key, fn in
            (("rf", ref_fwd), ("rb", ref_bwd), ("tf", torch_fwd), ("tb", torch_bwd))}


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    import torch
    set_threads(args.threads)
    emit({"benchmark": "conv", "threads": args.threads, "dtype": "float32",
          "timing": f"min of {args.repeat} calls, best of {args.rounds} rounds",
          "ratio_definition": "torch_ms / refimpl_ms (>1: refimpl faster)", **machine_info()})
    configs = [(w, b, resnet18_cifar_convs(w, b)) for w, b in ((16, 128), (64, 64))]
    # best over several passes through all shapes: a burst of load from
    # another process then spoils one pass of a shape, not its result
    best = {}
    before = snapshot()
    for _ in range(args.rounds):
        for width, batch, shapes in configs:
            for name, count, x_shape, w_shape, stride, pad in shapes:
                t = bench_one(torch, x_shape, w_shape, stride, pad, args.repeat)
                key = (width, batch, name)
                best[key] = {k: min(v, best.get(key, t)[k]) for k, v in t.items()}
    load = load_record(before, args.threads)  # over all the rounds
    for width, batch, shapes in configs:
        tot = {"rf": 0.0, "tf": 0.0, "rb": 0.0, "tb": 0.0}
        for name, count, x_shape, w_shape, stride, pad in shapes:
            t = best[(width, batch, name)]
            for k in tot:
                tot[k] += count * t[k]
            emit({"benchmark": "conv_shape", "width": width, "batch": batch, "name": name,
                  "count": count,
                  "x": list(x_shape), "w": list(w_shape), "stride": stride, "pad": pad,
                  "refimpl_fwd_ms": round(t["rf"], 2), "torch_fwd_ms": round(t["tf"], 2),
                  "fwd_speed_ratio": round(t["tf"] / t["rf"], 3),
                  "refimpl_bwd_ms": round(t["rb"], 2), "torch_bwd_ms": round(t["tb"], 2),
                  "bwd_speed_ratio": round(t["tb"] / t["rb"], 3),
                  "total_speed_ratio": round((t["tf"] + t["tb"]) / (t["rf"] + t["rb"]), 3)})
        emit({"benchmark": "conv_all", "width": width, "batch": batch,
              "name": "ALL convs (count-weighted)",
              "refimpl_fwd_ms": round(tot["rf"], 1), "torch_fwd_ms": round(tot["tf"], 1),
              "fwd_speed_ratio": round(tot["tf"] / tot["rf"], 3),
              "refimpl_bwd_ms": round(tot["rb"], 1), "torch_bwd_ms": round(tot["tb"], 1),
              "bwd_speed_ratio": round(tot["tb"] / tot["rb"], 3),
              "total_speed_ratio": round((tot["tf"] + tot["tb"]) / (tot["rf"] + tot["rb"]), 3),
              **load})


if __name__ == "__main__":
    main()

"""One ResNet-18 training step, refimpl vs PyTorch, side by side (CPU, float32).

What is timed, identically on both sides: ResNet-18 with the CIFAR stem on
32x32 inputs, *with* a 10-way fc (no MLP head), softmax cross-entropy against
random labels, forward + backward + one SGD step (momentum 0.9, weight decay
5e-4), BatchNorm in train mode. Both use 2 threads (refimpl's
``threads.set_num_threads`` and ``torch.set_num_threads``, see
benchmarks/common.py). The PyTorch model is the independent one from
tests/torch_resnet.py, loaded with refimpl's weights.

    python benchmarks/bench_resnet_step.py [--rounds 5] [--threads 2]
        [--configs 16x128 64x64 | --scaling]
    python benchmarks/bench_resnet_step.py --device gpu --configs 64x256

With --device gpu both sides run on the GPU (refimpl on CuPy, PyTorch on
CUDA with cuDNN), fp32 with TF32 off on both (CUPY_TF32=0 is expected in
the environment; PyTorch's matmul and cuDNN flags are set here), each step
followed by a device synchronization; the record adds the peak device memory
(CuPy's pool, torch.cuda.max_memory_reserved).

PyTorch runs twice, in NCHW (``torch``) and in ``channels_last`` (NHWC,
``torch_cl``); all three alternate round by round. Prints one JSON object per
configuration (width, batch): medians and [min, max] spreads of wall and CPU
time per step for each, images per second, ratio_nchw / ratio_cl = torch
time / refimpl time against each format (above 1: refimpl is faster), and
``ratio`` / ``cpu_ratio`` against the faster format (``fastest_torch``),
with the load average before and after and the CPU that other processes
used meanwhile (``common.load_record``).
"""
import argparse
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402

from benchmarks.common import (compare_times, emit, load_record, snapshot,  # noqa: E402
                               machine_info, set_threads)
from refimpl.layers.loss import (softmax_cross_entropy_backward,  # noqa: E402
                                 softmax_cross_entropy_forward)
from refimpl.models.resnet import ResNet  # noqa: E402
from refimpl.optim.sgd import SGD  # noqa: E402

CONFIGS = [(16, 128), (64, 64)]  # (width, batch)
# --scaling: how the cost grows with the batch (width 16) and with the width (batch 64)
SCALING = [(16, 32), (16, 64), (16, 128), (16, 256), (8, 64), (32, 64), (64, 64)]


def config(text):
    """'WIDTHxBATCH' -> (width, batch), e.g. '16x128'."""
    try:
        width, batch = (int(v) for v in text.lower().split("x"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected WIDTHxBATCH such as 16x128, got {text!r}")
    if width < 1 or batch < 1:
        raise argparse.ArgumentTypeError(f"width and batch must be >= 1, got {text!r}")
    return width, batch


def refimpl_step(width, batch, x, y, device="cpu"):
    """A closure running one refimpl training step (on ``device``, then synchronized)."""
    from refimpl.backend import asarray, synchronize
    model = ResNet("resnet18", stem="cifar", width=width, num_classes=10,
                   dtype=np.float32, device=device, seed=0)
    opt = SGD(model.store.data, model.store.grad, lr=0.1, momentum=0.9, weight_decay=5e-4)
    x, y = asarray(x, device=device), asarray(y, device=device)

    def step():
        model.store.zero_grad()
        logits = model.forward(x, train=True)
        _, cache = softmax_cross_entropy_forward(logits, y)
        model.backward(softmax_cross_entropy_backward(1.0, cache), need_dx=False)
        opt.step()
        synchronize(model.store.data)
    return model, step


def torch_step(torch, model_sd, width, x, y, channels_last=False, device="cpu"):
    """A closure running the same step in PyTorch (NCHW, or channels_last:
    NHWC activations and weights, often faster for oneDNN on a CPU)."""
    from refimpl.oracle.torch_resnet import TorchResNet
    dev = "cuda" if device == "gpu" else "cpu"
    tmodel = TorchResNet("resnet18", "cifar", width, num_classes=10).float().train()
    tmodel.load_state_dict({k: torch.from_numpy(v) for k, v in model_sd.items()})
    tmodel = tmodel.to(dev)
    tx, ty = torch.from_numpy(x).to(dev), torch.from_numpy(y).to(dev)
    if channels_last:
        tmodel = tmodel.to(memory_format=torch.channels_last)
        tx = tx.contiguous(memory_format=torch.channels_last)
    topt = torch.optim.SGD(tmodel.parameters(), lr=0.1, momentum=0.9, weight_decay=5e-4)

    def step():
        topt.zero_grad()
        torch.nn.functional.cross_entropy(tmodel(tx), ty).backward()
        topt.step()
        if dev == "cuda":
            torch.cuda.synchronize()
    return step


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--rounds", type=int, default=5,
                    help="alternating refimpl/torch blocks (2 steps each); medians are reported")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--configs", type=config, nargs="+", default=CONFIGS, metavar="WxB",
                    help="width x batch of each configuration (default: 16x128 64x64)")
    ap.add_argument("--device", choices=["cpu", "gpu"], default="cpu")
    ap.add_argument("--scaling", action="store_true",
                    help="docs/benchmarks.md's scaling grid: batch 32-256 at width 16, width 8-64 "
                         "at batch 64")
    args = ap.parse_args()
    set_threads(args.threads)
    import torch
    if args.device == "gpu":  # fp32 on both sides: no TF32 in cuBLAS or cuDNN
        torch.backends.cuda.matmul.allow_tf32 = False
        torch.backends.cudnn.allow_tf32 = False
        torch.backends.cudnn.benchmark = True
    emit({"benchmark": "resnet_step_machine", "machine": machine_info()})
    for width, batch in (SCALING if args.scaling else args.configs):
        g = np.random.default_rng(0)
        x = g.standard_normal((batch, 3, 32, 32)).astype(np.float32)
        y = g.integers(0, 10, size=batch)
        model, ours = refimpl_step(width, batch, x, y, args.device)
        state = model.store.state_dict()
        before = snapshot()
        t = compare_times({"refimpl": ours,
                           "torch": torch_step(torch, state, width, x, y, device=args.device),
                           "torch_cl": torch_step(torch, state, width, x, y, channels_last=True,
                                                  device=args.device)},
                          rounds=args.rounds)
        memory = {}
        if args.device == "gpu":
            from refimpl.backend import xp_for
            memory = {"refimpl_peak_mb": round(
                          xp_for("gpu").get_default_memory_pool().total_bytes() / 2**20, 1),
                      "torch_peak_mb": round(torch.cuda.max_memory_reserved() / 2**20, 1)}
        # the goal is set against the faster of PyTorch's two memory formats
        fastest = "torch" if t["torch_s"] <= t["torch_cl_s"] else "torch_cl"
        emit({"benchmark": "resnet_step", "device": args.device,
              "name": f"resnet18_cifar_w{width}_b{batch}_step",
              "what": "fwd+bwd+SGD, fc(10)+softmax CE, no MLP head, float32, no image gradient",
              "width": width, "batch": batch, "threads": args.threads,
              "rounds": args.rounds,
              **{f"{side}_{k}": (round(t[f"{side}_{k}"], 4) if k in ("s", "cpu_s")
                                 else [round(v, 4) for v in t[f"{side}_{k}"]])
                 for side in ("refimpl", "torch", "torch_cl")
                 for k in ("s", "cpu_s", "spread_s", "cpu_spread_s")},
              "refimpl_img_per_s": round(batch / t["refimpl_s"], 1),
              "torch_img_per_s": round(batch / t["torch_s"], 1),
              "torch_cl_img_per_s": round(batch / t["torch_cl_s"], 1),
              "ratio_nchw": round(t["ratio_torch"], 3), "cpu_ratio_nchw": round(t["cpu_ratio_torch"], 3),
              "ratio_cl": round(t["ratio_torch_cl"], 3), "cpu_ratio_cl": round(t["cpu_ratio_torch_cl"], 3),
              "fastest_torch": fastest,
              "ratio": round(t[f"ratio_{fastest}"], 3), "cpu_ratio": round(t[f"cpu_ratio_{fastest}"], 3),
              **memory, **load_record(before, args.threads)})


if __name__ == "__main__":
    main()

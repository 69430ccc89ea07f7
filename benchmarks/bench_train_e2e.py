"""refimpl-train end to end against its training step alone: what augmentation and the host cost.

    train   ``python -m refimpl.train`` (a subprocess, as a user runs it) on a
            packed synthetic dataset (written first by data_tools.synthetic):
            ResNet-18 CIFAR stem, --width, --size x --size images, B = --batch,
            D = 128, --epochs epochs (the prior, smoothed targets and the
            neighbour table from the second, a checkpoint per epoch); images/s
            of its last epoch's steps (metrics.jsonl: reading, augmentation on
            the device, targets, the step, the metrics line), and the whole
            process's wall time
    step    the same network, classifier and optimizer in this process,
            ``forward_backward`` + ``update`` on one batch already on the
            device (no reading, no augmentation), median of --repeat after
            two warm-ups, synchronized

    python benchmarks/bench_train_e2e.py --device gpu [--n 8192 --size 32 --width 64 --batch 256]

Prints one JSON object: train_img_per_s, step_img_per_s and ratio =
train / step (1: the loop costs nothing beyond the step), and the peak
device memory of the step (CuPy's pool) on a GPU.
"""
import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402


def step_alone(args, data_dir):
    """images/s of forward_backward + update on one device batch (module docstring)."""
    from refimpl import backend
    from refimpl.data.augment import augment_batch
    from refimpl.data.datasets import open_dataset
    from refimpl.models import build_model
    from refimpl.optim.sgd import SGD
    from refimpl.parallel import CosineClassifier, SelfComm, set_batchnorm_mode
    from refimpl.train.step import forward_backward, update
    comm, device = SelfComm(), args.device
    if device == "gpu":
        backend.use_gpu(0)
        backend.xp_for("gpu").get_default_memory_pool().free_all_blocks()
    data = open_dataset(str(data_dir))
    N = len(data)
    net = build_model("resnet18", "cifar", args.width, None, 128, np.float32, device, seed=0)
    set_batchnorm_mode(net, comm, "local")
    clf = CosineClassifier(N, 128, comm, dtype=np.float32, device=device, seed=0)
    net_opt = SGD(net.store.data, net.store.grad, 0.1, 0.9, 5e-4)
    clf_opt = SGD(clf.weight.ravel(), clf.grad.ravel(), 0.1, 0.9, 5e-4)
    ids = np.arange(args.batch)
    x = augment_batch(data.read(ids), ids, 0, 0, args.size, None, device, np.float32)
    times = []
    for _ in range(args.repeat + 2):
        t = time.perf_counter()
        forward_backward(net, clf, x, ids, comm, topk=(1, 5))
        update(net, comm, net_opt, clf_opt, 0.1)
        backend.synchronize()
        times.append(time.perf_counter() - t)
    s = float(np.median(times[2:]))
    peak = (backend.xp_for("gpu").get_default_memory_pool().total_bytes() / 2**20
            if device == "gpu" else None)
    return s, peak


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--device", choices=["gpu", "cpu"], default="gpu")
    p.add_argument("--n", type=int, default=8192)
    p.add_argument("--size", type=int, default=32)
    p.add_argument("--width", type=int, default=64)
    p.add_argument("--batch", type=int, default=256)
    p.add_argument("--epochs", type=int, default=2)
    p.add_argument("--repeat", type=int, default=10)
    p.add_argument("--out", default=None, help="folder for train_e2e.json and the run's log")
    args = p.parse_args()
    from data_tools.synthetic import write_synthetic
    with tempfile.TemporaryDirectory(prefix="train-e2e-") as tmp:
        t = time.perf_counter()
        data_dir = write_synthetic(Path(tmp) / "data", args.n, args.size, 10, seed=0)
        packed_s = time.perf_counter() - t
        run = Path(tmp) / "run"
        cmd = [sys.executable, "-m", "refimpl.train", f"train={data_dir}",
               f"device={args.device}", f"width={args.width}", f"batch_size={args.batch}",
               f"epochs={args.epochs}", "eval_every=0", "log_every=1000000", f"out={run}",
               "lr=0.1"]
        t = time.perf_counter()
        proc = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT,
                              env=dict(os.environ, PYTHONPATH=os.pathsep.join(
                                  [str(ROOT)] + [p for p in [os.environ.get("PYTHONPATH")] if p])))
        wall = time.perf_counter() - t
        if args.out:
            Path(args.out).mkdir(parents=True, exist_ok=True)
            Path(args.out, "train_e2e.log").write_text(proc.stdout + proc.stderr)
        if proc.returncode != 0:
            sys.stderr.write(proc.stdout[-3000:] + proc.stderr[-3000:])
            raise SystemExit(f"refimpl-train failed (exit {proc.returncode})")
        epochs = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
        epochs = [r for r in epochs if r["kind"] == "epoch"]
        step_s, peak = step_alone(args, data_dir)
    train_rate = epochs[-1]["img_per_s"]
    record = {"benchmark": "train_e2e", "device": args.device, "N": args.n, "size": args.size,
              "width": args.width, "B": args.batch, "epochs": args.epochs,
              "train_img_per_s": round(train_rate, 1),
              "step_s": round(step_s, 4), "step_img_per_s": round(args.batch / step_s, 1),
              "ratio": round(train_rate / (args.batch / step_s), 3),
              "train_process_s": round(wall, 2), "packing_s": round(packed_s, 2),
              "epoch_seconds": [round(r["seconds"], 2) for r in epochs],
              "step_peak_mb": None if peak is None else round(peak, 1)}
    line = json.dumps(record)
    print(line, flush=True)
    if args.out:
        Path(args.out, "train_e2e.json").write_text(line + "\n")


if __name__ == "__main__":
    main()

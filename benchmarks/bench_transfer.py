"""Phase 2 at small scale: how much pretraining saves when labels are few, and transfer.

Per seed, phase 1 once: the demo's recipe (ResNet-18 CIFAR stem width 16,
D = 128, B = 128, lr 0.3, 1 warm-up epoch then cosine, alpha 0.2 over K = 5
hardest classes, crop scale (0.2, 1), float32, sync BN), 20 epochs by
default, on the synthetic shapes at 32 x 32 (benchmarks/datasets.py: 8 classes,
2,000 train / 500 test, where raw pixels fail), without the contrastive
prior (docs/benchmarks.md, the ablations: on the shapes it holds the
encoder back). Then, with the same budget for every fine-tune (by default
120 steps of B = 32, warm-up 1 epoch of 12 steps then cosine, whatever the
fraction: 1% of the labels is 20 images seen about 190 times each, 100% is
2,000 seen about twice):

    pretrained  encoder + FC from the pretrained encoder (lr encoder < lr FC)
    scratch     encoder + FC from random initialization (the baseline)
    frozen      the pretrained encoder frozen (eval-mode BN), FC trained by
                SGD: a linear classifier on frozen features

each at 1%, 10% and 100% of the labels (``FineTuneConfig.labels``: a
class-balanced subset, seeded by the seed), on the pretraining's own
classes (semi-supervised, shapes32) and on 8 other classes (transfer,
shapes32b: no (shape, texture) pair in common). Test top-1 on the 500
test images after the last step; mean +- standard deviation over seeds.

    python benchmarks/bench_transfer.py [--seeds 0 1 2] [--jobs 2] [--out runs/transfer]
    python benchmarks/bench_transfer.py --table runs/transfer/results.jsonl

Jobs run in --jobs processes of 1 refimpl thread and 1 BLAS thread each
(every run is bitwise reproducible for a fixed thread count); the
pretrainings first, then each seed's fine-tunes as soon as its encoder is
there. Accuracies do not depend on the machine's load; the time does: the
run records its wall time, the CPU time of all its processes (os.times) and
the 1-minute load average (docs/finetune.md has a run's figures).
"""
import argparse
import concurrent.futures as futures
import json
import multiprocessing
import os
import shutil
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402

from benchmarks.common import emit, machine_info  # noqa: E402
from benchmarks.datasets import prepare  # noqa: E402

SOURCE, TARGETS = "shapes32", ("shapes32", "shapes32b")
FRACTIONS = (0.01, 0.1, 1.0)
MODES = ("pretrained", "scratch", "frozen")
# Phase 1: refimpl/train/demo.toml's recipe, without the prior, no monitor until the end.
PRETRAIN = {"arch": "resnet18", "stem": "cifar", "width": 16, "dim": 128, "tau": 0.15,
            "alpha": 0.2, "k": 5, "smooth_from_epoch": 1, "prior": False, "batch_size": 128,
            "lr": 0.3, "momentum": 0.9, "weight_decay": 5e-4, "warmup_epochs": 1.0,
            "bn": "sync", "dtype": "float32", "augment": {"crop_scale": [0.2, 1.0]},
            "knn_k": [20, 200], "eval_every": 0, "save_every": 0, "keep": 1,
            "log_every": 100000, "threads": 1}
# Phase 2: one recipe and one budget for every fine-tune.
FINETUNE = {"batch_size": 32, "momentum": 0.9, "weight_decay": 5e-4, "warmup_epochs": 1.0,
            "bn": "sync", "dtype": "float32", "augment": {"crop_scale": [0.2, 1.0]},
            "eval_every": 0, "save_every": 0, "keep": 1, "log_every": 100000, "threads": 1}
LR = {"pretrained": (0.01, 0.1), "scratch": (0.1, 0.1), "frozen": (0.0, 0.1)}  # encoder, FC


def _single_thread():
    from threadpoolctl import threadpool_limits
    threadpool_limits(limits=1, user_api="blas")


def pretrain(seed, epochs, out):
    """Phase 1 on SOURCE; returns its row (kNN of the encoder, seconds, run directory)."""
    _single_thread()
    from refimpl.parallel.comm import SelfComm
    from refimpl.train.config import Config
    from refimpl.train.loop import Trainer
    train, test = prepare(SOURCE, ROOT / "data")
    run = Path(out) / f"pretrain-seed{seed}"
    shutil.rmtree(run, ignore_errors=True)
    cfg = Config(**{**PRETRAIN, "train": train, "test": test, "seed": seed, "epochs": epochs,
                    "out": str(run)})
    start = time.perf_counter()
    results = Trainer(cfg, SelfComm(), log=lambda s: None).run()
    return {"benchmark": "transfer_pretrain", "dataset": SOURCE, "seed": seed, "epochs": epochs,
            "knn20": results["trained"]["pooled"][20], "knn200": results["trained"]["pooled"][200],
            "raw_pixels_knn20": results["raw_pixels"][20],
            "random_init_knn20": results["random_init"]["pooled"][20],
            "seconds": time.perf_counter() - start, "run": str(run)}


def finetune(seed, target, fraction, mode, epochs, steps_per_epoch, out):
    """One phase-2 run; returns its row (test top-1 and top-5, seconds)."""
    _single_thread()
    from refimpl.finetune.config import FineTuneConfig
    from refimpl.finetune.loop import FineTuner
    from refimpl.parallel.comm import SelfComm
    train, test = prepare(target, ROOT / "data")
    run = Path(out) / f"{target}-{mode}-{fraction:g}-seed{seed}"
    shutil.rmtree(run, ignore_errors=True)
    lr_encoder, lr_fc = LR[mode]
    init = "scratch" if mode == "scratch" else str(Path(out) / f"pretrain-seed{seed}")
    cfg = FineTuneConfig(**{**FINETUNE, "train": train, "test": test, "init": init,
                            "arch": "resnet18", "stem": "cifar", "width": 16,
                            "freeze_encoder": mode == "frozen", "labels": fraction,
                            "labels_seed": seed, "seed": seed, "epochs": epochs,
                            "steps_per_epoch": steps_per_epoch, "lr_encoder": lr_encoder,
                            "lr_fc": lr_fc, "out": str(run)})
    start = time.perf_counter()
    tuner = FineTuner(cfg, SelfComm(), log=lambda s: None)
    test_acc = tuner.run()["test"]
    return {"benchmark": "transfer", "source": SOURCE, "target": target, "mode": mode,
            "fraction": fraction, "labeled": int(tuner.subset.size), "seed": seed,
            "steps": epochs * steps_per_epoch, "batch_size": cfg.batch_size,
            "lr_encoder": lr_encoder, "lr_fc": lr_fc, "top1": test_acc[1], "top5": test_acc[5],
            "seconds": time.perf_counter() - start}


def summarize(rows):
    """{(target, fraction, mode): (mean, std, n)} of the test top-1 over seeds."""
    out = {}
    for r in rows:
        out.setdefault((r["target"], r["fraction"], r["mode"]), []).append(r["top1"])
    return {k: (float(np.mean(v)), float(np.std(v)), len(v)) for k, v in out.items()}


def markdown(rows, pretrain_rows=()):
    """The table of docs/finetune.md: test top-1 (%) mean +- std over seeds, and the gap."""
    s = summarize(rows)

    def pm(key):
        return f"{100 * s[key][0]:.1f} ± {100 * s[key][1]:.1f}" if key in s else ""
    lines = ["| target | labels | labeled images | pretrained, fine-tuned | scratch | "
             "pretrained, frozen (linear) | fine-tuned - scratch |",
             "|---|---|---|---|---|---|---|"]
    for target in TARGETS:
        for fraction in FRACTIONS:
            labeled = {r["labeled"] for r in rows if (r["target"], r["fraction"]) == (target,
                                                                                      fraction)}
            if not labeled:
                continue
            gaps = []
            for seed in sorted({r["seed"] for r in rows}):
                by = {r["mode"]: r["top1"] for r in rows if (r["target"], r["fraction"],
                                                            r["seed"]) == (target, fraction, seed)}
                if "pretrained" in by and "scratch" in by:
                    gaps.append(by["pretrained"] - by["scratch"])
            gap = f"{100 * np.mean(gaps):+.1f} ± {100 * np.std(gaps):.1f}" if gaps else ""
            name = f"{target} ({'semi-supervised' if target == SOURCE else 'transfer'})"
            lines.append(f"| {name} | {100 * fraction:g}% | {'/'.join(map(str, sorted(labeled)))} "
                         f"| {pm((target, fraction, 'pretrained'))} | "
                         f"{pm((target, fraction, 'scratch'))} | "
                         f"{pm((target, fraction, 'frozen'))} | {gap} |")
    if pretrain_rows:
        k = [r["knn20"] for r in pretrain_rows]
        raw = pretrain_rows[0]["raw_pixels_knn20"]
        rnd = [r["random_init_knn20"] for r in pretrain_rows]
        lines.append("")
        lines.append(f"Phase 1 ({len(k)} seeds, {pretrain_rows[0]['epochs']} epochs on "
                     f"{SOURCE}): encoder kNN@20 {100 * np.mean(k):.1f} ± {100 * np.std(k):.1f}% "
                     f"(raw pixels {100 * raw:.1f}%, random-init encoder "
                     f"{100 * np.mean(rnd):.1f} ± {100 * np.std(rnd):.1f}%).")
    return "\n".join(lines)


def time_line(row):
    """The run's cost: wall time, CPU time of all its processes, the machine's load."""
    return (f"Time: {row['seconds'] / 60:.1f} min wall, {row['cpu_seconds'] / 60:.1f} CPU-min "
            f"({row['jobs']} jobs of 1 thread on {row['cpus']} cores; 1-minute load average "
            f"{row['load_1min_start']:.2f} at the start, mean {row['load_1min_mean']:.2f} and "
            f"max {row['load_1min_max']:.2f} over the runs' ends).")


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--fractions", type=float, nargs="+", default=list(FRACTIONS))
    p.add_argument("--targets", nargs="+", default=list(TARGETS), choices=TARGETS)
    p.add_argument("--modes", nargs="+", default=list(MODES), choices=MODES)
    p.add_argument("--pretrain-epochs", type=int, default=20)
    p.add_argument("--epochs", type=int, default=10, help="fine-tuning epochs")
    p.add_argument("--steps-per-epoch", type=int, default=12,
                   help="fine-tuning steps per epoch, whatever the fraction (the budget)")
    p.add_argument("--jobs", type=int, default=2, help="runs at once, 1 thread each")
    p.add_argument("--out", default=str(ROOT / "runs" / "transfer"))
    p.add_argument("--table", nargs="+", metavar="JSONL",
                   help="print the markdown table of earlier runs' output and exit")
    args = p.parse_args()
    if args.table:
        rows = [json.loads(x) for f in args.table for x in open(f) if x.startswith("{")]
        print(markdown([r for r in rows if r.get("benchmark") == "transfer"],
                       [r for r in rows if r.get("benchmark") == "transfer_pretrain"]))
        for r in rows:
            if r.get("benchmark") == "transfer_time" and "cpu_seconds" in r:
                print(time_line(r))
        return
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    log = open(out / "results.jsonl", "w")

    def record(row):
        emit(row)
        log.write(json.dumps(row) + "\n")
        log.flush()
    record({"benchmark": "transfer_machine", **machine_info(), "jobs": args.jobs})
    start, cpu0, loads = time.perf_counter(), os.times(), [os.getloadavg()]
    runs, pretrained = [], []
    ft = (args.epochs, args.steps_per_epoch, str(out))
    with futures.ProcessPoolExecutor(args.jobs,
                                     mp_context=multiprocessing.get_context("fork")) as pool:
        pending = {pool.submit(pretrain, s, args.pretrain_epochs, str(out)): ("pretrain", s)
                   for s in args.seeds}
        for s in args.seeds:  # scratch needs no encoder: it fills the gaps
            for target in args.targets:
                for fraction in args.fractions:
                    if "scratch" in args.modes:
                        pending[pool.submit(finetune, s, target, fraction, "scratch", *ft)] = \
                            ("finetune", s)
        while pending:
            done, _ = futures.wait(pending, return_when=futures.FIRST_COMPLETED)
            for f in done:
                kind, seed = pending.pop(f)
                row = f.result()
                loads.append(os.getloadavg())
                record(row)
                if kind == "pretrain":
                    pretrained.append(row)
                    for target in args.targets:
                        for fraction in args.fractions:
                            for mode in ("pretrained", "frozen"):
                                if mode in args.modes:
                                    pending[pool.submit(finetune, seed, target, fraction, mode,
                                                        *ft)] = ("finetune", seed)
                else:
                    runs.append(row)
    cpu = os.times()  # the pool's workers have been waited for: their CPU is the children's
    timing = {"benchmark": "transfer_time", "seconds": time.perf_counter() - start,
            "cpu_seconds": (cpu.user + cpu.system + cpu.children_user + cpu.children_system)
            - (cpu0.user + cpu0.system + cpu0.children_user + cpu0.children_system),
            "load_1min_start": loads[0][0], "load_1min_mean": float(np.mean([x[0] for x in loads])),
            "load_1min_max": float(np.max([x[0] for x in loads])), "cpus": os.cpu_count(),
            "jobs": args.jobs, "seeds": args.seeds, "pretrain_epochs": args.pretrain_epochs,
            "finetune_steps": args.epochs * args.steps_per_epoch}
    record(timing)
    print(markdown(runs, pretrained))
    print(time_line(timing))


if __name__ == "__main__":
    main()

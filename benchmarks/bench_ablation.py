"""The paper's ablations at small scale: the contrastive prior and the smoothing.

On two datasets,

    digits  scikit-learn's handwritten digits at 16 x 16 (1,438 train / 359 test),
            where raw pixels are already at the ceiling (about 98% kNN)
    shapes  the synthetic shapes x textures at 16 x 16, 8 classes (2,000 train /
            500 test, drawn with different data seeds), where raw pixels fail
            (about 51% kNN at k = 20); ``shapes32``: the same at 32 x 32 (48%)

each variant of the method is trained on one process (refimpl-train's Trainer,
SelfComm) for several seeds:

    full        prior on, alpha = 0.2, K = 5      (the defaults)
    no-prior    prior off (W = nn.Linear's uniform init), alpha = 0.2, K = 5
    no-smooth   prior on, alpha = 0 (plain instance classification)
    plain       prior off, alpha = 0
    K=1, K=10   prior on, alpha = 0.2, K = 1 or 10

and reports, per run: the loss of the first 20 steps, encoder kNN (weighted,
k = 20 and 200, T = 0.07) after epochs 1, 5 and the last, the neighbour label
agreement at the end; and once per dataset and seed: raw pixels and the
random-init encoder (BatchNorm running statistics at their initial values).
One JSON object per run, then one summary object per (dataset, variant) with
the mean and standard deviation over seeds.

    python benchmarks/bench_ablation.py [--datasets digits shapes] [--seeds 0 1 2]
        [--variants full no-prior ...] [--epochs 20] [--out runs/ablation] [--threads 1]
    python benchmarks/bench_ablation.py --table out.jsonl ...   (docs/benchmarks.md's table)

These are accuracies, not speeds: a loaded machine changes the time, not the
numbers (every run is bitwise reproducible for a fixed thread count; NumPy's
BLAS is held at one thread, since its thread count changes float32 rounding).
"""
import argparse
import json
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402

from benchmarks.common import emit, machine_info  # noqa: E402
from benchmarks.datasets import prepare  # noqa: E402

VARIANTS = {
    "full": {},
    "no-prior": {"prior": False},
    "no-smooth": {"alpha": 0.0},
    "plain": {"prior": False, "alpha": 0.0},
    "K=1": {"k": 1},
    "K=10": {"k": 10},
}
COMMON = {"arch": "resnet18", "stem": "cifar", "width": 16, "dim": 128, "batch_size": 128,
          "lr": 0.3, "warmup_epochs": 1.0, "tau": 0.15, "smooth_from_epoch": 1,
          "augment": {"crop_scale": [0.2, 1.0]}, "knn_k": [20, 200], "eval_every": 1,
          "save_every": 0, "log_every": 1000, "dtype": "float32", "keep": 1}


def run_one(dataset, train, test, variant, seed, epochs, out, threads=0):
    from refimpl.parallel.comm import SelfComm
    from refimpl.train.config import Config
    from refimpl.train.loop import Trainer
    cfg = Config(**{**COMMON, **VARIANTS[variant], "train": train, "test": test,
                    "seed": seed, "epochs": epochs, "threads": threads,
                    "out": str(Path(out) / f"{dataset}-{variant}-seed{seed}")})
    start = time.perf_counter()
    trainer = Trainer(cfg, SelfComm(), log=lambda s: None)
    if Path(cfg.out).exists():  # a previous benchmark's run of the same name
        import shutil
        shutil.rmtree(cfg.out)
    results = trainer.run()
    seconds = time.perf_counter() - start
    records = [json.loads(x) for x in (Path(cfg.out) / "metrics.jsonl").read_text().splitlines()]
    steps = [r["loss"] for r in records if r["kind"] == "step"]
    epochs_ = {r["epoch"]: r for r in records if r["kind"] == "epoch"}

    def knn_after(e, k):
        r = epochs_.get(e - 1)
        return r["knn"]["pooled"][str(k)] if r and r.get("knn") else None
    return {"benchmark": "ablation", "dataset": dataset, "variant": variant, "seed": seed,
            "epochs": epochs, "loss_first_20": steps[:20], "loss_last": steps[-1],
            "knn20_epoch1": knn_after(1, 20), "knn20_epoch5": knn_after(5, 20),
            "knn20_end": knn_after(epochs, 20), "knn200_end": knn_after(epochs, 200),
            "head_knn20_end": epochs_[epochs - 1]["knn"]["head"]["20"],
            "agreement_end": epochs_[epochs - 1]["agreement"],
            "raw_pixels": results.get("raw_pixels"),
            "random_init": results.get("random_init", {}).get("pooled"),
            "after_prior": (results.get("after_prior") or {}).get("pooled"),
            "seconds": seconds}


def summarize(rows):
    """Mean and standard deviation over seeds of every number, per (dataset, variant)."""
    out = []
    for key in sorted({(r["dataset"], r["variant"]) for r in rows}):
        group = [r for r in rows if (r["dataset"], r["variant"]) == key]
        s = {"benchmark": "ablation_summary", "dataset": key[0], "variant": key[1],
             "seeds": [r["seed"] for r in group]}
        for f in ("knn20_epoch1", "knn20_epoch5", "knn20_end", "knn200_end", "head_knn20_end",
                  "agreement_end", "loss_last"):
            v = np.array([r[f] for r in group if r[f] is not None], dtype=float)
            s[f] = [float(v.mean()), float(v.std())] if v.size else None
        s["loss_step20_mean"] = float(np.mean([np.mean(r["loss_first_20"]) for r in group]))
        for f in ("raw_pixels", "random_init"):
            v = [r[f]["20"] if "20" in r[f] else r[f][20] for r in group if r[f]]
            s[f + "_knn20"] = [float(np.mean(v)), float(np.std(v))] if v else None
        out.append(s)
    return out


def markdown(rows):
    """docs/benchmarks.md's table from the run rows: mean +- std over seeds, in %."""
    def pm(v):
        return "" if v is None else f"{100 * v[0]:.1f} ± {100 * v[1]:.1f}"
    out = ["| dataset | variant | kNN@20 epoch 1 | epoch 5 | end | kNN@200 end | head kNN@20 end "
           "| agreement end | mean loss, steps 1-20 | raw pixels | random init |",
           "|---|---|---|---|---|---|---|---|---|---|---|"]
    for s in summarize(rows):
        out.append(f"| {s['dataset']} | {s['variant']} | {pm(s['knn20_epoch1'])} | "
                   f"{pm(s['knn20_epoch5'])} | {pm(s['knn20_end'])} | {pm(s['knn200_end'])} | "
                   f"{pm(s['head_knn20_end'])} | {pm(s['agreement_end'])} | "
                   f"{s['loss_step20_mean']:.3f} | {pm(s['raw_pixels_knn20'])} | "
                   f"{pm(s['random_init_knn20'])} |")
    return "\n".join(out)


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--datasets", nargs="+", default=["digits", "shapes"])
    p.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--epochs", type=int, default=20)
    p.add_argument("--data", default=str(ROOT / "data"), help="where the digits are packed")
    p.add_argument("--out", default=str(ROOT / "runs" / "ablation"))
    p.add_argument("--table", nargs="+", metavar="JSONL",
                   help="print the markdown table of earlier runs' output and exit")
    p.add_argument("--threads", type=int, default=0,
                   help="refimpl threads (0: all cores); e.g. 1 to run two datasets at once")
    args = p.parse_args()
    if args.table:
        rows = [json.loads(x) for f in args.table for x in open(f)
                if '"benchmark": "ablation"' in x]
        print(markdown(rows))
        return
    # One BLAS thread per run whatever refimpl's thread count: at --threads 1
    # OpenBLAS would otherwise start a thread per core (two runs side by side
    # then oversubscribe the cores), and its thread count changes the float32
    # rounding, so runs would not be bitwise comparable across machines.
    from threadpoolctl import threadpool_limits
    threadpool_limits(limits=1, user_api="blas")
    emit({"benchmark": "ablation_machine", **machine_info()})
    rows = []
    for dataset in args.datasets:
        train, test = prepare(dataset, args.data)
        for variant in args.variants:
            for seed in args.seeds:
                row = run_one(dataset, train, test, variant, seed, args.epochs, args.out,
                              args.threads)
                rows.append(row)
                emit(row)
    for s in summarize(rows):
        emit(s)


if __name__ == "__main__":
    main()

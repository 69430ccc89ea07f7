"""The paper's ablations at small scale: the contrastive prior's variants and the smoothing.

Each variant of the method is trained on one process (refimpl-train's Trainer,
SelfComm, one refimpl thread, one BLAS thread) for several seeds, on the
datasets of ``benchmarks/datasets.py`` (digits: raw pixels near the ceiling;
shapes32: raw pixels fail). The variants (``VARIANTS``; every one is a set
of config values, so any run can be repeated with refimpl-train):

    none        no prior (W = nn.Linear's uniform init)
    paper       the paper's reading: W[i] = z_hat_i of the random-init head,
                train-mode BN, its running statistics kept for training
    centered    the head's z_i minus their mean over all N, then normalized
    whitened    ZCA-whitened z_i, then normalized
    pooled      the pooled encoder features instead of the head's output
    initial-bn  paper, but training starts with the initial BN statistics
    augmented   paper, the rows from epoch 0's augmented views
    scaled      paper, rows of norm 0.577 (nn.Linear's rows) instead of 1
    mixed       paper, W = 0.5 z_hat + 0.5 the random rows
    late-smooth paper, smoothing from epoch 4 (the table rebuilt from trained rows)
    centered-late  centered, smoothing from epoch 4
    no-smooth, plain (no prior, alpha 0), K=1, K=10   the smoothing ablation

Per run, every epoch: encoder kNN@20/@200 and head kNN@20 on the test split,
the mean loss, the neighbour label agreement of the table in use, and the
classifier's rows: their mean pairwise cosine, their mean norm, how far they
turned from where training started (mean cos(w_i(t), w_i(0))) and how well
they point at their own instance's current feature (mean cos(w_i, z_i),
z_i = the eval-mode head feature). Once: raw pixels, the random-init encoder,
after the prior, the rows' mean pairwise cosine after the prior, the first
table's label agreement. One JSON object per run, then one summary object per
(dataset, variant): mean, standard deviation, min and max over seeds, and
the first epoch at which each seed's kNN@20 reached each level of ``REACH``.

    python benchmarks/bench_ablation.py                      # the default set, 2 jobs
    python benchmarks/bench_ablation.py --set prior          # every prior variant
    python benchmarks/bench_ablation.py --set smoothing      # K, alpha
    python benchmarks/bench_ablation.py --datasets shapes32 --variants none centered \\
        --seeds 0 1 2 --epochs 8 --schedule 16 --jobs 2
    python benchmarks/bench_ablation.py --table out.jsonl ... (docs/ablation.md's tables)

--schedule S --epochs E trains the first E epochs of an S-epoch schedule
(warm-up + cosine over S epochs): the first epochs of a longer run, which is
what the paper's claim (faster convergence) is about.

These are accuracies, not speeds: a loaded machine changes the time, not the
numbers (every run is bitwise reproducible for a fixed thread count; NumPy's
BLAS is held at one thread, since its thread count changes float32 rounding).
The CPU seconds of each run (user + sys of its process) are reported: load
barely changes them.
"""
import argparse
import dataclasses
import json
import multiprocessing
import os
import resource
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402

from benchmarks.common import emit, machine_info  # noqa: E402
from benchmarks.datasets import DATASETS, prepare  # noqa: E402

LINEAR_ROW_NORM = 0.577  # nn.Linear's rows: uniform(+-1/sqrt(D)) has E||w||^2 = 1/3
VARIANTS = {
    "none": {"prior": "none"},
    "paper": {"prior": "paper"},
    "centered": {"prior": "centered"},
    "whitened": {"prior": "whitened"},
    "pooled": {"prior": "paper", "prior_features": "pooled"},
    "initial-bn": {"prior": "paper", "prior_bn": "initial"},
    "augmented": {"prior": "paper", "prior_transform": "train"},
    "scaled": {"prior": "paper", "prior_scale": LINEAR_ROW_NORM},
    "mixed": {"prior": "paper", "prior_mix": 0.5},
    "late-smooth": {"prior": "paper", "smooth_from_epoch": 3},
    "centered-late": {"prior": "centered", "smooth_from_epoch": 3},
    "no-smooth": {"prior": "paper", "alpha": 0.0},
    "plain": {"prior": "none", "alpha": 0.0},
    "K=1": {"prior": "paper", "k": 1},
    "K=10": {"prior": "paper", "k": 10},
}
# --set: which (datasets, variants, seeds, epochs, schedule) run by default
SETS = {
    # about 1,100 CPU-seconds: about 10 minutes on 2 quiet cores with --jobs 2 (docs/ablation.md)
    "default": (["digits", "shapes32"], ["none", "paper", "centered"], [0, 1, 2], 5, 12),
    "prior": (["digits", "shapes32"], ["none", "paper", "centered", "whitened", "pooled",
                                       "initial-bn", "augmented", "scaled", "mixed",
                                       "late-smooth", "centered-late"], [0, 1, 2], 5, 12),
    "smoothing": (["digits", "shapes32"], ["paper", "no-smooth", "none", "plain", "K=1",
                                           "K=10"], [0, 1, 2], 12, 12),
}
# kNN@20 levels (%) whose first epoch is reported, per dataset
REACH = {"digits": (85, 90), "shapes": (45, 50), "shapes32": (50, 60, 70)}
COMMON = {"arch": "resnet18", "stem": "cifar", "width": 16, "dim": 128, "batch_size": 128,
          "lr": 0.3, "warmup_epochs": 1.0, "tau": 0.15, "alpha": 0.2, "k": 5,
          "smooth_from_epoch": 1, "augment": {"crop_scale": [0.2, 1.0]},
          "knn_k": [20, 200], "eval_every": 1, "save_every": 0, "log_every": 1000,
          "dtype": "float32", "keep": 1, "bn": "local"}


def _rows_unit(w):
    return w / np.maximum(np.linalg.norm(w, axis=1, keepdims=True), 1e-12)


def row_diagnostics(w, w0, head):
    """The classifier's rows (N, D) against where they started (w0) and the features.

    head: (N, D) eval-mode head features of the train split, or None.
    """
    w = np.asarray(w, dtype=np.float64)
    u, u0 = _rows_unit(w), _rows_unit(np.asarray(w0, dtype=np.float64))
    s, N = u.sum(axis=0), len(u)
    out = {"mean_cosine": float((s @ s - N) / (N * (N - 1))),
           "row_norm": float(np.linalg.norm(w, axis=1).mean()),
           "turned": float(np.mean(np.sum(u * u0, axis=1)))}
    if head is not None:
        out["alignment"] = float(np.mean(np.sum(u * _rows_unit(np.asarray(head, np.float64)),
                                                axis=1)))
    return out


def run_one(dataset, train, test, variant, seed, epochs, schedule, out, threads=1):
    """One run; returns its JSON row (module docstring)."""
    from threadpoolctl import threadpool_limits
    threadpool_limits(limits=1, user_api="blas")
    import refimpl.train.loop as loop
    from refimpl.parallel.comm import SelfComm
    from refimpl.train.config import Config

    class Trainer(loop.Trainer):
        """refimpl-train's Trainer, plus the rows' diagnostics after every epoch."""
        w0 = None
        bank = None
        rows = []

        def epoch_neighbours(self, epoch):
            if self.w0 is None:  # training starts from these rows
                self.w0 = self.clf.weight.copy()
            return super().epoch_neighbours(epoch)

        def knn(self, label):
            self.bank = None
            result = super().knn(label)
            if self.w0 is not None:
                self.rows.append(row_diagnostics(self.clf.weight, self.w0, self.bank))
            return result

    def extract_features(net, dataset, *args, **kw):
        feats = extract(net, dataset, *args, **kw)
        if dataset is trainer.train_set:
            trainer.bank = feats.get("head")
        return feats
    extract, loop.extract_features = loop.extract_features, extract_features

    cfg = Config(**{**COMMON, **VARIANTS[variant], "train": train, "test": test,
                    "seed": seed, "epochs": schedule, "threads": threads,
                    "out": str(Path(out) / f"{dataset}-{variant}-seed{seed}")})
    start, cpu = time.perf_counter(), resource.getrusage(resource.RUSAGE_SELF)
    load_start = os.getloadavg()
    if Path(cfg.out).exists():  # a previous benchmark's run of the same name
        import shutil
        shutil.rmtree(cfg.out)
    trainer = Trainer(cfg, SelfComm(), log=lambda s: None)
    trainer.rows = []
    # the first `epochs` epochs of a `schedule`-epoch warm-up + cosine schedule: the
    # schedule was made for cfg.epochs = schedule; the loop stops after `epochs`
    trainer.cfg = dataclasses.replace(cfg, epochs=epochs)
    results = trainer.run()
    seconds = time.perf_counter() - start
    end = resource.getrusage(resource.RUSAGE_SELF)
    records = [json.loads(x) for x in (Path(cfg.out) / "metrics.jsonl").read_text().splitlines()]
    steps = [r["loss"] for r in records if r["kind"] == "step"]
    per_epoch = [r for r in records if r["kind"] == "epoch"]
    prior = [r for r in records if r["kind"] == "prior"]

    def knn(kind, k):
        return [r["knn"][kind][str(k)] for r in per_epoch]
    return {"benchmark": "ablation", "dataset": dataset, "variant": variant,
            "config": VARIANTS[variant], "seed": seed, "epochs": epochs, "schedule": schedule,
            "knn20": knn("pooled", 20), "knn200": knn("pooled", 200),
            "head_knn20": knn("head", 20), "loss": [r["loss"] for r in per_epoch],
            "agreement": [r["agreement"] for r in per_epoch], "rows": trainer.rows,
            "loss_first_20": steps[:20],
            "raw_pixels": results.get("raw_pixels"),
            "random_init": results.get("random_init", {}).get("pooled"),
            "after_prior": (results.get("after_prior") or {}).get("pooled"),
            "prior_mean_cosine": prior[0]["mean_cosine"] if prior else None,
            "seconds": seconds, "load_start": load_start, "load_end": os.getloadavg(),
            "cpu_seconds": (end.ru_utime - cpu.ru_utime) + (end.ru_stime - cpu.ru_stime)}


def _job(args):
    return run_one(*args)


def first_epoch(curve, level):
    """1-based epoch at which curve (fractions) first reaches level (%), or None."""
    hits = [e + 1 for e, v in enumerate(curve) if 100 * v >= level - 1e-9]
    return hits[0] if hits else None


def _stats(values):
    v = np.array([x for x in values if x is not None], dtype=float)
    return ([float(v.mean()), float(v.std()), float(v.min()), float(v.max())]
            if v.size else None)


def _at20(knn):
    """kNN@20 of a {k: acc} dict (int keys in this process, str keys from JSON), or None."""
    return None if not knn else knn.get(20, knn.get("20"))


def summarize(rows):
    """Per (dataset, variant): mean, std, min, max over seeds of every number."""
    out = []
    for key in sorted({(r["dataset"], r["variant"]) for r in rows}):
        group = sorted((r for r in rows if (r["dataset"], r["variant"]) == key),
                       key=lambda r: r["seed"])
        E = min(len(r["knn20"]) for r in group)
        s = {"benchmark": "ablation_summary", "dataset": key[0], "variant": key[1],
             "seeds": [r["seed"] for r in group], "epochs": E,
             "schedule": group[0]["schedule"],
             "knn20": [_stats([r["knn20"][e] for r in group]) for e in range(E)],
             "knn200_end": _stats([r["knn200"][E - 1] for r in group]),
             "head_knn20_end": _stats([r["head_knn20"][E - 1] for r in group]),
             "loss": [_stats([r["loss"][e] for r in group]) for e in range(E)],
             "agreement_first": _stats([r["agreement"][0] for r in group]),
             "agreement_end": _stats([r["agreement"][E - 1] for r in group]),
             "prior_mean_cosine": _stats([r["prior_mean_cosine"] for r in group]),
             "after_prior_knn20": _stats([_at20(r["after_prior"]) for r in group]),
             "raw_pixels_knn20": _stats([_at20(r["raw_pixels"]) for r in group]),
             "random_init_knn20": _stats([_at20(r["random_init"]) for r in group]),
             "reach": {str(level): [first_epoch(r["knn20"][:E], level) for r in group]
                       for level in REACH.get(key[0], ())},
             "cpu_seconds": _stats([r["cpu_seconds"] for r in group])}
        for f in ("mean_cosine", "row_norm", "turned", "alignment"):
            s["rows_" + f] = [_stats([r["rows"][e].get(f) for r in group
                                      if len(r["rows"]) > e]) for e in range(E)]
        out.append(s)
    return out


def _pm(v, scale=100, digits=1):
    return "" if v is None else f"{scale * v[0]:.{digits}f} ± {scale * v[1]:.{digits}f}"


def markdown(rows, at=None):
    """docs/ablation.md's tables from the run rows: mean ± std over seeds, in %.

    at: the epochs whose kNN@20 get a column (default 1, 2, 3 and the last).
    """
    lines = []
    for dataset in sorted({r["dataset"] for r in rows}):
        summary = [s for s in summarize(rows) if s["dataset"] == dataset]
        E = min(s["epochs"] for s in summary)
        cols = sorted({e for e in (at or (1, 2, 3, E)) if 1 <= e <= E})
        levels = REACH.get(dataset, ())
        lines += [f"{dataset}: first {E} epochs of a {summary[0]['schedule']}-epoch schedule, "
                  f"seeds {summary[0]['seeds']}; raw pixels {_pm(summary[0]['raw_pixels_knn20'])}"
                  f", random init {_pm(summary[0]['random_init_knn20'])} (kNN@20, %)", "",
                  "| variant | rows' mean cosine after the prior | kNN@20 after the prior | "
                  "first table's agreement | "
                  + " | ".join(f"kNN@20 epoch {e}" for e in cols)
                  + " | kNN@200 end | agreement end | rows' cos to their start, end | "
                  + " | ".join(f"epoch reaching {v}%" for v in levels)
                  + " | CPU s per run (min-max) |",
                  "|---" * (9 + len(cols) + len(levels)) + "|"]
        for s in summary:
            reach = [", ".join("-" if e is None else str(e) for e in s["reach"][str(v)])
                     for v in levels]
            cpu = s["cpu_seconds"]
            lines.append(
                f"| {s['variant']} | {_pm(s['prior_mean_cosine'], 1, 3)} | "
                f"{_pm(s['after_prior_knn20'])} | {_pm(s['agreement_first'])} | "
                + " | ".join(_pm(s["knn20"][e - 1]) for e in cols)
                + f" | {_pm(s['knn200_end'])} | {_pm(s['agreement_end'])} | "
                + f"{_pm(s['rows_turned'][E - 1], 1, 4)} | "
                + " | ".join(reach) + f" | {cpu[0]:.0f} ({cpu[2]:.0f}-{cpu[3]:.0f}) |")
        lines.append("")
    return "\n".join(lines)


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--set", choices=list(SETS), default="default",
                   help="which datasets, variants, seeds and epochs (overridden by the "
                        "options below)")
    p.add_argument("--datasets", nargs="+", choices=DATASETS)
    p.add_argument("--variants", nargs="+", choices=list(VARIANTS))
    p.add_argument("--seeds", type=int, nargs="+")
    p.add_argument("--epochs", type=int, help="epochs trained")
    p.add_argument("--schedule", type=int, help="epochs of the lr schedule (>= --epochs)")
    p.add_argument("--jobs", type=int, default=2, help="runs at once, one process each")
    p.add_argument("--data", default=str(ROOT / "data"), help="where the digits are packed")
    p.add_argument("--out", default=str(ROOT / "runs" / "ablation"))
    p.add_argument("--table", nargs="+", metavar="JSONL",
                   help="print the markdown tables of earlier runs' output and exit")
    p.add_argument("--at", type=int, nargs="+", help="--table: the epochs shown")
    args = p.parse_args()
    if args.table:
        rows = {}
        for x in (x for f in args.table for x in open(f) if '"benchmark": "ablation"' in x):
            # a run repeated (several files, or fewer epochs of the same schedule): its
            # longest row (runs are bitwise reproducible, so the first epochs agree)
            r = json.loads(x)
            key = (r["dataset"], r["variant"], r["seed"])
            if key not in rows or len(r["knn20"]) > len(rows[key]["knn20"]):
                rows[key] = r
        rows = list(rows.values())
        if args.datasets:
            rows = [r for r in rows if r["dataset"] in args.datasets]
        if args.variants:
            rows = [r for r in rows if r["variant"] in args.variants]
        for d in {r["dataset"] for r in rows}:  # one table, one epoch count: the shortest
            E = min(len(r["knn20"]) for r in rows if r["dataset"] == d)
            for r in (r for r in rows if r["dataset"] == d):
                for f in ("knn20", "knn200", "head_knn20", "loss", "agreement", "rows"):
                    r[f] = r[f][:E]
        print(markdown(rows, args.at))
        return
    datasets, variants, seeds, epochs, schedule = SETS[args.set]
    datasets = args.datasets or datasets
    variants = args.variants or variants
    seeds = args.seeds if args.seeds is not None else seeds
    epochs = args.epochs or epochs
    schedule = max(args.schedule or (schedule if args.epochs is None else epochs), epochs)
    emit({"benchmark": "ablation_machine", **machine_info(), "set": args.set,
          "epochs": epochs, "schedule": schedule})
    jobs = [(d, *prepare(d, args.data), v, s, epochs, schedule, args.out)
            for d in datasets for v in variants for s in seeds]
    rows = []
    # a fresh interpreter per run ("spawn"): nothing leaks from one run to the next
    with multiprocessing.get_context("spawn").Pool(args.jobs, maxtasksperchild=1) as pool:
        for row in pool.imap_unordered(_job, jobs):
            rows.append(row)
            emit(row)
    for s in summarize(rows):
        emit(s)


if __name__ == "__main__":
    main()

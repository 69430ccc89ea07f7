"""The fine-tuning program: phase 2 end to end, on P ranks.

Contract. ``FineTuner(cfg, comm)`` builds everything on every rank from a
``FineTuneConfig``: it checks the config, takes the architecture (and, when
``train`` is unset, the datasets) from the ``init`` checkpoint, opens the
labeled datasets and checks their labels,
builds ``FineTuneNet`` (encoder + FC over the C classes), loads the
pretrained encoder (``finetune.init``), picks the labeled subset
(``finetune.labels``) and makes two SGD optimizers (encoder, FC) over the
one flat buffer. ``FineTuner.run()`` then, for every epoch:

    the steps: the global batch of the step (``finetune.sampler``), this
    rank's slice, augmented (keyed by the pass each image came from); the
    warm-up + cosine learning rates of both parts; ``finetune.step``;
    then the test split's top-1 and top-5 (eval-mode BatchNorm), metrics,
    the plot, a checkpoint

Rank 0 writes the run directory ``cfg.out``: ``config.toml``,
``label_subset.json`` (the labeled ids: the same for every P and rerun),
``metrics.jsonl`` (a JSON object per step and per epoch), ``curves.png``
and the checkpoints (``finetune.checkpoint``). The failure behaviour is
refimpl-train's: the run directory is owned by one run at a time
(``rundir.RunLock``, taken by rank 0 in ``start``, released when ``run``
ends); a non-finite loss stops the run naming the step
(``TrainingStopped``); SIGINT, SIGTERM and SIGUSR1 stop every rank at the
next step boundary inside the step loop (``TrainingInterrupted``), with
--save-on-interrupt after a checkpoint, and at once in any other phase
(``parallel.signals``); a config or dataset problem on any rank is a
``ConfigError`` on every rank.
"""
import json
import math
import os
import signal
import sys
import time
from pathlib import Path

import numpy as np

from refimpl import checkpoint, threads
from refimpl.backend import to_numpy
from refimpl.data.augment import augment_batch, eval_transform
from refimpl.data.datasets import open_dataset
from refimpl.data.sampler import local_slice
from refimpl.finetune import checkpoint as ft_checkpoint
from refimpl.finetune.config import (num_classes, resolve_architecture, resolve_data, validate,
                                     validate_labels)
from refimpl.finetune.init import load_init
from refimpl.finetune.labels import label_subset, read_subset, subset_record, write_subset
from refimpl.finetune.model import FineTuneNet
from refimpl.finetune.sampler import batch_of_step
from refimpl.finetune.step import TOPK, forward_backward, optimizers, topk_hits, update
from refimpl.optim.schedule import warmup_cosine
from refimpl.parallel.data_parallel import set_batchnorm_mode
from refimpl.deps import version_line
from refimpl.parallel.launch import select_gpu
from refimpl.parallel.signals import StopSignals
from refimpl.rundir import RunDirError, RunLock
from refimpl.train.config import ConfigError, config_hash, to_toml
from refimpl.train.loop import (PeerFailed, TrainingInterrupted, TrainingStopped, _before,
                                 _check_out)

PROG = "refimpl-finetune"


def collective(comm, fn):
    """fn() on every rank; a ConfigError on any rank is raised on every rank.

    The lowest failing rank raises its own error (marked ``local``, so that it
    prints it); the others raise ``PeerFailed``, which nobody prints.
    """
    error, result = None, None
    try:
        result = fn()
    except ConfigError as e:
        error = e
    failed = to_numpy(comm.all_gather(np.array([error is not None], dtype=np.int64)))
    if failed.any():
        first = int(np.argmax(failed))
        if comm.rank == first:
            error.local = True
            raise error
        raise PeerFailed(f"rank {first} could not start (its message is above)")
    return result


def open_labeled(what, spec):
    """A dataset, or a ConfigError naming ``what`` (train / test) and the problem."""
    try:
        ds = open_dataset(spec)
    except (OSError, ValueError) as e:
        raise ConfigError(f"{what}: cannot open {spec!r}: {e}") from None
    if len(ds) == 0:
        raise ConfigError(f"{what}: the dataset {spec!r} is empty")
    return ds


def test_accuracy(net, dataset, comm, batch_size, image_size, config=None, ks=TOPK):
    """{k: top-k accuracy} of ``net`` on a labeled dataset; eval-mode BatchNorm.

    Rank r classifies images [floor(r M / P), floor((r + 1) M / P)) with the
    eval transform; one Allreduce SUM of the hit counts. Equal on every rank.
    """
    M, P, r = len(dataset), comm.size, comm.rank
    lo, hi = r * M // P, (r + 1) * M // P
    labels = np.asarray(dataset.labels)
    hits = np.zeros(len(ks))
    for s in range(lo, hi, batch_size):
        idx = np.arange(s, min(s + batch_size, hi))
        x = eval_transform(dataset.read(idx), image_size, config, device=net.store.device,
                           dtype=net.store.dtype)                        # (n, 3, S, S)
        h = topk_hits(net.forward(x, train=False), labels[idx], ks)
        hits += [h[k] for k in ks]
    net.drop_caches()
    hits = to_numpy(comm.all_reduce(hits, "sum"))
    return {k: float(hits[i]) / M for i, k in enumerate(ks)}


class FineTuner:
    """One fine-tuning run on this rank (see the module docstring).

    log: a function of one string, called on rank 0 only (default print).
    """

    def __init__(self, cfg, comm, log=None, save_on_interrupt=False, signals=None):
        self.comm, self.rank0 = comm, comm.rank == 0
        self.save_on_interrupt = save_on_interrupt
        # the program's installed StopSignals; without one (a library call) a
        # dormant one, whose phases only name what the run does
        self.signals = signals or StopSignals(PROG, comm)
        self.lock = None  # the run directory's RunLock (rank 0, during run())
        self._log = log or (lambda s: print(s, flush=True))
        validate(cfg, comm.size)
        self._check_same_config(cfg)
        collective(comm, lambda: _check_out(cfg.out))
        if cfg.device == "gpu":
            select_gpu(comm)
        else:
            n = cfg.threads or max(1, (os.cpu_count() or 1) // comm.local_size)
            threads.set_num_threads(n, single_blas=comm.local_size > 1)
        self.cfg = cfg = collective(comm, lambda: resolve_architecture(resolve_data(cfg)))
        with self.signals.phase("opening the datasets"):
            self.train_set, self.test_set = collective(comm, lambda: self._open_datasets(cfg))
        self.N, self.C = len(self.train_set), num_classes(self.train_set.labels)
        self.S = cfg.image_size or min(self.train_set.image_size)
        self.aug = cfg.augment_config()
        self.frozen = cfg.freeze_encoder
        self.net = FineTuneNet(cfg.arch, cfg.stem, cfg.width, self.C, cfg.dtype, cfg.device,
                               cfg.seed)
        set_batchnorm_mode(self.net, comm, cfg.bn)
        self.init_description = collective(comm, lambda: load_init(self.net, cfg.init))
        self.subset = label_subset(self.train_set.labels, cfg.labels, cfg.labels_seed)
        self.encoder_opt, self.fc_opt = optimizers(
            self.net, cfg.lr_encoder, cfg.lr_fc, cfg.momentum, cfg.weight_decay, cfg.nesterov,
            cfg.decay_bn_and_bias, self.frozen)
        n = self.subset.size
        self.steps_per_epoch = cfg.steps_per_epoch or max(1, n // cfg.batch_size)
        self.total_steps = cfg.epochs * self.steps_per_epoch
        self.warmup_steps = int(round(cfg.warmup_epochs * self.steps_per_epoch))
        self.out = Path(cfg.out)
        self.state = {"epoch": 0, "step_in_epoch": 0, "step": 0}
        self.results = {}

    # ---------------------------------------------------------------- setup
    def _open_datasets(self, cfg):
        train = open_labeled("train", cfg.train)
        test = open_labeled("test", cfg.test) if cfg.test else None
        validate_labels(cfg, train.labels, None if test is None else test.labels)
        return train, test

    def _check_same_config(self, cfg):
        """Every rank must run the same config: compare hashes (one all_gather)."""
        digest = np.frombuffer(bytes.fromhex(config_hash(cfg))[:8], dtype=np.int64)
        table = to_numpy(self.comm.all_gather(digest.copy()))
        bad = np.nonzero(table != table[0])[0]
        if bad.size:
            raise ConfigError(f"ranks {bad.tolist()} run another configuration than rank 0 "
                              f"(config hashes differ): start every rank with the same config "
                              f"and overrides")

    def log(self, text):
        if self.rank0:
            self._log(text)

    def write_metrics(self, record):
        if self.rank0:
            with open(self.out / "metrics.jsonl", "a") as f:
                f.write(json.dumps(record) + "\n")

    # ---------------------------------------------------------------- steps
    def lr_at(self, step, base):
        cfg = self.cfg
        return warmup_cosine(step, base, self.total_steps, self.warmup_steps,
                             cfg.warmup_start_factor * base, cfg.final_lr_factor * base)

    def batch(self, step):
        """(x (b, 3, S, S), class labels (b,), global batch ids (B,)) of ``step`` on this rank."""
        cfg, comm = self.cfg, self.comm
        ids, passes = batch_of_step(self.subset, cfg.batch_size, cfg.seed, step)
        mine = local_slice(np.arange(ids.size), comm.rank, comm.size)
        ids, passes = ids[mine], passes[mine]
        parts = []
        for q in np.unique(passes):  # ascending, and the slice's passes never decrease
            at = ids[passes == q]
            parts.append(augment_batch(self.train_set.read(at), at, cfg.seed, int(q), self.S,
                                       self.aug, cfg.device, self.net.store.dtype))
        x = parts[0] if len(parts) == 1 else self.net.store.xp.concatenate(parts)
        return x, np.asarray(self.train_set.labels)[ids], ids

    def train_epoch(self, epoch, start_step=0):
        """Steps start_step.. of an epoch; returns (mean loss, mean top-1, seconds, images)."""
        cfg = self.cfg
        losses, top1, seen, t0 = [], [], 0, time.perf_counter()
        bar = self._progress(epoch, start_step)
        for t in range(start_step, self.steps_per_epoch):
            step = self.state["step"]
            x, y, ids = self.batch(step)
            lr_e, lr_f = self.lr_at(step, cfg.lr_encoder), self.lr_at(step, cfg.lr_fc)
            try:
                out = forward_backward(self.net, x, y, self.comm, self.frozen, step)
            except FloatingPointError as e:
                raise TrainingStopped(
                    f"{e} (epoch {epoch + 1}, step {t + 1} of the epoch; rank-0 image ids "
                    f"{local_slice(ids, 0, self.comm.size)[:16].tolist()}); nothing was "
                    f"written over the last good checkpoint "
                    f"({checkpoint.latest_checkpoint(self.out)})") from None
            update(self.net, self.comm, self.encoder_opt, self.fc_opt, lr_e, lr_f)
            self.state.update(step=step + 1, step_in_epoch=t + 1)
            self.check_stop()
            losses.append(out.loss)
            top1.append(out.acc[1])
            seen += cfg.batch_size
            self.write_metrics({"kind": "step", "epoch": epoch, "step": step, "loss": out.loss,
                                "top1": out.acc[1], "lr_encoder": lr_e if not self.frozen
                                else None, "lr_fc": lr_f})
            if bar is not None:
                bar.update(1)
                bar.set_postfix(loss=f"{out.loss:.3f}", lr_fc=f"{lr_f:.3g}")
            if (step + 1) % cfg.log_every == 0:
                self.log(f"epoch {epoch + 1}/{cfg.epochs} step {t + 1}/{self.steps_per_epoch} "
                         f"loss {out.loss:.4f} top1 {100 * out.acc[1]:.1f}% lr encoder "
                         f"{lr_e if not self.frozen else 0:.4g} fc {lr_f:.4g}")
        if bar is not None:
            bar.close()
        seconds = time.perf_counter() - t0
        return (float(np.mean(losses)) if losses else math.nan,
                float(np.mean(top1)) if top1 else math.nan, seconds, seen)

    def _progress(self, epoch, start):
        if not self.rank0:
            return None
        try:
            from tqdm import tqdm
        except ImportError:
            return None
        return tqdm(total=self.steps_per_epoch, initial=start, desc=f"epoch {epoch + 1}",
                    leave=False, disable=None, file=sys.stderr)

    def evaluate(self):
        """{1: top-1, 5: top-5} on the test split ({} without one)."""
        if self.test_set is None:
            return {}
        return test_accuracy(self.net, self.test_set, self.comm, self.cfg.eval_batch_size,
                             self.S, self.aug)

    # ------------------------------------------------------------ signals
    def install_signal_handlers(self):
        """Install this run's StopSignals (``parallel.signals``): a signal stops the
        run at the end of the step inside the step loop (``check_stop``, every rank
        together), and at once in any other phase. refimpl-finetune installs its
        own at its start instead."""
        if self.save_on_interrupt:
            self.signals.announce = "stopping at the end of this step after saving a checkpoint"
        self.signals.install()

    def check_stop(self):
        """Has any rank received a stop signal? (one all_reduce MAX of one number)"""
        signum = self.signals.any_rank(self.comm)
        if not signum:
            return
        self.signals.acting = True  # saving first is not itself stopped
        saved = self.save() if self.save_on_interrupt else None
        raise TrainingInterrupted(
            f"{signal.Signals(signum).name} at step {self.state['step']} (epoch "
            f"{self.state['epoch'] + 1}); "
            + (f"checkpoint {saved}" if saved else
               f"the last checkpoint is {checkpoint.latest_checkpoint(self.out)}"), signum)

    # ------------------------------------------------------------ the run
    def save(self):
        with self.signals.phase("saving a checkpoint"):
            path = ft_checkpoint.save(self.out, dict(self.state), self.cfg.to_dict(), self.net,
                                      self.encoder_opt, self.fc_opt, self.comm, self.subset,
                                      self.cfg.keep)
        self.log(f"checkpoint {path}")
        return path

    def resume(self, path):
        state = ft_checkpoint.load(path, self.cfg.to_dict(), self.net, self.encoder_opt,
                                   self.fc_opt, self.comm, self.subset)
        self.state.update(state)
        if self.rank0:  # the metrics of steps after the checkpoint are redone
            metrics = self.out / "metrics.jsonl"
            if metrics.exists():
                keep = [line for line in metrics.read_text().splitlines()
                        if _before(json.loads(line), self.state)]
                metrics.write_text("".join(line + "\n" for line in keep))
        saved_on = checkpoint.read_meta(path)["world_size"]
        self.log(f"resumed from {path}: epoch {self.state['epoch'] + 1}, step "
                 f"{self.state['step']} (saved on {saved_on} rank(s), now {self.comm.size})")

    def start(self, resume):
        """Take the run directory (rank 0: its lock, ``rundir.RunLock``, released when
        ``run`` ends), refuse a fresh start over a run's checkpoints, remove what an
        interrupted save left, resume, write config.toml and the labeled subset (rank 0)."""
        collective(self.comm, self._take_lock)
        if resume is None:
            found = checkpoint.latest_checkpoint(self.out)
            if found is not None:
                raise ConfigError(f"{self.out} already holds checkpoints (latest: {found.name}): "
                                  f"continue that run with --resume auto, or give another "
                                  f"out= (a fresh start would overwrite them)")
        if self.rank0:
            self.out.mkdir(parents=True, exist_ok=True)
            for name in checkpoint.clean_stale(self.out):
                self._log(f"removed {name}, left by an interrupted save")
        self.comm.barrier()
        if resume is not None:
            self.resume(resume)
        elif self.rank0 and (self.out / "metrics.jsonl").exists():
            (self.out / "metrics.jsonl").unlink()
        if self.rank0:
            (self.out / "config.toml").write_text(f"# made with {version_line()}\n"
                                                  + to_toml(self.cfg))
            record = subset_record(self.subset, self.train_set.labels, self.cfg.labels,
                                   self.cfg.labels_seed)
            old = read_subset(self.out) if resume is not None else None
            if old is not None and old["ids"] != record["ids"]:  # the checkpoint says so too
                raise ConfigError(f"{self.out}: its label_subset.json is not this run's subset")
            write_subset(self.out, record)

    def _take_lock(self):
        """Rank 0: create the run directory and take its lock (a ConfigError naming
        the run that holds it); the other ranks: nothing."""
        if not self.rank0:
            return
        created = not self.out.exists()
        try:
            self.out.mkdir(parents=True, exist_ok=True)
            self.lock = RunLock(self.out).acquire()
        except (OSError, RunDirError) as e:
            if created and self.out.is_dir() and not any(self.out.iterdir()):
                self.out.rmdir()
            raise ConfigError(str(e)) from None
        if self.lock.stale:
            self._log(f"took over {self.lock.path}: its run ({self.lock.stale}) ended without "
                      f"releasing it")

    def release(self):
        """Give up the run directory's lock (rank 0; a no-op when not held)."""
        if self.lock is not None:
            self.lock.release()
            self.lock = None

    def run(self, resume=None):
        """The whole run (module docstring); returns the results dict. The run
        directory's lock is held until it returns or raises."""
        try:
            return self._run(resume)
        finally:
            self.release()

    def _run(self, resume):
        cfg, phase = self.cfg, self.signals.phase
        self.signals.where = "the start of the run"
        self.start(resume)
        if resume is None:
            n, per = self.subset.size, np.bincount(np.asarray(self.train_set.labels)[self.subset])
            self.log(f"fine-tuning {cfg.arch} width {cfg.width} from {self.init_description}")
            self.log(f"C = {self.C} classes; {n} of {self.N} training images labeled "
                     f"(labels = {cfg.labels:g}, {per.min()}-{per.max()} per class); "
                     f"{self.steps_per_epoch} steps of B = {cfg.batch_size} per epoch on "
                     f"{self.comm.size} rank(s); image {self.S}x{self.S}; "
                     + ("encoder frozen (eval-mode BN), FC trained" if self.frozen else
                        f"lr encoder {cfg.lr_encoder:g}, FC {cfg.lr_fc:g}, bn {cfg.bn}"))
        for epoch in range(self.state["epoch"], cfg.epochs):
            self.signals.where = f"epoch {epoch + 1}"
            with phase(f"the steps of epoch {epoch + 1}", cooperative=True):
                loss, top1, seconds, seen = self.train_epoch(epoch, self.state["step_in_epoch"])
            self.state.update(epoch=epoch + 1, step_in_epoch=0)
            last = epoch + 1 == cfg.epochs
            test = {}
            if last or (cfg.eval_every and (epoch + 1) % cfg.eval_every == 0):
                with phase("the test accuracy"):
                    test = self.evaluate()
            # the epoch's records and plot: short next to the steps but, with few steps
            # per epoch, where a signal often lands; it is acted on at their end, like
            # one in the steps (after a checkpoint with --save-on-interrupt)
            with phase(f"the end of epoch {epoch + 1}", cooperative=True):
                self.write_metrics({"kind": "epoch", "epoch": epoch, "step": self.state["step"],
                                    "loss": loss, "top1": top1, "test_top1": test.get(1),
                                    "test_top5": test.get(5), "seconds": seconds,
                                    "img_per_s": seen / seconds if seconds else None})
                line = (f"; test top-1 {100 * test[1]:.1f}%, top-5 {100 * test[5]:.1f}%"
                        if test else "")
                self.log(f"epoch {epoch + 1}/{cfg.epochs}: loss {loss:.4f}, train top-1 "
                         f"{100 * top1:.1f}%{line}, {seconds:.1f} s")
                if self.rank0:
                    plot_curves(self.out / "metrics.jsonl", self.out / "curves.png")
                self.check_stop()
            if last or (cfg.save_every and (epoch + 1) % cfg.save_every == 0):
                self.save()
            if test:
                self.results["test"] = test
        self.signals.where = "the end of the run"
        return self.results


def plot_curves(metrics_path, png_path):
    """curves.png from metrics.jsonl: loss, train and test accuracy per epoch."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    records = [json.loads(line) for line in Path(metrics_path).read_text().splitlines()]
    epochs = [e for e in records if e.get("kind") == "epoch"]
    if not epochs:
        return
    x = [e["epoch"] + 1 for e in epochs]
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.6))
    axes[0].plot(x, [e["loss"] for e in epochs], marker="o", ms=3)
    axes[0].set_title("cross-entropy (mean over the epoch)")
    axes[1].plot(x, [100 * e["top1"] for e in epochs], marker="o", ms=3,
                 label="train top-1 (augmented)")
    for key, style in (("test_top1", "s"), ("test_top5", "^")):
        pts = [(e["epoch"] + 1, 100 * e[key]) for e in epochs if e.get(key) is not None]
        if pts:
            axes[1].plot(*zip(*pts), marker=style, ms=3, label=key.replace("_", " "))
    axes[1].set_title("accuracy (%)")
    axes[1].legend(fontsize=8)
    for ax in axes:
        ax.set_xlabel("epoch")
        ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(png_path, dpi=100)
    plt.close(fig)

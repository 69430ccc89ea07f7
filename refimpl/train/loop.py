"""The training program: the method end to end, on P ranks.

Contract. ``Trainer(cfg, comm)`` builds everything a run needs from a
validated ``Config`` (datasets, network, sharded classifier, optimizers) on
every rank; ``Trainer.run()`` then does, in order:

    1. raw pixels, random-init encoder: kNN on the test split (if labeled)
    2. the contrastive prior (``method.prior``): W from random-init features
    3. for every epoch:
         the hardest-class neighbours of every class (``method.neighbours``),
         when smoothing is on or the label agreement is monitored;
         the steps: the world-size-invariant global batch (``data.sampler``),
         this rank's slice, augmented; smoothed targets of the global batch;
         the warm-up + cosine learning rate; ``train.step``;
         the kNN monitor, metrics, the plot, a checkpoint
    4. the final evaluation (kNN, optionally a linear probe)

Rank 0 writes the run directory ``cfg.out``: ``config.toml`` (the exact
config), ``metrics.jsonl`` (one JSON object per step and per epoch),
``curves.png`` (loss, instance accuracy, kNN accuracy per epoch) and the
checkpoints (``refimpl.checkpoint``), and prints the log; every rank computes.
A non-finite loss stops the run, naming the step and the rank-0 batch ids,
and writes nothing over the last good checkpoint.
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
from refimpl.checkpoint import CheckpointError
from refimpl.data.augment import augment_batch
from refimpl.data.datasets import open_dataset
from refimpl.data.sampler import global_batches, local_slice, steps_per_epoch
from refimpl.evaluate.agreement import neighbour_label_agreement
from refimpl.evaluate.features import extract_features
from refimpl.evaluate.knn import weighted_knn_accuracy
from refimpl.method.neighbours import hardest_neighbours
from refimpl.method.prior import contrastive_prior, prior_summary
from refimpl.method.targets import target_entries
from refimpl.models.network import build_model
from refimpl.models.state_dict import load_encoder_file
from refimpl.optim.schedule import warmup_cosine
from refimpl.optim.sgd import SGD
from refimpl.params import is_bn_or_bias
from refimpl.parallel.agreement import (DisagreementError, check_same_config, check_same_dataset,
                                       raise_together)
from refimpl.parallel.classifier import CosineClassifier
from refimpl.parallel.launch import select_gpu
from refimpl.parallel.data_parallel import set_batchnorm_mode
from refimpl.deps import version_line
from refimpl.parallel.signals import FAILED, Interrupted, StopSignals
from refimpl.rundir import RunDirError, RunLock, check_run_dir
from refimpl.train.config import ConfigError, to_toml, validate
from refimpl.train.step import forward_backward, update


class TrainingStopped(RuntimeError):
    """The run cannot go on (a non-finite loss, a disk it cannot write); the message says
    where and why. ``local``: found on this rank only (it says it); ``quiet``: another
    rank's (this one says nothing)."""


class TrainingInterrupted(Interrupted):
    """A stop signal ended the run at a step boundary (every rank together)."""


class PeerFailed(ConfigError):
    """Another rank found a problem and printed it; this rank stops quietly."""


def image_side(cfg, dataset):
    """The network's input side S: the config's, else the dataset's shorter side."""
    return cfg.image_size or min(dataset.image_size)


def has_labels(dataset):
    return dataset is not None and bool(np.all(np.asarray(dataset.labels) >= 0))


class Trainer:
    """One run of the method on this rank (see the module docstring).

    log: a function of one string, called on rank 0 only (default print).
    """

    def __init__(self, cfg, comm, log=None, save_on_interrupt=False, signals=None):
        self.cfg, self.comm = cfg, comm
        self.save_on_interrupt = save_on_interrupt
        # the program's installed StopSignals; without one (a library call) a
        # dormant one, whose phases only name what the run does
        self.signals = signals or StopSignals("refimpl-train", comm)
        self._failure = None     # an OSError of a rank-0 write, said at the next check
        self.lock = None         # the run directory's RunLock (rank 0, during run())
        self.rank0 = comm.rank == 0
        self._log = log or (lambda s: print(s, flush=True))
        validate(cfg, None, comm.size)
        self._check_same_config()
        self._collective(lambda: _check_out(cfg.out))
        if cfg.device == "gpu":
            select_gpu(comm)
        else:
            # each rank its share of the node's cores; BLAS at one thread per rank
            n = cfg.threads or max(1, (os.cpu_count() or 1) // comm.local_size)
            threads.set_num_threads(n, single_blas=comm.local_size > 1)
        with self.signals.phase("opening the datasets"):
            self.train_set, self.test_set = self._collective(self._open_datasets)
        self._check_same_datasets()
        self.N = len(self.train_set)
        validate(cfg, self.N, comm.size)
        self.S = image_side(cfg, self.train_set)
        self.aug = cfg.augment_config()
        self.net = build_model(cfg.arch, cfg.stem, cfg.width, cfg.head_hidden or None, cfg.dim,
                               cfg.dtype, cfg.device, cfg.seed)
        set_batchnorm_mode(self.net, comm, cfg.bn)
        if cfg.init_encoder:  # torchvision-named weights start the encoder (oracle interop)
            self._collective(lambda: load_init_encoder(self.net, cfg.init_encoder))
        self.clf = CosineClassifier(self.N, cfg.dim, comm, cfg.tau, cfg.dtype, cfg.device,
                                    cfg.seed)
        mask = None if cfg.decay_bn_and_bias else self.net.store.decay_mask(is_bn_or_bias)
        self.net_opt = SGD(self.net.store.data, self.net.store.grad, cfg.lr, cfg.momentum,
                           cfg.weight_decay, cfg.nesterov, mask)
        self.clf_opt = SGD(self.clf.weight.ravel(), self.clf.grad.ravel(), cfg.lr, cfg.momentum,
                           cfg.weight_decay, cfg.nesterov)
        self.steps_per_epoch = steps_per_epoch(self.N, cfg.batch_size)
        self.total_steps = cfg.epochs * self.steps_per_epoch
        self.warmup_steps = int(round(cfg.warmup_epochs * self.steps_per_epoch))
        self.out = Path(cfg.out)
        self.state = {"epoch": 0, "step_in_epoch": 0, "step": 0, "prior_done": False}
        self.neighbours = None   # (N, K) table of the current epoch
        self.results = {}        # the evaluation lines of the final summary
        self.tracer = None       # refimpl-train --trace: an oracle.recorder.TraceRecorder

    # ---------------------------------------------------------------- setup
    def _collective(self, fn):
        """fn() on every rank; a ConfigError on any rank is raised on every rank.

        (A dataset missing on one node only must not leave the other ranks
        waiting in the next collective.) The error of the lowest failing rank
        is the one its rank prints (``PeerFailed`` on the others).
        """
        error, result = None, None
        try:
            result = fn()
        except ConfigError as e:
            error = e
        raise_together(self.comm, error, lambda first: PeerFailed(
            f"rank {first} could not start (its message is above)"))
        return result

    def _open_datasets(self):
        train = self._open("train", self.cfg.train)
        return train, (self._open("test", self.cfg.test) if self.cfg.test else None)

    def _open(self, what, spec):
        return open_split(what, spec)

    def _check_same_config(self):
        """Every rank must run the same config (``agreement.check_same_config``)."""
        try:
            check_same_config(self.comm, self.cfg.to_dict())
        except DisagreementError as e:
            raise ConfigError(str(e)) from None

    def _check_same_datasets(self):
        """Every rank must read the same datasets: N and the manifest's sha256."""
        try:
            check_same_dataset(self.comm, f"train {self.cfg.train!r}", self.train_set)
            if self.test_set is not None:
                check_same_dataset(self.comm, f"test {self.cfg.test!r}", self.test_set)
        except DisagreementError as e:
            raise ConfigError(str(e)) from None

    def log(self, text):
        if self.rank0:
            self._log(text)

    def write_metrics(self, record):
        if self.rank0:
            path = self.out / "metrics.jsonl"
            self._write(path, lambda: _append_line(path, json.dumps(record)))

    def _write(self, path, fn):
        """fn(): rank 0 writes ``path`` in the run directory. An OSError (a full disk)
        does not end rank 0 alone, which would leave the others waiting: it is kept
        (naming ``path``), no more is written, and the next ``check_stop`` stops every
        rank together."""
        if self._failure is None:
            try:
                fn()
            except OSError as e:
                self._failure = OSError(e.errno, f"{path}: {e.strerror or e}")

    def write_eval(self, name, knn):
        """One "eval" record: the kNN of a reference point (raw pixels, random init, ...)."""
        if knn and any(knn.values()):
            self.write_metrics({"kind": "eval", "name": name,
                                "knn": {kind: {str(k): a for k, a in acc.items()}
                                        for kind, acc in knn.items()}})

    # ----------------------------------------------------------- evaluation
    def knn(self, label):
        """Weighted kNN of pooled (and head) features, train split -> test split.

        Returns {"pooled": {k: acc}, "head": {k: acc}} (empty without a labeled
        test split); BatchNorm in eval mode (running statistics).
        """
        if not (has_labels(self.test_set) and has_labels(self.train_set)):
            return {}
        cfg = self.cfg
        kw = dict(batch_size=cfg.eval_batch_size, image_size=self.S)
        bank = extract_features(self.net, self.train_set, self.comm, **kw)
        queries = extract_features(self.net, self.test_set, self.comm, **kw)
        ks = [k for k in cfg.knn_k if k <= self.N]
        out = {}
        for kind in ("pooled", "head"):
            out[kind] = weighted_knn_accuracy(
                bank[kind], self.train_set.labels, queries[kind], self.test_set.labels,
                ks=ks, temperature=cfg.knn_temperature)
        line = "  ".join(f"@{k} {100 * a:.1f}%" for k, a in out["pooled"].items())
        head = "  ".join(f"@{k} {100 * a:.1f}%" for k, a in out["head"].items())
        self.log(f"kNN {label}: encoder {line} | head {head}")
        return out

    def raw_pixel_knn(self):
        """Weighted kNN on raw pixels (the eval transform's input, flattened)."""
        if not (has_labels(self.test_set) and has_labels(self.train_set)):
            return {}
        ks = [k for k in self.cfg.knn_k if k <= self.N]

        def pixels(ds):
            return ds.read(np.arange(len(ds))).reshape(len(ds), -1).astype(np.float32)
        acc = weighted_knn_accuracy(pixels(self.train_set), self.train_set.labels,
                                    pixels(self.test_set), self.test_set.labels, ks=ks,
                                    temperature=self.cfg.knn_temperature)
        self.log("kNN raw pixels: " + "  ".join(f"@{k} {100 * a:.1f}%" for k, a in acc.items()))
        return acc

    # ---------------------------------------------------------------- steps
    def lr_at(self, step):
        cfg = self.cfg
        return warmup_cosine(step, cfg.lr, self.total_steps, self.warmup_steps,
                             cfg.warmup_start_factor * cfg.lr, cfg.final_lr)

    def smoothing(self, epoch):
        return self.cfg.alpha > 0 and epoch >= self.cfg.smooth_from_epoch

    def epoch_neighbours(self, epoch):
        """The neighbour table for this epoch (None when neither smoothing nor the
        agreement monitor needs it)."""
        labels = np.asarray(self.train_set.labels)
        want = self.smoothing(epoch) or (self.cfg.agreement and bool(np.any(labels >= 0)))
        return hardest_neighbours(self.clf, self.comm, self.cfg.k) if want else None

    def agreement(self):
        """Neighbour label agreement of this epoch's table (None without one)."""
        if self.neighbours is None:
            return None
        return neighbour_label_agreement(self.neighbours, self.train_set.labels)

    def train_epoch(self, epoch, start_step=0):
        """Steps start_step.. of an epoch; returns the epoch's mean loss and top-1."""
        cfg, comm, P, r = self.cfg, self.comm, self.comm.size, self.comm.rank
        batches = global_batches(self.N, cfg.batch_size, cfg.seed, epoch)
        losses, top1, t0, seen = [], [], time.perf_counter(), 0
        bar = self._progress(epoch, start_step)
        for t in range(start_step, len(batches)):
            batch = batches[t]
            ids = local_slice(batch, r, P)
            x = augment_batch(self.train_set.read(ids), ids, cfg.seed, epoch, self.S, self.aug,
                              cfg.device, self.net.store.dtype)
            targets = (target_entries(batch, self.N, self.neighbours, cfg.alpha)
                       if self.smoothing(epoch) else None)
            step = self.state["step"]
            # the schedule's position: the global step, counted in this run's batches
            # (a batch size changed at an epoch boundary keeps the schedule by epoch)
            lr = self.lr_at(epoch * self.steps_per_epoch + t)
            if self.tracer is not None:  # the first call records the state before the step
                self.tracer.begin(fresh=t == 0)
            try:
                out = forward_backward(self.net, self.clf, x, ids, comm, targets, topk=(1, 5),
                                       step=step)
            except FloatingPointError as e:
                raise TrainingStopped(
                    f"{e} (epoch {epoch + 1}, step {t + 1} of the epoch; rank-0 batch ids "
                    f"{local_slice(batch, 0, P)[:16].tolist()}"
                    f"{' ...' if batch.size // P > 16 else ''}); nothing was written over "
                    f"the last checkpoint, saved at a finite loss "
                    f"({checkpoint.latest_checkpoint(self.out)})"
                ) from None
            if self.tracer is not None:
                self.tracer.record(x, ids, out, lr, targets)
            update(self.net, comm, self.net_opt, self.clf_opt, lr)
            if self.tracer is not None:
                self.tracer.end()
            self.state.update(step=step + 1, step_in_epoch=t + 1)
            self.check_stop()
            losses.append(out.loss)
            top1.append(out.acc[1])
            seen += batch.size
            self.write_metrics({"kind": "step", "epoch": epoch, "step": step, "loss": out.loss,
                                "top1": out.acc[1], "top5": out.acc[5], "lr": lr})
            if bar is not None:
                bar.update(1)
                bar.set_postfix(loss=f"{out.loss:.3f}", lr=f"{lr:.3g}")
            if (step + 1) % cfg.log_every == 0:
                rate = seen / (time.perf_counter() - t0)
                self.log(f"epoch {epoch + 1}/{cfg.epochs} step {t + 1}/{len(batches)} "
                         f"loss {out.loss:.4f} top1 {100 * out.acc[1]:.1f}% lr {lr:.4g} "
                         f"{rate:.0f} img/s")
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
        # disable=None: a bar on a terminal, none in a log file
        return tqdm(total=self.steps_per_epoch, initial=start, desc=f"epoch {epoch + 1}",
                    leave=False, disable=None, file=sys.stderr)

    # ------------------------------------------------------------ signals
    def install_signal_handlers(self):
        """Install this run's StopSignals (``parallel.signals``): a signal stops the
        run at the end of the step inside the step loop (``check_stop``, every rank
        together), and at once in any other phase. refimpl-train installs its own
        at its start instead."""
        self.signals.install()

    def check_stop(self):
        """Has any rank received a stop signal, or failed to write? (one all_reduce MAX)

        Every rank asks at the same step, so all of them stop together: on a
        signal with --save-on-interrupt after writing a checkpoint of this step;
        on a failed write (a full disk) with TrainingStopped, said by that rank.
        """
        signum = self.signals.any_rank(self.comm, failed=self._failure is not None)
        if not signum:
            return
        if signum == FAILED:
            error = None if self._failure is None else TrainingStopped(
                f"cannot write into the run directory: {self._failure}; "
                f"{self._last_checkpoint()}")
            raise_together(self.comm, error, lambda q: TrainingStopped(
                f"rank {q} could not write into the run directory (its message is above)"))
        self.signals.acting = True  # saving first is not itself stopped
        saved = self.save() if self.save_on_interrupt else None
        raise TrainingInterrupted(
            f"{signal.Signals(signum).name} at step {self.state['step']} ("
            + (f"epoch {self.state['epoch'] + 1}" if self.state["step_in_epoch"]
               else f"the end of epoch {self.state['epoch']}") + "); "
            + (f"checkpoint {saved}" if saved else
               f"the last checkpoint is {checkpoint.latest_checkpoint(self.out)}"), signum)

    def _last_checkpoint(self):
        last = checkpoint.latest_checkpoint(self.out)
        return (f"the last checkpoint is {last} (make room, then continue with --resume auto)"
                if last is not None else "there is no checkpoint yet")

    # ------------------------------------------------------------ the run
    def save(self):
        """A checkpoint of this step (``checkpoint.save``); a full disk or a folder in the
        way stops the run (TrainingStopped), the earlier checkpoints untouched."""
        with self.signals.phase("saving a checkpoint"):
            try:
                path = checkpoint.save(self.out, dict(self.state), self.cfg.to_dict(), self.net,
                                       self.clf, self.net_opt, self.clf_opt, self.comm,
                                       self.neighbours, self.cfg.keep, log=self.log)
            except (OSError, CheckpointError) as e:
                stopped = TrainingStopped(f"cannot save the checkpoint of step "
                                          f"{self.state['step']}: {e}; "
                                          f"{self._last_checkpoint()}")
                stopped.local, stopped.quiet = (getattr(e, "local", False),
                                                getattr(e, "quiet", False))
                raise stopped from None
        self.log(f"checkpoint {path}")
        return path

    def resume(self, path):
        """Load the checkpoint at ``path`` on every rank (``start`` chose and checked it)."""
        meta = checkpoint.read_meta(path)
        state, neighbours = checkpoint.load(path, self.cfg.to_dict(), self.net, self.clf,
                                            self.net_opt, self.clf_opt, self.comm)
        self.state.update(state)
        self.neighbours = neighbours
        if self.rank0:  # the metrics of steps after the checkpoint are redone
            metrics = self.out / "metrics.jsonl"
            self._write(metrics, lambda: _truncate_metrics(metrics, self.state))
        saved_on = meta["world_size"]
        self.log(f"resumed from {path}: epoch {self.state['epoch'] + 1}, step "
                 f"{self.state['step']} (saved on {saved_on} rank(s), now {self.comm.size})")
        saved_b = meta["config"].get("batch_size")
        if saved_b != self.cfg.batch_size:  # at an epoch boundary (start refuses the rest)
            self.log(f"batch_size {saved_b} -> {self.cfg.batch_size} at the start of epoch "
                     f"{self.state['epoch'] + 1}: {self.steps_per_epoch} steps per epoch; the "
                     f"learning-rate schedule continues at its step "
                     f"{self.state['epoch'] * self.steps_per_epoch} of {self.total_steps}")

    def start(self, resume):
        """Take the run directory and choose where the run starts; returns the checkpoint
        resumed from, or None for a fresh start.

        Rank 0, before anything is written: the lock (``rundir.RunLock``: one run
        per directory, released at the end of ``run``); what an interrupted save
        left is removed; a fresh start into a directory with any ``ckpt-*`` is
        refused; ``resume`` ("auto", a run directory or a checkpoint) is resolved
        (``checkpoint.resume_point``: a checkpoint that does not verify is named,
        never passed over), a batch size changed in the middle of an epoch is
        refused, and no ``ckpt-*`` this run could save over may fail to verify
        (``checkpoint.check_overwritable``). Every rank then loads the checkpoint
        rank 0 chose; rank 0 writes config.toml.
        """
        error, chosen = None, None
        if self.rank0:
            try:
                chosen = self._prepare_out(resume)
            except (OSError, ConfigError, CheckpointError, RunDirError) as e:
                error = e if isinstance(e, ConfigError) else ConfigError(str(e))
        raise_together(self.comm, error, lambda q: PeerFailed(
            f"rank {q} could not start (its message is above)"))
        chosen = _bcast_text(self.comm, "" if chosen is None else str(chosen)) or None
        if chosen is not None:
            self.resume(Path(chosen))
        elif self.rank0:  # a fresh run's metrics start empty
            path = self.out / "metrics.jsonl"
            self._write(path, lambda: path.unlink(missing_ok=True))
        if self.rank0:
            path = self.out / "config.toml"
            self._write(path, lambda: path.write_text(f"# made with {version_line()}\n"
                                                          + to_toml(self.cfg)))
        self.check_stop()  # a failed write: every rank stops here
        return None if chosen is None else Path(chosen)

    def _prepare_out(self, resume):
        """Rank 0's part of ``start``: returns the checkpoint to resume from, or None."""
        out, cfg = self.out, self.cfg
        created = not out.exists()
        out.mkdir(parents=True, exist_ok=True)
        try:
            self.lock = RunLock(out).acquire()
        except RunDirError:
            if created:
                out.rmdir()
            raise
        if self.lock.stale:
            self._log(f"took over {self.lock.path}: its run ({self.lock.stale}) ended without "
                      f"releasing it")
        for name in checkpoint.clean_stale(out):
            self._log(f"removed {name}, left by an interrupted save")
        if resume is None:
            entries = checkpoint.checkpoint_entries(out)
            found = checkpoint.latest_checkpoint(out)
            if found is not None:
                raise ConfigError(f"{out} already holds checkpoints (latest: {found.name}): "
                                  f"continue that run with --resume auto, or give another "
                                  f"out= (a fresh start would overwrite them)")
            if entries:
                raise ConfigError(f"{out} already holds checkpoint folders that do not verify "
                                  f"({', '.join(p.name for p in entries[-3:])}): a fresh start "
                                  f"would overwrite them; move them away, or give another out=")
            return None
        chosen = checkpoint.resume_point(out) if resume == "auto" else checkpoint.resolve(resume)
        if chosen is None:  # --resume auto in a run directory without checkpoints
            return None
        meta = checkpoint.read_meta(chosen)
        state, saved_b = meta["state"], meta["config"].get("batch_size")
        if saved_b != cfg.batch_size and state["step_in_epoch"]:
            raise ConfigError(
                f"{chosen} was saved in the middle of epoch {state['epoch'] + 1} (after step "
                f"{state['step_in_epoch']} of it) with batch_size {saved_b}: resuming with "
                f"batch_size {cfg.batch_size} would count the epoch's position in other batches; "
                f"resume with batch_size={saved_b}, or from a checkpoint at the end of an epoch")
        checkpoint.check_overwritable(out, state["step"])
        return chosen

    def release(self):
        """Give up the run directory's lock (rank 0; a no-op when not held)."""
        if self.lock is not None:
            self.lock.release()
            self.lock = None

    def run(self, resume=None):
        """The whole run (module docstring); returns the final results dict.

        resume: None (a fresh start), "auto" (the run directory's checkpoint, if
        any), or a checkpoint or run directory to continue from (``start``).
        The run directory's lock is held until it returns or raises.
        """
        try:
            return self._run(resume)
        finally:
            self.release()

    def _run(self, resume):
        cfg, phase = self.cfg, self.signals.phase
        self.signals.where = "the start of the run"  # what a signal between phases names
        if self.start(resume) is None:
            self.log(f"{self.N} instances, {self.steps_per_epoch} steps of B = "
                     f"{cfg.batch_size} per epoch on {self.comm.size} rank(s); "
                     f"image {self.S}x{self.S}; {cfg.arch} width {cfg.width}, D = {cfg.dim}")
            self.log(method_line(cfg))
            with phase("the kNN monitor"):
                self.results["raw_pixels"] = self.raw_pixel_knn()
                self.results["random_init"] = self.knn("random init (BN running statistics at "
                                                       "their initial values: mean 0, var 1)")
            self.write_eval("raw_pixels", {"pooled": self.results["raw_pixels"]})
            self.write_eval("random_init", self.results["random_init"])
            if cfg.prior != "none":
                with phase("the contrastive prior"):
                    report = contrastive_prior(self.net, self.clf, self.train_set, self.comm,
                                               cfg.batch_size, seed=cfg.seed, image_size=self.S,
                                               transform=cfg.prior_transform,
                                               augment_config=self.aug, rows=cfg.prior,
                                               features=cfg.prior_features,
                                               bn_statistics=cfg.prior_bn,
                                               scale=cfg.prior_scale, mix=cfg.prior_mix)
                self.log(prior_summary(report))
                self.write_metrics({"kind": "prior", "mean_cosine": report["mean_cosine"],
                                    "seconds": report["seconds"]})
                bn = ("of the prior pass" if cfg.prior_bn == "pass" else
                      "put back to their initial values")
                with phase("the kNN monitor"):
                    self.results["after_prior"] = self.knn(f"after the prior (BN running "
                                                           f"statistics {bn})")
                self.write_eval("after_prior", self.results["after_prior"])
            self.state["prior_done"] = cfg.prior != "none"
        for epoch in range(self.state["epoch"], cfg.epochs):
            self.signals.where = f"epoch {epoch + 1}"
            start = self.state["step_in_epoch"]
            if start == 0 or self.neighbours is None:
                with phase("the neighbour search"):
                    self.neighbours = self.epoch_neighbours(epoch)
            agreement = self.agreement()
            with phase(f"the steps of epoch {epoch + 1}", cooperative=True):
                loss, top1, seconds, seen = self.train_epoch(epoch, start)
            self.state.update(epoch=epoch + 1, step_in_epoch=0)
            last = epoch + 1 == cfg.epochs
            knn = {}
            if last or (cfg.eval_every and (epoch + 1) % cfg.eval_every == 0):
                with phase("the kNN monitor"):
                    knn = self.knn(f"after epoch {epoch + 1}")
            record = {"kind": "epoch", "epoch": epoch, "step": self.state["step"], "loss": loss,
                      "top1": top1, "agreement": agreement, "seconds": seconds,
                      "img_per_s": seen / seconds if seconds else None,
                      "knn": {kind: {str(k): a for k, a in acc.items()}
                              for kind, acc in knn.items()}}
            # the epoch's records and plot: short next to the steps but, with few steps
            # per epoch, where a signal often lands; it is acted on at their end, like
            # one in the steps (after a checkpoint with --save-on-interrupt)
            with phase(f"the end of epoch {epoch + 1}", cooperative=True):
                self.write_metrics(record)
                agree = ("" if agreement is None
                         else f", neighbour label agreement {100 * agreement:.1f}%")
                self.log(f"epoch {epoch + 1}/{cfg.epochs}: loss {loss:.4f}, instance top-1 "
                         f"{100 * top1:.1f}%{agree}, {seconds:.1f} s "
                         f"({seen / seconds:.0f} img/s)")
                if self.rank0:
                    png = self.out / "curves.png"
                    self._write(png, lambda: plot_curves(self.out / "metrics.jsonl", png))
                self.check_stop()  # a write that failed this epoch stops every rank here
            if last or (cfg.save_every and (epoch + 1) % cfg.save_every == 0):
                self.save()
            if knn:
                self.results["trained"] = knn
        self.signals.where = "the end of the run"
        if cfg.linear_probe:
            with phase("the linear probe"):
                self.results["linear_probe"] = self.linear_probe()
        return self.results

    def linear_probe(self):
        from refimpl.evaluate.linear_probe import linear_probe_accuracy
        if not (has_labels(self.test_set) and has_labels(self.train_set)):
            return None
        kw = dict(batch_size=self.cfg.eval_batch_size, image_size=self.S, which=("pooled",))
        bank = extract_features(self.net, self.train_set, self.comm, **kw)["pooled"]
        queries = extract_features(self.net, self.test_set, self.comm, **kw)["pooled"]
        acc = linear_probe_accuracy(bank, self.train_set.labels, queries, self.test_set.labels)
        self.log(f"linear probe (frozen pooled encoder features): {100 * acc:.1f}%")
        return acc


def method_line(cfg):
    """One line: the method's settings of this run (prior, smoothing), then cfg.why."""
    if cfg.prior == "none":
        prior = "no contrastive prior"
    else:
        extra = [f"{cfg.prior_features} features", f"{cfg.prior_bn} BN statistics",
                 f"{cfg.prior_transform} transform"]
        if cfg.prior_scale != 1:
            extra.append(f"rows of norm {cfg.prior_scale:g}")
        if cfg.prior_mix != 1:
            extra.append(f"mixed {cfg.prior_mix:g} with the random rows")
        prior = f"prior = {cfg.prior} ({', '.join(extra)})"
    smooth = (f"alpha {cfg.alpha:g} over the K = {cfg.k} hardest classes from epoch "
              f"{cfg.smooth_from_epoch + 1}" if cfg.alpha > 0 else "no label smoothing")
    return f"method: {prior}; {smooth}" + (f". Why: {cfg.why}" if cfg.why else "")


def load_init_encoder(net, path):
    """Config.init_encoder: a torchvision-named .pt/.npz file starts the encoder.

    (``models.state_dict.load_encoder_file``: fc.*, head.* and classifier.* keys
    are ignored, every encoder key must fit.) A bad file is a ConfigError.
    """
    try:
        load_encoder_file(net, path)
    except (ValueError, OSError) as e:  # StateDictError is a ValueError
        raise ConfigError(f"init_encoder: {e}") from None


def _append_line(path, line):
    with open(path, "a") as f:
        f.write(line + "\n")


def _truncate_metrics(path, state):
    """Keep the records of metrics.jsonl that a checkpoint of ``state`` holds (and drop
    a line a crash cut short); the rest is redone."""
    if not path.exists():
        return
    keep = []
    for line in path.read_text(errors="replace").splitlines():
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(record, dict) and _before(record, state):
            keep.append(line)
    path.write_text("".join(line + "\n" for line in keep))


def _bcast_text(comm, text):
    """Rank 0's ``text`` on every rank (its length, then its UTF-8 bytes)."""
    data = np.frombuffer(text.encode(), dtype=np.uint8) if comm.rank == 0 else None
    size = comm.bcast(np.array([0 if data is None else data.size], dtype=np.int64))
    buf = data.copy() if comm.rank == 0 else np.empty(int(size[0]), dtype=np.uint8)
    return comm.bcast(buf).tobytes().decode() if buf.size else ""


def open_split(what, spec):
    """Open a dataset for ``what`` ("train", "test"); a ConfigError (one line) when it
    cannot be opened or is empty. The trainer and the dry run open datasets here."""
    try:
        ds = open_dataset(spec)
    except (OSError, ValueError, TypeError) as e:
        raise ConfigError(f"{what}: cannot open {spec!r}: {e}") from None
    if len(ds) == 0:
        raise ConfigError(f"{what}: the dataset {spec!r} is empty")
    return ds


def _check_out(out):
    """Config.out must name a folder this process can write (``rundir.check_run_dir``)."""
    try:
        check_run_dir(out)
    except RunDirError as e:
        raise ConfigError(str(e)) from None


def _before(record, state):
    """Does a metrics record belong to the part of the run a checkpoint holds?"""
    if record.get("kind") == "step":
        return record["step"] < state["step"]
    return record.get("epoch", -1) < state["epoch"]


def plot_curves(metrics_path, png_path):
    """curves.png from metrics.jsonl: loss, instance top-1, kNN accuracy per epoch."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    records = [json.loads(line) for line in Path(metrics_path).read_text().splitlines()]
    epochs = [e for e in records if e.get("kind") == "epoch"]
    if not epochs:
        return
    x = [e["epoch"] + 1 for e in epochs]
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.6))
    axes[0].plot(x, [e["loss"] for e in epochs], marker="o", ms=3)
    axes[0].set_title("loss (mean over the epoch)")
    axes[1].plot(x, [100 * e["top1"] for e in epochs], marker="o", ms=3, label="instance top-1")
    if any(e.get("agreement") is not None for e in epochs):
        axes[1].plot(x, [100 * e["agreement"] if e.get("agreement") is not None else np.nan
                         for e in epochs], marker="s", ms=3, label="neighbour label agreement")
    axes[1].set_title("instance accuracy, agreement (%)")
    axes[1].legend(fontsize=8)
    for kind, style in (("pooled", "-"), ("head", "--")):
        ks = sorted({k for e in epochs for k in e.get("knn", {}).get(kind, {})}, key=int)
        for k in ks:
            pts = [(e["epoch"] + 1, 100 * e["knn"][kind][k]) for e in epochs
                   if k in e.get("knn", {}).get(kind, {})]
            axes[2].plot(*zip(*pts), style, marker="o", ms=3,
                         label=f"{'encoder' if kind == 'pooled' else 'head'} k={k}")
    # the reference points, as horizontal lines: raw pixels, random init, after the prior
    evals = {e["name"]: e["knn"] for e in records if e.get("kind") == "eval"}
    for name, color in (("raw_pixels", "gray"), ("random_init", "tab:red"),
                        ("after_prior", "tab:purple")):
        acc = evals.get(name, {}).get("pooled", {})
        k = min(acc, key=int) if acc else None
        if k is not None:
            axes[2].axhline(100 * acc[k], color=color, ls=":", lw=1.2,
                            label=f"{name.replace('_', ' ')} k={k}")
    axes[2].set_title("kNN accuracy on the test split (%)")
    if axes[2].lines:
        axes[2].legend(fontsize=8)
    for ax in axes:
        ax.set_xlabel("epoch")
        ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(png_path, dpi=100)
    plt.close(fig)

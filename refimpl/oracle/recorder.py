"""The recorder: a refimpl run's steps written as an oracle trace (``oracle/trace.py``).

Contract. ``TraceRecorder`` records the steps of a refimpl run on any number
of ranks, in the format ``trace.py`` defines: every rank calls ``begin``
(before ``train.step.forward_backward``), ``record`` (between it and
``update``) and ``end`` (after ``update``); rank 0 writes the files (every
rank its rows of the classifier files). The hyper-parameters are read from
the objects the run uses (network, classifier, optimizers, communicator),
plus the few they cannot tell. ``TraceRecorder.for_trainer`` records
``refimpl-train --trace``: the first steps of a ``train.loop.Trainer``'s run.
``replay`` records refimpl's side of a replay with it too.
"""
from pathlib import Path

import numpy as np

from refimpl import __version__
from refimpl.backend import get_array_module, to_numpy
from refimpl.fileio import write_shard_rows
from refimpl.layers.normalize import l2_normalize_forward
from refimpl.oracle.trace import (CLASSIFIER, CLASSIFIER_MOMENTUM, CLF, FULL_LIMIT, INIT,
                                  TraceError, canonical_order, check_hparams, check_one_dtype,
                                  save_npz, shard_checksums, step_file, write_meta)
from refimpl.params import is_bn_or_bias
from refimpl.parallel.sharding import shard_range


def decay_mask_rule(net, net_opt):
    """'all' or 'no_bn_bias': which parameters net_opt decays (TraceError otherwise)."""
    if net_opt.decay is None or net_opt.weight_decay == 0:
        return "all"
    decayed = to_numpy(net_opt.decay) != 0
    if np.array_equal(decayed, to_numpy(net.store.decay_mask(is_bn_or_bias)) != 0):
        return "no_bn_bias"
    if decayed.all():
        return "all"
    raise TraceError("the network's optimizer decays a set of parameters that is neither "
                     "'all' nor 'no_bn_bias' (1-D parameters excluded): the trace cannot "
                     "name it")


class TraceRecorder:
    """Record steps of a refimpl run into a trace directory, on any number of ranks.

    Arguments: path (created by rank 0), net, clf, net_opt, clf_opt, comm as
    the run uses them; hparams: what the objects cannot tell, {"alpha", "K",
    "batch_size", "seed", "neighbours"} (the rest is read from the objects,
    and a given value that contradicts them is an error); steps: how many
    steps to record; classifier: "auto" | "full" | "rows"; checksum_shards:
    S for the classifier checksums (default P); producer: a free text.

    Every rank calls, for each step:

        rec.begin(fresh)      before forward_backward; fresh: the neighbour table
                              in use was just computed from the current W (the
                              first recorded step writes the initial state)
        rec.record(x, ids, out, lr, targets)   after forward_backward
        rec.end()             after update: rank 0 writes the step file

    and nothing happens once ``done``.
    """

    def __init__(self, path, net, clf, net_opt, clf_opt, comm, hparams=None, steps=1,
                 classifier="auto", checksum_shards=None, producer=None):
        self.path, self.net, self.clf, self.comm = Path(path), net, clf, comm
        self.net_opt, self.clf_opt = net_opt, clf_opt
        self.total = int(steps)
        if self.total < 1:
            raise TraceError(f"trace steps must be >= 1, got {steps}")
        dtype = np.dtype(net.store.dtype)
        check_one_dtype({"classifier.weight": clf.weight, "network parameters": net.store.data,
                         **({"network momentum": net_opt.momentum_buffer}
                            if net_opt.momentum_buffer is not None else {}),
                         **({"classifier momentum": clf_opt.momentum_buffer}
                            if clf_opt.momentum_buffer is not None else {})},
                        dtype, "TraceRecorder")
        for key in ("momentum", "weight_decay", "nesterov"):
            if getattr(net_opt, key) != getattr(clf_opt, key):
                raise TraceError(f"TraceRecorder: the network's and the classifier's "
                                 f"optimizers differ in {key} ({getattr(net_opt, key)} vs "
                                 f"{getattr(clf_opt, key)}): a trace has one SGD")
        if clf_opt.decay is not None and not np.all(to_numpy(clf_opt.decay) != 0):
            raise TraceError("TraceRecorder: the classifier's weight decay is masked; the "
                             "format decays the classifier whenever weight_decay > 0")
        enc = net.encoder
        derived = {"N": clf.num_classes, "D": clf.dim, "tau": float(clf.tau),
                   "momentum": float(net_opt.momentum),
                   "weight_decay": float(net_opt.weight_decay),
                   "weight_decay_mask": decay_mask_rule(net, net_opt),
                   "nesterov": bool(net_opt.nesterov),
                   "bn": "local" if net.bn.allreduce is None else "sync",
                   "bn_momentum": 0.1, "bn_eps": 1e-5, "dtype": dtype.name,
                   "arch": enc.arch, "stem": enc.stem, "width": enc.width,
                   "head_hidden": net.store.shapes["head.0.weight"][0], "dim": net.dim}
        hp = dict(hparams or {})
        # local BN: the world size is what the statistics were taken over (ranks
        # times groups); sync BN gives the same numbers on any P: any is accepted
        world = comm.size * net.bn.groups
        if derived["bn"] == "local" or hp.get("world_size") is None:
            derived["world_size"] = world
        for key, value in derived.items():
            if key in hp and hp[key] is not None and hp[key] != value:
                raise TraceError(f"TraceRecorder: hparams[{key!r}] = {hp[key]!r} contradicts "
                                 f"the run ({value!r})")
            hp[key] = value
        hp.setdefault("alpha", 0.0)
        if hp["alpha"] > 0:
            hp.setdefault("neighbours", "initial_weight")
        self.hparams = hp
        self.mode = classifier
        if classifier == "auto":
            self.mode = "full" if clf.num_classes * clf.dim <= FULL_LIMIT else "rows"
        if self.mode not in ("full", "rows"):
            raise TraceError(f"classifier must be 'auto', 'full' or 'rows', got {classifier!r}")
        self.shards = int(checksum_shards or hp["world_size"])
        self.producer = producer or f"refimpl {__version__}"
        self.entries, self.count, self.started = [], 0, False
        self.current = None

    @property
    def done(self):
        return self.count >= self.total

    def _index(self, ids):
        """Host row indices as an index array of the classifier's device."""
        return get_array_module(self.clf.weight).asarray(ids)

    def _counts(self):
        P, N = self.comm.size, self.clf.num_classes
        return [shard_range(N, P, r)[1] - shard_range(N, P, r)[0] for r in range(P)]

    def _gather_rows(self, a):
        """This rank's classifier rows -> the full (N, D) array (every rank)."""
        return to_numpy(self.comm.all_gather_v(a, self._counts()))

    def _write_classifier_file(self, name, rows):
        """Every rank writes its rows of an (N, D) .npy (rank 0 creates it)."""
        clf = self.clf
        write_shard_rows(self.path / name, rows, clf.lo, (clf.num_classes, clf.dim),
                         np.dtype(clf.weight.dtype), self.comm)
        self.comm.barrier()

    def _write_init(self):
        net, clf, comm = self.net, self.clf, self.comm
        if comm.rank == 0:
            self.path.mkdir(parents=True, exist_ok=True)
            for old in self.path.glob("step_*.npz"):  # a trace is rewritten whole
                old.unlink()
            if (self.path / CLASSIFIER_MOMENTUM).exists():
                (self.path / CLASSIFIER_MOMENTUM).unlink()
        comm.barrier()
        arrays = net.store.state_dict()
        v = self.net_opt.momentum_buffer
        if v is not None and np.any(to_numpy(v) != 0):
            arrays.update(net.store.flat_dict(v, "momentum/"))
        if comm.rank == 0:
            save_npz(self.path / INIT, arrays)
        self._write_classifier_file(CLASSIFIER, clf.weight)
        m = self.clf_opt.momentum_buffer
        flag = np.array([0.0 if m is None else float(np.any(to_numpy(m) != 0))])
        if to_numpy(comm.all_reduce(flag, "max"))[0]:
            self._write_classifier_file(CLASSIFIER_MOMENTUM, m.reshape(clf.weight.shape))

    def begin(self, fresh=None):
        """Before a step's forward_backward: the first call writes the initial state.

        fresh: None (nothing known: hparams["neighbours"] stands), or whether
        the neighbour table in use was computed from the classifier weight as
        it is now. The rule "initial_weight" holds only if the first recorded
        step's table is fresh and no later one is (a new epoch's table comes
        from a later W); otherwise the trace says "given".
        """
        if self.done:
            return
        first = not self.started
        if first:
            self._write_init()
            self.started = True
        if fresh is not None and fresh != first and \
                self.hparams.get("neighbours") == "initial_weight":
            self.hparams["neighbours"] = "given"

    def record(self, x, ids, out, lr, targets=None):
        """Between forward_backward and update: the inputs, forward and gradients.

        x (b, C, H, W), ids (b,): this rank's batch; out: forward_backward's
        StepOutputs; lr: the learning rate the update will use; targets: the
        sparse targets given to forward_backward (None: one-hot).
        """
        if self.done:
            return
        comm, clf, net = self.comm, self.clf, self.net
        t = {"lr": np.array(float(lr), dtype=np.float64),
             "input": to_numpy(comm.all_gather(x)),
             "ids": to_numpy(comm.all_gather(np.asarray(ids, dtype=np.int64)))}
        B = t["ids"].shape[0]
        if self.hparams.setdefault("batch_size", B) != B:
            raise TraceError(f"TraceRecorder: hparams['batch_size'] = "
                             f"{self.hparams['batch_size']} but the step's global batch has "
                             f"{B} rows")
        target_ids = t["ids"][:, None]
        if targets is not None and np.shape(targets[0])[1] > 1:
            target_ids = np.asarray(targets[0], dtype=np.int64)
            alpha = 1.0 - float(np.asarray(targets[1])[0, 0])
            if abs(alpha - self.hparams["alpha"]) > 1e-12:
                raise TraceError(f"TraceRecorder: the targets smooth with alpha = {alpha}, "
                                 f"hparams say {self.hparams['alpha']}")
            self.hparams.setdefault("K", target_ids.shape[1] - 1)
            t["neighbours"] = target_ids[:, 1:].copy()
        z = to_numpy(comm.all_gather(out.z))
        t["z"] = z
        t["z_hat"] = to_numpy(l2_normalize_forward(z)[0])
        t["row_max"] = to_numpy(out.row_max)
        t["logsumexp"] = to_numpy(out.logsumexp)
        t["loss"] = np.array(out.loss, dtype=z.dtype)
        if self.mode == "full":
            t["grad/" + CLF] = self._gather_rows(clf.grad)
        else:
            rows = np.unique(target_ids)
            self.rows = rows
            mine = rows[(rows >= clf.lo) & (rows < clf.hi)] - clf.lo
            t["classifier.rows"] = rows
            t[f"grad/{CLF}@rows"] = to_numpy(comm.all_gather_v(clf.grad[self._index(mine)]))
            t[f"checksum/grad/{CLF}"] = shard_checksums(clf.grad, clf.lo, clf.num_classes,
                                                        self.shards, comm)
        t["dz"] = to_numpy(comm.all_gather(out.dz))
        for n in net.store.param_names():
            t["grad/" + n] = to_numpy(net.store.grads[n]).copy()
        self.current = t

    def end(self):
        """After update: the updated state; rank 0 writes the step file and meta.json."""
        if self.done:
            return
        if self.current is None:
            raise TraceError("TraceRecorder.end() before record(): call begin, record, end "
                             "around each step")
        t, net, clf, comm = self.current, self.net, self.clf, self.comm
        t.update(net.store.state_dict())  # updated parameters and BN buffers
        v = self.net_opt.momentum_buffer
        if v is not None:
            t.update(net.store.flat_dict(v, "momentum/"))
        arrays = [(CLF, clf.weight)]
        m = self.clf_opt.momentum_buffer
        if m is not None:
            arrays.append(("momentum/" + CLF, m.reshape(clf.weight.shape)))
        for name, a in arrays:
            if self.mode == "full":
                t[name] = self._gather_rows(a)
            else:
                mine = self.rows[(self.rows >= clf.lo) & (self.rows < clf.hi)] - clf.lo
                t[name + "@rows"] = to_numpy(comm.all_gather_v(a[self._index(mine)]))
                t["checksum/" + name] = shard_checksums(a, clf.lo, clf.num_classes,
                                                        self.shards, comm)
        params, buffers = net.store.param_names(), net.store.buffer_names()
        self.entries.append({"file": step_file(self.count), "step": self.count,
                             "lr": float(t["lr"])})
        if comm.rank == 0:
            ordered = {n: t[n] for n in canonical_order(t, params, buffers)}
            save_npz(self.path / step_file(self.count), ordered)
            write_meta(self.path, check_hparams(dict(self.hparams)), self.entries,
                       self.mode, self.producer)
        comm.barrier()
        self.count += 1
        self.current = None

    @classmethod
    def for_trainer(cls, trainer, path, steps):
        """A recorder of the first ``steps`` steps of ``train.loop.Trainer``'s run."""
        cfg = trainer.cfg
        hp = {"alpha": float(cfg.alpha), "batch_size": cfg.batch_size, "seed": cfg.seed}
        if cfg.alpha > 0:
            hp.update(K=cfg.k, neighbours="initial_weight")
        return cls(path, trainer.net, trainer.clf, trainer.net_opt, trainer.clf_opt,
                   trainer.comm, hp, steps,
                   producer=f"refimpl {__version__} (refimpl-train)")

"""Write a trace from PyTorch: hooks on your nn.Module and your torch.optim.SGD.

Contract. ``TraceWriter`` records the steps of a PyTorch implementation of
the method in one process in refimpl's trace format (``oracle/trace.py``),
so that ``refimpl-oracle replay DIR`` runs the same steps in refimpl and
compares every tensor; ``DistributedTraceWriter`` does the same from every
rank of a torch.distributed job (gloo or NCCL): a DDP-wrapped encoder, a
classifier whose rows are sharded over the ranks, the ranks' parts gathered
into one trace by rank 0. Import this module only where PyTorch is
installed (it imports torch; ``refimpl.oracle`` never imports it).

    writer = TraceWriter("my_trace", model, optimizer, classifier=W,
                         hparams={"tau": 0.15, "alpha": 0.2, "K": 3, "world_size": 1,
                                  "bn": "local", "neighbours": "initial_weight"})
    for step in range(3):
        writer.begin_step(ids, neighbours=rows)   # the first call records the initial state
        z = model(x)                              # hooked: its input and output
        loss = my_loss(z, W, ids, rows)
        writer.log(loss=loss, z_hat=z_hat, row_max=row_max, logsumexp=lse)  # what you have
        loss.backward()                           # hooked: dz, the gradient of model's output
        optimizer.step()                          # hooked: gradients and lr before it; the
                                                  # parameters, momenta, BN buffers after it
    writer.close()                                # removes the hooks

    # every rank of a torch.distributed job, W_r = this rank's rows [lo, hi) of W:
    writer = DistributedTraceWriter("my_trace", ddp_model, optimizer, W_r, (lo, hi),
                                    {"tau": 0.15, "alpha": 0.2, "K": 3, "bn": "local",
                                     "neighbours": "initial_weight"},
                                    gradients="averaged")    # DDP's convention, see below
    ...                                           # the same calls, each rank with its own
                                                  # batch: begin_step(local ids, local rows)

What the writers read from your objects (so that the trace cannot contradict them):

    model       its state dict, under torchvision names plus head.0 / head.1 /
                head.3 (arch, stem, width, head_hidden, dim are read from the
                shapes; DDP's ``module.`` is unwrapped); every BatchNorm's
                momentum and eps (one value each)
    optimizer   torch.optim.SGD: momentum, weight_decay, nesterov, one lr;
                dampening 0; the weight-decay mask from the param groups when
                the writer is made: all parameters in groups of one
                weight_decay -> "all"; the 1-D ones (BatchNorm, biases) in a
                group of weight_decay 0 -> "no_bn_bias"
    classifier  the (N, D) nn.Parameter W (distributed: this rank's rows), in
                the optimizer like the rest
    hparams     what it cannot read: tau, alpha, world_size (single process:
                the P it emulates), bn ("local" or "sync": whether your
                BatchNorm's statistics are per rank is not visible in a
                module); K and neighbours ("initial_weight" if your table
                was computed from W at the first step, else "given") when
                alpha > 0; seed (optional)

One dtype: every parameter, buffer and W must share it (mixed dtypes are
refused). One global batch: if the model is called several times within a
step (one call per rank's local batch, a single-process emulation of P
ranks with per-rank BatchNorm), the inputs, outputs and their gradients are
concatenated in call order, which must be rank order; the distributed writer
then concatenates the ranks' in rank order. The gradients are read from
``.grad`` when ``optimizer.step()`` starts (after DDP's all-reduce, before
weight decay).

The gradient scale (docs/oracle.md, Gradient scale). A trace holds dz of the
GLOBAL-mean loss (refimpl's). ``gradients`` says what yours is:

    "averaged"  DDP: the network's gradients are averaged over the P ranks, so
                for them to be those of the global-mean loss each rank's dz is
                P x refimpl's (a per-rank mean loss; Partial FC's all-gather
                backward multiplies by P). The writer records dz / P.
    "summed"    refimpl's: dz is of the global-mean loss and the gradients are
                summed over the ranks. dz is recorded as it is.

Per rank, from every rank: the model's inputs, outputs (z) and their
gradients (dz); ``begin_step``'s ids and neighbour rows; ``log``'s z_hat,
row_max, logsumexp when they hold this rank's b rows (a tensor of the
global batch's B rows, as a model-parallel classifier has them, is taken
from rank 0); the loss, the mean of the ranks' (a per-rank mean or the
global mean alike); the classifier's rows, their gradients and momenta.
From rank 0: lr, the parameters, their gradients and momenta, the
BatchNorm buffers (rank 0's, as DDP's broadcast_buffers makes them
everyone's).
"""
from pathlib import Path

import numpy as np
import torch

from refimpl import __version__
from refimpl.fileio import write_shard_rows
from refimpl.oracle.trace import (CLASSIFIER, CLASSIFIER_MOMENTUM, CLF, FULL_LIMIT, INIT,
                                  TraceError, architecture_of, canonical_order, check_hparams,
                                  check_one_dtype, save_npz, shard_checksums, step_file,
                                  write_meta)

LOGGED = ("loss", "z_hat", "row_max", "logsumexp")
GRADIENTS = ("averaged", "summed")


def _np(t):
    """A NumPy copy of a tensor (detached, on the host)."""
    return t.detach().cpu().numpy().copy()


def unwrap(model):
    """The module inside DistributedDataParallel / DataParallel (names without ``module.``)."""
    wrappers = (torch.nn.parallel.DistributedDataParallel, torch.nn.DataParallel)
    return model.module if isinstance(model, wrappers) else model


class _OneProcess:
    """The collectives of the single-process writer: every rank's part is this one."""
    rank, size = 0, 1

    def all(self, obj):
        return [obj]

    gather = all

    def all_gather(self, array):  # what fileio.write_shard_rows needs of a communicator
        return array

    def barrier(self):
        pass


class TraceWriter:
    """Record a PyTorch model + classifier + SGD, step by step, into a trace directory.

    Arguments: path (created), model (nn.Module: encoder + head), optimizer
    (torch.optim.SGD over the model's parameters and the classifier),
    classifier (the (N, D) nn.Parameter), hparams (module docstring), steps
    (record this many, then stop; None: every step until ``close``),
    classifier_mode ("auto", "full" or "rows", as ``oracle.trace``).
    """

    def __init__(self, path, model, optimizer, classifier, hparams, steps=None,
                 classifier_mode="auto"):
        self._setup(path, model, optimizer, classifier, hparams, steps, classifier_mode,
                    _OneProcess(), (0, classifier.shape[0]), 1.0)

    def _setup(self, path, model, optimizer, classifier, hparams, steps, classifier_mode,
               comm, rows, dz_scale):
        self.path, self.opt, self.W, self.comm = Path(path), optimizer, classifier, comm
        self.model = unwrap(model)
        self.total, self.dz_scale = steps, dz_scale
        self.lo, self.hi = int(rows[0]), int(rows[1])
        if classifier.dim() != 2 or classifier.shape[0] != self.hi - self.lo:
            raise TraceError(f"classifier must be the ({self.hi - self.lo}, D) weight of rows "
                             f"[{self.lo}, {self.hi}), got shape {tuple(classifier.shape)}")
        if any(p is classifier for p in self.model.parameters()):
            raise TraceError("the classifier must not be a parameter of the model: pass the "
                             "encoder + head as model and W separately")
        self.names = [n for n, p in self.model.named_parameters()]
        self.params = dict(self.model.named_parameters())
        state = self.model.state_dict()
        self.buffers = [n for n in state if n not in self.params]
        self.num_classes = self._num_classes()
        self.hparams = self._hparams(dict(hparams), state)
        N, D = self.num_classes, classifier.shape[1]
        self.mode = classifier_mode
        if self.mode == "auto":
            self.mode = "full" if N * D <= FULL_LIMIT else "rows"
        if self.mode not in ("full", "rows"):
            raise TraceError(f"classifier_mode must be 'auto', 'full' or 'rows', got "
                             f"{classifier_mode!r}")
        self.count, self.entries, self.started, self.armed = 0, [], False, False
        self._reset()
        self.handles = [self.model.register_forward_pre_hook(self._on_input),
                        self.model.register_forward_hook(self._on_output),
                        optimizer.register_step_pre_hook(self._before_step),
                        optimizer.register_step_post_hook(self._after_step)]

    def _num_classes(self):
        return self.hi

    # ---------------------------------------------------------- hyper-parameters
    def _hparams(self, hp, state):
        opt, W = self.opt, self.W
        if not isinstance(opt, torch.optim.SGD):
            raise TraceError(f"the optimizer is {type(opt).__name__}: the trace format (and "
                             f"refimpl) has SGD with momentum only")
        groups = opt.param_groups
        for key in ("lr", "momentum", "nesterov", "dampening", "maximize"):
            values = {g.get(key) for g in groups}
            if len(values) > 1:
                raise TraceError(f"the optimizer's param groups differ in {key} ({values}): "
                                 f"refimpl has one {key} for the network and the classifier")
        g0 = groups[0]
        if g0.get("dampening", 0) != 0 or g0.get("maximize", False):
            raise TraceError("SGD with dampening != 0 or maximize=True has no refimpl "
                             "counterpart (v = mu v + d; p -= lr v)")
        wd_of = {id(p): g["weight_decay"] for g in groups for p in g["params"]}
        want = {id(p): n for n, p in self.params.items()}
        want[id(W)] = CLF
        missing = [n for i, n in want.items() if i not in wd_of]
        extra = [i for i in wd_of if i not in want]
        if missing or extra:
            raise TraceError(f"the optimizer must hold exactly the model's parameters and the "
                             f"classifier: missing {missing[:5]}, {len(extra)} others")
        wds = set(wd_of.values())
        if len(wds) == 1:
            mask, wd = "all", wds.pop()
        else:
            wd = max(wds)
            off = {want[i] for i, v in wd_of.items() if v == 0}
            one_d = {n for n in self.names if self.params[n].dim() <= 1}
            if len(wds) != 2 or 0 not in wds or off != one_d:
                raise TraceError(f"the weight-decay groups ({sorted(wds)}) are neither one "
                                 f"group ('all') nor the 1-D parameters at 0 ('no_bn_bias')")
            mask = "no_bn_bias"
        bns = [m for m in self.model.modules()
               if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]
        bn_m, bn_eps = {m.momentum for m in bns}, {m.eps for m in bns}
        if len(bn_m) != 1 or len(bn_eps) != 1 or None in bn_m:
            raise TraceError(f"every BatchNorm needs one momentum (not None) and one eps, got "
                             f"momenta {bn_m} and eps {bn_eps}")
        derived = {"N": self.num_classes, "D": int(W.shape[1]),
                   "momentum": float(g0["momentum"]), "weight_decay": float(wd),
                   "weight_decay_mask": mask, "nesterov": bool(g0["nesterov"]),
                   "bn_momentum": float(bn_m.pop()), "bn_eps": float(bn_eps.pop()),
                   "dtype": str(W.dtype).replace("torch.", "")}
        derived.update(self._derived())
        derived.update(architecture_of({k: tuple(v.shape) for k, v in state.items()}))
        for key, value in derived.items():
            if hp.get(key) is not None and hp[key] != value:
                raise TraceError(f"hparams[{key!r}] = {hp[key]!r} contradicts the model / "
                                 f"optimizer ({value!r})")
            hp[key] = value
        hp.setdefault("alpha", 0.0)
        check_one_dtype({**{n: _np(v) for n, v in state.items()}, CLF: _np(W)}, hp["dtype"],
                        "TraceWriter")
        return hp

    def _derived(self):
        """Further hyper-parameters the writer knows (the distributed one: world_size)."""
        return {}

    # ---------------------------------------------------------- hooks
    def _reset(self):
        self.inputs, self.outputs, self.dz, self.logged = [], [], [], {}
        self.grads, self.lr, self.ids, self.neighbours = None, None, None, None

    def _on_input(self, module, args):
        if self.armed:
            self.inputs.append(_np(args[0]))

    def _on_output(self, module, args, output):
        if not self.armed:
            return
        i = len(self.outputs)
        self.outputs.append(_np(output))
        self.dz.append(None)
        if output.requires_grad:
            def keep(g, i=i):
                self.dz[i] = _np(g)
            output.register_hook(keep)

    def _before_step(self, optimizer, args, kwargs):
        if not self.armed:
            return
        self.lr = float(optimizer.param_groups[0]["lr"])
        named = [(n, self.params[n]) for n in self.names] + [(CLF, self.W)]
        self.grads = {n: (_np(p.grad) if p.grad is not None else np.zeros(tuple(p.shape),
                                                                           _np(p).dtype))
                      for n, p in named}

    def _after_step(self, optimizer, args, kwargs):
        if self.armed:
            self._write_step()

    # ---------------------------------------------------------- the user's calls
    @property
    def done(self):
        return self.total is not None and self.count >= self.total

    def begin_step(self, ids, neighbours=None):
        """Start recording a step: the instance ids (b,) of the rows this process
        feeds its model (one process: the global batch's B) and, for smoothed
        targets, their neighbour rows NK(ids) (b, K)."""
        if self.done:
            return
        if not self.started:
            self._write_init()
            self.started = True
        self._reset()
        self.ids = np.asarray(ids.cpu() if hasattr(ids, "cpu") else ids, dtype=np.int64)
        if neighbours is not None:
            self.neighbours = np.asarray(neighbours.cpu() if hasattr(neighbours, "cpu")
                                         else neighbours, dtype=np.int64)
        self.armed = True

    def log(self, **tensors):
        """Record forward values you have: loss, z_hat (b or B, D), row_max (b or B,),
        logsumexp (b or B,). Any you leave out is simply not compared."""
        for k, v in tensors.items():
            if k not in LOGGED:
                raise TraceError(f"log: {k!r} is not one of {LOGGED}")
            self.logged[k] = _np(v) if hasattr(v, "detach") else np.asarray(v)

    def close(self):
        """Remove the hooks (the files are complete after every step)."""
        for h in self.handles:
            h.remove()
        self.handles, self.armed = [], False
        self.comm.barrier()

    # ---------------------------------------------------------- files
    def _momentum(self, p):
        buf = self.opt.state.get(p, {}).get("momentum_buffer")
        return None if buf is None else _np(buf)

    def _owned(self):
        """Whether this process writes its classifier rows (a replicated W: rank 0 only)."""
        return True

    def _write_rows(self, name, rows):
        """Every process its rows [lo, hi) of the (N, D) file ``name``."""
        rows = rows if self._owned() else rows[:0]
        write_shard_rows(self.path / name, rows, self.lo, (self.num_classes, rows.shape[1]),
                         rows.dtype, self.comm)
        self.comm.barrier()

    def _write_init(self):
        comm = self.comm
        if comm.rank == 0:
            self.path.mkdir(parents=True, exist_ok=True)
            for old in list(self.path.glob("step_*.npz")) + [self.path / CLASSIFIER_MOMENTUM]:
                if old.exists():
                    old.unlink()
            arrays = {n: _np(v) for n, v in self.model.state_dict().items()}
            for n in self.names:
                m = self._momentum(self.params[n])
                if m is not None and np.any(m != 0):
                    arrays["momentum/" + n] = m
            save_npz(self.path / INIT, arrays)
        comm.barrier()
        self._write_rows(CLASSIFIER, _np(self.W))
        m = self._momentum(self.W)
        if any(comm.all(m is not None and bool(np.any(m != 0)))):
            self._write_rows(CLASSIFIER_MOMENTUM, m if m is not None else
                             np.zeros(tuple(self.W.shape), _np(self.W).dtype))

    def _local_step(self):
        """This process's part of the step: what only it saw (a dict), or an error text."""
        if not self.inputs or self.grads is None:
            return ("the model was not called, or optimizer.step() not reached, between "
                    "begin_step and the step's end")
        if any(g is None for g in self.dz):
            return ("an output of the model got no gradient (was loss.backward() called on a "
                    "loss that uses it?)")
        part = {"input": np.concatenate(self.inputs), "z": np.concatenate(self.outputs),
                "dz": np.concatenate(self.dz) / self.dz_scale, "ids": self.ids,
                "neighbours": self.neighbours, "logged": self.logged}
        if part["ids"].shape[0] != part["z"].shape[0]:
            return (f"begin_step got {part['ids'].shape[0]} ids but the model saw "
                    f"{part['z'].shape[0]} rows")
        return part

    def _classifier_part(self, rows):
        """This process's classifier rows after the step: (lo, {name: its rows or, with
        ``rows`` (the touched ids), those of them it holds and its checksums})."""
        if not self._owned():
            return None
        arrays = {"grad/" + CLF: self.grads[CLF], CLF: _np(self.W)}
        m = self._momentum(self.W)
        if m is not None:
            arrays["momentum/" + CLF] = m
        if rows is None:
            return self.lo, arrays
        mine = rows[(rows >= self.lo) & (rows < self.hi)]
        S = self.hparams["world_size"]
        out = {}
        for name, a in arrays.items():
            out[name + "@rows"] = a[mine - self.lo]
            out["checksum/" + name] = shard_checksums(a, self.lo, self.num_classes, S)
        return self.lo, out

    def _write_step(self):
        self.armed = False
        local = self._local_step()
        seen = self.comm.all(local if isinstance(local, str) else
                             (local["ids"], local["neighbours"],
                              {k: np.shape(v) for k, v in local["logged"].items()}))
        rows = self._check_step(seen)                 # the same verdict on every rank
        parts = self.comm.gather((local, self._classifier_part(rows)))
        if self.comm.rank == 0:
            self._write(parts, rows)
        self.count += 1

    def _check_step(self, seen):
        """Raise TraceError (on every rank alike) for a step the ranks cannot make one
        trace step of; returns the touched classifier rows ("rows" mode) or None.

        seen: every process's (ids, neighbours, {logged name: shape}) or error text.
        """
        many = self.comm.size > 1
        for r, p in enumerate(seen):
            if isinstance(p, str):
                raise TraceError(f"TraceWriter{f' (rank {r})' if many else ''}: {p}")
        ids = np.concatenate([p[0] for p in seen])
        B, hp = ids.shape[0], self.hparams
        if hp.get("batch_size", B) != B:
            raise TraceError(f"TraceWriter: step {self.count} has {B} ids, the trace's batch "
                             f"is {hp['batch_size']}")
        nbs = [p[1] for p in seen]
        if any(n is None for n in nbs) and any(n is not None for n in nbs):
            raise TraceError("TraceWriter: begin_step got neighbour rows on some ranks and "
                             "none on others")
        for k in LOGGED:
            shapes = [p[2].get(k) for p in seen]
            if any(s is None for s in shapes) and any(s is not None for s in shapes):
                raise TraceError(f"TraceWriter: log({k}=...) was called on some ranks only")
            if k != "loss" and shapes[0] is not None and shapes[0][0] != B and \
                    sum(s[0] for s in shapes) != B:
                raise TraceError(f"TraceWriter: log({k}=...) has {[s[0] for s in shapes]} "
                                 f"rows on the ranks: each must hold its own rows or the "
                                 f"global batch's B = {B}")
        hp.setdefault("batch_size", B)
        if nbs[0] is not None:
            hp.setdefault("K", int(nbs[0].shape[1]))
        check_hparams(dict(hp), "TraceWriter hparams")
        if self.mode == "full":
            return None
        targets = [ids[:, None]] + ([np.concatenate(nbs)] if nbs[0] is not None else [])
        return np.unique(np.concatenate(targets, axis=1))

    def _write(self, parts, rows):
        """Rank 0: the step file from every process's part, and meta.json."""
        hp = self.hparams
        locals_ = [p[0] for p in parts]
        t = {"lr": np.array(self.lr, dtype=np.float64),
             "input": np.concatenate([p["input"] for p in locals_]),
             "ids": np.concatenate([p["ids"] for p in locals_])}
        B = hp["batch_size"]
        if locals_[0]["neighbours"] is not None:
            t["neighbours"] = np.concatenate([p["neighbours"] for p in locals_])
        t["z"] = np.concatenate([p["z"] for p in locals_])
        t.update(self._logged(locals_, B))
        state = {n: _np(v) for n, v in self.model.state_dict().items()}
        t.update({n: state[n] for n in self.buffers})
        clf = self._assemble_classifier([p[1] for p in parts if p[1] is not None], rows)
        if self.mode == "full":
            t["grad/" + CLF] = clf["grad/" + CLF]
        else:
            t["classifier.rows"] = rows
            for key in (f"grad/{CLF}@rows", f"checksum/grad/{CLF}"):
                t[key] = clf[key]
        t["dz"] = np.concatenate([p["dz"] for p in locals_])
        for n in self.names:
            t["grad/" + n] = self.grads[n]
            t[n] = state[n]
            m = self._momentum(self.params[n])
            if m is not None:
                t["momentum/" + n] = m
        t.update({k: v for k, v in clf.items() if not k.startswith(("grad/", "checksum/grad/"))})
        check_one_dtype({n: v for n, v in t.items()
                         if n != "lr" and not n.startswith("checksum/")},
                        hp["dtype"], f"TraceWriter step {self.count}")
        ordered = {n: t[n] for n in canonical_order(t, self.names, self.buffers)}
        save_npz(self.path / step_file(self.count), ordered)
        self.entries.append({"file": step_file(self.count), "step": self.count,
                             "lr": self.lr})
        write_meta(self.path, check_hparams(dict(hp), "TraceWriter hparams"), self.entries,
                   self.mode, self._producer())

    def _producer(self):
        return f"refimpl.oracle.torch_writer {__version__} (torch {torch.__version__})"

    @staticmethod
    def _logged(locals_, B):
        """log()'s tensors of the global batch: the loss the mean of the processes', a
        per-row tensor of B rows process 0's, of b rows the processes' concatenated."""
        out = {}
        for k in LOGGED:
            have = [p["logged"][k] for p in locals_ if k in p["logged"]]
            if not have:
                continue
            if k == "loss":
                out[k] = np.asarray(sum(have) / len(have), dtype=have[0].dtype)
            else:
                out[k] = have[0] if have[0].shape[0] == B else np.concatenate(have)
        return out

    def _assemble_classifier(self, parts, rows):
        """{name: (N, D) array} ("full") or the touched rows in id order and the
        checksums summed over the processes ("rows"), from [(lo, arrays)]."""
        parts = sorted(parts, key=lambda p: p[0])
        names = parts[0][1].keys()
        if rows is None:
            return {n: np.concatenate([a[n] for _, a in parts]) for n in names}
        return {n: (np.concatenate([a[n] for _, a in parts]) if n.endswith("@rows")
                    else sum(a[n] for _, a in parts)) for n in names}


class DistributedTraceWriter(TraceWriter):
    """``TraceWriter`` for every rank of a torch.distributed job; rank 0 writes the trace.

    Every rank makes one with its own objects and makes the same calls
    (``begin_step`` with its local ids and neighbour rows, ``log``,
    ``close``); each call that records is collective over ``group``.

    Arguments: path (rank 0 creates it; on a file system every rank sees is
    not needed: only rank 0 writes, except ``classifier.npy`` whose rows
    every rank writes into, so give a shared path), model (the encoder +
    head, DDP-wrapped or not), optimizer (this rank's torch.optim.SGD over
    the model's parameters and W_r), classifier (W_r, this rank's rows of
    the (N, D) weight as an nn.Parameter), rows ((lo, hi): W_r is rows
    [lo, hi) of W; the ranks' ranges partition [0, N) in any split, or all
    are (0, N) for a replicated classifier), hparams (as ``TraceWriter``,
    world_size read from the group), gradients ("averaged" or "summed", the
    module docstring: required, it is the first convention to map), group
    (None: the default process group), steps, classifier_mode.

    NCCL: ``torch.distributed.gather_object`` needs ``torch.cuda.set_device``
    of each rank's GPU first (PyTorch's rule).
    """

    def __init__(self, path, model, optimizer, classifier, rows, hparams, gradients,
                 group=None, steps=None, classifier_mode="auto"):
        import torch.distributed as dist
        if not dist.is_available() or not dist.is_initialized():
            raise TraceError("DistributedTraceWriter: torch.distributed is not initialized "
                             "(init_process_group first; TraceWriter records one process)")
        if gradients not in GRADIENTS:
            raise TraceError(f"gradients must be one of {GRADIENTS}: 'averaged' if DDP "
                             f"averages your network's gradients (each rank's dz is then P x "
                             f"the global-mean loss's: it is divided by P), 'summed' if your "
                             f"loss is the global mean and gradients are summed; got "
                             f"{gradients!r}")
        self.gradients = gradients
        comm = _ProcessGroup(group)
        self._ranges = [tuple(int(v) for v in r) for r in comm.all(tuple(rows))]
        scale = float(comm.size) if gradients == "averaged" else 1.0
        try:  # a refusal on one rank is raised on every rank (none waits in a collective)
            self._setup(path, model, optimizer, classifier, hparams, steps, classifier_mode,
                        comm, rows, scale)
            mine = {k: v for k, v in self.hparams.items() if k != "seed"}
        except TraceError as e:
            mine = str(e)
        theirs = comm.all(mine)
        for r, hp in enumerate(theirs):
            why = hp if isinstance(hp, str) else None
            if why is None and not isinstance(theirs[0], str):
                diff = sorted(k for k in set(hp) | set(theirs[0])
                              if hp.get(k) != theirs[0].get(k))
                if diff:
                    why = (f"rank {r}'s objects differ from rank 0's in "
                           + ", ".join(f"{k} ({theirs[0].get(k)!r} vs {hp.get(k)!r})"
                                       for k in diff))
            if why is not None:
                for h in getattr(self, "handles", []):
                    h.remove()
                self.handles = []
                raise TraceError(f"DistributedTraceWriter (rank {r}): {why}")

    def _num_classes(self):
        ranges, N = self._ranges, max(hi for _, hi in self._ranges)
        if all(r == (0, N) for r in ranges):
            return N                                              # replicated
        covered = sorted(ranges)
        if covered[0][0] != 0 or any(a[1] != b[0] for a, b in zip(covered, covered[1:])) or \
                any(lo >= hi for lo, hi in covered):
            raise TraceError(f"DistributedTraceWriter: the ranks' classifier rows {ranges} "
                             f"neither partition [0, N) nor are all (0, N) (replicated)")
        return N

    def _owned(self):
        replicated = self._ranges[0] == (0, self.num_classes) and self.comm.size > 1
        return self.comm.rank == 0 or not replicated

    def _derived(self):
        return {"world_size": self.comm.size}

    def _producer(self):
        how = (f"gradients averaged: dz recorded / {self.comm.size}"
               if self.gradients == "averaged" else "gradients summed")
        return (f"refimpl.oracle.torch_writer {__version__} (torch {torch.__version__}; "
                f"DistributedTraceWriter, {self.comm.size} ranks, {how})")


class _ProcessGroup:
    """The writer's collectives over a torch.distributed process group (picklable
    objects: small, and one gather to rank 0 per step)."""

    def __init__(self, group):
        import torch.distributed as dist
        self.dist, self.group = dist, group
        self.rank, self.size = dist.get_rank(group), dist.get_world_size(group)
        self.root = 0 if group is None else dist.get_global_rank(group, 0)

    def all(self, obj):
        out = [None] * self.size
        self.dist.all_gather_object(out, obj, group=self.group)
        return out

    def all_gather(self, array):
        """The ranks' arrays joined along axis 0 (MPIComm.all_gather's result), on
        every rank: what fileio.write_shard_rows needs of a communicator."""
        return np.concatenate(self.all(np.asarray(array)))

    def gather(self, obj):
        out = [None] * self.size if self.rank == 0 else None
        self.dist.gather_object(obj, out, dst=self.root, group=self.group)
        return out

    def barrier(self):
        self.dist.barrier(group=self.group)

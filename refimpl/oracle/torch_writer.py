"""Write a trace from PyTorch: hooks on your nn.Module and your torch.optim.SGD.

Contract. ``TraceWriter`` records the steps of a PyTorch implementation of
the method in refimpl's trace format (``oracle/trace.py``), so that
``refimpl-oracle replay DIR`` runs the same steps in refimpl and compares
every tensor. Import this module only where PyTorch is installed (it imports
torch; ``refimpl.oracle`` never imports it).

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

What the writer reads from your objects (so that it cannot contradict them):

    model       its state dict, under torchvision names plus head.0 / head.1 /
                head.3 (arch, stem, width, head_hidden, dim are read from the
                shapes); every BatchNorm's momentum and eps (one value each)
    optimizer   torch.optim.SGD: momentum, weight_decay, nesterov, one lr;
                dampening 0; the weight-decay mask from the param groups: all
                parameters in groups of one weight_decay -> "all"; the 1-D
                ones (BatchNorm, biases) in a group of weight_decay 0 ->
                "no_bn_bias"
    classifier  the (N, D) nn.Parameter W, in the optimizer like the rest
    hparams     what it cannot read: tau, alpha, world_size, bn ("local" or
                "sync"); K and neighbours ("initial_weight" if your table
                was computed from W at the first step, else "given") when
                alpha > 0; seed (optional)

One dtype: every parameter, buffer and W must share it (mixed dtypes are
refused). One global batch: if the model is called several times within a
step (one call per rank's local batch, a single-process emulation of P
ranks with per-rank BatchNorm), the inputs, outputs and their gradients are
concatenated in call order, which must be rank order. The gradients are
read from ``.grad`` when ``optimizer.step()`` starts; record a multi-process
(DDP) run from rank 0 after the all-reduce, with the global batch gathered.
"""
from pathlib import Path

import numpy as np
import torch

from refimpl import __version__
from refimpl.oracle.trace import (CLASSIFIER, CLASSIFIER_MOMENTUM, CLF, FULL_LIMIT, INIT,
                                  TraceError, architecture_of, canonical_order, check_hparams,
                                  check_one_dtype, save_npz, shard_checksums, step_file,
                                  write_meta)

LOGGED = ("loss", "z_hat", "row_max", "logsumexp")


def _np(t):
    """A NumPy copy of a tensor (detached, on the host)."""
    return t.detach().cpu().numpy().copy()


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
        self.path, self.model, self.opt, self.W = Path(path), model, optimizer, classifier
        self.total = steps
        if any(p is classifier for p in model.parameters()):
            raise TraceError("the classifier must not be a parameter of the model: pass the "
                             "encoder + head as model and W separately")
        self.names = [n for n, p in model.named_parameters() if p is not classifier]
        self.params = dict(model.named_parameters())
        state = model.state_dict()
        self.buffers = [n for n in state if n not in self.params]
        self.hparams = self._hparams(dict(hparams), state)
        N, D = classifier.shape
        self.mode = classifier_mode
        if self.mode == "auto":
            self.mode = "full" if N * D <= FULL_LIMIT else "rows"
        if self.mode not in ("full", "rows"):
            raise TraceError(f"classifier_mode must be 'auto', 'full' or 'rows', got "
                             f"{classifier_mode!r}")
        self.count, self.entries, self.started, self.armed = 0, [], False, False
        self._reset()
        self.handles = [model.register_forward_pre_hook(self._on_input),
                        model.register_forward_hook(self._on_output),
                        optimizer.register_step_pre_hook(self._before_step),
                        optimizer.register_step_post_hook(self._after_step)]

    # ---------------------------------------------------------- hyper-parameters
    def _hparams(self, hp, state):
        opt, W = self.opt, self.W
        if not isinstance(opt, torch.optim.SGD):
            raise TraceError(f"the optimizer is {type(opt).__name__}: the trace format (and "
                             f"refimpl) has SGD with momentum only")
        if W.dim() != 2:
            raise TraceError(f"classifier must be the (N, D) weight, got shape {tuple(W.shape)}")
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
        want = {id(p): n for n, p in self.params.items() if p is not W}
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
        derived = {"N": int(W.shape[0]), "D": int(W.shape[1]),
                   "momentum": float(g0["momentum"]), "weight_decay": float(wd),
                   "weight_decay_mask": mask, "nesterov": bool(g0["nesterov"]),
                   "bn_momentum": float(bn_m.pop()), "bn_eps": float(bn_eps.pop()),
                   "dtype": str(W.dtype).replace("torch.", "")}
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
        """Start recording a step: its global batch's instance ids (B,) and, for
        smoothed targets, the neighbour rows NK(ids) (B, K) it uses."""
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
        """Record forward values you have: loss, z_hat (B, D), row_max (B,),
        logsumexp (B,). Any you leave out is simply not compared."""
        for k, v in tensors.items():
            if k not in LOGGED:
                raise TraceError(f"log: {k!r} is not one of {LOGGED}")
            self.logged[k] = _np(v) if hasattr(v, "detach") else np.asarray(v)

    def close(self):
        """Remove the hooks (the files are complete after every step)."""
        for h in self.handles:
            h.remove()
        self.handles, self.armed = [], False

    # ---------------------------------------------------------- files
    def _momentum(self, p):
        buf = self.opt.state.get(p, {}).get("momentum_buffer")
        return None if buf is None else _np(buf)

    def _write_init(self):
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
        np.save(self.path / CLASSIFIER, _np(self.W))
        m = self._momentum(self.W)
        if m is not None and np.any(m != 0):
            np.save(self.path / CLASSIFIER_MOMENTUM, m)

    def _write_step(self):
        self.armed = False
        hp = self.hparams
        if not self.inputs or self.grads is None:
            raise TraceError("TraceWriter: the model was not called, or optimizer.step() "
                             "not reached, between begin_step and the step's end")
        if any(g is None for g in self.dz):
            raise TraceError("TraceWriter: an output of the model got no gradient (was "
                             "loss.backward() called on a loss that uses it?)")
        t = {"lr": np.array(self.lr, dtype=np.float64), "input": np.concatenate(self.inputs),
             "ids": self.ids}
        B = t["ids"].shape[0]
        if hp.setdefault("batch_size", B) != B:
            raise TraceError(f"TraceWriter: step {self.count} has {B} ids, the trace's batch "
                             f"is {hp['batch_size']}")
        if self.neighbours is not None:
            t["neighbours"] = self.neighbours
            hp.setdefault("K", int(self.neighbours.shape[1]))
        t["z"] = np.concatenate(self.outputs)
        t.update(self.logged)
        state = {n: _np(v) for n, v in self.model.state_dict().items()}
        t.update({n: state[n] for n in self.buffers})
        target_ids = t["ids"][:, None] if self.neighbours is None else \
            np.concatenate([t["ids"][:, None], self.neighbours], axis=1)
        rows = np.unique(target_ids)
        W, N = _np(self.W), self.W.shape[0]
        S = hp["world_size"]
        if self.mode == "full":
            t["grad/" + CLF] = self.grads[CLF]
        else:
            t["classifier.rows"] = rows
            t[f"grad/{CLF}@rows"] = self.grads[CLF][rows]
            t[f"checksum/grad/{CLF}"] = shard_checksums(self.grads[CLF], 0, N, S)
        t["dz"] = np.concatenate(self.dz)
        for n in self.names:
            t["grad/" + n] = self.grads[n]
            t[n] = state[n]
            m = self._momentum(self.params[n])
            if m is not None:
                t["momentum/" + n] = m
        for name, value in ((CLF, W), ("momentum/" + CLF, self._momentum(self.W))):
            if value is None:
                continue
            if self.mode == "full":
                t[name] = value
            else:
                t[name + "@rows"] = value[rows]
                t["checksum/" + name] = shard_checksums(value, 0, N, S)
        check_one_dtype({n: v for n, v in t.items()
                         if n != "lr" and not n.startswith("checksum/")},
                        hp["dtype"], f"TraceWriter step {self.count}")
        ordered = {n: t[n] for n in canonical_order(t, self.names, self.buffers)}
        save_npz(self.path / step_file(self.count), ordered)
        self.entries.append({"file": step_file(self.count), "step": self.count,
                             "lr": self.lr})
        write_meta(self.path, check_hparams(dict(hp), "TraceWriter hparams"), self.entries,
                   self.mode, f"refimpl.oracle.torch_writer {__version__} (torch "
                               f"{torch.__version__})")
        self.count += 1

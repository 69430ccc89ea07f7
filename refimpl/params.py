"""A flat parameter store: every replicated parameter in ONE buffer.

Contract. The encoder and the head register their parameters here, by
torchvision-style name (``layer1.0.conv1.weight``), with their initial values.
``finalize()`` then allocates

    data   (G,)  every parameter, back to back, in registration order
    grad   (G,)  their gradients, same layout

and hands out views: ``params[name]`` and ``grads[name]`` are reshaped slices of
``data`` and ``grad``, so a layer that writes ``grads[name] += dw`` writes into
the flat buffer. This is what lets the training step sum all gradients over the
ranks with a single ``Allreduce(grad)`` and update all parameters with one
optimizer over one flat buffer (``optim.SGD``, which walks it in blocks).

BatchNorm running statistics are *buffers*, not parameters (no gradient, no
decay, not all-reduced): the float ones (``running_mean``, ``running_var``)
live in their own flat buffer ``buffer_data`` (so they too can be broadcast or
saved in one piece), and the ``num_batches_tracked`` counters are 0-d int64
NumPy arrays on the host, like PyTorch's (a counter on the device would cost a
synchronization to read).

Two phases, on purpose: shapes are known only after the whole model has been
built, and one allocation is what makes the buffer contiguous.

    store = ParamStore(dtype=np.float64)
    store.add_param("fc.weight", w0)          # host values, any float dtype
    store.add_buffer("bn1.running_mean", np.zeros(64))
    store.finalize()                          # allocate on the device, copy
    store.params["fc.weight"]                 # a view into store.data

``state_dict()`` / ``load_state_dict()`` use PyTorch's semantics (params and
buffers in registration order, which is torchvision's order when the model
registers in module order); loading checks every key and shape before writing
anything, so a bad dict never leaves a half-loaded model.
"""
import numpy as np

from refimpl.backend import (asarray, check_device, default_device, resolve_dtype,
                             to_numpy, xp_for)


class StateDictError(ValueError):
    """A state dict does not match the model (missing/unexpected keys, shapes)."""


def is_bn_or_bias(name, shape):
    """True for 1-D parameters: BatchNorm weight/bias and every bias.

    The usual choice of parameters to exclude from weight decay; pass it as
    ``ParamStore.decay_mask(exclude=is_bn_or_bias)``.
    """
    return len(shape) <= 1


class ParamStore:
    """Parameters, gradients and buffers of one model, in flat buffers.

    Attributes after ``finalize()``:
      data, grad    (G,) flat parameter / gradient buffers of G parameters (dtype, device)
      params, grads dict name -> view into data / grad, shaped like the param
      buffer_data   (Q,) flat buffer of the float buffers (running statistics)
      buffers       dict name -> view into buffer_data, or a 0-d int64 NumPy
                    array for counters (num_batches_tracked)
    """

    def __init__(self, dtype=None, device=None):
        self.dtype = resolve_dtype(dtype)
        # Resolved once: REFIMPL_DEVICE may change later, the store's device may not.
        self.device = default_device() if device is None else check_device(device)
        self.xp = xp_for(self.device)
        self._order = []      # (kind, name) in registration order: "param"/"buffer"
        self._init = {}       # name -> host initial value (dropped at finalize)
        self.shapes = {}      # name -> shape, for params and buffers
        self.finalized = False

    # ---- phase 1: registration -------------------------------------------
    def _register(self, kind, name, value):
        if self.finalized:
            raise RuntimeError(f"ParamStore: cannot add {name!r} after finalize()")
        if name in self.shapes:
            raise ValueError(f"ParamStore: {name!r} registered twice")
        value = np.asarray(value)
        self._order.append((kind, name))
        self._init[name] = value
        self.shapes[name] = tuple(value.shape)

    def add_param(self, name, value):
        """Register a parameter with its initial (host) values."""
        self._register("param", name, value)

    def add_buffer(self, name, value):
        """Register a buffer: float (running statistics) or integer (counters).

        Integer buffers stay 0-d/ND int64 NumPy arrays on the host; float
        buffers get the store's dtype and device.
        """
        self._register("buffer", name, value)

    # ---- phase 2: allocation ---------------------------------------------
    def finalize(self):
        """Allocate the flat buffers, copy the initial values, make the views."""
        if self.finalized:
            raise RuntimeError("ParamStore: finalize() called twice")
        xp = self.xp
        param_names = self.param_names()
        float_buffers = [n for k, n in self._order
                         if k == "buffer" and self._init[n].dtype.kind == "f"]

        self.offsets, host = self._pack(param_names)               # name -> (start, stop)
        self.data = asarray(host, device=self.device)              # (G,)
        self.grad = xp.zeros_like(self.data)                       # (G,)
        self.params = {n: self.data[a:b].reshape(self.shapes[n])
                       for n, (a, b) in self.offsets.items()}
        self.grads = {n: self.grad[a:b].reshape(self.shapes[n])
                      for n, (a, b) in self.offsets.items()}

        buffer_offsets, host = self._pack(float_buffers)
        self.buffer_data = asarray(host, device=self.device)       # (Q,)
        self.buffers = {}
        for k, n in self._order:
            if k != "buffer":
                continue
            if n in buffer_offsets:
                a, b = buffer_offsets[n]
                self.buffers[n] = self.buffer_data[a:b].reshape(self.shapes[n])
            else:
                self.buffers[n] = self._init[n].astype(np.int64)   # host counter
        self._init = None
        self.finalized = True
        return self

    def _pack(self, names):
        """Initial values of ``names`` back to back in one host array of the
        store's dtype, and each name's (start, stop) in it. Filled on the host,
        then copied to the device once."""
        offsets, start = {}, 0
        for n in names:
            offsets[n] = (start, start + int(np.prod(self.shapes[n])))
            start = offsets[n][1]
        host = np.empty(start, dtype=self.dtype)
        for n, (a, b) in offsets.items():
            host[a:b] = self._init[n].ravel()
        return offsets, host

    def _check_finalized(self):
        if not self.finalized:
            raise RuntimeError("ParamStore: call finalize() first")

    # ---- access ----------------------------------------------------------
    def names(self):
        """Every name (params and buffers) in registration order."""
        return [n for _, n in self._order]

    def param_names(self):
        """Parameter names in registration order."""
        return [n for k, n in self._order if k == "param"]

    def buffer_names(self):
        """Buffer names in registration order."""
        return [n for k, n in self._order if k == "buffer"]

    def named_params(self):
        """[(name, view into data)] in registration order."""
        self._check_finalized()
        return [(n, self.params[n]) for n in self.param_names()]

    @property
    def num_params(self):
        """P, the number of parameter elements."""
        return sum(int(np.prod(self.shapes[n])) for n in self.param_names())

    def zero_grad(self):
        """Set every gradient to 0 (in place: the views stay valid)."""
        self._check_finalized()
        self.grad.fill(0)

    def decay_mask(self, exclude=None):
        """(G,) flat mask, 1 where weight decay applies and 0 where it does not.

        exclude: None (decay everything, like torch.optim.SGD given all
        parameters) or a predicate ``(name, shape) -> bool`` that is True for
        parameters to exclude, e.g. ``is_bn_or_bias``.
        """
        self._check_finalized()
        mask = np.ones(self.data.shape[0], dtype=self.dtype)
        if exclude is not None:
            for n, (a, b) in self.offsets.items():
                if exclude(n, self.shapes[n]):
                    mask[a:b] = 0
        return asarray(mask, device=self.device)

    def counter_names(self):
        """Names of the integer buffers (num_batches_tracked), host-side counters."""
        self._check_finalized()
        return [n for n, v in self.buffers.items() if v.dtype.kind == "i"]

    # ---- buffer snapshots --------------------------------------------------
    def snapshot_buffers(self):
        """A copy of every buffer: (float buffer data, {counter name: value}).

        A train-mode forward updates the BatchNorm running statistics; a step
        that must be undone (a non-finite loss) puts them back with
        ``restore_buffers``.
        """
        self._check_finalized()
        return (self.buffer_data.copy(),
                {n: self.buffers[n].copy() for n in self.counter_names()})

    def restore_buffers(self, snapshot):
        """Write a ``snapshot_buffers()`` copy back, in place (every view stays valid)."""
        data, counters = snapshot
        self.buffer_data[...] = data
        for n, v in counters.items():
            self.buffers[n][...] = v

    # ---- flat buffers by name (optimizer momentum) ------------------------
    def flat_dict(self, flat, prefix):
        """{prefix + name: NumPy copy} of a (G,) buffer laid out like ``data``.

        Each entry is the parameter's slice, shaped like the parameter: how
        an optimizer's velocity (``SGD.momentum_buffer``) goes into a
        checkpoint or a trace, as ``momentum/<name>``.
        """
        self._check_finalized()
        host = to_numpy(flat)
        return {prefix + n: host[a:b].reshape(self.shapes[n]).copy()
                for n, (a, b) in self.offsets.items()}

    def load_flat(self, flat, arrays, prefix, strict=True):
        """Write ``arrays[prefix + name]`` into name's slice of ``flat``, in place.

        The inverse of ``flat_dict``. strict: every parameter's entry must
        be there (StateDictError naming the first missing one, and nothing
        written); otherwise the missing ones keep their values.
        """
        self._check_finalized()
        missing = [prefix + n for n in self.offsets if prefix + n not in arrays]
        if strict and missing:
            raise StateDictError(f"no {missing[0]} ({len(missing)} of "
                                 f"{len(self.offsets)} {prefix}* entries missing)")
        host = np.array(to_numpy(flat), copy=True)
        for n, (a, b) in self.offsets.items():
            if prefix + n in arrays:
                host[a:b] = np.asarray(arrays[prefix + n]).ravel()
        flat[...] = asarray(host, device=self.device)

    # ---- state dict ------------------------------------------------------
    def state_dict(self):
        """{name: NumPy copy} of params and buffers, in registration order."""
        self._check_finalized()
        out = {}
        for k, n in self._order:
            src = self.params[n] if k == "param" else self.buffers[n]
            out[n] = np.array(to_numpy(src), copy=True)
        return out

    def load_state_dict(self, state, strict=True, names=None):
        """Copy values from ``state`` (name -> array-like) into the store.

        names: the keys this dict is meant to cover (default: all of the
        store's); e.g. the encoder's names when loading into a store that also
        holds the head.

        Every key and shape is checked before anything is written: a mismatch
        raises StateDictError naming all missing keys, unexpected keys and
        wrong shapes, and the store is left untouched. With strict=False
        missing and unexpected keys are allowed (and returned as
        ``(missing, unexpected)``, like PyTorch); wrong shapes are always an
        error. Float values are cast to the store's dtype, counters to int64.
        """
        self._check_finalized()
        names = self.names() if names is None else list(names)
        unknown = [n for n in names if n not in self.shapes]
        if unknown:
            raise ValueError("load_state_dict: names not in the store: " + ", ".join(unknown))
        covered = set(names)
        missing = [n for n in names if n not in state]
        unexpected = [k for k in state if k not in covered]
        values, wrong = {}, []
        for n in names:
            if n not in state:
                continue
            v = np.asarray(to_numpy(state[n]))
            if tuple(v.shape) != self.shapes[n]:
                wrong.append(f"{n}: expected shape {self.shapes[n]}, got {tuple(v.shape)}")
            values[n] = v
        problems = []
        if strict and missing:
            problems.append("missing keys: " + ", ".join(missing))
        if strict and unexpected:
            problems.append("unexpected keys: " + ", ".join(unexpected))
        if wrong:
            problems.append("shape mismatches: " + "; ".join(wrong))
        if problems:
            raise StateDictError("load_state_dict: " + "\n  ".join(problems))

        for n, v in values.items():
            dst = self.params[n] if n in self.params else self.buffers[n]
            if dst.dtype.kind == "i":
                dst[...] = v.astype(np.int64)
            else:
                dst[...] = asarray(v.astype(self.dtype), device=self.device)
        return missing, unexpected

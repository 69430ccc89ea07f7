"""The building blocks of the models: parameterized layers and residual blocks.

Contract. Each class here only *composes* layer functions from
``refimpl.layers`` and *owns* parameters: it registers them in a ``ParamStore``
under torchvision's names when it is built, looks up their views in the store
when it runs, keeps the layer caches of its last ``forward``, and in
``backward(dout)`` returns ``dx`` and **accumulates** (``+=``) its parameter
gradients into the store's gradient views (so a caller zeroes them once per
step with ``store.zero_grad()``).

    Conv2d       <name>.weight                       (bias-free, like torchvision)
    BatchNormMode  how every BatchNorm of a network takes train-mode statistics
                 (per rank, synchronized, or in groups): ONE object, shared
    BatchNorm    <name>.weight/.bias, running stats  (BatchNorm1d/2d alike)
    Linear       <name>.weight/.bias
    BasicBlock   conv1 bn1 relu conv2 bn2 (+ downsample.0/.1) + add + relu
    Bottleneck   conv1 bn1 conv2 bn2 conv3 bn3 (+ downsample) + add + relu

Initialization is torchvision's, drawn on the host from the ``np.random.Generator``
passed in (in float64, then cast by the store, so a float32 and a float64
model built with the same seed start from the same weights up to rounding):

- conv: ``kaiming_normal_(mode="fan_out", nonlinearity="relu")``,
  i.e. N(0, 2 / (F * HH * WW));
- BatchNorm: weight 1 (0 for the last BN of a block with zero_init_residual),
  bias 0, running_mean 0, running_var 1, num_batches_tracked 0;
- Linear: PyTorch's default, weight and bias ~ U(-1/sqrt(D_in), 1/sqrt(D_in)).

Bottleneck is torchvision's "v1.5": the stride sits on the 3x3 conv (conv2),
not on the first 1x1 conv as in the original paper and Caffe.
"""
import math

import numpy as np

from refimpl.backend import get_array_module
from refimpl.checks import check_int
from refimpl.layers.batchnorm import batchnorm_backward, batchnorm_forward
from refimpl.layers.conv import conv2d_backward, conv2d_forward
from refimpl.layers.linear import linear_backward, linear_forward
from refimpl.layers.relu import relu_backward, relu_forward
from refimpl.threads import elementwise_slices, parallel_map


class Conv2d:
    """A bias-free 2-D convolution owning ``<name>.weight`` (F, C, k, k)."""

    def __init__(self, store, name, in_channels, out_channels, kernel, stride=1,
                 pad=0, rng=None):
        self.store, self.name = store, name + ".weight"
        self.stride, self.pad = stride, pad
        fan_out = out_channels * kernel * kernel
        std = math.sqrt(2.0 / fan_out)  # kaiming normal, fan_out, ReLU gain sqrt(2)
        store.add_param(self.name, rng.standard_normal(
            (out_channels, in_channels, kernel, kernel)) * std)

    def forward(self, x):
        """x (N, C, H, W) -> out (N, F, H', W')."""
        out, self.cache = conv2d_forward(x, self.store.params[self.name],
                                         self.stride, self.pad)
        return out

    def backward(self, dout, need_dx=True):
        """dout (N, F, H', W') -> dx (N, C, H, W), or None without need_dx; accumulates dw."""
        dx, dw = conv2d_backward(dout, self.cache, need_dx)
        self.store.grads[self.name] += dw
        return dx


class BatchNormMode:
    """How the BatchNorms of one network compute train-mode statistics.

    One object per network, shared by reference by every ``BatchNorm`` in it
    (encoder and head), so the mode is set once, in one place:

      allreduce  None: each rank normalizes with its own batch ("local", like
                 DDP); or a callable v -> sum of v over the ranks: the
                 statistics of the global batch ("sync", ``batchnorm_forward``)
      groups     1, or G > 1: normalize the batch as G equal consecutive parts,
                 each with its own statistics. What P ranks with "local" BN
                 compute, in one process (G = P), to check such a run against
                 one process. The running statistics follow part 0 only, as a
                 P-rank run keeps rank 0's (``broadcast_buffers``).
    ``parallel.data_parallel.set_batchnorm_mode(net, comm, mode)`` sets it.
    """

    def __init__(self, allreduce=None, groups=1):
        self.allreduce = allreduce
        self.groups = groups

    @property
    def groups(self):
        return self._groups

    @groups.setter
    def groups(self, value):
        self._groups = check_int("bn groups", value)


class BatchNorm:
    """BatchNorm over (N, C) or (N, C, H, W), PyTorch's convention.

    Owns ``<name>.weight``, ``<name>.bias`` (parameters) and
    ``<name>.running_mean``, ``<name>.running_var``, ``<name>.num_batches_tracked``
    (buffers). In train mode ``forward`` writes the new running statistics into
    the store's buffers and counts the batch, as ``nn.BatchNorm2d`` does.
    ``mode`` is the network's shared ``BatchNormMode`` (default: a private
    one, local statistics).
    """

    def __init__(self, store, name, channels, zero_init=False, momentum=0.1, eps=1e-5,
                 mode=None):
        self.store, self.name = store, name
        self.momentum, self.eps = momentum, eps
        self.mode = BatchNormMode() if mode is None else mode
        store.add_param(name + ".weight",
                        np.zeros(channels) if zero_init else np.ones(channels))
        store.add_param(name + ".bias", np.zeros(channels))
        store.add_buffer(name + ".running_mean", np.zeros(channels))
        store.add_buffer(name + ".running_var", np.ones(channels))
        store.add_buffer(name + ".num_batches_tracked", np.array(0, dtype=np.int64))

    def forward(self, x, train=True):
        """x (N, C[, H, W]) -> out like x, with the statistics ``self.mode`` says."""
        p, b, n = self.store.params, self.store.buffers, self.name
        gamma, beta = p[n + ".weight"], p[n + ".bias"]
        rm, rv = b[n + ".running_mean"], b[n + ".running_var"]
        allreduce, groups = self.mode.allreduce, self.mode.groups
        if groups == 1 or not train:
            out, self.cache, mean, var = batchnorm_forward(
                x, gamma, beta, rm, rv, train=train, momentum=self.momentum,
                eps=self.eps, allreduce=allreduce)
            self.groups = 1
        else:
            if allreduce is not None:
                raise ValueError("batchnorm: groups > 1 is per-group (local) BN; "
                                 "it cannot be combined with a synchronizing allreduce")
            if x.shape[0] % groups:
                raise ValueError(f"batchnorm: a batch of {x.shape[0]} does not split "
                                 f"into {groups} equal groups")
            xp = get_array_module(x)
            outs, self.cache = [], []
            for g, xg in enumerate(xp.split(x, groups, axis=0)):
                keep = g == 0  # only part 0 updates the running statistics
                out_g, cache_g, m_g, v_g = batchnorm_forward(
                    xg, gamma, beta, rm if keep else None, rv if keep else None,
                    train=True, momentum=self.momentum, eps=self.eps)
                outs.append(out_g)
                self.cache.append(cache_g)
                if keep:
                    mean, var = m_g, v_g
            out = xp.concatenate(outs, axis=0)
            self.groups = groups  # backward splits dout the same way
        if train:
            # The layer returns new statistics; the module is where state lives.
            rm[...] = mean
            rv[...] = var
            b[n + ".num_batches_tracked"] += 1
        return out

    def backward(self, dout):
        """dout like x -> dx; accumulates dgamma, dbeta."""
        if self.groups == 1:
            dx, dgamma, dbeta = batchnorm_backward(dout, self.cache)
        else:
            xp = get_array_module(dout)
            grads = [batchnorm_backward(d, c) for d, c in
                     zip(xp.split(dout, self.groups, axis=0), self.cache)]
            dx = xp.concatenate([g[0] for g in grads], axis=0)
            dgamma, dbeta = sum(g[1] for g in grads), sum(g[2] for g in grads)
        self.store.grads[self.name + ".weight"] += dgamma
        self.store.grads[self.name + ".bias"] += dbeta
        return dx


class Linear:
    """A fully connected layer owning ``<name>.weight`` (D_out, D_in) and ``<name>.bias``."""

    def __init__(self, store, name, in_features, out_features, rng=None):
        self.store, self.name = store, name
        bound = 1.0 / math.sqrt(in_features)  # nn.Linear.reset_parameters
        store.add_param(name + ".weight",
                        rng.uniform(-bound, bound, (out_features, in_features)))
        store.add_param(name + ".bias", rng.uniform(-bound, bound, out_features))

    def forward(self, x):
        """x (N, D_in) -> out (N, D_out)."""
        p = self.store.params
        out, self.cache = linear_forward(x, p[self.name + ".weight"], p[self.name + ".bias"])
        return out

    def backward(self, dout):
        """dout (N, D_out) -> dx (N, D_in); accumulates dw, db."""
        dx, dw, db = linear_backward(dout, self.cache)
        self.store.grads[self.name + ".weight"] += dw
        self.store.grads[self.name + ".bias"] += db
        return dx


class _Residual:
    """What BasicBlock and Bottleneck share: the downsample branch, add, ReLU.

    A subclass defines ``self.layers``, the main branch as
    ``[(conv, bn), ...]`` with a ReLU after every pair but the last.
    """

    def _make_downsample(self, store, prefix, in_channels, out_channels, stride, rng, bn_mode):
        # A 1x1 conv (with the block's stride) + BN brings the identity to the
        # main branch's shape, only where the shapes differ (torchvision).
        self.downsample = None
        if stride != 1 or in_channels != out_channels:
            self.downsample = (
                Conv2d(store, prefix + "downsample.0", in_channels, out_channels, 1,
                       stride=stride, rng=rng),
                BatchNorm(store, prefix + "downsample.1", out_channels, mode=bn_mode))

    def forward(self, x, train=True):
        """x (N, C_in, H, W) -> out (N, C_out, H/stride, W/stride)."""
        out = x
        self.relu_caches = []
        for i, (conv, bn) in enumerate(self.layers):
            out = bn.forward(conv.forward(out), train)
            if i < len(self.layers) - 1:
                # in place: BatchNorm's output is a new array nothing else holds
                out, cache = relu_forward(out, out=out)
                self.relu_caches.append(cache)
        identity = x
        if self.downsample is not None:
            conv, bn = self.downsample
            identity = bn.forward(conv.forward(x), train)
        add_into(out, identity)                                  # out += identity
        out, self.out_relu_cache = relu_forward(out, out=out)   # (N, C_out, H', W')
        return out

    def backward(self, dout):
        """dout (N, C_out, H', W') -> dx (N, C_in, H, W); accumulates all grads."""
        dsum = relu_backward(dout, self.out_relu_cache)
        # The add copies its gradient to both branches.
        d = dsum
        for i in reversed(range(len(self.layers))):
            conv, bn = self.layers[i]
            if i < len(self.layers) - 1:
                d = relu_backward(d, self.relu_caches[i])
            d = conv.backward(bn.backward(d))
        # d is the conv's new dx array: the two branches are summed into it
        if self.downsample is None:
            return add_into(d, dsum)
        conv, bn = self.downsample
        return add_into(d, conv.backward(bn.backward(dsum)))


def add_into(a, b):
    """a += b elementwise (same shapes, a C-contiguous), on refimpl's threads; returns a."""
    xp = get_array_module(a)
    a1, b1 = a.reshape(-1), xp.ascontiguousarray(b).reshape(-1)
    parallel_map(lambda s: xp.add(a1[s], b1[s], out=a1[s]), elementwise_slices(a))
    return a


class BasicBlock(_Residual):
    """ResNet-18/34 block: 3x3 conv (stride) - BN - ReLU - 3x3 conv - BN, + identity, ReLU.

    Output channels = ``channels`` (expansion 1).
    """
    expansion = 1

    def __init__(self, store, prefix, in_channels, channels, stride=1, rng=None,
                 zero_init_residual=False, bn_mode=None):
        bn_mode = BatchNormMode() if bn_mode is None else bn_mode  # one for the block
        self.out_channels = channels
        self.layers = [
            (Conv2d(store, prefix + "conv1", in_channels, channels, 3, stride, 1, rng),
             BatchNorm(store, prefix + "bn1", channels, mode=bn_mode)),
            (Conv2d(store, prefix + "conv2", channels, channels, 3, 1, 1, rng),
             BatchNorm(store, prefix + "bn2", channels, zero_init=zero_init_residual,
                       mode=bn_mode)),
        ]
        self._make_downsample(store, prefix, in_channels, channels, stride, rng, bn_mode)


class Bottleneck(_Residual):
    """ResNet-50 block (torchvision v1.5): 1x1 - BN - ReLU - 3x3 (stride) - BN -
    ReLU - 1x1 (x4 channels) - BN, + identity, ReLU.

    Output channels = 4 * ``channels`` (expansion 4).
    """
    expansion = 4

    def __init__(self, store, prefix, in_channels, channels, stride=1, rng=None,
                 zero_init_residual=False, bn_mode=None):
        bn_mode = BatchNormMode() if bn_mode is None else bn_mode  # one for the block
        out = channels * self.expansion
        self.out_channels = out
        self.layers = [
            (Conv2d(store, prefix + "conv1", in_channels, channels, 1, 1, 0, rng),
             BatchNorm(store, prefix + "bn1", channels, mode=bn_mode)),
            (Conv2d(store, prefix + "conv2", channels, channels, 3, stride, 1, rng),
             BatchNorm(store, prefix + "bn2", channels, mode=bn_mode)),
            (Conv2d(store, prefix + "conv3", channels, out, 1, 1, 0, rng),
             BatchNorm(store, prefix + "bn3", out, zero_init=zero_init_residual, mode=bn_mode)),
        ]
        self._make_downsample(store, prefix, in_channels, out, stride, rng, bn_mode)

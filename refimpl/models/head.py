"""The MLP projection head: Linear -> BatchNorm1d -> ReLU -> Linear.

Contract. ``MLPHead`` maps the encoder's pooled feature h (N, in_features) to
the unnormalized embedding z (N, dim):

    z = Linear_3( ReLU( BN_1( Linear_0(h) ) ) )

with PyTorch-default biases on both Linear layers, and the names of an
``nn.Sequential`` called ``head``:

    head.0.weight (hidden, in)   head.0.bias (hidden,)
    head.1.weight, head.1.bias, head.1.running_mean, head.1.running_var,
    head.1.num_batches_tracked                        (BatchNorm1d(hidden))
    head.3.weight (dim, hidden)  head.3.bias (dim,)   (head.2 is the ReLU)

The L2 normalization of z belongs to the cosine classifier, not to the head.
"""
from refimpl.backend import rng as make_rng
from refimpl.layers.relu import relu_backward, relu_forward
from refimpl.models.blocks import BatchNorm, BatchNormMode, Linear
from refimpl.params import ParamStore


class MLPHead:
    """Linear(in, hidden) -> BatchNorm1d(hidden) -> ReLU -> Linear(hidden, dim).

    Arguments:
      in_features, hidden, dim   layer sizes (dim default 128)
      dtype, device, seed        as ResNet; draws from ``backend.rng(seed, "init", 1)``
      store, rng                 as ResNet (register into a shared store)
      bn_mode                    the network's shared ``BatchNormMode`` (None: local)
    """

    def __init__(self, in_features, hidden, dim=128, dtype=None, device=None, seed=0,
                 store=None, rng=None, bn_mode=None):
        own_store = store is None
        self.store = ParamStore(dtype, device) if own_store else store
        rng = make_rng(seed, "init", 1) if rng is None else rng
        self.bn_mode = BatchNormMode() if bn_mode is None else bn_mode
        self.fc1 = Linear(self.store, "head.0", in_features, hidden, rng=rng)
        self.bn = BatchNorm(self.store, "head.1", hidden, mode=self.bn_mode)
        self.fc2 = Linear(self.store, "head.3", hidden, dim, rng=rng)
        self.in_features, self.hidden, self.dim = in_features, hidden, dim
        if own_store:
            self.store.finalize()

    def forward(self, h, train=True):
        """h (N, in_features) -> z (N, dim), unnormalized."""
        out = self.bn.forward(self.fc1.forward(h), train)                   # (N, hidden)
        out, self.relu_cache = relu_forward(out, out=out)                  # in place
        return self.fc2.forward(out)                                        # (N, dim)

    def backward(self, dz):
        """dz (N, dim) -> dh (N, in_features); accumulates all grads."""
        d = relu_backward(self.fc2.backward(dz), self.relu_cache)           # (N, hidden)
        return self.fc1.backward(self.bn.backward(d))                       # (N, in_features)

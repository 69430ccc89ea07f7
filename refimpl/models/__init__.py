"""Models: a ResNet encoder and an MLP head sharing ONE flat parameter store.

    resnet.py       ResNet-18/34/50, torchvision layout and names, two stems
    head.py         the MLP head Linear -> BN1d -> ReLU -> Linear, "head.*"
    blocks.py       Conv2d/BatchNorm/Linear owners, BasicBlock, Bottleneck
    state_dict.py   torchvision-compatible export/import of the encoder

``Network`` (built by ``build_model``) is what training uses: encoder and head
register into the same ``ParamStore``, so all replicated parameters sit in one
buffer and all their gradients in one gradient buffer (one Allreduce). The
cosine classifier is sharded over the ranks and lives elsewhere.

    net = build_model("resnet18", stem="cifar", width=64, dim=128, seed=0)
    z = net.forward(x, train=True)          # (B, 3, H, W) -> (B, 128), unnormalized
    net.store.zero_grad(); net.backward(dz) # accumulates into net.store.grad
"""
import numbers

from refimpl.backend import rng as make_rng
from refimpl.models.head import MLPHead
from refimpl.models.resnet import ARCHS, STEMS, ResNet
from refimpl.params import ParamStore


class Network:
    """Encoder (ResNet without fc) + MLP head, in one ParamStore.

    Names: the encoder's are torchvision's (``conv1.weight``, ``layer1.0...``),
    the head's start with "head." (``head.0.weight``). The encoder draws its
    initial values from ``backend.rng(seed, "init", 0)`` and the head from
    ``backend.rng(seed, "init", 1)``, so changing the head leaves the encoder's
    initialization unchanged.

    bn_allreduce: synchronized-BN hook for every BatchNorm (None: per-rank BN).
    """

    def __init__(self, arch="resnet18", stem="cifar", width=64, head_hidden=None,
                 dim=128, dtype=None, device=None, seed=0, bn_allreduce=None):
        self.store = ParamStore(dtype, device)
        self.encoder = ResNet(arch, stem, width, num_classes=None, store=self.store,
                              rng=make_rng(seed, "init", 0), bn_allreduce=bn_allreduce)
        # Default hidden width = the encoder's feature width (MoCo v2 / SimCLR style).
        hidden = self.encoder.out_features if head_hidden is None else int(head_hidden)
        self.head = MLPHead(self.encoder.out_features, hidden, dim, store=self.store,
                            rng=make_rng(seed, "init", 1), bn_allreduce=bn_allreduce)
        self.store.finalize()
        self.dim = dim

    @property
    def bn_allreduce(self):
        """The synchronized-BN hook of every BatchNorm (None: per-rank BN)."""
        return self.encoder.bn_allreduce

    @bn_allreduce.setter
    def bn_allreduce(self, fn):
        # One switch for the encoder and the head alike.
        self.encoder.bn_allreduce = self.head.bn_allreduce = fn

    @property
    def bn_groups(self):
        """Train-mode BatchNorm in this many equal groups of the batch (default 1).

        ``bn_groups = P`` in one process computes what P ranks with per-rank
        ("local") BatchNorm compute, for checking such a run against 1 rank.
        """
        return self.encoder.bn_groups

    @bn_groups.setter
    def bn_groups(self, groups):
        if isinstance(groups, bool) or not isinstance(groups, numbers.Integral) or groups < 1:
            raise ValueError(f"bn_groups must be a positive integer, got {groups!r}")
        self.encoder.bn_groups = self.head.bn_groups = int(groups)

    def forward(self, x, train=True):
        """x (B, C, H, W) -> z (B, dim), unnormalized."""
        return self.head.forward(self.encoder.forward(x, train), train)

    def backward(self, dz):
        """dz (B, dim) -> dx (B, C, H, W); accumulates every gradient in store.grad."""
        return self.encoder.backward(self.head.backward(dz))


def build_model(arch="resnet18", stem="cifar", width=64, head_hidden=None, dim=128,
                dtype=None, device=None, seed=0, bn_allreduce=None):
    """A ``Network`` (encoder + head in one store); see its docstring."""
    return Network(arch, stem, width, head_hidden, dim, dtype, device, seed, bn_allreduce)


__all__ = ["ARCHS", "STEMS", "MLPHead", "Network", "ResNet", "build_model"]

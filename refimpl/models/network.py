"""The network that training uses: ResNet encoder + MLP head in ONE flat store.

Contract. ``Network`` (built by ``build_model``) maps images to unnormalized
embeddings:

    x (B, 3, H, W) -> encoder (ResNet, no fc) -> h (B, F) -> head -> z (B, dim)

Encoder and head register into the same ``ParamStore``, so all replicated
parameters sit in one buffer and all their gradients in one gradient buffer:
the data-parallel step sums them over the ranks with one Allreduce. The cosine
classifier is sharded over the ranks and lives in ``refimpl.parallel``.

Names: the encoder's are torchvision's (``conv1.weight``, ``layer1.0...``),
the head's start with "head." (``head.0.weight``). The encoder draws its
initial values from ``backend.rng(seed, "init", 0)`` and the head from
``backend.rng(seed, "init", 1)``, so changing the head leaves the encoder's
initialization unchanged.

BatchNorm: ``net.bn`` is the ONE ``BatchNormMode`` that every BatchNorm of
encoder and head shares (per-rank, synchronized or grouped statistics); set it
with ``parallel.data_parallel.set_batchnorm_mode(net, comm, mode)`` or
``net.bn.groups = P``.

    net = build_model("resnet18", stem="cifar", width=64, dim=128, seed=0)
    z = net.forward(x, train=True)          # (B, 3, H, W) -> (B, 128), unnormalized
    net.store.zero_grad(); net.backward(dz) # accumulates into net.store.grad
"""
from refimpl.backend import rng as make_rng
from refimpl.models.blocks import BatchNormMode
from refimpl.models.head import MLPHead
from refimpl.models.resnet import ResNet
from refimpl.params import ParamStore


class Network:
    """Encoder (ResNet without fc) + MLP head, in one ParamStore.

    Arguments: arch, stem, width as ``ResNet``; head_hidden (default: the
    encoder's feature width, MoCo v2 / SimCLR style) and dim (default 128) of
    the head; dtype, device of every parameter; seed of the initialization.
    Attributes: store, encoder, head, bn (the shared BatchNormMode), dim.
    """

    def __init__(self, arch="resnet18", stem="cifar", width=64, head_hidden=None,
                 dim=128, dtype=None, device=None, seed=0):
        self.store = ParamStore(dtype, device)
        self.bn = BatchNormMode()
        self.encoder = ResNet(arch, stem, width, num_classes=None, store=self.store,
                              rng=make_rng(seed, "init", 0), bn_mode=self.bn)
        hidden = self.encoder.out_features if head_hidden is None else int(head_hidden)
        self.head = MLPHead(self.encoder.out_features, hidden, dim, store=self.store,
                            rng=make_rng(seed, "init", 1), bn_mode=self.bn)
        self.store.finalize()
        self.dim = dim

    def features(self, x, train=False):
        """x (B, 3, H, W) -> h (B, F): the pooled encoder features (evaluation)."""
        return self.encoder.forward(x, train)

    def forward(self, x, train=True):
        """x (B, C, H, W) -> z (B, dim), unnormalized."""
        return self.head.forward(self.encoder.forward(x, train), train)

    def backward(self, dz, need_dx=True):
        """dz (B, dim) -> dx (B, C, H, W); accumulates every gradient in store.grad.

        need_dx=False skips the image's gradient (returns None): what training does.
        """
        return self.encoder.backward(self.head.backward(dz), need_dx)

    def drop_caches(self):
        """Forget what the last forward kept for a backward (every layer's cache).

        A forward that no backward follows (the contrastive prior, feature
        extraction) would otherwise hold a batch's activations until the
        next forward.
        """
        enc, head = self.encoder, self.head
        modules = [enc, enc.conv1, enc.bn1, enc.fc, head, head.fc1, head.bn, head.fc2]
        for block in enc.blocks:
            modules.append(block)
            modules += [m for pair in block.layers for m in pair]
            modules += list(block.downsample or ())
        for m in modules:
            for attr in _CACHES:
                if getattr(m, attr, None) is not None:
                    setattr(m, attr, None)


# The attributes in which the modules keep their forward's caches.
_CACHES = ("cache", "relu_cache", "relu_caches", "out_relu_cache", "pool_cache",
           "avgpool_cache")


def build_model(arch="resnet18", stem="cifar", width=64, head_hidden=None, dim=128,
                dtype=None, device=None, seed=0):
    """A ``Network`` (encoder + head in one store); see its docstring."""
    return Network(arch, stem, width, head_hidden, dim, dtype, device, seed)

"""The network of phase 2: the encoder + pool + FC over C classes, in ONE flat store.

Contract. ``FineTuneNet`` maps images to class logits:

    x (B, 3, H, W) -> encoder (ResNet, no fc) -> pool -> h (B, F) -> fc -> logits (B, C)

It is torchvision's ResNet with ``num_classes = C``, key for key: the
encoder's names (``conv1.weight``, ``layer1.0...``) then ``fc.weight``
(C, F) and ``fc.bias`` (C,), in one ``ParamStore``, so the data-parallel
step sums every gradient with one Allreduce of one flat buffer. The encoder
comes first in the buffer: ``store.data[:net.encoder_size]`` is the encoder,
the rest the FC, and each part gets its own optimizer (its own learning
rate: ``finetune.step.update``). The MLP head and the instance classifier of
phase 1 are not part of it.

Initial values: the encoder draws from ``backend.rng(seed, "init", 0)``,
exactly like ``models.Network``'s encoder (so "scratch" with seed s starts
where pretraining with seed s started), the FC from ``rng(seed, "init", 2)``
(``nn.Linear``'s default). ``load_encoder`` then overwrites the encoder with
pretrained weights (``finetune.init``).

``frozen=True`` is the linear protocol on frozen features: the encoder runs
with BatchNorm in eval mode (its running statistics, never updated), and
backward stops at the FC.

    net = FineTuneNet("resnet18", "cifar", 16, num_classes=10, dtype=np.float64)
    logits = net.forward(x, train=True)           # (B, 10)
    net.store.zero_grad(); net.backward(dlogits)  # accumulates into net.store.grad
"""
from refimpl.backend import rng as make_rng
from refimpl.models.blocks import BatchNormMode, Linear
from refimpl.models.network import _CACHES
from refimpl.models.resnet import ResNet
from refimpl.params import ParamStore


class FineTuneNet:
    """Encoder + FC in one store (module docstring).

    Arguments: arch, stem, width as ``ResNet``; num_classes C >= 2; dtype,
    device of every parameter; seed of the initialization.
    Attributes: store, encoder, fc, bn (the shared BatchNormMode),
    num_classes, encoder_size (the encoder's elements at the front of
    store.data).
    """

    def __init__(self, arch="resnet18", stem="cifar", width=64, num_classes=10, dtype=None,
                 device=None, seed=0):
        self.store = ParamStore(dtype, device)
        self.bn = BatchNormMode()
        self.encoder = ResNet(arch, stem, width, num_classes=None, store=self.store,
                              rng=make_rng(seed, "init", 0), bn_mode=self.bn)
        self.fc = Linear(self.store, "fc", self.encoder.out_features, num_classes,
                         rng=make_rng(seed, "init", 2))
        self.store.finalize()
        self.num_classes = num_classes
        self.encoder_size = self.store.offsets["fc.weight"][0]

    def features(self, x, train=False):
        """x (B, 3, H, W) -> h (B, F): the pooled encoder features."""
        return self.encoder.forward(x, train)

    def forward(self, x, train=True, frozen=False):
        """x (B, 3, H, W) -> logits (B, C).

        train: BatchNorm with batch statistics (updating its running ones);
        frozen: the encoder in eval mode whatever ``train`` says.
        """
        return self.fc.forward(self.encoder.forward(x, train and not frozen))  # (B, C)

    def backward(self, dlogits, frozen=False):
        """dlogits (B, C) -> None; accumulates the FC's gradient, and the encoder's
        unless frozen (the image's gradient is never needed)."""
        dh = self.fc.backward(dlogits)                                          # (B, F)
        if not frozen:
            self.encoder.backward(dh, need_dx=False)

    def drop_caches(self):
        """Forget the activations the last forward kept for a backward."""
        enc = self.encoder
        modules = [enc, enc.conv1, enc.bn1, self.fc]
        for block in enc.blocks:
            modules.append(block)
            modules += [m for pair in block.layers for m in pair]
            modules += list(block.downsample or ())
        for m in modules:
            for attr in _CACHES:
                if getattr(m, attr, None) is not None:
                    setattr(m, attr, None)

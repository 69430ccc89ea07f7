"""ResNet-18/34/50 encoders with torchvision's layout and parameter names.

Contract. ``ResNet`` composes the stem, four stages of residual blocks, global
average pooling and an optional fully connected layer, with the parameter
names of ``torchvision.models.resnet18/34/50`` (``conv1.weight``,
``bn1.running_mean``, ``layer1.0.conv1.weight``,
``layer2.0.downsample.0.weight``, ``fc.weight``, ...), registered in
torchvision's order, so ``store.state_dict()`` has torchvision's keys in
torchvision's order.

    x (N, 3, H, W)
      stem "imagenet": conv1 7x7/2 pad 3 - bn1 - ReLU - max pool 3x3/2 pad 1
      stem "cifar":    conv1 3x3/1 pad 1 - bn1 - ReLU          (no max pool)
      layer1..layer4   channels w, 2w, 4w, 8w (x4 for Bottleneck),
                       stride 1, 2, 2, 2 on the first block of each stage
      global average pool -> (N, 8w * expansion)
      fc (only with num_classes) -> (N, num_classes)

The width multiplier ``width`` is torchvision's 64 base width; ``width=16``
gives channels 16, 32, 64, 128 (64, 128, 256, 512 for ResNet-50).

``forward(x, train)`` keeps the caches on the object; ``backward(dout)``
returns dx and accumulates every parameter gradient into the store's flat
gradient buffer (zero it with ``store.zero_grad()`` once per step).
"""
from refimpl.backend import rng as make_rng
from refimpl.checks import check_int
from refimpl.layers.pool import (global_avgpool_backward, global_avgpool_forward,
                                 maxpool2d_backward, maxpool2d_forward)
from refimpl.layers.relu import relu_backward, relu_forward
from refimpl.models.blocks import BasicBlock, BatchNorm, BatchNormMode, Bottleneck, Conv2d, Linear
from refimpl.params import ParamStore

# arch -> (block, blocks per stage), as torchvision.
ARCHS = {
    "resnet18": (BasicBlock, (2, 2, 2, 2)),
    "resnet34": (BasicBlock, (3, 4, 6, 3)),
    "resnet50": (Bottleneck, (3, 4, 6, 3)),
}
STEMS = ("imagenet", "cifar")


class ResNet:
    """A ResNet encoder (optionally with torchvision's fc classifier).

    Arguments:
      arch         "resnet18" | "resnet34" | "resnet50"
      stem         "imagenet" (7x7/2 conv + max pool) or "cifar" (3x3/1 conv)
      width        base width (64 = torchvision)
      num_classes  None: output the pooled feature (N, out_features);
                   int: add ``fc`` like torchvision, output (N, num_classes)
      zero_init_residual  torchvision's option: last BN of each block starts at 0
      dtype, device       of the parameters (float32 default; float64 for oracles)
      seed         initialization seed: draws come from ``backend.rng(seed, "init", 0)``
      store        None: own a ParamStore and finalize it; a ParamStore: only
                   register into it (the caller adds more and finalizes)
      rng          a np.random.Generator to draw from instead of ``seed``
      bn_mode      the ``BatchNormMode`` every BatchNorm shares (None: a new,
                   local one; ``Network`` passes the one of the whole network)
    Input images have 3 channels (RGB), as torchvision's.
    """

    def __init__(self, arch="resnet18", stem="cifar", width=64, num_classes=None,
                 zero_init_residual=False, dtype=None, device=None, seed=0, store=None,
                 rng=None, bn_mode=None):
        if arch not in ARCHS:
            raise ValueError(f"arch must be one of {sorted(ARCHS)}, got {arch!r}")
        if stem not in STEMS:
            raise ValueError(f"stem must be one of {STEMS}, got {stem!r}")
        width = check_int("width", width)
        own_store = store is None
        self.store = ParamStore(dtype, device) if own_store else store
        rng = make_rng(seed, "init", 0) if rng is None else rng
        self.arch, self.stem, self.width = arch, stem, width
        self.num_classes = num_classes
        self.bn_mode = bn = BatchNormMode() if bn_mode is None else bn_mode
        block, depths = ARCHS[arch]
        s = self.store
        n0 = len(s.names())

        # Registration order = torchvision's module order = state_dict order.
        if stem == "imagenet":
            self.conv1 = Conv2d(s, "conv1", 3, width, 7, stride=2, pad=3, rng=rng)
        else:
            self.conv1 = Conv2d(s, "conv1", 3, width, 3, stride=1, pad=1, rng=rng)
        self.bn1 = BatchNorm(s, "bn1", width, mode=bn)
        self.blocks = []  # every block of layer1..layer4, in order
        channels_in = width
        for stage, depth in enumerate(depths):
            channels = width * 2 ** stage
            for i in range(depth):
                stride = 2 if (stage > 0 and i == 0) else 1
                b = block(s, f"layer{stage + 1}.{i}.", channels_in, channels, stride,
                          rng=rng, zero_init_residual=zero_init_residual, bn_mode=bn)
                self.blocks.append(b)
                channels_in = b.out_channels
        self.out_features = channels_in  # 8w (BasicBlock) or 32w (Bottleneck)
        self.fc = None
        if num_classes is not None:
            self.fc = Linear(s, "fc", channels_in, check_int("num_classes", num_classes),
                             rng=rng)
        # The names this encoder owns, in order (its torchvision state dict).
        self.state_names = s.names()[n0:]
        if own_store:
            s.finalize()

    def forward(self, x, train=True):
        """x (N, C_in, H, W) -> (N, out_features), or (N, num_classes) with fc.

        train: BatchNorm uses batch statistics and updates its running ones
        (True) or uses the running ones (False).
        """
        out = self.bn1.forward(self.conv1.forward(x), train)    # (N, w, H1, W1)
        out, self.relu_cache = relu_forward(out, out=out)      # in place: BN's new array
        if self.stem == "imagenet":
            out, self.pool_cache = maxpool2d_forward(out, 3, 2, 1)  # (N, w, H1/2, W1/2)
        for b in self.blocks:
            out = b.forward(out, train)                         # (N, C, H', W')
        out, self.avgpool_cache = global_avgpool_forward(out)   # (N, out_features)
        if self.fc is not None:
            out = self.fc.forward(out)                           # (N, num_classes)
        return out

    def backward(self, dout, need_dx=True):
        """dout like forward's output -> dx (N, C_in, H, W); accumulates all grads.

        need_dx=False: the input image needs no gradient; the stem's dx (a
        GEMM and a col2im) is skipped and None returned (the training step).
        """
        d = dout
        if self.fc is not None:
            d = self.fc.backward(d)                              # (N, out_features)
        d = global_avgpool_backward(d, self.avgpool_cache)      # (N, C, H', W')
        for b in reversed(self.blocks):
            d = b.backward(d)
        if self.stem == "imagenet":
            d = maxpool2d_backward(d, self.pool_cache)
        d = relu_backward(d, self.relu_cache)
        return self.conv1.backward(self.bn1.backward(d), need_dx)  # (N, C_in, H, W)


"""Models: a ResNet encoder and an MLP head sharing ONE flat parameter store.

In the order a forward pass runs:

    blocks.py       Conv2d / BatchNorm / Linear owners, BasicBlock, Bottleneck,
                    and BatchNormMode (one BN setting shared by the network)
    resnet.py       ResNet-18/34/50, torchvision layout and names, two stems
    head.py         the MLP head Linear -> BN1d -> ReLU -> Linear, "head.*"
    network.py      Network / build_model: encoder + head in one store
    state_dict.py   torchvision-compatible export/import of the encoder
"""
from refimpl.models.blocks import BatchNormMode
from refimpl.models.head import MLPHead
from refimpl.models.network import Network, build_model
from refimpl.models.resnet import ARCHS, STEMS, ResNet

__all__ = ["ARCHS", "STEMS", "BatchNormMode", "MLPHead", "Network", "ResNet", "build_model"]

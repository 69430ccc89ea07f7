"""An independent PyTorch ResNet + MLP head: the second oracle for refimpl.models.

Import it only where PyTorch is installed (it imports torch at once); the
rest of refimpl never imports it.

Plain ``torch.nn``, written without looking at refimpl's code path and without
importing refimpl. Module names follow torchvision (``conv1``, ``bn1``,
``layer1.0.conv1``, ``layer2.0.downsample.0``, ``fc``; the head is an
``nn.Sequential`` called ``head``), so ``state_dict()`` keys equal refimpl's and
weights move between the two by name.

    model = TorchNetwork("resnet18", stem="cifar", width=16, head_hidden=128, dim=128)
    model.load_state_dict({k: torch.from_numpy(v) for k, v in refimpl_sd.items()})

Stems: "imagenet" (7x7/2 conv, BN, ReLU, 3x3/2 max pool) and "cifar"
(3x3/1 conv, BN, ReLU). Bottleneck is torchvision's v1.5 (stride on the 3x3).
Initialization is PyTorch's own; the tests always copy refimpl's weights in.
"""
import torch
from torch import nn


class BasicBlock(nn.Module):
    expansion = 1

    def __init__(self, inplanes, planes, stride=1):
        super().__init__()
        self.conv1 = nn.Conv2d(inplanes, planes, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.relu = nn.ReLU(inplace=False)
        self.conv2 = nn.Conv2d(planes, planes, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.downsample = None
        if stride != 1 or inplanes != planes:
            self.downsample = nn.Sequential(
                nn.Conv2d(inplanes, planes, 1, stride, bias=False), nn.BatchNorm2d(planes))

    def forward(self, x):
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        identity = x if self.downsample is None else self.downsample(x)
        return self.relu(out + identity)


class Bottleneck(nn.Module):
    expansion = 4

    def __init__(self, inplanes, planes, stride=1):
        super().__init__()
        out = planes * self.expansion
        self.conv1 = nn.Conv2d(inplanes, planes, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv3 = nn.Conv2d(planes, out, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(out)
        self.relu = nn.ReLU(inplace=False)
        self.downsample = None
        if stride != 1 or inplanes != out:
            self.downsample = nn.Sequential(
                nn.Conv2d(inplanes, out, 1, stride, bias=False), nn.BatchNorm2d(out))

    def forward(self, x):
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        identity = x if self.downsample is None else self.downsample(x)
        return self.relu(out + identity)


LAYOUT = {"resnet18": (BasicBlock, [2, 2, 2, 2]),
          "resnet34": (BasicBlock, [3, 4, 6, 3]),
          "resnet50": (Bottleneck, [3, 4, 6, 3])}


class TorchResNet(nn.Module):
    """ResNet encoder; ``num_classes=None`` returns the pooled feature."""

    def __init__(self, arch="resnet18", stem="cifar", width=64, num_classes=None):
        super().__init__()
        block, depths = LAYOUT[arch]
        self.stem = stem
        if stem == "imagenet":
            self.conv1 = nn.Conv2d(3, width, 7, 2, 3, bias=False)
        else:
            self.conv1 = nn.Conv2d(3, width, 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.relu = nn.ReLU(inplace=False)
        self.maxpool = nn.MaxPool2d(3, 2, 1) if stem == "imagenet" else nn.Identity()
        inplanes = width
        for i, depth in enumerate(depths):
            planes = width * 2 ** i
            blocks = []
            for j in range(depth):
                blocks.append(block(inplanes, planes, 2 if (i > 0 and j == 0) else 1))
                inplanes = planes * block.expansion
            setattr(self, f"layer{i + 1}", nn.Sequential(*blocks))
        self.out_features = inplanes
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(inplanes, num_classes) if num_classes is not None else None

    def forward(self, x):
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        x = torch.flatten(self.avgpool(x), 1)
        return x if self.fc is None else self.fc(x)


class TorchNetwork(TorchResNet):
    """Encoder (no fc) + head ``Linear -> BatchNorm1d -> ReLU -> Linear``.

    The encoder's modules sit at the top level (not under "encoder."), so the
    keys are torchvision's plus ``head.*``, like refimpl's Network.
    """

    def __init__(self, arch="resnet18", stem="cifar", width=64, head_hidden=None, dim=128):
        super().__init__(arch, stem, width, num_classes=None)
        hidden = self.out_features if head_hidden is None else head_hidden
        self.head = nn.Sequential(nn.Linear(self.out_features, hidden),
                                  nn.BatchNorm1d(hidden), nn.ReLU(inplace=False),
                                  nn.Linear(hidden, dim))

    def forward(self, x):
        return self.head(super().forward(x))

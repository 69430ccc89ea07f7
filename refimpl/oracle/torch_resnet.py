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

``torch_training_steps``: the method's whole training step (this network, a
dense cosine classifier with smoothed targets, SGD) in plain PyTorch, P ranks
emulated as DDP behaves, recorded as a trace by the writer it is handed
(refimpl's ``TraceWriter``: this module imports nothing of refimpl), with
planted convention bugs on request. The oracle's tests and tutorial 12
replay it in refimpl.
"""
import functools

import numpy as np
import torch
from torch import nn
import torch.nn.functional as F


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


# ------------------------------------------------------------ a whole training step

PLANTED_BUGS = ("dz_times_P", "dz_over_P", "unbiased_bn", "ties")


def hardest_neighbours(W, k, tie_rule=True):
    """NK(i): the k rows j != i most similar to row i (N, k); ties to the lower id.

    ``tie_rule=False`` is a planted bug: ties to the higher id.
    """
    Wn = F.normalize(W.detach(), dim=1)
    S = Wn @ Wn.T                                                 # (N, N) cosines
    S.fill_diagonal_(-float("inf"))                               # j != i
    if tie_rule:
        return torch.sort(S, dim=1, descending=True, stable=True).indices[:, :k]
    return torch.argsort(S, dim=1, stable=True).flip(1)[:, :k]    # BUG: ties to the higher id


def unbiased_batchnorm(bn, x):
    """A planted bug: BatchNorm that normalizes with the UNBIASED batch variance
    (PyTorch normalizes with the biased one and stores the unbiased one)."""
    dims, shape = [0] + list(range(2, x.dim())), [1, -1] + [1] * (x.dim() - 2)
    mean, var = x.mean(dims), x.var(dims, unbiased=True)
    with torch.no_grad():
        bn.running_mean.mul_(1 - bn.momentum).add_(bn.momentum * mean)
        bn.running_var.mul_(1 - bn.momentum).add_(bn.momentum * var)
        bn.num_batches_tracked += 1
    xhat = (x - mean.view(shape)) / torch.sqrt(var.view(shape) + bn.eps)
    return xhat * bn.weight.view(shape) + bn.bias.view(shape)


def torch_training_steps(out, writer_class, P=1, dtype=torch.float64, lrs=(0.1, 0.05),
                         bug=None, num_classes=16, dim=16, batch_size=8, k=3, tau=0.15,
                         alpha=0.2, nesterov=False, weight_decay_mask="all",
                         logged=("loss", "z_hat", "row_max", "logsumexp"), seed=0):
    """One step per learning rate in ``lrs`` of an independent PyTorch
    implementation, traced into the folder ``out`` (returned).

    The step, with a dense classifier W (N, D) and autograd:

        z = net(x)                                   (B, D), one call per rank's b rows
        logits = normalize(z) @ normalize(W).T / tau (B, N)
        y = (1 - alpha) e_i + alpha/K sum_{j in NK(i)} e_j
        loss = mean_b( -sum_j y_bj log softmax(logits)_bj )

    P ranks are emulated in one process the way DDP behaves: the batch goes
    through the network in P chunks (per-rank BatchNorm statistics), the
    features are concatenated (the all-gather), and rank 0's BatchNorm
    buffers are kept (``broadcast_buffers``). NK is computed once from the
    initial W. The network is ``TorchNetwork("resnet18", "cifar", width=2,
    head_hidden=8, dim)``; W's entries are +-1/2, so cosines are multiples of
    1/8 and many tie: the tie rule decides real entries.

    Inputs:
      writer_class  refimpl.oracle.torch_writer.TraceWriter (or one like it):
                    called as writer_class(out, model, opt, W, hparams)
      P, dtype      the emulated world size, the run's one dtype
      bug           None or one of PLANTED_BUGS: "dz_times_P" / "dz_over_P"
                    (the feature gradient times or over P), "unbiased_bn"
                    (``unbiased_batchnorm``), "ties" (NK's ties to the higher id)
      nesterov, weight_decay_mask  SGD's nesterov; "all" (one param group) or
                    "no_bn_bias" (1-D parameters in a group without weight decay)
      logged        which of loss, z_hat, row_max, logsumexp are recorded
    """
    if bug not in (None,) + PLANTED_BUGS:
        raise ValueError(f"bug must be None or one of {PLANTED_BUGS}, got {bug!r}")
    N, D, B, K = num_classes, dim, batch_size, k
    g = np.random.default_rng(seed)
    torch.manual_seed(seed)
    model = TorchNetwork("resnet18", "cifar", width=2, head_hidden=8, dim=D).to(dtype)
    if bug == "unbiased_bn":
        for m in model.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                m.forward = functools.partial(unbiased_batchnorm, m)
    W = nn.Parameter(torch.tensor(g.choice([-0.5, 0.5], size=(N, D)), dtype=dtype))
    if weight_decay_mask == "all":
        params = list(model.parameters()) + [W]
    else:  # refimpl-train's rule: no weight decay on BatchNorm and biases
        params = [{"params": [p for p in model.parameters() if p.dim() > 1] + [W]},
                  {"params": [p for p in model.parameters() if p.dim() <= 1],
                   "weight_decay": 0.0}]
    opt = torch.optim.SGD(params, lr=lrs[0], momentum=0.9, weight_decay=5e-4,
                          nesterov=nesterov)
    # The trace: hooks on model and opt; what they cannot see is said here.
    writer = writer_class(out, model, opt, W, {"tau": tau, "alpha": alpha, "K": K,
                                               "world_size": P, "bn": "local",
                                               "neighbours": "initial_weight", "seed": seed})
    table = hardest_neighbours(W, K, tie_rule=bug != "ties")      # (N, K), once per epoch
    b = B // P
    for lr in lrs:
        x = torch.tensor(g.normal(size=(B, 3, 8, 8)), dtype=dtype)   # (B, 3, 8, 8)
        ids = torch.tensor(g.permutation(N)[:B])                     # (B,) instance ids
        rows = table[ids]                                            # (B, K)
        writer.begin_step(ids, neighbours=rows)
        zs = []
        for r in range(P):                                           # rank r's local batch
            zs.append(model(x[r * b:(r + 1) * b]))
            if r == 0:
                rank0 = {name: v.clone() for name, v in model.named_buffers()}
        z = torch.cat(zs)                                            # (B, D): the all-gather
        if bug == "dz_times_P":
            z.register_hook(lambda dz: dz * P)  # BUG: Partial FC's x P, no DDP averaging after
        if bug == "dz_over_P":
            z.register_hook(lambda dz: dz / P)  # BUG: averaged once more
        z_hat = F.normalize(z, dim=1)
        logits = z_hat @ F.normalize(W, dim=1).T / tau                # (B, N)
        y = torch.zeros(B, N, dtype=dtype)
        y[torch.arange(B), ids] = 1 - alpha
        y.scatter_add_(1, rows, torch.full((B, K), alpha / K, dtype=dtype))
        loss = -(y * F.log_softmax(logits, dim=1)).sum(dim=1).mean()  # mean over global B
        tensors = {"loss": loss, "z_hat": z_hat, "row_max": logits.max(dim=1).values,
                   "logsumexp": torch.logsumexp(logits, dim=1)}
        writer.log(**{name: tensors[name] for name in logged})
        opt.zero_grad()
        loss.backward()
        with torch.no_grad():                                         # broadcast_buffers
            for name, v in model.named_buffers():
                v.copy_(rank0[name])
        for group in opt.param_groups:
            group["lr"] = lr
        opt.step()                                                    # the step file is written
    writer.close()
    return out

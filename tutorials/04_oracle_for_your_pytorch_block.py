# %% [markdown]
# # 04 · Check your own PyTorch residual block against refimpl, tensor by tensor
#
# **You will learn** the oracle workflow: give refimpl and your
# implementation the same weights and the same batch, run a forward, a
# backward and an SGD step in float64, and compare every tensor by name,
# so that a mismatch points at one tensor instead of at "the loss differs".
#
# **You need** refimpl and PyTorch (CPU is fine; `make test` installs it).
# Run `python tutorials/04_oracle_for_your_pytorch_block.py`.
#
# ## Your implementation
#
# Here it is a torchvision-style BasicBlock with a downsample branch, written
# in plain `torch.nn`. Its module names (`conv1`, `bn1`, `downsample.0`, ...)
# are torchvision's, which refimpl uses too, so the state dicts line up.

# %%
import numpy as np
import torch
import torch.nn as nn

from refimpl.layers.loss import softmax_cross_entropy_backward, softmax_cross_entropy_forward
from refimpl.layers.pool import global_avgpool_backward, global_avgpool_forward
from refimpl.models.blocks import BasicBlock
from refimpl.optim.sgd import SGD
from refimpl.oracle import compare_tensors, format_report
from refimpl.params import ParamStore


class MyBlock(nn.Module):
    def __init__(self, cin, cout, stride):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.downsample = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False),
                                        nn.BatchNorm2d(cout))

    def forward(self, x):
        out = torch.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return torch.relu(out + self.downsample(x))


# %% [markdown]
# ## The same block in refimpl, and the same weights in both
#
# refimpl draws its weights from a seeded generator into one flat parameter
# buffer; `store.state_dict()` names them, and PyTorch loads that dict. Give
# BatchNorm non-trivial scales and shifts, or half of its backward is never
# exercised.

# %%
cin, cout, stride = 4, 8, 2
store = ParamStore(dtype=np.float64)
block = BasicBlock(store, "", cin, cout, stride, rng=np.random.default_rng(0))
store.finalize()
g = np.random.default_rng(1)
for name in store.param_names():
    if ".bias" in name or (name.startswith(("bn", "downsample.1")) and name.endswith("weight")):
        store.params[name][...] = g.uniform(0.5, 1.5, store.shapes[name])

mine = MyBlock(cin, cout, stride).double()
mine.load_state_dict({k: torch.from_numpy(v) for k, v in store.state_dict().items()})
print(f"{len(store.param_names())} parameters, {len(store.buffer_names())} buffers,"
      f" names: {store.param_names()[:3]} ...")

# %% [markdown]
# ## One training step on each side
#
# Loss: global average pool, then softmax cross-entropy against labels,
# averaged over the batch. Gradient-scale convention: refimpl's gradients are
# those of this batch-mean loss, exactly what `loss.backward()` gives.

# %%
x = g.standard_normal((6, cin, 8, 8))
labels = g.integers(0, cout, 6)
lr, momentum, wd = 0.1, 0.9, 1e-3

opt = SGD(store.data, store.grad, lr=lr, momentum=momentum, weight_decay=wd)
store.zero_grad()
out = block.forward(x, train=True)                       # (6, 8, 4, 4)
pooled, pool_cache = global_avgpool_forward(out)         # (6, 8)
loss, loss_cache = softmax_cross_entropy_forward(pooled, labels)
dx = block.backward(global_avgpool_backward(softmax_cross_entropy_backward(1.0, loss_cache),
                                            pool_cache))
grads = {n: store.grads[n].copy() for n in store.param_names()}  # before the step
opt.step()

torch_opt = torch.optim.SGD(mine.parameters(), lr=lr, momentum=momentum, weight_decay=wd)
xt = torch.tensor(x, requires_grad=True)
loss_t = nn.functional.cross_entropy(mine(xt).mean(dim=(2, 3)), torch.from_numpy(labels))
loss_t.backward()
torch_grads = {n: p.grad.numpy().copy() for n, p in mine.named_parameters()}
torch_opt.step()

# %% [markdown]
# ## Compare every tensor by name
#
# The error of a tensor is max |ours - theirs| / max |theirs|
# (`refimpl.oracle.scaled_error`). In float64 an implementation that computes
# the same function agrees to ~1e-13; anything above ~1e-8 is a bug, not
# rounding. `compare_tensors` compares two name -> array dicts in the order
# given and `format_report` prints one line per tensor.

# %%
ours = {"loss": loss, "dx": dx, **{"grad " + n: g for n, g in grads.items()},
        **{n: v for n, v in store.state_dict().items() if not n.endswith("num_batches_tracked")}}
theirs = {"loss": loss_t.item(), "dx": xt.grad.numpy(),
          **{"grad " + n: g for n, g in torch_grads.items()},
          **{n: v.numpy() for n, v in mine.state_dict().items()}}
# two independent float64 implementations: ~1e-15 here; 1e-10 is tests/tolerances.py's
# INDEPENDENT64 (100 x the largest error measured for a whole network, on every BLAS kernel)
rows, ok = compare_tensors(ours, theirs, tol=1e-10, names=list(ours))
print("loss, input gradient, gradients, then the parameters and BatchNorm running")
print("statistics after the SGD step:")
print(format_report(rows))
worst = max(d["error"] for d in rows)
print(f"worst error over {len(rows)} tensors: {worst:.1e}")
assert ok and worst < 1e-10

# %% [markdown]
# ## Try on your own
#
# - Break your block: use `nn.BatchNorm2d(cout, momentum=0.9)` (Keras' sense
#   of momentum) and rerun. Which tensors light up, and which stay at 1e-16?
# - Multiply the loss by 4 on the PyTorch side, as an implementation that
#   averages over a per-rank batch and sums over 4 ranks would: every
#   gradient is off by exactly a factor the report makes obvious.
# - The same comparison for a whole ResNet-18 is `tests/test_resnet_torch.py`.

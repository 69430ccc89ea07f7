"""Synchronized BatchNorm for any torch.distributed backend: gloo (CPU) included.

Contract. ``nn.SyncBatchNorm`` runs on CUDA tensors only (NCCL); on a CPU
process group (gloo) its forward raises "SyncBatchNorm expected input tensor
to be on GPU". ``SyncBatchNorm`` here is the same layer written with plain
``torch.distributed.all_reduce``, so a 2-process CPU job can record a
``bn = "sync"`` trace; ``convert_sync_batchnorm(model, group)`` swaps it in
for every BatchNorm, names and state kept (like
``nn.SyncBatchNorm.convert_sync_batchnorm``). Import it only where PyTorch
is installed.

    model = convert_sync_batchnorm(TorchNetwork(...), group=None)   # before DDP(...)
    model = DistributedDataParallel(model)

In training mode, over the union of the P ranks' local batches (m samples
per channel in all):

    forward   one all_reduce SUM of [sum d (C), sum d^2 (C), m] with
              d = x - running_mean (a shift every rank shares, for float32)
              mean = running_mean + sum d / m
              var  = sum d^2 / m - (sum d / m)^2     BIASED: normalizes
              y    = (x - mean) / sqrt(var + eps) * weight + bias
              running_mean = (1 - momentum) running_mean + momentum mean
              running_var  = (1 - momentum) running_var + momentum var m / (m - 1)
                                                     UNBIASED: stored
    backward  one all_reduce SUM of [sum dout (C), sum dout * xhat (C)]
              dx = weight / sqrt(var + eps) (dout - sum dout / m - xhat sum dout xhat / m)
              dweight, dbias: this rank's LOCAL sums (its share; DDP's gradient
              all-reduce combines them like every other parameter's)

PyTorch's conventions (momentum 0.1, eps 1e-5) and refimpl's sync BatchNorm
(``layers/batchnorm.py``: the same shift, the same two messages). Evaluation
mode, or a process group of one rank, is plain ``F.batch_norm``.
"""
import torch
import torch.distributed as dist
from torch import nn
import torch.nn.functional as F


class _SyncBatchNormFunction(torch.autograd.Function):
    """y = BatchNorm(x) with the statistics of every rank's x; see the module docstring."""

    @staticmethod
    def forward(ctx, x, weight, bias, running_mean, running_var, eps, momentum, group):
        C = x.shape[1]
        dims = [0] + list(range(2, x.dim()))
        shape = [1, C] + [1] * (x.dim() - 2)
        shift = running_mean.detach().view(shape)
        d = x - shift
        m_local = x.numel() // C
        stats = torch.cat([d.sum(dims), (d * d).sum(dims),
                           torch.tensor([float(m_local)], dtype=x.dtype, device=x.device)])
        dist.all_reduce(stats, group=group)                        # (2C + 1,)
        m = stats[2 * C]
        mean_d = stats[:C] / m                                     # (C,)
        var = stats[C:2 * C] / m - mean_d * mean_d                 # biased: normalizes
        mean = running_mean + mean_d
        invstd = torch.rsqrt(var + eps)                            # (C,)
        xhat = (x - mean.view(shape)) * invstd.view(shape)         # (b, C, ...)
        with torch.no_grad():
            running_mean.mul_(1 - momentum).add_(momentum * mean)
            running_var.mul_(1 - momentum).add_(momentum * var * m / (m - 1))  # unbiased
        ctx.save_for_backward(xhat, weight, invstd)
        ctx.m, ctx.group, ctx.dims, ctx.shape = m, group, dims, shape
        return xhat * weight.view(shape) + bias.view(shape)

    @staticmethod
    def backward(ctx, dout):
        xhat, weight, invstd = ctx.saved_tensors
        m, dims, shape, C = ctx.m, ctx.dims, ctx.shape, xhat.shape[1]
        dbias = dout.sum(dims)                                     # local sums: this
        dweight = (dout * xhat).sum(dims)                          # rank's share
        sums = torch.cat([dbias, dweight])
        dist.all_reduce(sums, group=ctx.group)                     # (2C,) over the ranks
        mean_dout, mean_dout_xhat = (sums[:C] / m).view(shape), (sums[C:] / m).view(shape)
        dx = (weight * invstd).view(shape) * (dout - mean_dout - xhat * mean_dout_xhat)
        return dx, dweight, dbias, None, None, None, None, None


class SyncBatchNorm(nn.modules.batchnorm._BatchNorm):
    """BatchNorm1d / BatchNorm2d with the statistics of the whole process group.

    Arguments as ``nn.SyncBatchNorm`` (num_features, eps, momentum, affine
    must be True, track_running_stats must be True, process_group: None is
    the default group). Input (b, C) or (b, C, H, W).
    """

    def __init__(self, num_features, eps=1e-5, momentum=0.1, affine=True,
                 track_running_stats=True, process_group=None, device=None, dtype=None):
        if not affine or not track_running_stats or momentum is None:
            raise ValueError("SyncBatchNorm here needs affine=True, track_running_stats=True "
                             "and a momentum (PyTorch's 0.1 is refimpl's)")
        super().__init__(num_features, eps, momentum, affine, track_running_stats, device,
                         dtype)
        self.process_group = process_group

    def _check_input_dim(self, x):
        if x.dim() not in (2, 4):
            raise ValueError(f"SyncBatchNorm: expected a 2-D or 4-D input, got {x.dim()}-D")

    def forward(self, x):
        self._check_input_dim(x)
        synced = self.training and dist.is_available() and dist.is_initialized() and \
            dist.get_world_size(self.process_group) > 1
        if not synced:
            return super().forward(x)
        self.num_batches_tracked.add_(1)
        return _SyncBatchNormFunction.apply(x, self.weight, self.bias, self.running_mean,
                                            self.running_var, self.eps, self.momentum,
                                            self.process_group)


def convert_sync_batchnorm(module, process_group=None):
    """``module`` with every BatchNorm1d / BatchNorm2d replaced by ``SyncBatchNorm``
    (same names, parameters, buffers, momentum, eps); returns the new module."""
    out = module
    if isinstance(module, nn.modules.batchnorm._BatchNorm) and \
            not isinstance(module, SyncBatchNorm):
        out = SyncBatchNorm(module.num_features, module.eps, module.momentum, module.affine,
                            module.track_running_stats, process_group,
                            device=module.weight.device, dtype=module.weight.dtype)
        with torch.no_grad():
            out.weight.copy_(module.weight)
            out.bias.copy_(module.bias)
        out.running_mean, out.running_var = module.running_mean, module.running_var
        out.num_batches_tracked = module.num_batches_tracked
        out.train(module.training)
    for name, child in module.named_children():
        out.add_module(name, convert_sync_batchnorm(child, process_group))
    return out

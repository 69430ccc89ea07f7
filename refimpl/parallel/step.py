"""One hybrid data/model-parallel training step, in the order of DESIGN.md's table.

    1   encoder + head on the local batch -> z (b, D)           data parallel
    2-5 classifier forward: gather z_hat and labels, local logits,
        max and sum all-reduces, loss                            model parallel
    6-7 classifier backward: dW_r local, dZ reduce-scattered     model parallel
    8   backward through normalize, head, encoder                data parallel
    9   one all-reduce (SUM) of the flat gradient buffer         data parallel
    10  SGD: replicated parameters (identical on every rank), W_r local

The same function runs with ``SelfComm`` (1 process) and ``MPIComm`` (P
ranks). Given the same global batch (``data.sampler``), a P-rank step equals
the 1-rank step up to float rounding: with "sync" BatchNorm directly, with
"local" BatchNorm against one process with ``net.bn_groups = P``.
"""
import math

from refimpl.backend import scalar
from refimpl.parallel.data_parallel import (allreduce_gradients, broadcast_buffers,
                                            check_replicated)


def train_step(net, clf, x, labels, comm, net_opt, clf_opt, lr=None, neighbours=None,
               alpha=0.0, topk=None, step=None, check_replicas=False):
    """One SGD step of encoder + head (``net``) and classifier shard (``clf``).

    Inputs (this rank):
      net       ``models.Network``; its BN mode set by ``set_batchnorm_mode``
      clf       ``CosineClassifier`` (this rank's shard)
      x         (b, C, H, W) local images; labels (b,) their instance ids
      net_opt   SGD over ``net.store.data`` / ``.grad``
      clf_opt   SGD over ``clf.weight`` / ``clf.grad`` (flattened)
      lr        learning rate of this step (None: each optimizer's own)
      neighbours, alpha, topk   as ``CosineClassifier.forward``
      step      the step's index, only for the error message
      check_replicas  after the update, verify that the replicated parameters
                and BN statistics are bitwise identical on every rank
                (``check_replicated``: one all_gather of two checksums)
    Outputs: (loss, acc): the global mean loss as a Python float (equal on
    every rank) and the top-k accuracies ({} unless topk).

    A non-finite loss raises FloatingPointError on every rank (the loss is
    the same everywhere) before any parameter is updated, and the BatchNorm
    running statistics are put back to what they were before the step.
    """
    store = net.store
    # The forward updates the BN running statistics; kept to undo a bad step.
    saved = (store.buffer_data.copy(),
             {n: v.copy() for n, v in store.buffers.items() if v.dtype.kind == "i"})
    store.zero_grad()
    z = net.forward(x, train=True)                                   # 1: (b, D)
    loss, acc = clf.forward(z, labels, neighbours, alpha, topk)      # 2-5
    loss = scalar(loss)
    if not math.isfinite(loss):
        store.buffer_data[...] = saved[0]
        for n, v in saved[1].items():
            store.buffers[n][...] = v
        clf.cache = None
        where = "" if step is None else f" at step {step}"
        raise FloatingPointError(f"the loss is {loss}{where}; no parameter or BatchNorm "
                                 f"statistic was updated")
    dz = clf.backward()                                              # 6-7: (b, D)
    net.backward(dz)                                                 # 8
    allreduce_gradients(net.store.grad, comm)                        # 9
    net_opt.step(lr)                                                 # 10
    clf_opt.step(lr)
    if net.bn_allreduce is None:
        # Local BN: ranks saw different batches; keep rank 0's statistics.
        broadcast_buffers(net.store, comm)
    if check_replicas:
        check_replicated(comm, {"parameters": store.data, "BN statistics": store.buffer_data})
    return loss, acc

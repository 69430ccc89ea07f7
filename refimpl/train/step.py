"""One hybrid data/model-parallel training step, in the order of docs/design.md's table.

    forward_backward:
    1   encoder + head on the local batch -> z (b, D)           data parallel
    2-5 classifier forward: gather z_hat and labels, local logits,
        max and sum all-reduces, loss                            model parallel
    6-7 classifier backward: dW_r local, dZ reduce-scattered     model parallel
    8   backward through normalize, head, encoder                data parallel
    9   one all-reduce (SUM) of the flat gradient buffer         data parallel
    update:
    10  SGD: replicated parameters (identical on every rank), W_r local
    11  "local" BN only: rank 0's running statistics to every rank (Bcast)

``train_step`` is the two together. They are separate so that a caller can
look at everything a step computed before the weights move (the oracle's
traces: z, dz, the per-row log-sum-exp, every gradient).

The same functions run with ``SelfComm`` (1 process) and ``MPIComm`` (P
ranks). Given the same global batch (``data.sampler``), a P-rank step equals
the 1-rank step up to float rounding: with "sync" BatchNorm directly, with
"local" BatchNorm against one process with ``net.bn.groups = P``.

Gradient scale: the loss is the mean over the global batch; each rank's
backward gives the gradient of its share of that mean, and the all-reduce
SUMS them (never averages, never multiplies by P).
"""
import dataclasses
import math

from refimpl.backend import scalar
from refimpl.parallel.data_parallel import (allreduce_gradients, broadcast_buffers,
                                            check_replicated)


@dataclasses.dataclass
class StepOutputs:
    """What one forward + backward computed (this rank's view).

    loss       the global mean loss (a Python float, equal on every rank)
    acc        {k: top-k accuracy of the global batch} ({} unless asked)
    z          (b, D) the local batch's unnormalized features
    dz         (b, D) the gradient of the global mean loss with respect to z
    row_max    (B,) max_j logit_bj of every row of the global batch
    logsumexp  (B,) log sum_j exp(logit_bj) of every row of the global batch
    """
    loss: float
    acc: dict
    z: object
    dz: object
    row_max: object
    logsumexp: object


def forward_backward(net, clf, x, labels, comm, targets=None, topk=None, step=None):
    """Rows 1-9: the gradients of the global mean loss, summed over the ranks.

    Inputs (this rank):
      net      ``models.Network``; its BN mode set by ``set_batchnorm_mode``
      clf      ``parallel.CosineClassifier`` (this rank's shard)
      x        (b, C, H, W) local images; labels (b,) their instance ids
      targets  None (one-hot) or sparse targets of the GLOBAL batch
               (``method.targets.target_entries``)
      topk     None or e.g. (1, 5)
      step     the step's index, only for the error message
    After it: ``net.store.grad`` holds the summed gradient of the replicated
    parameters, ``clf.grad`` this shard's; no parameter has moved (the BN
    running statistics have: a train-mode forward updates them).

    A non-finite loss raises FloatingPointError on every rank (the loss is
    the same everywhere) before any gradient is computed; the BatchNorm
    running statistics are put back to what they were before the step and
    the classifier forgets the step.
    """
    store = net.store
    saved = store.snapshot_buffers()  # the forward updates them; kept to undo a bad step
    store.zero_grad()
    z = net.forward(x, train=True)                                   # 1: (b, D)
    loss, acc = clf.forward(z, labels, targets, topk)                # 2-5
    loss = scalar(loss)
    if not math.isfinite(loss):
        store.restore_buffers(saved)
        clf.discard()
        where = "" if step is None else f" at step {step}"
        raise FloatingPointError(f"the loss is {loss}{where}; no parameter or BatchNorm "
                                 f"statistic was updated")
    row_max, lse = clf.row_max(), clf.logsumexp()                    # (B,), (B,)
    dz = clf.backward()                                              # 6-7: (b, D)
    net.backward(dz, need_dx=False)                                  # 8 (no image gradient)
    allreduce_gradients(store.grad, comm)                            # 9
    return StepOutputs(loss, acc, z, dz, row_max, lse)


def update(net, comm, net_opt, clf_opt, lr=None, check_replicas=False):
    """Rows 10-11: one SGD step of the replicated parameters and of the shard.

    lr: this step's learning rate (None: each optimizer's own), finite >= 0.
    check_replicas: after the update, verify that the replicated parameters
    and BN statistics are bitwise identical on every rank
    (``check_replicated``: one all_gather of two checksums).
    """
    if lr is not None and not 0 <= lr < float("inf"):
        raise ValueError(f"the learning rate must be finite and >= 0, got {lr}")
    net_opt.step(lr)                                                 # 10
    clf_opt.step(lr)
    if net.bn.allreduce is None:
        # 11, local BN: ranks saw different batches; keep rank 0's statistics.
        broadcast_buffers(net.store, comm)
    if check_replicas:
        check_replicated(comm, {"parameters": net.store.data,
                                "BN statistics": net.store.buffer_data})


def train_step(net, clf, x, labels, comm, net_opt, clf_opt, lr=None, targets=None,
               topk=None, step=None, check_replicas=False):
    """``forward_backward`` then ``update``: one full step; returns (loss, acc)."""
    out = forward_backward(net, clf, x, labels, comm, targets, topk, step)
    update(net, comm, net_opt, clf_opt, lr, check_replicas)
    return out.loss, out.acc

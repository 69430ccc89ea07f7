"""One data-parallel fine-tuning step: encoder + FC, softmax cross-entropy, two learning rates.

    forward_backward:
    1  encoder + pool + FC on the local batch -> logits (b, C)    data parallel
    2  local cross-entropy and top-k counts; one Allreduce SUM of
       [b * local mean loss, top-1 hits, top-5 hits] -> the global mean
       loss and accuracy (a non-finite loss stops here, on every rank)
    3  dlogits = (softmax - onehot) / B; backward through FC and encoder
    4  one Allreduce SUM of the flat gradient buffer (frozen: of the FC's
       part only, the encoder has no gradient)
    update:
    5  SGD of the encoder (lr_encoder) and of the FC (lr_fc): two optimizers
       over the two parts of the one flat buffer; replicated on every rank
    6  "local" BN only: rank 0's running statistics to every rank (Bcast)

It is phase 1's step (``train.step``) without the instance classifier:
the FC is replicated like the encoder, so no collective of rows 2-7 of
docs/design.md's table is needed. Gradient scale is the same: the loss is
the mean over the global batch B, each rank's backward gives the gradient
of its share of it, and the all-reduce SUMS them. The same code runs with
``SelfComm``; given the same global batch (``finetune.sampler``), P ranks
equal 1 rank up to rounding with ``bn = "sync"`` (and with "local" against
``net.bn.groups = P``).

Bytes per step and rank: 3 f (row 2) + G f (row 4; frozen: (C F + C) f)
+ Q f (row 6, local BN with a trained encoder) for G parameters and Q BN
buffer elements, f bytes per float; sync BN adds its per-layer sums
(docs/design.md).
"""
import dataclasses
import math

import numpy as np

from refimpl.backend import get_array_module, to_numpy
from refimpl.layers.loss import softmax_cross_entropy_backward, softmax_cross_entropy_forward
from refimpl.optim.sgd import SGD
from refimpl.parallel.data_parallel import (allreduce_gradients, broadcast_buffers,
                                            check_replicated)
from refimpl.params import is_bn_or_bias

TOPK = (1, 5)


@dataclasses.dataclass
class StepOutputs:
    """What one forward + backward computed (this rank's view).

    loss     the global mean loss (a Python float, equal on every rank)
    acc      {1: top-1, 5: top-5} of the global batch (top-5 is 1 when C <= 5)
    logits   (b, C) the local batch's logits
    dlogits  (b, C) the gradient of the global mean loss with respect to them
    """
    loss: float
    acc: dict
    logits: object
    dlogits: object


def topk_hits(logits, labels, ks=TOPK):
    """{k: number of rows whose label is among the k largest logits} (host ints).

    A label's rank counts the logits above it, and the equal ones of lower
    class ids (ties go to the lower id, like argmax).
    """
    xp = get_array_module(logits)
    labels = xp.asarray(labels)
    rows = xp.arange(logits.shape[0])
    own = logits[rows, labels][:, None]                                  # (b, 1)
    ids = xp.arange(logits.shape[1])[None, :]
    above = xp.sum((logits > own) | ((logits == own) & (ids < labels[:, None])), axis=1)  # (b,)
    return {k: int(xp.sum(above < k)) for k in ks}


def forward_backward(net, x, labels, comm, frozen=False, step=None):
    """Rows 1-4: the gradient of the global mean loss, summed over the ranks.

    net: ``finetune.FineTuneNet`` (its BN mode set); x (b, 3, S, S) local
    images; labels (b,) int class ids in [0, C); frozen: train the FC only
    (eval-mode BN, no encoder gradient); step: the index, for the message.
    After it ``net.store.grad`` holds the summed gradient (encoder part 0
    when frozen); no parameter has moved.

    A non-finite loss raises FloatingPointError on every rank before any
    gradient is computed, and the BatchNorm running statistics are put back.
    """
    store = net.store
    saved = store.snapshot_buffers()  # a train-mode forward updates them
    store.zero_grad()
    b = x.shape[0]
    logits = net.forward(x, train=True, frozen=frozen)                      # 1: (b, C)
    local_loss, cache = softmax_cross_entropy_forward(logits, labels)      # mean over b
    hits = topk_hits(logits, labels)
    totals = to_numpy(comm.all_reduce(np.array([float(local_loss) * b, hits[1], hits[5]]),
                                      "sum"))                              # 2
    B = b * comm.size
    loss = float(totals[0]) / B
    if not math.isfinite(loss):
        store.restore_buffers(saved)
        where = "" if step is None else f" at step {step}"
        raise FloatingPointError(f"the loss is {loss}{where}; no parameter or BatchNorm "
                                 f"statistic was updated")
    dlogits = softmax_cross_entropy_backward(b / B, cache)                 # 3: (b, C), / B
    net.backward(dlogits, frozen=frozen)
    grad = store.grad[net.encoder_size:] if frozen else store.grad
    allreduce_gradients(grad, comm)                                        # 4
    return StepOutputs(loss, {1: totals[1] / B, 5: totals[2] / B}, logits, dlogits)


def optimizers(net, lr_encoder, lr_fc, momentum=0.9, weight_decay=5e-4, nesterov=False,
               decay_bn_and_bias=False, frozen=False):
    """(encoder SGD, or None when frozen; FC SGD) over the two parts of the flat buffer.

    Both are PyTorch's SGD (``optim.sgd``) with their own base learning rate;
    weight decay skips BatchNorm parameters and biases unless
    decay_bn_and_bias (the mask of ``refimpl-train``). A frozen encoder gets
    no optimizer: no update, no weight decay, no momentum.
    """
    store, E = net.store, net.encoder_size
    mask = None if decay_bn_and_bias else store.decay_mask(is_bn_or_bias)

    def sgd(part, lr):
        return SGD(store.data[part], store.grad[part], lr, momentum, weight_decay, nesterov,
                   None if mask is None else mask[part])
    return (None if frozen else sgd(slice(0, E), lr_encoder)), sgd(slice(E, None), lr_fc)


def update(net, comm, encoder_opt, fc_opt, lr_encoder, lr_fc, check_replicas=False):
    """Rows 5-6: SGD of the encoder (None when frozen) and of the FC.

    check_replicas: afterwards verify that parameters and BN statistics are
    bitwise identical on every rank (one all_gather of two checksums).
    """
    for lr in (lr_encoder, lr_fc):
        if not 0 <= lr < float("inf"):
            raise ValueError(f"the learning rate must be finite and >= 0, got {lr}")
    if encoder_opt is not None:
        encoder_opt.step(lr_encoder)                                       # 5
    fc_opt.step(lr_fc)
    if net.bn.allreduce is None and encoder_opt is not None:
        broadcast_buffers(net.store, comm)                                 # 6
    if check_replicas:
        check_replicated(comm, {"parameters": net.store.data,
                                "BN statistics": net.store.buffer_data})

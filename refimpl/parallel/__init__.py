"""Hybrid data/model parallelism by hand: communicators, the sharded classifier.

In the order a training step uses them (DESIGN.md's step table):

    comm.py           SelfComm / MPIComm: all_gather next to its adjoint
                      reduce_scatter, all_reduce, bcast; byte counters; GPU
                      staging; abort_on_error
    classifier.py     the N-way cosine classifier, rows sharded over ranks:
                      gather, local logits, max/sum all-reduces, loss, backward,
                      reduce-scatter of the feature gradient
    data_parallel.py  one all-reduce (SUM) of the flat gradient buffer; replica
                      checksums; BatchNorm modes (local / sync)
    step.py           one training step, rows 1-10 of the table
"""
from refimpl.parallel.classifier import (CosineClassifier, cosine_softmax_backward,
                                         cosine_softmax_forward, shard_range, target_entries)
from refimpl.parallel.comm import (MPIComm, SelfComm, abort_on_error, detect_cuda_aware_mpi,
                                   select_gpu)
from refimpl.parallel.data_parallel import (BN_MODES, allreduce_gradients, broadcast_buffers,
                                            check_replicated, set_batchnorm_mode)
from refimpl.parallel.step import train_step

__all__ = ["BN_MODES", "CosineClassifier", "MPIComm", "SelfComm", "abort_on_error",
           "allreduce_gradients", "broadcast_buffers", "check_replicated",
           "cosine_softmax_backward", "cosine_softmax_forward", "detect_cuda_aware_mpi",
           "select_gpu", "set_batchnorm_mode", "shard_range", "target_entries", "train_step"]

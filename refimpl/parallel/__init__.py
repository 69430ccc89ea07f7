"""Hybrid data/model parallelism by hand: communicators, the sharded classifier.

In the order a training step uses them (docs/design.md's step table):

    comm.py           SelfComm / MPIComm: all_gather next to its adjoint
                      reduce_scatter, all_reduce, bcast; byte counters; GPU
                      staging
    launch.py         the job: mpirun_command (starting P ranks),
                      launched_by_mpi / world_comm (its communicator),
                      select_gpu, abort_on_error
    agreement.py      before work: the ranks agree on N, the dataset (size and
                      manifest hash) and the config, or refuse naming the ranks
    sharding.py       which rank owns which rows of W (shard_range,
                      shard_owner), and the world-size-invariant initial rows
    classifier.py     the N-way cosine classifier, rows sharded over ranks:
                      gather, local logits, max/sum all-reduces, loss, backward,
                      reduce-scatter of the feature gradient
    topk.py           top-k accuracy, counted block by block in the forward pass
    data_parallel.py  one all-reduce (SUM) of the flat gradient buffer; replica
                      checksums; BatchNorm modes (local / sync)

The step that puts them together is ``refimpl.train.step``.
"""
from refimpl.parallel.classifier import (CosineClassifier, check_targets,
                                         cosine_softmax_backward, cosine_softmax_forward,
                                         shard_softmax)
from refimpl.parallel.comm import MPIComm, SelfComm, detect_cuda_aware_mpi
from refimpl.parallel.data_parallel import (BN_MODES, allreduce_gradients, broadcast_buffers,
                                            check_replicated, set_batchnorm_mode)
from refimpl.parallel.launch import (abort_on_error, find_mpirun, launched_by_mpi, run_mpirun,
                                     mpirun_command, select_gpu, world_comm)
from refimpl.parallel.sharding import init_shard, shard_owner, shard_range

__all__ = ["BN_MODES", "CosineClassifier", "MPIComm", "SelfComm", "abort_on_error",
           "allreduce_gradients", "broadcast_buffers", "check_replicated", "check_targets",
           "cosine_softmax_backward", "cosine_softmax_forward", "detect_cuda_aware_mpi",
           "find_mpirun", "init_shard", "launched_by_mpi", "mpirun_command", "run_mpirun", "select_gpu",
           "set_batchnorm_mode", "shard_owner", "shard_range", "shard_softmax", "world_comm"]

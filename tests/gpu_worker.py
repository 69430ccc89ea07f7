"""The rank program of the GPU tests' P-rank cases, and the builders both sides share.

    mpirun -np P python tests/gpu_worker.py TASK DEVICE OUT.npz

Every rank takes the GPU of its node-local rank (on a machine with one GPU,
P ranks share it), runs TASK on DEVICE ('gpu', or 'cpu' for the dry run of
benchmarks/gpu_check.sh) and rank 0 saves the gathered results to OUT.npz
as host arrays; tests/test_gpu_method.py computes the same with the same
builders on the CPU in one process and compares.

    prior       the contrastive prior, float64, sync BN: W (N, D), the BN buffers
    neighbours  the ring neighbour search on exactly tied rows, float64 and
                float32, default and small tiles: the (N, K) tables
    features    extract_features, float64: pooled (N, F) and head (N, D)
"""
import sys

import numpy as np

from refimpl.backend import asarray, to_numpy
from refimpl.data.augment import eval_transform
from refimpl.data.synthetic import SyntheticDataset
from refimpl.evaluate.features import extract_features
from refimpl.method.neighbours import hardest_neighbours
from refimpl.method.prior import contrastive_prior
from refimpl.models import build_model
from refimpl.parallel import CosineClassifier, set_batchnorm_mode

N_PRIOR, D, B, SIZE, SEED = 37, 8, 12, 8, 3   # 37 rows: uneven shards
N_TIES, K = 61, 5
N_FEATURES = 23
TILES = {"default": (None, None), "small": (7, 11)}


def tiny_net(device, dtype=np.float64, moved_bn=False):
    """ResNet-18 width 2 + head 16 -> 8 -> 8 (seed 0) on ``device``; moved_bn: two
    train-mode forwards first, so eval-mode BN is not the identity."""
    net = build_model("resnet18", stem="cifar", width=2, head_hidden=8, dim=D, dtype=dtype,
                      device=device, seed=0)
    if moved_bn:
        warm = SyntheticDataset(16, SIZE, 4, seed=5)
        for _ in range(2):
            net.forward(eval_transform(warm.read(np.arange(16)), SIZE, device=device,
                                       dtype=dtype), train=True)
        net.drop_caches()
    return net


def prior_result(comm, device, dtype=np.float64, bn="sync", transform="eval"):
    """{"W": (N, D), "buffers": (Q,)} host arrays after the prior on comm's ranks."""
    net = tiny_net(device, dtype)
    set_batchnorm_mode(net, comm, bn)
    clf = CosineClassifier(N_PRIOR, D, comm, dtype=dtype, device=device, seed=0)
    report = contrastive_prior(net, clf, SyntheticDataset(N_PRIOR, size=SIZE), comm, B,
                               seed=SEED, transform=transform)
    return {"W": to_numpy(comm.all_gather_v(clf.weight)),
            "buffers": to_numpy(net.store.buffer_data),
            "bytes": np.array([report["bytes_sent"], report["bytes_received"]])}


def tie_rows(n=N_TIES, d=16, seed=0):
    """Rows of +-1/2: norm 2, every cosine a multiple of 1/16, exact in any order and
    precision; some rows duplicated (cosine 1), so ties decide real entries."""
    W = np.random.default_rng(seed).choice([-0.5, 0.5], size=(n, d))
    W[1:30:3] = W[0:29:3]
    return W


def neighbour_tables(comm, device, W=None):
    """{"<dtype>_<tiles>": (N, K) table} of the ring search over comm's ranks."""
    W = tie_rows() if W is None else W
    out = {}
    for dtype in (np.float64, np.float32):
        clf = CosineClassifier(W.shape[0], W.shape[1], comm, dtype=dtype, device=device)
        clf.weight[...] = asarray(W[clf.lo:clf.hi], device=device, dtype=dtype)
        for name, (rows, columns) in TILES.items():
            out[f"{np.dtype(dtype).name}_{name}"] = hardest_neighbours(clf, comm, K, rows,
                                                                       columns)
    return out


def features_result(comm, device, dtype=np.float64, batch_size=4):
    """{"pooled", "head"} of N_FEATURES images, eval-mode BN (moved statistics)."""
    net = tiny_net(device, dtype, moved_bn=True)
    data = SyntheticDataset(N_FEATURES, SIZE, 4, seed=1)
    return extract_features(net, data, comm, batch_size=batch_size)


TASKS = {"prior": prior_result, "neighbours": neighbour_tables, "features": features_result}


def main(task, device, out):
    from mpi4py import MPI

    from refimpl.parallel import MPIComm, abort_on_error, select_gpu
    comm = MPIComm(MPI.COMM_WORLD)
    with abort_on_error(comm):
        if device == "gpu":
            select_gpu(comm)
        result = TASKS[task](comm, device)
        if comm.rank == 0:
            np.savez(out, size=comm.size, **{k: to_numpy(v) for k, v in result.items()})
        comm.barrier()


if __name__ == "__main__":
    main(*sys.argv[1:4])

"""Data parallelism in one process (refimpl.parallel.data_parallel):
``check_replicated`` / ``checksum``, ``set_batchnorm_mode``, and a sync-BN step
on one rank = a local-BN step."""
import numpy as np
import pytest

from refimpl.oracle import check_tensor
from refimpl.parallel import SelfComm, check_replicated, set_batchnorm_mode
from refimpl.parallel.data_parallel import checksum
from refimpl.train.step import train_step
from parallel_problem import make_step, small_net
from tolerances import LAYER64


class StaleRank1(SelfComm):
    """all_gather as if a rank 1 held different bytes for the second array."""

    def all_gather(self, x):
        table = np.concatenate([x, x])
        table[1, 1] += 1
        return table


def test_check_replicated_and_checksum():
    """Equal replicas pass; one changed bit changes the CRC; a stale rank is named."""
    a = np.arange(5.0)
    assert check_replicated(SelfComm(), {"a": a, "b": np.ones((2, 3))}) is None
    c = checksum(a)
    assert checksum(a.copy()) == c
    b = a.copy()
    b[3] = np.nextafter(b[3], 10)  # one bit of one element
    assert checksum(b) != c
    m = np.arange(12.0).reshape(3, 4)
    assert checksum(m[:, ::2]) == checksum(np.ascontiguousarray(m[:, ::2]))
    with pytest.raises(RuntimeError, match=r"differ between ranks: b \(ranks \[1\] differ"):
        check_replicated(StaleRank1(), {"a": a, "b": b})


def test_set_batchnorm_mode():
    """'sync' installs a sum all-reduce hook in encoder and head; 'local' removes it."""
    net, comm = small_net(), SelfComm()
    with pytest.raises(ValueError, match=r"bn mode must be one of \('local', 'sync'\)"):
        set_batchnorm_mode(net, comm, "bogus")
    assert net.bn.allreduce is None
    # One setting: every BatchNorm of encoder and head holds the network's object.
    assert net.head.bn.mode is net.bn and net.encoder.bn1.mode is net.bn
    assert all(bn.mode is net.bn for b in net.encoder.blocks for _, bn in b.layers)
    set_batchnorm_mode(net, comm, "sync")
    assert callable(net.bn.allreduce)
    v = np.arange(3.0)
    np.testing.assert_array_equal(net.bn.allreduce(v), v)  # the sum over 1 rank
    assert comm.counters["all_reduce_sum"]["calls"] == 1
    set_batchnorm_mode(net, comm, "local")
    assert net.bn.allreduce is None


def test_sync_bn_step_equals_local_bn_step_on_one_rank():
    """On one rank synchronized BN is plain BN (one-pass variance: to rounding)."""
    losses, params = [], []
    for mode in ("local", "sync"):
        net, clf, net_opt, clf_opt, x, labels = make_step()
        set_batchnorm_mode(net, clf.comm, mode)
        losses.append(train_step(net, clf, x, labels, clf.comm, net_opt, clf_opt)[0])
        params.append(net.store.data.copy())
    check_tensor("loss", losses[1], losses[0], LAYER64)
    check_tensor("params", params[1], params[0], LAYER64)

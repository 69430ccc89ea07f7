"""World-size-invariant batching: the global batch of a step does not depend on P."""
import zlib

import numpy as np
import pytest

from refimpl.data.sampler import epoch_permutation, global_batches, local_slice, steps_per_epoch


def test_permutation_is_deterministic_and_a_permutation():
    p = epoch_permutation(100, seed=3, epoch=1)
    assert p.dtype == np.int64 and p.shape == (100,)
    np.testing.assert_array_equal(np.sort(p), np.arange(100))
    np.testing.assert_array_equal(p, epoch_permutation(100, 3, 1))
    assert not np.array_equal(p, epoch_permutation(100, 3, 2))  # epoch matters
    assert not np.array_equal(p, epoch_permutation(100, 4, 1))  # seed matters
    # pinned value: the named stream rng(seed, "sampler", epoch), nothing else
    tag = zlib.crc32(b"sampler")
    np.testing.assert_array_equal(p, np.random.default_rng([3, tag, 1, 1]).permutation(100))


def test_global_batches_and_steps():
    batches = global_batches(103, 10, seed=0, epoch=0)
    assert len(batches) == steps_per_epoch(103, 10) == 10
    assert all(b.shape == (10,) and b.dtype == np.int64 for b in batches)
    np.testing.assert_array_equal(np.concatenate(batches), epoch_permutation(103, 0, 0)[:100])
    batches = global_batches(103, 10, seed=0, epoch=0, drop_last=False)
    assert len(batches) == steps_per_epoch(103, 10, drop_last=False) == 11
    assert batches[-1].shape == (3,)
    np.testing.assert_array_equal(np.sort(np.concatenate(batches)), np.arange(103))
    with pytest.raises(ValueError, match="no batch"):
        global_batches(5, 10, 0, 0)
    with pytest.raises(ValueError, match="batch_size must be a positive integer, got 0"):
        steps_per_epoch(5, 0)


@pytest.mark.parametrize("world_size", [1, 2, 3, 4])
def test_local_slices_rebuild_the_global_batch(world_size):
    B = 12  # divisible by 1, 2, 3, 4
    for step, batch in enumerate(global_batches(50, B, seed=7, epoch=2)):
        parts = [local_slice(batch, r, world_size) for r in range(world_size)]
        assert all(p.shape == (B // world_size,) for p in parts)
        np.testing.assert_array_equal(np.concatenate(parts), batch)
        # rank r holds entries [r*b, (r+1)*b)
        b = B // world_size
        np.testing.assert_array_equal(parts[-1], batch[(world_size - 1) * b:])
    # and the global batches themselves do not depend on anything but (seed, epoch)
    np.testing.assert_array_equal(global_batches(50, B, 7, 2)[1], epoch_permutation(50, 7, 2)[12:24])


def test_local_slice_errors():
    batch = np.arange(10)
    with pytest.raises(ValueError, match="10 is not divisible by world size 4"):
        local_slice(batch, 0, 4)
    with pytest.raises(ValueError, match=r"rank must be an integer in \[0, 1\], got 2"):
        local_slice(batch, 2, 2)
    with pytest.raises(ValueError, match="world_size must be a positive integer, got 0"):
        local_slice(batch, 0, 0)
    with pytest.raises(ValueError, match="n must be a non-negative integer, got 3.0"):
        epoch_permutation(3.0, 0, 0)
    with pytest.raises(ValueError, match="1-d"):
        local_slice(batch.reshape(2, 5), 0, 1)

# %% [markdown]
# # 03 · Feed P ranks so that they see exactly what 1 rank sees
#
# **You will learn** how refimpl decides the global batch of a step, how each
# rank takes its share, and why every random augmentation is seeded by
# (seed, epoch, instance id) rather than by a rank's own random stream. This
# is what lets a P-rank training run be compared with a 1-rank run number by
# number (docs/design.md, "World-size invariance").
#
# **You need** refimpl with its data extra (`make test` installs it): the
# tutorial packs scikit-learn's bundled digits (no download) into a temporary
# folder. Run `python tutorials/03_world_size_invariant_batches.py`.
#
# ## The rule
#
#     perm      = permutation of 0..N-1 from the stream (seed, "sampler", epoch)
#     batch_t   = perm[t*B : (t+1)*B]                   global batch of step t
#     rank r    = batch_t[r*b : (r+1)*b],  b = B / P    its local batch
#     pixels(i) = augment(image i, stream (seed, "augment", epoch, i))

# %%
import shutil
import tempfile
from pathlib import Path

import numpy as np

from data_tools.digits import make_digits
from refimpl.data import PackedDataset, global_batches, local_slice
from refimpl.data.augment import augment_batch

tmp = Path(tempfile.mkdtemp())
train_dir, _ = make_digits(tmp / "digits", size=32)
ds = PackedDataset(train_dir)
print(f"{len(ds)} training images of size {ds.image_size}, memory-mapped: "
      f"{type(ds.images).__name__}")

seed, epoch, B = 0, 3, 12
batch = global_batches(len(ds), B, seed, epoch)[0]     # step 0's global batch, (B,)
print("global batch of step 0:", batch.tolist())

# %% [markdown]
# ## Every world size splits the same batch
#
# Each rank computes the same permutation (it depends on seed and epoch only)
# and keeps a contiguous slice. Concatenating the slices of ranks 0..P-1
# gives back the global batch, whatever P is.

# %%
for P in (1, 2, 3, 4):
    slices = [local_slice(batch, r, P) for r in range(P)]
    print(f"P={P}: " + " | ".join(str(s.tolist()) for s in slices))
    assert np.array_equal(np.concatenate(slices), batch)

# %% [markdown]
# ## Every instance gets its own augmentation, wherever it lands
#
# Rank r augments only its own b images. Because image i's crop, flip and
# colour jitter come from the stream (seed, "augment", epoch, i), the pixels
# that 4 ranks produce, put side by side, are the pixels that 1 rank produces
# for the whole batch: bit for bit.

# %%
one_rank = augment_batch(ds.read(batch), batch, seed, epoch, out_size=32)   # (B, 3, 32, 32)
P = 4
per_rank = [augment_batch(ds.read(ids), ids, seed, epoch, out_size=32)
            for ids in (local_slice(batch, r, P) for r in range(P))]
four_ranks = np.concatenate(per_rank)                                        # (B, 3, 32, 32)
print("augmented batch", one_rank.shape, one_rank.dtype,
      "| max |1 rank - 4 ranks| =", float(np.abs(one_rank - four_ranks).max()))
assert np.array_equal(one_rank, four_ranks)  # each image alone, in one process: the same bits

# %% [markdown]
# A different epoch draws a different augmentation of the same image, and a
# rank-local random stream would have broken the equality above.

# %%
next_epoch = augment_batch(ds.read(batch), batch, seed, epoch + 1, out_size=32)
changed = float(np.abs(next_epoch - one_rank).mean())
print(f"mean |epoch {epoch} - epoch {epoch + 1}| = {changed:.3f} (normalized units)")
assert changed > 0.05  # another augmentation: O(0.1) apart, not rounding
shutil.rmtree(tmp)  # the packed digits were only for this tutorial

# %% [markdown]
# ## Try on your own
#
# - `local_slice(batch, 0, 5)` with B = 12: why must B be divisible by P?
# - Look at what the network is trained on:
#   `python -m data_tools.preview <folder>/train --out grid.png`.

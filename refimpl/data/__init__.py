"""Data: which dataset, which instances each step, their augmented pixels.

In the order a training step uses them:

    datasets   open_dataset: a packed folder, a "synthetic:..." spec or a dataset object
    packed     the packed-dataset format: write_packed / PackedWriter / PackedDataset
    synthetic  SyntheticDataset / open_synthetic: shapes x textures generated on the fly
    sampler    epoch_permutation / global_batches / local_slice / steps_per_epoch
    augment    vectorized NumPy/CuPy augmentations (import refimpl.data.augment)
    resample   the bilinear resampler that augment's crops and the generators share

Packed datasets are made by the converters in ``data_tools`` (image folders,
CIFAR, scikit-learn digits, generated data); see ``python -m data_tools``.
"""
from refimpl.data.datasets import open_dataset
from refimpl.data.packed import (FORMAT_VERSION, PackedDataset, PackedFormatError,
                                 PackedWriter, write_packed)
from refimpl.data.sampler import (epoch_permutation, global_batches, local_slice,
                                  steps_per_epoch)
from refimpl.data.synthetic import SyntheticDataset, open_synthetic

__all__ = ["open_dataset", "FORMAT_VERSION", "PackedDataset", "PackedFormatError",
           "PackedWriter", "write_packed", "SyntheticDataset", "open_synthetic",
           "epoch_permutation", "global_batches", "local_slice", "steps_per_epoch"]

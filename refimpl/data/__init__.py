"""Data: the packed-dataset format, world-size-invariant batching, augmentations.

    packed   write_packed / PackedWriter / PackedDataset / open_dataset
    sampler  epoch_permutation / global_batches / local_slice / steps_per_epoch
    augment  vectorized NumPy augmentations (import refimpl.data.augment)

Packed datasets are made by the converters in ``data_tools`` (image folders,
CIFAR, scikit-learn digits, generated data); see ``python -m data_tools``.
"""
from refimpl.data.packed import (FORMAT_VERSION, PackedDataset, PackedFormatError,
                                 PackedWriter, open_dataset, write_packed)
from refimpl.data.sampler import (epoch_permutation, global_batches, local_slice,
                                  steps_per_epoch)

__all__ = ["FORMAT_VERSION", "PackedDataset", "PackedFormatError", "PackedWriter",
           "open_dataset", "write_packed", "epoch_permutation", "global_batches",
           "local_slice", "steps_per_epoch"]

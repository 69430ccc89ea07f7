"""Which dataset a training or evaluation run reads: one argument, three kinds.

    open_dataset(spec) -> a dataset object

spec is one of
  * a folder path (str or os.PathLike) -> ``refimpl.data.packed.PackedDataset``
    (made by the converters in ``data_tools``);
  * a string "synthetic:n=N,size=S,classes=K,seed=X" ->
    ``refimpl.data.synthetic.open_synthetic`` (generated on the fly, no files);
  * an object that already has ``read`` and ``labels`` -> itself.

Every dataset object offers the same reader interface: ``len(ds)``,
``ds.labels`` int64 (N,) (-1 = unknown), ``ds.class_names``,
``ds.image_size`` (H, W), ``ds.manifest`` and ``ds.read(indices)`` -> uint8
(n, H, W, 3).

    dataset_identity(ds) -> (N, sha256 hex of the manifest's canonical JSON)

is what two copies of one dataset share (a packed manifest holds the sha256
of both ``.npy`` files): the ranks of a job compare it before they train.
"""
import hashlib
import json
import os

from refimpl.data.packed import PackedDataset
from refimpl.data.synthetic import SPEC_PREFIX, open_synthetic


def open_dataset(spec):
    """A dataset object for ``spec`` (a folder path, a "synthetic:..." spec, or a dataset)."""
    if isinstance(spec, str) and spec.startswith(SPEC_PREFIX):
        return open_synthetic(spec)
    if isinstance(spec, (str, os.PathLike)):
        return PackedDataset(spec)
    if hasattr(spec, "read") and hasattr(spec, "labels"):
        return spec
    raise TypeError(f"open_dataset: expected a path (a packed dataset folder), a 'synthetic:...' "
                    f"spec or an object with read() and labels, got {type(spec).__name__}")


def dataset_identity(ds):
    """(N, hex sha256 of ``ds.manifest`` as canonical JSON; "" hashed when it has none)."""
    manifest = getattr(ds, "manifest", None)
    text = json.dumps(manifest, sort_keys=True, separators=(",", ":"), default=str)
    return len(ds), hashlib.sha256(text.encode()).hexdigest()

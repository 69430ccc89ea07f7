"""Convert CIFAR-10 / CIFAR-100 (official "python version") into packed datasets.

    python -m data_tools.cifar SRC OUT [--dataset auto|cifar10|cifar100] [--overwrite]

SRC is one of
  * the extracted folder (cifar-10-batches-py/ or cifar-100-python/), or a
    folder that contains it;
  * the downloaded archive (cifar-10-python.tar.gz / cifar-100-python.tar.gz).
    Members are read into memory by name (tarfile.extractfile); nothing is
    extracted to disk, so a crafted archive cannot write outside OUT.

OUT/train and OUT/test are written as packed datasets (32 x 32 RGB, uint8),
both or neither (``refimpl.data.packed.PackedSplits``): every batch of both
splits is read and checked first, both are written to a staging folder, and
only then are both published. An existing OUT/train or OUT/test is replaced
only with --overwrite, and never so that one split is new and the other old.

A damaged archive (truncated download, corrupt gzip stream) is one error
naming the file: "<file>: truncated or corrupt archive (...)".

  CIFAR-10:  train = data_batch_1..5 in that order, test = test_batch;
             labels from b"labels", class_names from batches.meta b"label_names".
  CIFAR-100: train = train, test = test; labels are the FINE labels
             (b"fine_labels", 100 classes, names from meta b"fine_label_names").
             The coarse labels are recorded in the manifest, not as an extra
             array: every fine class belongs to exactly one superclass, so
             "fine_to_coarse" (100 ints, -1 for a fine class absent from the
             split) plus "coarse_class_names" give coarse = fine_to_coarse[label].
             A fine class seen with two different coarse labels is an error.

Each manifest's "files" lists "<batch>/<filename>" from b"filenames".

SECURITY: the official files are Python pickles, and unpickling can run code.
Only convert files you trust, from the path you give. As a second line of
defence the loader is a restricted Unpickler that accepts only plain Python
containers and NumPy arrays (it refuses every other class, e.g. os.system).

Rows come as (N, 3072) uint8 in channel-major order (1024 red, 1024 green,
1024 blue, each row-major 32 x 32) and become (N, 32, 32, 3).
"""
import argparse
import io
import lzma
import pickle
import sys
import tarfile
import zlib
from pathlib import Path

import numpy as np

from data_tools.cli import add_version, run
from refimpl.data.packed import PackedSplits

LAYOUTS = {
    "cifar10": {"folder": "cifar-10-batches-py", "meta": "batches.meta",
                "train": ["data_batch_1", "data_batch_2", "data_batch_3", "data_batch_4",
                          "data_batch_5"],
                "test": ["test_batch"]},
    "cifar100": {"folder": "cifar-100-python", "meta": "meta", "train": ["train"], "test": ["test"]},
}

# The only globals a CIFAR pickle needs: NumPy's array reconstruction, and
# _codecs.encode, which Python 3 uses to pickle bytes at protocol 2.
_ALLOWED_GLOBALS = {
    ("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
    ("numpy.core.multiarray", "scalar"), ("numpy._core.multiarray", "scalar"),
    ("numpy", "ndarray"), ("numpy", "dtype"), ("_codecs", "encode"),
}


class _RestrictedUnpickler(pickle.Unpickler):
    """An Unpickler that builds only containers, numbers, strings and NumPy arrays."""

    def find_class(self, module, name):
        if (module, name) in _ALLOWED_GLOBALS:
            if module == "_codecs":
                import codecs
                return codecs.encode
            # Python 2 / NumPy 1 pickles name numpy.core, which NumPy 2 renamed.
            import numpy
            core = getattr(numpy, "_core", None) or numpy.core
            if name in ("_reconstruct", "scalar"):
                return getattr(core.multiarray, name)
            return getattr(numpy, name)
        raise pickle.UnpicklingError(f"refusing to load {module}.{name} from a CIFAR file "
                                     f"(only NumPy arrays and plain containers are allowed)")


def _unpickle(data, name):
    """Bytes of one CIFAR file -> dict with str keys (official files have bytes keys)."""
    try:
        obj = _RestrictedUnpickler(io.BytesIO(data), encoding="bytes").load()
    except pickle.UnpicklingError as e:
        raise ValueError(f"{name}: {e}") from e
    except Exception as e:
        raise ValueError(f"{name}: not a readable CIFAR pickle ({type(e).__name__}: {e})") from e
    if not isinstance(obj, dict):
        raise ValueError(f"{name}: expected a pickled dict, got {type(obj).__name__}")
    return {(k.decode("latin1") if isinstance(k, bytes) else k): v for k, v in obj.items()}


def _text(v):
    return v.decode("utf-8") if isinstance(v, bytes) else str(v)


# --------------------------------------------------------------------------
# sources: a folder or a tar.gz, both give bytes by member name


class _FolderSource:
    def __init__(self, root):
        self.root = root

    def names(self):
        return {p.name for p in self.root.iterdir() if p.is_file()}

    def read(self, name):
        return (self.root / name).read_bytes()

    def describe(self, name):
        return str(self.root / name)

    def close(self):
        pass


# What tarfile and its decompressors raise on a damaged archive: ReadError (a
# TarError) for a cut-off tar, EOFError for a cut-off gzip/bz2/xz stream,
# zlib.error / OSError for corrupt compressed data, lzma.LZMAError.
_DAMAGED = (tarfile.TarError, EOFError, zlib.error, lzma.LZMAError, OSError)


class _TarSource:
    """Members of a CIFAR tar.gz, read in memory by name (no extraction)."""

    def __init__(self, path):
        self.path = path
        try:
            self.tar = tarfile.open(path, mode="r:*")
        except (EOFError, zlib.error, lzma.LZMAError) as e:  # cut within the first block
            raise ValueError(self._damaged(e)) from e
        except (tarfile.TarError, OSError) as e:
            raise ValueError(f"{path}: not a readable tar archive ({e})") from e
        # Regular files exactly one folder deep, e.g. "cifar-10-batches-py/data_batch_1".
        self.members = {}
        try:
            members = self.tar.getmembers()  # reads the whole archive: damage surfaces here
        except _DAMAGED as e:
            self.tar.close()
            raise ValueError(self._damaged(e)) from e
        for m in members:
            parts = m.name.split("/")
            if m.isfile() and len(parts) == 2:
                self.members.setdefault(parts[0], {})[parts[1]] = m

    def _damaged(self, e):
        return f"{self.path}: truncated or corrupt archive ({type(e).__name__}: {e})"

    def folder(self, name):
        self.folder_name = name
        return self

    def names(self):
        return set(self.members.get(self.folder_name, {}))

    def read(self, name):
        try:
            return self.tar.extractfile(self.members[self.folder_name][name]).read()
        except _DAMAGED as e:
            raise ValueError(self._damaged(e)) from e

    def describe(self, name):
        return f"{self.path}:{self.folder_name}/{name}"

    def close(self):
        self.tar.close()


def _open_source(src, dataset):
    """(dataset name, source) for SRC, detecting cifar10/cifar100 unless given."""
    src = Path(src)
    if not src.exists():
        raise FileNotFoundError(f"{src}: no such file or folder")
    kinds = [dataset] if dataset != "auto" else list(LAYOUTS)
    if src.is_file():
        tar = _TarSource(src)
        for kind in kinds:
            if LAYOUTS[kind]["folder"] in tar.members:
                return kind, tar.folder(LAYOUTS[kind]["folder"])
        tar.close()
        raise ValueError(f"{src}: no {' or '.join(LAYOUTS[k]['folder'] + '/' for k in kinds)} "
                         f"folder in the archive (found: {sorted(tar.members) or 'nothing'})")
    for kind in kinds:
        lay = LAYOUTS[kind]
        for root in (src, src / lay["folder"]):
            if (root / lay["meta"]).is_file():
                return kind, _FolderSource(root)
    raise ValueError(f"{src}: not a CIFAR python folder (looked for "
                     f"{' or '.join(LAYOUTS[k]['meta'] for k in kinds)} in it and in "
                     f"{' or '.join(LAYOUTS[k]['folder'] for k in kinds)}/)")


# --------------------------------------------------------------------------
# conversion


def rows_to_images(data, name="data"):
    """uint8 (N, 3072) channel-major rows -> uint8 (N, 32, 32, 3)."""
    data = np.asarray(data)
    if data.ndim != 2 or data.shape[1] != 3072:
        raise ValueError(f"{name}: expected data shaped (N, 3072), got {data.shape}")
    if data.dtype != np.uint8:
        if not np.issubdtype(data.dtype, np.integer) or data.min() < 0 or data.max() > 255:
            raise ValueError(f"{name}: expected uint8 pixel values, got {data.dtype}")
        data = data.astype(np.uint8)
    return data.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1).copy()  # (N, 32, 32, 3)


def _labels(batch, key, n, num_classes, name):
    if key not in batch:
        raise ValueError(f"{name}: missing key b{key!r}")
    labels = np.asarray(batch[key])
    if labels.shape != (n,) or not (np.issubdtype(labels.dtype, np.integer) or n == 0):
        raise ValueError(f"{name}: {key} must be {n} integers, got {labels.dtype} {labels.shape}")
    if n and (labels.min() < 0 or labels.max() >= num_classes):
        raise ValueError(f"{name}: {key} out of range [0, {num_classes}): "
                         f"min {labels.min()}, max {labels.max()}")
    return labels.astype(np.int64)


def load_split(source, kind, split, class_names, coarse_names=None):
    """Read one split -> (images (N,32,32,3), labels (N,), files, coarse labels or None)."""
    lay = LAYOUTS[kind]
    available = source.names()
    missing = [b for b in lay[split] if b not in available]
    if missing:
        raise ValueError(f"{split} split incomplete: missing "
                         f"{', '.join(source.describe(b) for b in missing)}")
    images, labels, files, coarse = [], [], [], []
    for b in lay[split]:
        name = source.describe(b)
        batch = _unpickle(source.read(b), name)
        if "data" not in batch:
            raise ValueError(f"{name}: missing key b'data'")
        x = rows_to_images(batch["data"], name)
        n = x.shape[0]
        key = "labels" if kind == "cifar10" else "fine_labels"
        labels.append(_labels(batch, key, n, len(class_names), name))
        if kind == "cifar100":
            coarse.append(_labels(batch, "coarse_labels", n, len(coarse_names), name))
        fnames = batch.get("filenames")
        if fnames is None or len(fnames) != n:
            raise ValueError(f"{name}: expected {n} filenames")
        files += [f"{b}/{_text(f)}" for f in fnames]
        images.append(x)
    return (np.concatenate(images), np.concatenate(labels), files,
            np.concatenate(coarse) if coarse else None)


def fine_to_coarse_map(fine, coarse, num_fine, name):
    """list of num_fine ints: the coarse class of each fine class (-1 if unseen)."""
    mapping = np.full(num_fine, -1, dtype=np.int64)
    for f in np.unique(fine):
        cs = np.unique(coarse[fine == f])
        if cs.size != 1:
            raise ValueError(f"{name}: fine class {f} appears with coarse labels {cs.tolist()}")
        mapping[f] = cs[0]
    return mapping.tolist()


def convert_cifar(src, out, dataset="auto", overwrite=False):
    """Convert CIFAR at ``src`` into out/train and out/test; returns (train, test) Paths."""
    if dataset not in ("auto",) + tuple(LAYOUTS):
        raise ValueError(f"--dataset must be auto, cifar10 or cifar100, got {dataset!r}")
    # Check both targets before reading or writing anything.
    splits = PackedSplits(out, ("train", "test"), overwrite=overwrite)
    kind, source = _open_source(src, dataset)
    try:
        loaded, class_names, coarse_names = _read_all(source, kind)
    finally:
        source.close()
    lay = LAYOUTS[kind]
    # Every check of the input happens before the first write; PackedSplits
    # publishes both splits or neither if writing fails.
    manifests = {}
    for split, (images, labels, files, coarse) in loaded.items():
        manifest = {"source": {"tool": "data_tools.cifar", "dataset": kind,
                               "src": str(Path(src).resolve()), "batches": lay[split]},
                    "split": split, "class_names": class_names, "files": files}
        if kind == "cifar100":
            manifest["coarse_class_names"] = coarse_names
            manifest["fine_to_coarse"] = fine_to_coarse_map(labels, coarse, len(class_names),
                                                            source.describe(lay[split][0]))
        manifests[split] = manifest
    with splits:
        for split in ("train", "test"):
            splits.write(split, loaded[split][0], loaded[split][1], manifests[split])
    return splits.paths


def _names(meta, key, where):
    """meta[key] as a list of str (absent: []); anything but a list is an error naming it."""
    names = meta.get(key, [])
    if not isinstance(names, (list, tuple)):
        raise ValueError(f"{where}: b{key!r} must be a list of class names, got "
                         f"{type(names).__name__} {names!r:.40}")
    return [_text(c) for c in names]


def _read_all(source, kind):
    """Read and check meta and both splits -> ({split: load_split(...)}, class_names, coarse_names)."""
    lay = LAYOUTS[kind]
    if lay["meta"] not in source.names():
        raise ValueError(f"missing {source.describe(lay['meta'])}")
    meta = _unpickle(source.read(lay["meta"]), source.describe(lay["meta"]))
    name_key = "label_names" if kind == "cifar10" else "fine_label_names"
    if name_key not in meta:
        raise ValueError(f"{source.describe(lay['meta'])}: missing key b{name_key!r}")
    class_names = _names(meta, name_key, source.describe(lay["meta"]))
    coarse_names = (_names(meta, "coarse_label_names", source.describe(lay["meta"]))
                    if kind == "cifar100" else None)
    if kind == "cifar100" and not coarse_names:
        raise ValueError(f"{source.describe(lay['meta'])}: missing key b'coarse_label_names'")

    # Read and check both splits fully before writing either one.
    loaded = {split: load_split(source, kind, split, class_names, coarse_names)
              for split in ("train", "test")}
    return loaded, class_names, coarse_names


def build_parser():
    p = argparse.ArgumentParser(
        prog="python -m data_tools.cifar",
        description="Convert CIFAR-10/100 (official python version: the extracted folder or the "
                    ".tar.gz) into OUT/train and OUT/test packed datasets. The files are Python "
                    "pickles: only convert files you trust.")
    p.add_argument("src", metavar="SRC", help="cifar-10-batches-py/ or cifar-100-python/ "
                   "(or a folder holding it), or the .tar.gz")
    p.add_argument("out", metavar="OUT", help="output folder; OUT/train and OUT/test are created")
    p.add_argument("--dataset", choices=("auto", "cifar10", "cifar100"), default="auto",
                   help="which CIFAR (default: detected from the files)")
    p.add_argument("--overwrite", action="store_true", help="replace existing OUT/train, OUT/test")
    add_version(p)
    return p


def main(argv=None):
    """Command-line entry point; returns the exit status (0 ok, 1 error)."""
    args = build_parser().parse_args(argv)
    return run("cifar", lambda: "wrote " + ", ".join(map(str, convert_cifar(
        args.src, args.out, dataset=args.dataset, overwrite=args.overwrite))))


if __name__ == "__main__":
    sys.exit(main())

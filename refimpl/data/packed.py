"""The packed dataset format: one folder, three files, read by memory map.

This module owns both sides of the format, so reader and writer cannot drift.

A dataset folder holds

    images.npy     uint8, (N, H, W, 3), RGB, C order (a plain ``.npy`` file)
    labels.npy     int64, (N,); -1 where the label is unknown
    manifest.json  format_version, source, class_names, image_size [H, W],
                   num_images, checksums {"images.npy": sha256, "labels.npy":
                   sha256}, files (per-image source paths, or null for
                   generated data), skipped ([{path, reason}]), plus any extra
                   keys the writer was given.

Why ``.npy``: NumPy maps it without a custom reader (``np.load(mmap_mode="r")``)
so a training run touches only the rows of its batch, and any other language
can read it from the 64-byte-aligned header.

Writing is atomic: everything goes to a temporary folder next to ``out_dir``
that is renamed into place only once the arrays, the checksums and the
manifest are complete. A crash or a bad image leaves no half-written dataset,
and an existing ``out_dir`` is never replaced unless ``overwrite=True`` (and
even then only if it is a packed dataset or empty: a user's image folder is
never deleted by a mistyped argument).

Reading never loads the whole image array: ``PackedDataset.images`` is a
read-only ``np.memmap`` and ``read(indices)`` copies just the rows asked for.
Checksums are checked by ``verify()``, not on open (it reads everything).

Public API:
    write_packed(out_dir, images, labels, manifest=None, overwrite=False) -> Path
    PackedWriter(out_dir, num_images, height, width, manifest=None, overwrite=False)
    PackedDataset(path)
    FORMAT_VERSION, PackedFormatError

``refimpl.data.datasets.open_dataset`` opens a folder path as a PackedDataset.
"""
import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path

import numpy as np

from refimpl.checks import check_int

FORMAT_VERSION = 1
IMAGES_FILE = "images.npy"
LABELS_FILE = "labels.npy"
MANIFEST_FILE = "manifest.json"

# Keys the writer computes itself; a caller may pass them only with the same value.
_COMPUTED_KEYS = ("format_version", "image_size", "num_images", "checksums")


class PackedFormatError(ValueError):
    """A packed dataset folder is missing, incomplete or inconsistent."""


# --------------------------------------------------------------------------
# helpers


def _sha256(path, chunk=1 << 22):
    """Hex sha256 of a file's bytes, read in 4 MiB chunks (never all at once)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(chunk), b""):
            h.update(block)
    return h.hexdigest()


def _read_npy_header(path):
    """(shape, fortran_order, dtype, data_offset) of a .npy file, reading only its header."""
    with open(path, "rb") as f:
        try:
            version = np.lib.format.read_magic(f)
            if version == (1, 0):
                shape, fortran, dtype = np.lib.format.read_array_header_1_0(f)
            else:
                shape, fortran, dtype = np.lib.format.read_array_header_2_0(f)
        except Exception as e:  # ValueError for bad magic, truncated header, ...
            raise PackedFormatError(f"{path}: not a valid .npy file ({e})") from e
        return shape, fortran, dtype, f.tell()


def _shrink_npy(path, num_rows):
    """Keep the first ``num_rows`` rows of a C-order .npy file, in place.

    The header is rewritten with the smaller shape and padded with spaces to
    its old length (the .npy format allows any padding before the final
    newline), so the data does not move; then the file is truncated.
    """
    shape, fortran, dtype, offset = _read_npy_header(path)
    if fortran or num_rows > shape[0]:
        raise ValueError(f"cannot shrink {path} from {shape[0]} to {num_rows} rows")
    new_shape = (int(num_rows),) + tuple(shape[1:])
    header = repr({"descr": np.lib.format.dtype_to_descr(dtype),
                   "fortran_order": False, "shape": new_shape}).encode("latin1")
    # magic (6) + version (2) + header-length field (2 bytes in v1, 4 in v2/v3)
    with open(path, "rb") as f:
        major = f.read(8)[6]
    start = 10 if major == 1 else 12
    room = offset - start
    if len(header) + 1 > room:  # cannot happen: a smaller shape has a shorter repr
        raise ValueError(f"{path}: no room to rewrite the .npy header")
    header = header + b" " * (room - len(header) - 1) + b"\n"
    with open(path, "r+b") as f:
        f.seek(start)
        f.write(header)
        f.truncate(offset + int(np.prod(new_shape)) * dtype.itemsize)


def _check_manifest_extras(manifest, num_images):
    """Validate the caller-given manifest keys that have a fixed meaning."""
    class_names = manifest.get("class_names", [])
    if not isinstance(class_names, (list, tuple)) or not all(isinstance(c, str) for c in class_names):
        raise ValueError("manifest['class_names'] must be a list of strings")
    files = manifest.get("files")
    if files is not None:
        if not isinstance(files, (list, tuple)) or len(files) != num_images:
            raise ValueError(f"manifest['files'] must be null or a list of {num_images} "
                             f"paths (one per image), got "
                             f"{len(files) if isinstance(files, (list, tuple)) else type(files).__name__}")
    skipped = manifest.get("skipped", [])
    if not isinstance(skipped, (list, tuple)) or not all(
            isinstance(s, dict) and "path" in s and "reason" in s for s in skipped):
        raise ValueError("manifest['skipped'] must be a list of {path, reason} dicts")


def _is_replaceable(path):
    """True if ``path`` is an empty folder or a packed dataset (safe for overwrite=True)."""
    return path.is_dir() and (not any(path.iterdir()) or (path / MANIFEST_FILE).is_file())


# --------------------------------------------------------------------------
# writing


class PackedWriter:
    """Stream a dataset too large for memory into a packed folder, atomically.

        with PackedWriter(out_dir, num_images, H, W, manifest={...}) as w:
            w.write(start, images_chunk, labels_chunk)   # rows [start, start+n)
            w.manifest["skipped"] = [...]                # may be edited until exit
            w.truncate(k)                                # optional: keep rows [0, k)

    Images go straight into an ``np.lib.format.open_memmap`` inside a
    temporary folder next to ``out_dir``. On a clean exit the writer checks
    that every kept row was written, saves labels, computes the checksums,
    writes the manifest and renames the folder into place. On an exception
    the temporary folder is removed and ``out_dir`` is untouched.

    Labels default to -1 (unknown) for rows written without labels.
    ``truncate`` exists for converters that learn only at the end how many
    inputs were decodable (``pack_folder --skip-bad``).
    """

    def __init__(self, out_dir, num_images, height, width, manifest=None, overwrite=False):
        self.out_dir = Path(out_dir)
        self.num_images = check_int("num_images", num_images)
        self.height, self.width = check_int("height", height), check_int("width", width)
        self.overwrite = bool(overwrite)
        self.manifest = dict(manifest or {})
        self._check_target()
        self._tmp = None
        self._images = None
        self.labels = np.full(self.num_images, -1, dtype=np.int64)  # (N,)
        self._written = np.zeros(self.num_images, dtype=bool)  # which rows write() filled
        self._keep = self.num_images

    def _check_target(self):
        if self.out_dir.exists() or self.out_dir.is_symlink():
            if not self.overwrite:
                raise FileExistsError(f"{self.out_dir} already exists (pass overwrite=True "
                                      f"/ --overwrite to replace it)")
            if not _is_replaceable(self.out_dir):
                raise FileExistsError(f"{self.out_dir} exists and is neither empty nor a packed "
                                      f"dataset (no {MANIFEST_FILE}); refusing to replace it")

    # context manager -------------------------------------------------------

    def __enter__(self):
        self.out_dir.parent.mkdir(parents=True, exist_ok=True)
        # Same parent as out_dir, so the final rename is atomic (same filesystem).
        self._tmp = Path(tempfile.mkdtemp(prefix=f".{self.out_dir.name}.tmp-",
                                          dir=self.out_dir.parent))
        self._images = np.lib.format.open_memmap(
            self._tmp / IMAGES_FILE, mode="w+", dtype=np.uint8,
            shape=(self.num_images, self.height, self.width, 3))
        return self

    def __exit__(self, exc_type, exc, tb):
        if exc_type is None:
            try:
                self._finish()
            except BaseException:
                self._abort()
                raise
        else:
            self._abort()
        return False

    def _abort(self):
        self._images = None  # drop the map before deleting its file
        if self._tmp is not None:
            shutil.rmtree(self._tmp, ignore_errors=True)
            self._tmp = None

    # writing rows ----------------------------------------------------------

    def write(self, start, images, labels=None):
        """Write ``images`` (n, H, W, 3) uint8 into rows [start, start + n).

        labels: None (rows stay -1) or ints shaped (n,).
        """
        if self._images is None:
            raise RuntimeError("PackedWriter.write called outside its `with` block")
        images = np.asarray(images)
        if images.dtype != np.uint8:
            raise ValueError(f"images must be uint8, got {images.dtype}")
        if images.ndim != 4 or images.shape[1:] != (self.height, self.width, 3):
            raise ValueError(f"images must be shaped (n, {self.height}, {self.width}, 3), "
                             f"got {images.shape}")
        start, n = int(start), images.shape[0]
        if start < 0 or start + n > self.num_images:
            raise ValueError(f"rows [{start}, {start + n}) outside [0, {self.num_images})")
        self._images[start:start + n] = images
        if labels is not None:
            labels = np.asarray(labels)
            if labels.shape != (n,) or not (np.issubdtype(labels.dtype, np.integer) or n == 0):
                raise ValueError(f"labels must be integers shaped ({n},), got "
                                 f"{labels.dtype} {labels.shape}")
            self.labels[start:start + n] = labels
        self._written[start:start + n] = True

    def truncate(self, num_images):
        """Keep only rows [0, num_images) when the writer finishes (at least one row)."""
        self._keep = check_int("num_images", num_images, maximum=self.num_images)

    # finishing -------------------------------------------------------------

    def _finish(self):
        n = self._keep
        missing = np.flatnonzero(~self._written[:n])
        if missing.size:
            raise ValueError(f"{missing.size} of {n} rows were never written "
                             f"(first: {missing[:5].tolist()}); refusing to save zeros as images")
        labels = self.labels[:n]
        if labels.min() < -1:
            raise ValueError(f"labels must be >= -1 (-1 = unknown), found {labels.min()}")
        manifest = dict(self.manifest)
        _check_manifest_extras(manifest, n)
        class_names = list(manifest.get("class_names", []))
        if class_names and labels.max() >= len(class_names):
            raise ValueError(f"label {labels.max()} out of range for {len(class_names)} class names")
        computed = {"format_version": FORMAT_VERSION, "image_size": [self.height, self.width],
                    "num_images": n}
        for k, v in computed.items():
            if k in manifest and manifest[k] != v:
                raise ValueError(f"manifest[{k!r}] = {manifest[k]!r} contradicts the data ({v!r}); "
                                 f"the writer computes it, leave it out")

        self._images.flush()
        self._images = None  # unmap before the file is shrunk / hashed
        if n < self.num_images:
            _shrink_npy(self._tmp / IMAGES_FILE, n)
        np.save(self._tmp / LABELS_FILE, labels, allow_pickle=False)
        checksums = {IMAGES_FILE: _sha256(self._tmp / IMAGES_FILE),
                     LABELS_FILE: _sha256(self._tmp / LABELS_FILE)}

        # Fixed keys first so the manifest reads well; extras after.
        full = {"format_version": FORMAT_VERSION, "source": manifest.pop("source", None),
                "class_names": class_names, "image_size": [self.height, self.width],
                "num_images": n, "checksums": checksums,
                "files": manifest.pop("files", None), "skipped": list(manifest.pop("skipped", []))}
        for k in _COMPUTED_KEYS + ("class_names",):
            manifest.pop(k, None)
        full.update(manifest)
        try:
            text = json.dumps(full, indent=1)
        except TypeError as e:
            raise ValueError(f"manifest is not JSON-serializable: {e}") from e
        with open(self._tmp / MANIFEST_FILE, "w") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())

        self._check_target()  # someone may have created it while we worked
        old = None
        if self.out_dir.exists():
            # Move the old dataset aside first, so a failure between the two
            # renames still leaves one complete dataset on disk.
            old = Path(tempfile.mkdtemp(prefix=f".{self.out_dir.name}.old-", dir=self.out_dir.parent))
            os.rename(self.out_dir, old / "data")
        os.rename(self._tmp, self.out_dir)
        self._tmp = None
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
        self.path = self.out_dir
        return self.out_dir


def write_packed(out_dir, images, labels, manifest=None, overwrite=False):
    """Write an in-memory dataset as a packed folder, atomically; returns its Path.

    images: uint8 (N, H, W, 3); labels: integers (N,), -1 = unknown;
    manifest: source, class_names, files, skipped and any extra JSON keys.
    """
    images = np.asarray(images)
    if images.dtype != np.uint8:
        raise ValueError(f"images must be uint8, got {images.dtype}")
    if images.ndim != 4 or images.shape[3] != 3:
        raise ValueError(f"images must be shaped (N, H, W, 3), got {images.shape}")
    labels = np.asarray(labels)
    if labels.shape != (images.shape[0],):
        raise ValueError(f"labels must be shaped ({images.shape[0]},) to match images, "
                         f"got {labels.shape}")
    if labels.size and not np.issubdtype(labels.dtype, np.integer):
        raise ValueError(f"labels must be integers, got {labels.dtype}")
    if images.shape[0] == 0:
        raise ValueError("a dataset needs at least one image, got 0")
    n, h, w, _ = images.shape
    with PackedWriter(out_dir, n, h, w, manifest=manifest, overwrite=overwrite) as writer:
        writer.write(0, images, labels)
    return Path(out_dir)


# --------------------------------------------------------------------------
# reading


class PackedDataset:
    """A packed dataset folder, opened for reading by memory map.

    Attributes:
        images       read-only np.memmap uint8 (N, H, W, 3); nothing is loaded
        labels       int64 (N,), -1 = unknown
        manifest     dict (the parsed manifest.json)
        class_names  list of str (may be empty)
        image_size   (H, W)
    Methods: len(ds), ds.read(indices) -> uint8 (n, H, W, 3), ds.verify().
    """

    def __init__(self, path):
        self.path = Path(path)
        if not self.path.is_dir():
            raise PackedFormatError(f"{self.path}: no such dataset folder")
        for name in (MANIFEST_FILE, IMAGES_FILE, LABELS_FILE):
            if not (self.path / name).is_file():
                raise PackedFormatError(f"{self.path}: missing {name} (not a packed dataset, "
                                        f"or an incomplete copy)")
        self.manifest = self._load_manifest()
        h, w = self.manifest["image_size"]
        n = self.manifest["num_images"]

        # Check the images header and file size before mapping: a truncated
        # file would otherwise fail later, or deep inside mmap, with no context.
        img_path = self.path / IMAGES_FILE
        shape, fortran, dtype, offset = _read_npy_header(img_path)
        if dtype != np.uint8 or fortran or len(shape) != 4 or shape[3] != 3:
            raise PackedFormatError(f"{img_path}: expected C-order uint8 (N, H, W, 3), got "
                                    f"{dtype} {shape}{' fortran order' if fortran else ''}")
        if tuple(shape) != (n, h, w, 3):
            raise PackedFormatError(f"{img_path}: shape {tuple(shape)} does not match the manifest "
                                    f"(num_images {n}, image_size [{h}, {w}])")
        expected = offset + n * h * w * 3
        actual = img_path.stat().st_size
        if actual < expected:
            raise PackedFormatError(f"{img_path} is truncated: {actual} bytes, expected {expected} "
                                    f"for {n} images of {h}x{w}x3")
        self.images = np.load(img_path, mmap_mode="r")

        lab_path = self.path / LABELS_FILE
        try:
            labels = np.load(lab_path, allow_pickle=False)
        except Exception as e:
            raise PackedFormatError(f"{lab_path}: unreadable ({e})") from e
        if labels.ndim != 1 or not np.issubdtype(labels.dtype, np.integer):
            raise PackedFormatError(f"{lab_path}: expected int64 (N,), "
                                    f"got {labels.dtype} {labels.shape}")
        if labels.shape[0] != n:
            raise PackedFormatError(f"{lab_path}: {labels.shape[0]} labels for {n} images")
        # The writer's range rule, checked again: the file may have been replaced.
        n_classes = len(self.class_names)
        bad = labels < -1
        if n_classes:
            bad |= labels >= n_classes
        if bad.any():
            i = int(np.argmax(bad))  # the first bad label
            allowed = f"-1 <= label < {n_classes} class_names" if n_classes else "label >= -1"
            raise PackedFormatError(f"{lab_path}: label {int(labels[i])} at index {i} out of range "
                                    f"(expected {allowed}; -1 = unknown)")
        self.labels = labels.astype(np.int64, copy=False)

    def _load_manifest(self):
        path = self.path / MANIFEST_FILE
        try:
            with open(path) as f:
                m = json.load(f)
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise PackedFormatError(f"{path}: not valid JSON ({e})") from e
        if not isinstance(m, dict):
            raise PackedFormatError(f"{path}: expected a JSON object, got {type(m).__name__}")
        missing = [k for k in ("format_version", "image_size", "num_images", "checksums") if k not in m]
        if missing:
            raise PackedFormatError(f"{path}: missing keys {missing}")
        if m["format_version"] != FORMAT_VERSION:
            raise PackedFormatError(f"{path}: format_version {m['format_version']!r}, this refimpl "
                                    f"reads version {FORMAT_VERSION}; re-pack the dataset")
        size = m["image_size"]
        if (not isinstance(size, list) or len(size) != 2
                or not all(isinstance(s, int) and s > 0 for s in size)):
            raise PackedFormatError(f"{path}: image_size must be [H, W] positive ints, got {size!r}")
        if not isinstance(m["num_images"], int) or m["num_images"] < 1:
            raise PackedFormatError(f"{path}: num_images must be a positive int, "
                                    f"got {m['num_images']!r}")
        m.setdefault("class_names", [])
        return m

    @property
    def class_names(self):
        return list(self.manifest.get("class_names") or [])

    @property
    def image_size(self):
        h, w = self.manifest["image_size"]
        return (h, w)

    def __len__(self):
        return self.images.shape[0]

    def __repr__(self):
        h, w = self.image_size
        return f"PackedDataset({str(self.path)!r}, {len(self)} images of {h}x{w})"

    def read(self, indices):
        """Copy rows ``indices`` (any order, duplicates allowed) -> uint8 (n, H, W, 3).

        Rows are fetched in ascending order (one sequential sweep over the
        file) and then put back in the order asked for.
        """
        idx = np.asarray(indices)
        if idx.ndim != 1 or not (np.issubdtype(idx.dtype, np.integer) or idx.size == 0):
            raise ValueError(f"indices must be a 1-d array of ints, got {idx.dtype} {idx.shape}")
        idx = idx.astype(np.int64)
        if idx.size and (idx.min() < 0 or idx.max() >= len(self)):
            bad = idx[(idx < 0) | (idx >= len(self))][0]
            raise IndexError(f"index {bad} out of range for a dataset of {len(self)} images")
        uniq, inverse = np.unique(idx, return_inverse=True)
        rows = np.asarray(self.images[uniq])  # (u, H, W, 3), a copy
        return rows[inverse.reshape(-1)]  # (n, H, W, 3)

    def verify(self):
        """Recompute both checksums (reads every byte); raise PackedFormatError on mismatch."""
        expected = self.manifest["checksums"]
        for name in (IMAGES_FILE, LABELS_FILE):
            got = _sha256(self.path / name)
            if expected.get(name) != got:
                raise PackedFormatError(f"{self.path / name}: checksum mismatch (manifest "
                                        f"{expected.get(name)}, file {got}); the file was modified "
                                        f"or damaged")
        return True


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

Temporary folders. A writer stages its data in ``.<name>.tmp-<host>-<pid>-<token>``
next to the target ``<name>`` and publishes it with ``refimpl.fileio``
(``staging_dir``, ``publish``; fileio's docstring gives the naming and
permission rules): every file is fsynced before the rename. When a writer
starts it deletes the stale ``.<name>.tmp-*`` folders of the same target that
a killed run left behind: only those named with this host and the pid of a
process that no longer exists (``fileio.remove_stale_temporaries``). A
running writer's folder, one from another host (a shared filesystem), and
one in any other naming are never touched.

Replacing. With ``overwrite=True`` the old dataset is first renamed into
``.<name>.old-<host>-<pid>-<token>/``, then the new one is renamed into
place, then the old one is deleted. If the second rename fails, the first is
undone. A crash between the two renames leaves no ``<name>`` and the previous
dataset complete in the ``.old-`` folder; ``.old-`` folders are never deleted
automatically (they may hold the only copy), so rename it back or delete it.

Several datasets that belong together (the train and test splits of one
conversion) are written with ``PackedSplits``: both are published, or neither.

  * ``out_dir`` does not exist yet (the usual case): the splits are staged as
    ``.<out>.tmp-.../<split>/`` next to it, and ONE rename publishes the whole
    folder. A crash leaves nothing or everything.
  * ``out_dir`` exists: the splits are staged inside it, in
    ``.train+test.tmp-.../``; every existing split is first moved aside into
    ``out_dir/.train+test.old-.../``, and only then is every new split renamed
    in. A failing rename undoes the ones before it. A crash between two
    renames leaves only old splits or only new splits in ``out_dir`` (one of
    them missing), never one new and one old; the old ones are in the
    ``.old-`` folder (kept, as above), and the next run replaces the rest.

Before it creates the image file, a writer checks that the filesystem has
room for it (N * H * W * 3 bytes), and the file is allocated whole before it
is mapped (``fileio.create_npy``): writing into a sparse memory map on a
full disk kills the process with SIGBUS instead of an error.

Reading never loads the whole image array: ``PackedDataset.images`` is a
read-only ``np.memmap`` and ``read(indices)`` copies just the rows asked for.
Opening checks the manifest's types (num_images, image_size, format_version
are ints, not bools; class_names a list of strings; checksums two sha256 hex
strings; files, skipped), and that both ``.npy`` files are exactly as long as
their headers say (shorter: truncated; longer: trailing bytes). Checksums
themselves are checked by ``verify()``, not on open (it reads everything).

Public API:
    write_packed(out_dir, images, labels, manifest=None, overwrite=False) -> Path
    PackedWriter(out_dir, num_images, height, width, manifest=None, overwrite=False)
    PackedSplits(out_dir, names, overwrite=False)
    PackedDataset(path)
    FORMAT_VERSION, PackedFormatError

``refimpl.data.datasets.open_dataset`` opens a folder path as a PackedDataset.
"""
import json
import re
import shutil
from pathlib import Path

import numpy as np

from refimpl.checks import check_int
from refimpl.fileio import (check_room, create_npy, publish, remove_stale_temporaries, sha256_file,
                            staging_dir)

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


def _is_int(v):
    """True for a JSON integer (Python int), False for bools (true is an int to Python)."""
    return isinstance(v, int) and not isinstance(v, bool)


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


def _check_npy_length(path, offset, nbytes, what):
    """The file must be exactly header + data bytes long: shorter is truncated, longer is damaged."""
    expected = offset + nbytes
    actual = Path(path).stat().st_size
    if actual < expected:
        raise PackedFormatError(f"{path} is truncated: {actual} bytes, expected {expected} "
                                f"for {what}")
    if actual > expected:
        raise PackedFormatError(f"{path} has {actual - expected} trailing bytes: {actual} bytes, "
                                f"expected {expected} for {what} (a damaged or foreign file)")


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
    """Validate the caller-given manifest keys that have a fixed meaning (writer and reader)."""
    class_names = manifest.get("class_names", [])
    if not isinstance(class_names, (list, tuple)) or not all(isinstance(c, str) for c in class_names):
        raise ValueError(f"manifest['class_names'] must be a list of strings, got {class_names!r:.80}")
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


def _check_target(path, overwrite):
    """FileExistsError unless ``path`` is free, or replaceable and ``overwrite``."""
    if path.exists() or path.is_symlink():
        if not overwrite:
            raise FileExistsError(f"{path} already exists (pass overwrite=True "
                                  f"/ --overwrite to replace it)")
        if not _is_replaceable(path):
            raise FileExistsError(f"{path} exists and is neither empty nor a packed "
                                  f"dataset (no {MANIFEST_FILE}); refusing to replace it")


# --------------------------------------------------------------------------
# writing


class PackedWriter:
    """Stream a dataset too large for memory into a packed folder, atomically.

        with PackedWriter(out_dir, num_images, H, W, manifest={...}) as w:
            w.write(start, images_chunk, labels_chunk)   # rows [start, start+n)
            w.manifest["skipped"] = [...]                # may be edited until exit
            w.truncate(k)                                # optional: keep rows [0, k)

    Entering removes stale temporaries of ``out_dir`` (module docstring),
    checks that the filesystem has room for the image file, and creates an
    ``np.lib.format.open_memmap`` inside a temporary folder next to
    ``out_dir``. On a clean exit the writer checks that every kept row was
    written, saves labels, computes the checksums, writes the manifest and
    renames the folder into place. On an exception the temporary folder is
    removed and ``out_dir`` is untouched.

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
        _check_target(self.out_dir, self.overwrite)
        self._tmp = None
        self._images = None
        self.labels = None  # int64 (N,), allocated on entry (after the size checks)
        self._written = None
        self._keep = self.num_images

    @property
    def image_bytes(self):
        """Size of images.npy's data: N * H * W * 3 bytes (a Python int: never overflows)."""
        return self.num_images * self.height * self.width * 3

    # context manager -------------------------------------------------------

    def __enter__(self):
        parent = self.out_dir.parent
        parent.mkdir(parents=True, exist_ok=True)
        remove_stale_temporaries(parent, self.out_dir.name)
        need = self.image_bytes + 8 * self.num_images + (1 << 16)  # images, labels, headers
        check_room(parent, need, f"{self.out_dir}: {self.num_images} images of "
                                 f"{self.height}x{self.width}x3")
        # Same parent as out_dir, so the final rename is atomic (same filesystem).
        self._tmp = staging_dir(parent, self.out_dir.name, "tmp")
        try:
            self.labels = np.full(self.num_images, -1, dtype=np.int64)  # (N,)
            self._written = np.zeros(self.num_images, dtype=bool)  # which rows write() filled
            # allocated whole before it is mapped: a full disk is an OSError, not a SIGBUS
            create_npy(self._tmp / IMAGES_FILE, (self.num_images, self.height, self.width, 3),
                       np.uint8)
            self._images = np.load(self._tmp / IMAGES_FILE, mmap_mode="r+")
        except BaseException:
            self._abort()  # __exit__ does not run when __enter__ raises
            raise
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
        checksums = {IMAGES_FILE: sha256_file(self._tmp / IMAGES_FILE),
                     LABELS_FILE: sha256_file(self._tmp / LABELS_FILE)}

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
        (self._tmp / MANIFEST_FILE).write_text(text)

        _check_target(self.out_dir, self.overwrite)  # someone may have created it while we worked
        publish([(self._tmp, self.out_dir)])
        self._tmp = None
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


class PackedSplits:
    """Several packed datasets in one folder (``out_dir/<name>``), published together or not at all.

        with PackedSplits(out_dir, ("train", "test"), overwrite=False) as splits:
            splits.write("train", images, labels, manifest)         # in memory
            with splits.writer("test", n, H, W, manifest) as w:     # or streamed
                w.write(0, chunk, chunk_labels)
        splits.paths   # (out_dir/train, out_dir/test)

    Construction checks every target (an existing ``out_dir/<name>`` needs
    ``overwrite`` and must be a packed dataset or empty), so a converter can
    fail before reading its input. Each split is written complete into a
    staging folder; on a clean exit, with every split written, they are
    published as the module docstring describes (one rename when ``out_dir``
    is new; else old splits aside first, then new ones in). On an exception
    the staging folder is removed and ``out_dir`` is untouched.
    """

    def __init__(self, out_dir, names, overwrite=False):
        self.out_dir = Path(out_dir)
        self.names = tuple(names)
        if not self.names or len(set(self.names)) != len(self.names) or not all(
                isinstance(n, str) and n and "/" not in n and not n.startswith(".")
                for n in self.names):
            raise ValueError(f"split names must be distinct plain folder names, got {names!r}")
        self.overwrite = bool(overwrite)
        self.paths = tuple(self.out_dir / n for n in self.names)
        self._check_targets()
        self._stage = None

    def _check_targets(self):
        if (self.out_dir.exists() or self.out_dir.is_symlink()) and not self.out_dir.is_dir():
            raise FileExistsError(f"{self.out_dir} exists and is not a folder")
        for path in self.paths:
            _check_target(path, self.overwrite)

    def __enter__(self):
        parent = self.out_dir.parent
        parent.mkdir(parents=True, exist_ok=True)
        remove_stale_temporaries(parent, self.out_dir.name)
        group = "+".join(self.names)
        if self.out_dir.is_dir():
            remove_stale_temporaries(self.out_dir, group)
            self._stage = staging_dir(self.out_dir, group, "tmp")
        else:  # staged as a whole new out_dir, published by one rename
            self._stage = staging_dir(parent, self.out_dir.name, "tmp")
        return self

    def _staged(self, name):
        if self._stage is None:
            raise RuntimeError("PackedSplits.write/writer called outside its `with` block")
        if name not in self.names:
            raise ValueError(f"unknown split {name!r}; expected one of {self.names}")
        return self._stage / name

    def writer(self, name, num_images, height, width, manifest=None):
        """A ``PackedWriter`` for split ``name`` (use it in a ``with`` block)."""
        return PackedWriter(self._staged(name), num_images, height, width, manifest=manifest)

    def write(self, name, images, labels, manifest=None):
        """Write split ``name`` from memory, like ``write_packed``; returns its final Path."""
        write_packed(self._staged(name), images, labels, manifest)
        return self.out_dir / name

    def __exit__(self, exc_type, exc, tb):
        try:
            if exc_type is None:
                self._publish()
        finally:
            if self._stage is not None:
                shutil.rmtree(self._stage, ignore_errors=True)
                self._stage = None
        return False

    def _publish(self):
        missing = [n for n in self.names if not (self._stage / n / MANIFEST_FILE).is_file()]
        if missing:
            raise ValueError(f"split(s) {', '.join(missing)} of {self.out_dir} were never written; "
                             f"publishing none")
        self._check_targets()  # someone may have created them while we worked
        if self._stage.parent == self.out_dir.parent:
            try:
                publish([(self._stage, self.out_dir)], replace=False)  # every split at once
                self._stage = None
                return
            except OSError:
                if not self.out_dir.is_dir():
                    raise
                self._check_targets()  # out_dir appeared meanwhile: publish split by split
        publish([(self._stage / n, self.out_dir / n) for n in self.names])


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
        _check_npy_length(img_path, offset, n * h * w * 3, f"{n} images of {h}x{w}x3")
        self.images = np.load(img_path, mmap_mode="r")

        lab_path = self.path / LABELS_FILE
        shape, fortran, dtype, offset = _read_npy_header(lab_path)
        if len(shape) != 1 or not np.issubdtype(dtype, np.integer):
            raise PackedFormatError(f"{lab_path}: expected int64 (N,), got {dtype} {shape}")
        if shape[0] != n:
            raise PackedFormatError(f"{lab_path}: {shape[0]} labels for {n} images")
        _check_npy_length(lab_path, offset, n * dtype.itemsize, f"{n} labels of {dtype}")
        try:
            labels = np.load(lab_path, allow_pickle=False)
        except Exception as e:
            raise PackedFormatError(f"{lab_path}: unreadable ({e})") from e
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
        if not _is_int(m["format_version"]) or m["format_version"] != FORMAT_VERSION:
            raise PackedFormatError(f"{path}: format_version {m['format_version']!r}, this refimpl "
                                    f"reads version {FORMAT_VERSION}; re-pack the dataset")
        size = m["image_size"]
        if (not isinstance(size, list) or len(size) != 2
                or not all(_is_int(s) and s > 0 for s in size)):
            raise PackedFormatError(f"{path}: image_size must be [H, W] positive ints, got {size!r}")
        if not _is_int(m["num_images"]) or m["num_images"] < 1:
            raise PackedFormatError(f"{path}: num_images must be a positive int, "
                                    f"got {m['num_images']!r}")
        sums = m["checksums"]
        if (not isinstance(sums, dict) or set(sums) != {IMAGES_FILE, LABELS_FILE}
                or not all(isinstance(v, str) and re.fullmatch(r"[0-9a-f]{64}", v)
                           for v in sums.values())):
            raise PackedFormatError(f"{path}: checksums must be {{\"{IMAGES_FILE}\": sha256, "
                                    f"\"{LABELS_FILE}\": sha256}} (64 lowercase hex digits each), "
                                    f"got {sums!r:.120}")
        m.setdefault("class_names", [])
        try:
            _check_manifest_extras(m, m["num_images"])  # the writer's rules for the same keys
        except ValueError as e:
            raise PackedFormatError(f"{path}: {e}") from e
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
            got = sha256_file(self.path / name)
            if expected.get(name) != got:
                raise PackedFormatError(f"{self.path / name}: checksum mismatch (manifest "
                                        f"{expected.get(name)}, file {got}); the file was modified "
                                        f"or damaged")
        return True


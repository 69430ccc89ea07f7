"""Pack a folder of images into a packed dataset (refimpl/data/packed.py).

    python -m data_tools.pack_folder SRC OUT --size S [--resize shorter|exact]
        [--workers K] [--skip-bad] [--max-pixels P] [--overwrite] [--quiet]

Layouts (decided from SRC's top level; names starting with "." are ignored):
  * ImageFolder: SRC holds only sub-folders, one per class. Labels are the
    index of the class folder in sorted order; class_names records the names.
    Files inside a class folder are found recursively.
  * flat: SRC holds only files. Every label is -1 (unknown), class_names is [].
  Files and folders side by side at the top level are an error (ambiguous).
  An empty class folder, or no files at all, is an error.

Every non-hidden file is an input: there is no extension filter, so a stray
non-image file is reported rather than silently dropped.

Symbolic links are followed, to files and to folders alike: a linked
sub-folder is walked like a real one, and its files are named by their path
through the link ("cats/linked/x.jpg"). Loop protection: a folder that is
the same folder (device and inode) as SRC, one of SRC's parents, or one of
the folders it lies in (a link back up the tree) is not entered; it is
listed in the manifest's "skipped" as {path, reason: "symbolic link loop:
leads back to ..., which it lies in; not followed"} and named in a note on
stderr, and the run goes on (it is not a bad image: nothing under it is
lost, the loop only repeats the tree).
A link to a folder elsewhere in SRC is followed, so its files are packed
twice under two names, as the tree says. An unreadable folder is an error.

Decoding (Pillow), per image, in this order:
  1. the first frame is loaded (a truncated file fails here);
  2. the EXIF orientation is applied (ImageOps.exif_transpose);
  3. conversion to 8-bit RGB:
     - 16-bit grayscale (I;16*, and I, taken as 16-bit) -> the high byte,
       v >> 8 (65535 -> 255, 32768 -> 128): scaled, never clipped. This is what
       Pillow's own PNG decoder does to 16-bit RGB(A), so 16-bit gray and
       16-bit colour images map the same way;
     - F (float) -> clipped to 0..255, as Pillow's convert does;
     - anything with alpha (RGBA, LA, PA, premultiplied, or a palette / L /
       RGB image with a tRNS transparency entry) is COMPOSITED ON WHITE:
       transparent pixels become white, as on a white page (dropping alpha
       instead would expose whatever colour the encoder left under it);
     - 1, L, P, CMYK, YCbCr, ... -> Pillow's convert("RGB"), grayscale
       replicated to three channels;
  4. resize with bicubic filtering (Pillow antialiases when shrinking):
     "shorter" (default): the shorter side to S, keeping the aspect ratio,
     then a center crop S x S (offset floor((w - S) / 2)); "exact": straight
     to S x S, ignoring the aspect ratio.

Bad inputs (zero-byte, not an image, truncated, corrupt, over the pixel
limit, a broken link) are named with a reason. By default the run fails
listing all of them and writes nothing; with --skip-bad they are left out and
recorded in the manifest's "skipped" list as {path, reason}.

Running out of memory is not a bad input: an image whose decoding raises
MemoryError is reported as "out of memory decoding ..." and stops the run,
even with --skip-bad (the output must not depend on the machine's memory),
writing nothing; so does a decoding worker process that dies (the kernel's
OOM killer, or a crash inside a decoder), which is named as such instead of
hanging the pool. Before starting, the run checks an estimate of its memory
(about WORKER_BYTES_PER_PIXEL bytes per output pixel per worker, plus the
same again for the writing process) against the available memory
(``data_tools.memory``), and PackedWriter checks the disk space for N x S x S
x 3 bytes: ``--size 99999999999999999999`` is one clear error.

Decompression bombs: Image.MAX_IMAGE_PIXELS is set to --max-pixels (default
Pillow's 89,478,485; 0 = no limit), and Pillow's DecompressionBombWarning
(more pixels than the limit) is treated as an error, not only its
DecompressionBombError (twice the limit).

Decoding runs in --workers processes (default min(4, CPUs)); more workers
than the CPUs this process may use (os.sched_getaffinity) are clamped to that
number, with a note on stderr, and more than the number of files to that
number. Results come back in sorted input order, so the output does not
depend on the worker count. Images stream into the dataset file
(PackedWriter), so memory stays small for any number of images. The
manifest records each image's path relative to SRC ("files").
"""
import argparse
import os
import sys
import time
import warnings
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from pathlib import Path

import numpy as np

from data_tools.cli import add_version, require, run
from data_tools.memory import check_memory
from refimpl.checks import check_int
from refimpl.data.packed import PackedWriter

DEFAULT_MAX_PIXELS = 89_478_485  # Pillow's own default (about 0.25 GiB of 24-bit RGB)
RESIZE_MODES = ("shorter", "exact")
_ALPHA_MODES = ("RGBA", "LA", "PA", "RGBa", "La")
_SIXTEEN_BIT = ("I;16", "I;16L", "I;16B", "I;16N", "I")
# Memory per output pixel held by one decoding worker besides the decoded
# source (which --max-pixels bounds): the resized RGB image, its crop, the
# array copy and the pickled result, 3 bytes each, rounded up.
WORKER_BYTES_PER_PIXEL = 16

# decode_image's status: a decoded image, a bad file, or memory ran out.
OK, BAD, OUT_OF_MEMORY = "ok", "bad", "out of memory"


class BadImagesError(ValueError):
    """Some inputs could not be decoded (and --skip-bad was not given)."""


# --------------------------------------------------------------------------
# finding the inputs


def _visible(p):
    return not p.name.startswith(".")


def _identity(path):
    """(device, inode) of the folder ``path`` leads to (links followed)."""
    st = os.stat(path)
    return st.st_dev, st.st_ino


def _loop(path, src, enclosing):
    """A "skipped" entry for a folder that is one of its ``enclosing`` folders."""
    rel = path.relative_to(src).as_posix()
    return {"path": rel, "reason": f"symbolic link loop: leads back to {enclosing}, which it "
                                   f"lies in; not followed"}


def _files_under(folder, src, enclosing, skipped):
    """Every visible file under ``folder`` (links followed), as posix paths relative to SRC.

    enclosing: {(dev, ino): name} of the folders ``folder`` lies in (SRC, its
    parents, the class folder ...); a sub-folder that is one of them is a
    loop: appended to ``skipped`` and not entered. Every path down the tree
    is finite: it would have to revisit a folder already on it.
    """
    found = []
    stack = [(Path(folder), enclosing)]
    while stack:
        d, above = stack.pop()
        with os.scandir(d) as it:  # an unreadable folder raises PermissionError: an error
            entries = sorted((e for e in it if not e.name.startswith(".")), key=lambda e: e.name)
        for e in entries:
            path = Path(e.path)
            if e.is_dir():  # follows links: a linked sub-folder is walked like a real one
                ident = _identity(path)
                if ident in above:
                    skipped.append(_loop(path, src, above[ident]))
                else:
                    stack.append((path, {**above, ident: path.relative_to(src).as_posix()}))
            else:
                found.append(path.relative_to(src).as_posix())
    return found


def find_images(src):
    """Walk SRC -> (layout, class_names, rel_paths, labels, skipped).

    layout: "imagefolder" or "flat"; rel_paths: sorted posix paths relative to
    SRC; labels: int64 (n,), the class index or -1 for the flat layout;
    skipped: [{path, reason}] for the symbolic link loops not followed.
    """
    src = Path(src)
    if not src.is_dir():
        raise FileNotFoundError(f"{src}: no such folder")
    # SRC and every folder above it: a link to any of them is a loop
    root = {_identity(p): f"{p} (above SRC)" for p in src.resolve().parents}
    root[_identity(src)] = "SRC"
    skipped = []
    entries = sorted((p for p in src.iterdir() if _visible(p)), key=lambda p: p.name)
    dirs = []
    for p in entries:
        if p.is_dir() and _identity(p) in root:
            skipped.append(_loop(p, src, root[_identity(p)]))
        elif p.is_dir():
            dirs.append(p)
    files = [p for p in entries if not p.is_dir()]
    if dirs and files:
        raise ValueError(f"{src} mixes files ({', '.join(p.name for p in files[:3])}"
                         f"{', ...' if len(files) > 3 else ''}) and class folders "
                         f"({', '.join(p.name for p in dirs[:3])}{', ...' if len(dirs) > 3 else ''}): "
                         f"use either one folder per class or a flat folder of images")
    if not dirs:
        if not files:
            raise ValueError(f"{src} is empty: no images to pack")
        rels = [p.name for p in files]
        return "flat", [], rels, np.full(len(rels), -1, dtype=np.int64), skipped

    class_names, rels, labels = [], [], []
    for label, d in enumerate(dirs):
        found = _files_under(d, src, {**root, _identity(d): d.name}, skipped)
        if not found:
            raise ValueError(f"class folder {d} holds no files (every class needs at least one image)")
        class_names.append(d.name)
        rels += sorted(found)
        labels += [label] * len(found)
    return "imagefolder", class_names, rels, np.asarray(labels, dtype=np.int64), skipped


# --------------------------------------------------------------------------
# decoding one image


def to_rgb8(im):
    """Any Pillow image -> an 8-bit RGB Pillow image (rules in the module docstring)."""
    from PIL import Image
    mode = im.mode
    if mode in _SIXTEEN_BIT:
        a = np.asarray(im)  # (H, W) uint16 (any byte order) or int32 for "I"
        a8 = (np.clip(a.astype(np.int64), 0, 65535) >> 8).astype(np.uint8)  # high byte
        return Image.fromarray(np.repeat(a8[:, :, None], 3, axis=2))  # gray -> RGB
    if mode == "F":
        a = np.clip(np.nan_to_num(np.asarray(im, dtype=np.float64)), 0, 255)
        return Image.fromarray(np.repeat(np.round(a).astype(np.uint8)[:, :, None], 3, axis=2))
    has_alpha = mode in _ALPHA_MODES or (mode in ("P", "L", "RGB") and "transparency" in im.info)
    if has_alpha:
        rgba = im.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, rgba).convert("RGB")
    return im.convert("RGB")


def resize_square(im, size, resize="shorter"):
    """RGB Pillow image -> uint8 (size, size, 3), by "shorter"+center crop or "exact"."""
    from PIL import Image
    bicubic = Image.Resampling.BICUBIC
    w, h = im.size
    if resize == "exact":
        if (w, h) != (size, size):
            im = im.resize((size, size), bicubic)
    else:
        scale = size / min(w, h)
        nw, nh = max(size, round(w * scale)), max(size, round(h * scale))
        if (nw, nh) != (w, h):
            im = im.resize((nw, nh), bicubic)
        left, top = (nw - size) // 2, (nh - size) // 2
        im = im.crop((left, top, left + size, top + size))
    out = np.asarray(im, dtype=np.uint8)  # (size, size, 3)
    assert out.shape == (size, size, 3), out.shape
    return out


def decode_image(path, size, resize="shorter"):
    """(status, payload) for one file; never raises on bad data.

    (OK, uint8 (size, size, 3)), (BAD, reason) or (OUT_OF_MEMORY, reason).
    Uses the current Image.MAX_IMAGE_PIXELS; the bomb warning is an error here.
    """
    from PIL import Image, ImageOps, UnidentifiedImageError
    try:
        if os.path.islink(path) and not os.path.exists(path):
            return BAD, f"broken symbolic link (to {os.readlink(path)})"
        if os.path.getsize(path) == 0:
            return BAD, "zero-byte file"
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(path) as im:
                im.load()  # decode now: truncation and corruption surface here
                im = ImageOps.exif_transpose(im)
                return OK, resize_square(to_rgb8(im), size, resize)
    except (Image.DecompressionBombWarning, Image.DecompressionBombError) as e:
        return BAD, f"decompression bomb (over --max-pixels): {e}"
    except UnidentifiedImageError:
        return BAD, "not an image (Pillow cannot identify the file format)"
    except MemoryError as e:  # a valid image may need more memory than there is
        return OUT_OF_MEMORY, f"out of memory decoding it (MemoryError{': ' + str(e) if str(e) else ''})"
    except Exception as e:  # decoders raise OSError, SyntaxError, ValueError, struct.error, ...
        return BAD, f"corrupt or truncated image ({type(e).__name__}: {e})"


def _init_worker(max_pixels):
    from PIL import Image
    Image.MAX_IMAGE_PIXELS = max_pixels or None


def _decode_task(task):
    return decode_image(*task)


# --------------------------------------------------------------------------
# progress on stderr


class _Progress:
    """A one-line "\\r"-updated counter on stderr, at most ~5 updates a second."""

    def __init__(self, total, enabled=True, stream=None):
        self.total, self.enabled = total, enabled
        self.stream = stream or sys.stderr
        self.start = self.last = time.monotonic()

    def update(self, done, bad, force=False):
        now = time.monotonic()
        if not self.enabled or (not force and now - self.last < 0.2):
            return
        self.last = now
        rate = done / max(now - self.start, 1e-9)
        self.stream.write(f"\rpack_folder: {done}/{self.total} images "
                          f"({100 * done / self.total:5.1f}%, {bad} bad, {rate:.0f}/s)")
        self.stream.flush()

    def close(self, done, bad):
        if self.enabled:
            self.update(done, bad, force=True)
            self.stream.write("\n")
            self.stream.flush()


# --------------------------------------------------------------------------
# the tool


def available_cpus():
    """CPUs this process may run on (its affinity mask on Linux, else all)."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def default_workers():
    return max(1, min(4, available_cpus()))


def _format_bad(bad, limit=20):
    lines = [f"  {b['path']}: {b['reason']}" for b in bad[:limit]]
    if len(bad) > limit:
        lines.append(f"  ... and {len(bad) - limit} more")
    return "\n".join(lines)


def pack_folder(src, out, size, resize="shorter", workers=None, skip_bad=False,
                max_pixels=DEFAULT_MAX_PIXELS, overwrite=False, progress=True):
    """Pack the images under ``src`` into the dataset folder ``out``; returns its Path.

    Raises BadImagesError (listing every bad file; nothing written) unless
    skip_bad, ValueError for empty or ambiguous input, FileExistsError if
    ``out`` exists and not overwrite.
    """
    from PIL import Image
    src, out = Path(src), Path(out)
    size = check_int("--size", size)
    if resize not in RESIZE_MODES:
        raise ValueError(f"--resize must be one of {RESIZE_MODES}, got {resize!r}")
    workers = check_int("--workers", default_workers() if workers is None else workers)
    cpus = available_cpus()
    if workers > cpus:
        print(f"pack_folder: note: --workers {workers} is more than the {cpus} CPUs this process "
              f"may use; using {cpus}", file=sys.stderr)
        workers = cpus
    max_pixels = check_int("--max-pixels", max_pixels, minimum=0)  # 0: no limit
    if src.is_dir() and (out.resolve() == src.resolve() or src.resolve() in out.resolve().parents):
        raise ValueError(f"OUT ({out}) must not be SRC or inside it")

    layout, class_names, rels, labels, loops = find_images(src)
    n = len(rels)
    workers = min(workers, n)  # an idle process only costs memory
    check_memory(f"--size {size}: decoding into {size}x{size} images with {workers} worker(s)",
                 (workers + 1) * WORKER_BYTES_PER_PIXEL * size * size)
    manifest = {
        "source": {"tool": "data_tools.pack_folder", "src": str(src.resolve()), "layout": layout,
                   "size": size, "resize": resize, "resample": "bicubic",
                   "alpha": "composited on white", "sixteen_bit": "high byte (v >> 8)"},
        "class_names": class_names,
    }
    tasks = [(str(src / r), size, resize) for r in rels]
    bar = _Progress(n, enabled=progress)
    old_limit = Image.MAX_IMAGE_PIXELS
    with PackedWriter(out, n, size, size, manifest=manifest, overwrite=overwrite) as writer:
        kept, files, bad, oom = 0, [], [], []
        pool = None
        try:
            if workers == 1:
                _init_worker(max_pixels)  # in this process; restored below
                results = map(_decode_task, tasks)
            else:
                # ProcessPoolExecutor, not multiprocessing.Pool: a worker that dies
                # (OOM killer, decoder crash) raises BrokenProcessPool instead of
                # leaving Pool.imap waiting forever for its results.
                pool = ProcessPoolExecutor(workers, initializer=_init_worker,
                                           initargs=(max_pixels,))
                chunk = max(1, min(64, n // (workers * 8)))
                results = pool.map(_decode_task, tasks, chunksize=chunk)  # ordered
            for i, (status, payload) in enumerate(results):
                if status == OK:
                    # After the first bad file, keep decoding (to list them all) but stop writing.
                    if not (bad or oom) or (skip_bad and not oom):
                        writer.write(kept, payload[None], labels[i:i + 1])
                        files.append(rels[i])
                        kept += 1
                else:
                    (oom if status == OUT_OF_MEMORY else bad).append(
                        {"path": rels[i], "reason": payload})
                bar.update(i + 1, len(bad) + len(oom))
        except BrokenProcessPool as e:
            raise MemoryError(
                f"out of memory decoding the files under {src}, most likely: a decoding worker "
                f"process died abruptly ({e}); the kernel's OOM killer does that, and so does a "
                f"crash inside an image decoder. Nothing was written. Retry with fewer --workers "
                f"(now {workers}) or a lower --max-pixels; with --workers 1 the file is named") from e
        finally:
            Image.MAX_IMAGE_PIXELS = old_limit
            if pool is not None:
                pool.shutdown(wait=True, cancel_futures=True)
            bar.close(n, len(bad) + len(oom))
        if oom:
            raise MemoryError(f"out of memory decoding {len(oom)} of {n} files under {src} "
                              f"(they may be valid images; nothing was written, even with "
                              f"--skip-bad). Retry with fewer --workers (now {workers}), a lower "
                              f"--max-pixels, or more memory:\n{_format_bad(oom)}")
        if bad and not skip_bad:
            raise BadImagesError(f"{len(bad)} of {n} files under {src} could not be decoded "
                                 f"(nothing was written; --skip-bad leaves them out):\n"
                                 f"{_format_bad(bad)}")
        if kept == 0:
            raise BadImagesError(f"none of the {n} files under {src} could be decoded:\n"
                                 f"{_format_bad(bad)}")
        writer.truncate(kept)
        writer.manifest["files"] = files
        writer.manifest["skipped"] = loops + bad
    if loops:
        print(f"pack_folder: note: did not follow {len(loops)} symbolic link loop(s) (listed in "
              f"the manifest's skipped):\n{_format_bad(loops)}", file=sys.stderr)
    if bad and progress:
        print(f"pack_folder: skipped {len(bad)} bad files (listed in the manifest):\n"
              f"{_format_bad(bad)}", file=sys.stderr)
    return out


def build_parser():
    p = argparse.ArgumentParser(
        prog="python -m data_tools.pack_folder",
        description="Pack an ImageFolder tree (one sub-folder per class) or a flat folder of "
                    "images into a packed dataset (images.npy, labels.npy, manifest.json).")
    p.add_argument("src", metavar="SRC", help="folder of class sub-folders, or of images")
    p.add_argument("out", metavar="OUT", help="dataset folder to create")
    p.add_argument("--size", type=int, required=True, help="output side length S (S x S images)")
    p.add_argument("--resize", choices=RESIZE_MODES, default="shorter",
                   help="shorter: shorter side to S, then center crop (default); exact: to S x S")
    p.add_argument("--workers", type=int, default=None,
                   help=f"decoding processes (default min(4, CPUs) = {default_workers()}; "
                        f"at most the {available_cpus()} CPUs)")
    p.add_argument("--skip-bad", action="store_true",
                   help="leave out undecodable files and record them in the manifest "
                        "(default: fail, naming them, and write nothing)")
    p.add_argument("--max-pixels", type=int, default=DEFAULT_MAX_PIXELS,
                   help="decompression-bomb limit in pixels per image (0 = none; "
                        "default %(default)s)")
    p.add_argument("--overwrite", action="store_true", help="replace OUT if it is a packed dataset")
    p.add_argument("--quiet", action="store_true", help="no progress line")
    add_version(p)
    return p


def main(argv=None):
    """Command-line entry point; returns the exit status (0 ok, 1 error)."""
    args = build_parser().parse_args(argv)
    require("pack_folder", ["PIL"], "reading images")
    return run("pack_folder", lambda: "wrote " + str(pack_folder(
        args.src, args.out, args.size, resize=args.resize, workers=args.workers,
        skip_bad=args.skip_bad, max_pixels=args.max_pixels, overwrite=args.overwrite,
        progress=not args.quiet)), quiet=args.quiet)


if __name__ == "__main__":
    sys.exit(main())

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
limit) are named with a reason. By default the run fails listing all of them
and writes nothing; with --skip-bad they are left out and recorded in the
manifest's "skipped" list as {path, reason}.

Decompression bombs: Image.MAX_IMAGE_PIXELS is set to --max-pixels (default
Pillow's 89,478,485; 0 = no limit), and Pillow's DecompressionBombWarning
(more pixels than the limit) is treated as an error, not only its
DecompressionBombError (twice the limit).

Decoding runs in --workers processes (default min(4, CPUs)); results come
back in sorted input order, so the output does not depend on the worker
count. Images stream into the dataset file (PackedWriter), so memory stays
small for any number of images. The manifest records each image's path
relative to SRC ("files").
"""
import argparse
import os
import sys
import time
import warnings
from multiprocessing import Pool
from pathlib import Path

import numpy as np

from data_tools.cli import run
from refimpl.checks import check_int
from refimpl.data.packed import PackedWriter

DEFAULT_MAX_PIXELS = 89_478_485  # Pillow's own default (about 0.25 GiB of 24-bit RGB)
RESIZE_MODES = ("shorter", "exact")
_ALPHA_MODES = ("RGBA", "LA", "PA", "RGBa", "La")
_SIXTEEN_BIT = ("I;16", "I;16L", "I;16B", "I;16N", "I")


class BadImagesError(ValueError):
    """Some inputs could not be decoded (and --skip-bad was not given)."""


# --------------------------------------------------------------------------
# finding the inputs


def _visible(p):
    return not p.name.startswith(".")


def find_images(src):
    """Walk SRC -> (layout, class_names, rel_paths, labels).

    layout: "imagefolder" or "flat"; rel_paths: sorted posix paths relative to
    SRC; labels: int64 (n,), the class index or -1 for the flat layout.
    """
    src = Path(src)
    if not src.is_dir():
        raise FileNotFoundError(f"{src}: no such folder")
    entries = sorted((p for p in src.iterdir() if _visible(p)), key=lambda p: p.name)
    dirs = [p for p in entries if p.is_dir()]
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
        return "flat", [], rels, np.full(len(rels), -1, dtype=np.int64)

    class_names, rels, labels = [], [], []
    for label, d in enumerate(dirs):
        found = []
        for root, subdirs, names in os.walk(d):
            subdirs[:] = [s for s in subdirs if not s.startswith(".")]  # prune hidden folders
            found += [Path(root, n).relative_to(src).as_posix() for n in names if not n.startswith(".")]
        if not found:
            raise ValueError(f"class folder {d} holds no files (every class needs at least one image)")
        class_names.append(d.name)
        rels += sorted(found)
        labels += [label] * len(found)
    return "imagefolder", class_names, rels, np.asarray(labels, dtype=np.int64)


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
    """(True, uint8 (size, size, 3)) or (False, reason) for one file; never raises on bad data.

    Uses the current Image.MAX_IMAGE_PIXELS; the bomb warning is an error here.
    """
    from PIL import Image, ImageOps, UnidentifiedImageError
    try:
        if os.path.getsize(path) == 0:
            return False, "zero-byte file"
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(path) as im:
                im.load()  # decode now: truncation and corruption surface here
                im = ImageOps.exif_transpose(im)
                return True, resize_square(to_rgb8(im), size, resize)
    except (Image.DecompressionBombWarning, Image.DecompressionBombError) as e:
        return False, f"decompression bomb (over --max-pixels): {e}"
    except UnidentifiedImageError:
        return False, "not an image (Pillow cannot identify the file format)"
    except Exception as e:  # decoders raise OSError, SyntaxError, ValueError, struct.error, ...
        return False, f"corrupt or truncated image ({type(e).__name__}: {e})"


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


def default_workers():
    try:
        cpus = len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        cpus = os.cpu_count() or 1
    return max(1, min(4, cpus))


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
    max_pixels = check_int("--max-pixels", max_pixels, minimum=0)  # 0: no limit
    if src.is_dir() and (out.resolve() == src.resolve() or src.resolve() in out.resolve().parents):
        raise ValueError(f"OUT ({out}) must not be SRC or inside it")

    layout, class_names, rels, labels = find_images(src)
    n = len(rels)
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
        kept, files, bad = 0, [], []
        pool = None
        try:
            if workers == 1:
                _init_worker(max_pixels)  # in this process; restored below
                results = map(_decode_task, tasks)
            else:
                pool = Pool(workers, initializer=_init_worker, initargs=(max_pixels,))
                chunk = max(1, min(64, n // (workers * 8)))
                results = pool.imap(_decode_task, tasks, chunksize=chunk)  # ordered
            for i, (ok, payload) in enumerate(results):
                if ok:
                    # After the first bad file, keep decoding (to list them all) but stop writing.
                    if not bad or skip_bad:
                        writer.write(kept, payload[None], labels[i:i + 1])
                        files.append(rels[i])
                        kept += 1
                else:
                    bad.append({"path": rels[i], "reason": payload})
                bar.update(i + 1, len(bad))
        finally:
            Image.MAX_IMAGE_PIXELS = old_limit
            if pool is not None:
                pool.terminate()
                pool.join()
            bar.close(n, len(bad))
        if bad and not skip_bad:
            raise BadImagesError(f"{len(bad)} of {n} files under {src} could not be decoded "
                                 f"(nothing was written; --skip-bad leaves them out):\n"
                                 f"{_format_bad(bad)}")
        if kept == 0:
            raise BadImagesError(f"none of the {n} files under {src} could be decoded:\n"
                                 f"{_format_bad(bad)}")
        writer.truncate(kept)
        writer.manifest["files"] = files
        writer.manifest["skipped"] = bad
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
                   help=f"decoding processes (default min(4, CPUs) = {default_workers()})")
    p.add_argument("--skip-bad", action="store_true",
                   help="leave out undecodable files and record them in the manifest "
                        "(default: fail, naming them, and write nothing)")
    p.add_argument("--max-pixels", type=int, default=DEFAULT_MAX_PIXELS,
                   help="decompression-bomb limit in pixels per image (0 = none; "
                        "default %(default)s)")
    p.add_argument("--overwrite", action="store_true", help="replace OUT if it is a packed dataset")
    p.add_argument("--quiet", action="store_true", help="no progress line")
    return p


def main(argv=None):
    """Command-line entry point; returns the exit status (0 ok, 1 error)."""
    args = build_parser().parse_args(argv)
    return run("pack_folder", lambda: "wrote " + str(pack_folder(
        args.src, args.out, args.size, resize=args.resize, workers=args.workers,
        skip_bad=args.skip_bad, max_pixels=args.max_pixels, overwrite=args.overwrite,
        progress=not args.quiet)), quiet=args.quiet)


if __name__ == "__main__":
    sys.exit(main())

"""scikit-learn's handwritten digits as packed datasets: the project's embedded default data.

    python -m data_tools.digits OUT [--size 32] [--test-fraction 0.2] [--seed 0] [--overwrite]
    make_digits(out_dir, size=32, test_fraction=0.2, seed=0) -> (train_path, test_path)

Source: ``sklearn.datasets.load_digits()``, 1,797 real 8 x 8 grayscale scans
with values 0..16 in 10 classes, shipped inside scikit-learn (no download).

Pixels: v (0..16) -> round(v * 255 / 16) as uint8 (0 -> 0, 16 -> 255), then
upscaled from 8 x 8 to size x size (size >= 8; 8 means no resize) by
bilinear interpolation, ``refimpl.data.resample.resize`` (align_corners=False,
edges clamped; smooth and without the overshoot rings bicubic draws around
the strokes of such tiny images), computed in float64 and rounded once,
half to even, to uint8; then the gray channel is replicated to RGB. This is
Pillow's BILINEAR upscale up to +-1 per pixel: Pillow rounds to 8 bits
between its horizontal and vertical passes (at size 32, 8.9% of the pixels
differ by 1; at size 16, none).

Split (fixed and documented, so results are comparable across runs):
  perm = refimpl.backend.rng(seed, "split").permutation(1797)
  for each class c, take its images in the order they appear in perm; the
  first round(test_fraction * n_c) go to test, the rest to train.
Each split is then stored in ascending order of the original index
(manifest "source_indices"). Every class is in both splits, or it is an error.

OUT/train and OUT/test manifests record source "sklearn.datasets.load_digits",
split, seed, test_fraction, class_names "0".."9" and source_indices; files is
null (no per-image source files). Both splits are published together or not
at all (``refimpl.data.packed.PackedSplits``).

Memory: the upscale holds about BYTES_PER_PIXEL (32) bytes per output pixel of
all 1,797 images at once (float64 result, its rounding, the RGB copy);
``load_digits_uint8`` checks that estimate against the available memory
(``data_tools.memory``) before it allocates, so ``--size 100000`` is one clear
error instead of an OOM kill.
"""
import argparse
import sys

import numpy as np

from data_tools.cli import add_version, require, run
from data_tools.memory import check_memory
from refimpl.backend import rng
from refimpl.checks import check_int
from refimpl.data.packed import PackedSplits
from refimpl.data.resample import resize

SOURCE = "sklearn.datasets.load_digits"
CLASS_NAMES = [str(d) for d in range(10)]
DIGIT_SIDE = 8  # the scans are 8 x 8
NUM_DIGITS = 1797
BYTES_PER_PIXEL = 32  # peak working set of load_digits_uint8 per output pixel (measured: 25-30)


def load_digits_arrays():
    """scikit-learn's digits: images float64 (1797, 8, 8) in [0, 1] (v / 16), labels int64 (1797,).

    The one loader of the raw digits (this module and ``data_tools.clutter``).
    """
    from sklearn.datasets import load_digits
    d = load_digits()
    return d.images / 16.0, d.target.astype(np.int64)


def load_digits_uint8(size=32):
    """All 1,797 digits -> (images uint8 (1797, size, size, 3), labels int64 (1797,)).

    size >= 8 (pixel rule in the module docstring).
    """
    size = check_int("size", size, minimum=DIGIT_SIDE)
    check_memory(f"--size {size}: {NUM_DIGITS} digits of {size}x{size}",
                 NUM_DIGITS * size * size * BYTES_PER_PIXEL)
    digits, labels = load_digits_arrays()
    gray = np.round(digits * 255.0).astype(np.uint8)         # (1797, 8, 8), v * 255 / 16
    if size != DIGIT_SIDE:
        # all digits at once, as the channels of one (8, 8, 1797) image; the
        # weights are convex, so the values stay in [0, 255] up to rounding
        up = resize(gray.transpose(1, 2, 0), size, size)     # (size, size, 1797) float64
        gray = np.rint(up).astype(np.uint8).transpose(2, 0, 1)  # (1797, size, size)
    images = np.repeat(gray[..., None], 3, axis=3)           # (1797, size, size, 3)
    return images, labels


def split_indices(labels, test_fraction=0.2, seed=0):
    """Stratified split -> (train_idx, test_idx), each int64 ascending (rule in the module docstring)."""
    if not 0 < test_fraction < 1:
        raise ValueError(f"test_fraction must be in (0, 1), got {test_fraction!r}")
    check_int("seed", seed, minimum=0)
    labels = np.asarray(labels)
    perm = rng(seed, "split").permutation(labels.shape[0])
    test = []
    for c in np.unique(labels):
        members = perm[labels[perm] == c]  # class c, in permuted order
        k = int(round(test_fraction * members.size))
        if not 0 < k < members.size:
            raise ValueError(f"test_fraction {test_fraction} puts {k} of {members.size} images of "
                             f"class {c} in the test split; every class must be in both splits")
        test.append(members[:k])
    test = np.sort(np.concatenate(test)).astype(np.int64)
    train = np.setdiff1d(np.arange(labels.shape[0]), test).astype(np.int64)
    return train, test


def make_digits(out_dir, size=32, test_fraction=0.2, seed=0, overwrite=False):
    """Write out_dir/train and out_dir/test (both or neither); returns their Paths (train, test)."""
    splits = PackedSplits(out_dir, ("train", "test"), overwrite=overwrite)  # checks both targets
    images, labels = load_digits_uint8(size)
    train, test = split_indices(labels, test_fraction, seed)
    with splits:
        for split, idx in (("train", train), ("test", test)):
            manifest = {"source": SOURCE, "split": split, "seed": int(seed),
                        "test_fraction": float(test_fraction),
                        "split_rule": "stratified: per class, the first round(test_fraction * n_c) "
                                      "images in rng(seed, 'split').permutation(1797) order go to test",
                        "resize": "bilinear" if size != DIGIT_SIDE else "none",
                        "class_names": CLASS_NAMES, "files": None, "source_indices": idx.tolist()}
            splits.write(split, images[idx], labels[idx], manifest)
    return splits.paths


def build_parser():
    p = argparse.ArgumentParser(
        prog="python -m data_tools.digits",
        description="Pack scikit-learn's bundled 8x8 handwritten digits (1,797 images, no "
                    "download) into OUT/train and OUT/test.")
    p.add_argument("out", metavar="OUT", help="output folder")
    p.add_argument("--size", type=int, default=32,
                   help="side length, >= 8 (default 32; bilinear upscale)")
    p.add_argument("--test-fraction", type=float, default=0.2,
                   help="share of each class in the test split (default 0.2)")
    p.add_argument("--seed", type=int, default=0, help="seed of the split (default 0)")
    p.add_argument("--overwrite", action="store_true", help="replace existing OUT/train, OUT/test")
    add_version(p)
    return p


def main(argv=None):
    """Command-line entry point; returns the exit status (0 ok, 1 error)."""
    args = build_parser().parse_args(argv)
    require("digits", ["sklearn"], "scikit-learn's digits")
    return run("digits", lambda: "wrote " + ", ".join(map(str, make_digits(
        args.out, size=args.size, test_fraction=args.test_fraction, seed=args.seed,
        overwrite=args.overwrite))))


if __name__ == "__main__":
    sys.exit(main())

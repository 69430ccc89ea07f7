"""Cluttered digits: a harder benchmark made from scikit-learn's real 8x8 digits.

Contract: ``make_clutter(out_dir, size, copies, seed, test_fraction)`` writes
two packed datasets, ``out_dir/train`` and ``out_dir/test``. Every original
digit (1,797 of them, no download) is placed ``copies`` times on a
``size x size`` canvas. The split is made over the ORIGINAL digits first
(``data_tools.digits.split_indices``: the same split as the plain digits), so
all copies of one digit land in the same split (no near-duplicate leaks from
train to test), and the output is a pure function of the arguments.

One placement (all numbers from ``backend.rng(seed, "clutter", digit_index, copy)``):

- background: a dark random tint plus smooth noise (a 4x4 grid of random
  colours, bilinearly upsampled), values in about [0, 0.4];
- distractors: 2 stroke fragments, each a random 4x4 patch (in the 8x8 digit
  grid) of a random digit *of the same split*, scaled like the main digit,
  placed anywhere, in a dimmer random colour (intensity 0.35-0.6);
- the digit: resized (bilinear) to a random side of 35%-75% of the canvas,
  placed at a random position fully inside it, in a bright random colour
  (each channel 0.6-1.0).

Every resize is ``refimpl.data.resample.resize`` (bilinear, align_corners=False,
edges clamped), in float64; the canvas is rounded to uint8 once at the end.

Why: on plain digits a nearest neighbour on raw pixels is already ~98%
correct, so it cannot tell a learned representation from the identity. Here
position, scale, colour and clutter break pixel alignment, and raw-pixel kNN
falls far down (``refimpl.evaluate.knn.raw_pixel_knn_accuracy``; the tests
measure it), leaving room for self-supervised features to show what they
learned.

Both splits are published together or not at all
(``refimpl.data.packed.PackedSplits``). Memory: a split's images are built in
memory (3 bytes per pixel, plus about CANVAS_BYTES_PER_PIXEL for the float64
canvas being drawn); ``make_clutter`` checks the larger split's estimate
against the available memory (``data_tools.memory``) before it allocates.

    python -m data_tools.clutter OUT --size 32 --copies 4 --seed 0
"""
import argparse
import sys

import numpy as np

from data_tools.cli import add_version, require, run
from data_tools.digits import CLASS_NAMES, load_digits_arrays, split_indices
from data_tools.memory import check_memory
from refimpl.backend import rng
from refimpl.checks import check_int
from refimpl.data.packed import PackedSplits
from refimpl.data.resample import resize

DIGIT_SCALE = (0.35, 0.75)       # digit side / canvas side
FRAGMENTS = 2                    # distractor strokes per image
FRAGMENT_CELLS = 4               # a fragment is a 4x4 patch of the 8x8 digit grid
FRAGMENT_INTENSITY = (0.35, 0.6)
NOISE_GRID = 4
MIN_SIZE = 8                     # smallest canvas side
CANVAS_BYTES_PER_PIXEL = 128     # one canvas in flight: float64 RGB and its temporaries


def _paste(canvas, alpha_img, colour, top, left):
    """Alpha-composite ``colour`` (3,) with coverage ``alpha_img`` (h, w) into canvas (S, S, 3)."""
    h, w = alpha_img.shape
    region = canvas[top:top + h, left:left + w]
    a = np.clip(alpha_img, 0, 1)[..., None]
    canvas[top:top + h, left:left + w] = region + a * (colour - region)


def place_digit(digit, others, size, seed, digit_index, copy):
    """One cluttered image uint8 (size, size, 3) of ``digit`` (8, 8) in [0, 1].

    others: (m, 8, 8) digits of the same split to cut distractor fragments from.
    All randomness: rng(seed, "clutter", digit_index, copy).
    """
    g = rng(seed, "clutter", digit_index, copy)
    tint = g.uniform(0.0, 0.2, 3)
    canvas = tint + g.uniform(0.0, 0.2, (NOISE_GRID, NOISE_GRID, 3))
    canvas = resize(canvas, size, size)                    # (S, S, 3)
    side = max(4, int(round(size * g.uniform(*DIGIT_SCALE))))
    cell = side / 8.0                                      # pixels per digit-grid cell
    for _ in range(FRAGMENTS):
        other = others[g.integers(len(others))]
        r0, c0 = g.integers(0, 8 - FRAGMENT_CELLS + 1, 2)
        patch = other[r0:r0 + FRAGMENT_CELLS, c0:c0 + FRAGMENT_CELLS]
        fside = max(2, int(round(FRAGMENT_CELLS * cell)))
        patch = resize(patch, fside, fside)
        top, left = g.integers(0, size - fside + 1, 2)
        colour = g.uniform(*FRAGMENT_INTENSITY) * g.uniform(0.6, 1.0, 3)
        _paste(canvas, patch, colour, top, left)
    top, left = g.integers(0, size - side + 1, 2)
    _paste(canvas, resize(digit, side, side), g.uniform(0.6, 1.0, 3), top, left)
    return np.clip(np.rint(canvas * 255), 0, 255).astype(np.uint8)


def clutter_arrays(digits, labels, indices, size=32, copies=4, seed=0):
    """Cluttered copies of the digits ``indices``, in memory.

    digits: (N, 8, 8) in [0, 1]; labels (N,); indices: the split's original ids.
    Returns images uint8 (len(indices) * copies, S, S, 3), labels int64 and
    digit_ids int64 (the original index of each image), copy-major within a
    digit: rows [i*copies, (i+1)*copies) are digit indices[i].
    """
    indices = np.asarray(indices, dtype=np.int64)
    others = digits[indices]
    images = np.empty((len(indices) * copies, size, size, 3), dtype=np.uint8)
    for i, d in enumerate(indices):
        for c in range(copies):
            images[i * copies + c] = place_digit(digits[d], others, size, seed, d, c)
    digit_ids = np.repeat(indices, copies)
    return images, labels[digit_ids], digit_ids


def make_clutter(out_dir, size=32, copies=4, seed=0, test_fraction=0.2, overwrite=False):
    """Write out_dir/train and out_dir/test (packed, both or neither); returns (train_path, test_path).

    The split of the original digits is ``data_tools.digits.split_indices``
    (stratified by class; the same digits as ``make_digits`` with the same
    seed and test_fraction). The manifests record ``source_indices``: the
    original sklearn index of every image, so the split can be checked.
    """
    size = check_int("size", size, minimum=MIN_SIZE)
    copies = check_int("copies", copies)
    splits = PackedSplits(out_dir, ("train", "test"), overwrite=overwrite)  # checks both targets
    digits, labels = load_digits_arrays()
    # the same stratified split of the original digits as data_tools.digits
    train_idx, test_idx = split_indices(labels, test_fraction, seed)
    largest = max(len(train_idx), len(test_idx)) * copies
    check_memory(f"--size {size} --copies {copies}: {largest} images of {size}x{size} in one split",
                 (largest * 3 + CANVAS_BYTES_PER_PIXEL) * size * size)
    with splits:
        for split, idx in (("train", train_idx), ("test", test_idx)):
            images, y, digit_ids = clutter_arrays(digits, labels, idx, size, copies, seed)
            manifest = {"source": "data_tools.clutter (sklearn.datasets.load_digits)",
                        "split": split, "seed": int(seed), "test_fraction": float(test_fraction),
                        "size": int(size), "copies": int(copies), "class_names": CLASS_NAMES,
                        "split_rule": "data_tools.digits.split_indices over the original digits; "
                                      "all copies of a digit stay in its split",
                        "source_indices": digit_ids.tolist()}
            splits.write(split, images, y, manifest)
            del images  # the next split is built after this one is on disk
    return splits.paths


def main(argv=None):
    parser = argparse.ArgumentParser(
        prog="python -m data_tools.clutter",
        description="Cluttered digits (scikit-learn's 8x8 digits at random scale and "
                    "position on a noisy background with distractor strokes) -> "
                    "OUT/train, OUT/test, split by original digit.")
    parser.add_argument("out", help="output folder (gets train/ and test/)")
    parser.add_argument("--size", type=int, default=32, help="canvas side in pixels")
    parser.add_argument("--copies", type=int, default=4, help="placements per original digit")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--test-fraction", type=float, default=0.2)
    parser.add_argument("--overwrite", action="store_true")
    add_version(parser)
    args = parser.parse_args(argv)
    require("clutter", ["sklearn"], "scikit-learn's digits")
    return run("clutter", lambda: "wrote " + ", ".join(map(str, make_clutter(
        args.out, size=args.size, copies=args.copies, seed=args.seed,
        test_fraction=args.test_fraction, overwrite=args.overwrite))))


if __name__ == "__main__":
    sys.exit(main())

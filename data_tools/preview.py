"""A contact sheet of a dataset and its augmentations, as a PNG.

    python -m data_tools.preview DATASET --out grid.png [--n 8] [--augs 6]
                                 [--size S] [--seed 0] [--zoom 1]

One row per image: first the image through ``eval_transform`` (what
evaluation sees), then ``--augs`` random augmentations of it from
``augment_batch`` (epochs 0, 1, ..., so each column is what training sees in
that epoch), all un-normalized back to 0..255. Cells are ``S x S`` (S =
``--size``, default the dataset's height) with a GAP-pixel gray border
between them; ``--zoom Z`` enlarges the finished sheet by pixel repetition.

Sheet size before zoom: height ``n S + (n + 1) GAP``, width
``(1 + augs) S + (2 + augs) GAP`` (one extra gap column separates the
original from its augmentations).

DATASET is anything ``refimpl.data.datasets.open_dataset`` accepts: a packed
folder or a "synthetic:n=...,size=..." spec. The rows show images spread
evenly over the dataset (indices ``linspace(0, N - 1, n)``).
"""
import argparse
import sys
from pathlib import Path

import numpy as np

from data_tools.cli import add_version, require, run
from refimpl.checks import check_int
from refimpl.data.augment import AugmentConfig, augment_batch, denormalize, eval_transform
from refimpl.data.datasets import open_dataset
from refimpl.data.synthetic import SPEC_PREFIX

GAP = 2
GAP_VALUE = 128  # mid gray


def sheet(dataset, n=8, augs=6, size=None, seed=0, config=None):
    """The contact sheet as uint8 (height, width, 3) (see the module docstring)."""
    config = AugmentConfig() if config is None else config
    n, augs = check_int("n", n), check_int("augs", augs, minimum=0)
    size = check_int("size", dataset.image_size[0] if size is None else size)
    ids = np.unique(np.round(np.linspace(0, len(dataset) - 1, n)).astype(np.int64))
    images = dataset.read(ids)                               # (n, H, W, 3)
    cols = [denormalize(eval_transform(images, size, config, device="cpu"), config)]
    for epoch in range(augs):
        x = augment_batch(images, ids, seed, epoch, size, config, device="cpu")
        cols.append(denormalize(x, config))                  # (n, S, S, 3)
    rows, ncol = len(ids), len(cols)
    out = np.full((rows * size + (rows + 1) * GAP, ncol * size + (ncol + 2) * GAP, 3),
                  GAP_VALUE, dtype=np.uint8)
    for c, col in enumerate(cols):
        x0 = GAP + c * (size + GAP) + (GAP if c > 0 else 0)  # extra gap after the original
        for r in range(rows):
            y0 = GAP + r * (size + GAP)
            out[y0:y0 + size, x0:x0 + size] = col[r]
    return out


def main(argv=None):
    """Command-line entry point; returns the exit status (0 ok, 1 error)."""
    parser = argparse.ArgumentParser(
        prog="python -m data_tools.preview",
        description="Write a PNG grid: per row an image (eval transform) and several "
                    "random augmentations of it.")
    parser.add_argument("dataset", metavar="DATASET",
                        help="a packed dataset folder or a 'synthetic:n=...' spec")
    parser.add_argument("--out", required=True, help="output PNG path")
    parser.add_argument("--n", type=int, default=8, help="images (rows), default 8")
    parser.add_argument("--augs", type=int, default=6, help="augmentations per image, default 6")
    parser.add_argument("--size", type=int, default=None, help="cell side (default: image height)")
    parser.add_argument("--seed", type=int, default=0, help="augmentation seed")
    parser.add_argument("--zoom", type=int, default=1, help="enlarge the sheet Z times")
    add_version(parser)
    args = parser.parse_args(argv)
    require("preview", ["PIL"], "writing the PNG grid")
    from PIL import Image

    def work():
        if not args.dataset.startswith(SPEC_PREFIX) and not Path(args.dataset).exists():
            raise FileNotFoundError(f"dataset {args.dataset!r} not found (expected a packed "
                                    f"dataset folder or a 'synthetic:n=...' spec)")
        check_int("--zoom", args.zoom)
        grid = sheet(open_dataset(args.dataset), n=args.n, augs=args.augs, size=args.size,
                     seed=args.seed)
        grid = np.repeat(np.repeat(grid, args.zoom, axis=0), args.zoom, axis=1)
        out = Path(args.out)
        out.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(grid).save(out)
        return f"wrote {out} ({grid.shape[1]}x{grid.shape[0]})"
    return run("preview", work)


if __name__ == "__main__":
    sys.exit(main())

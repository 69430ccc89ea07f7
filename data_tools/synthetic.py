"""Pack a finite synthetic dataset (shapes x textures) to disk.

    python -m data_tools.synthetic OUT --n 5000 --size 32 --classes 10 --seed 0
    write_synthetic(out_dir, num_images, size=32, num_classes=10, seed=0) -> Path

The images and labels are those of ``refimpl.data.synthetic.SyntheticDataset``
with the same arguments (its docstring describes them), bit for bit: this
tool only writes them into a packed folder (``refimpl.data.packed``), in
chunks, atomically. Training does not need it: any dataset argument accepts
"synthetic:n=N,size=S,classes=K,seed=X" and generates the images on the fly.
The manifest records source "synthetic", the spec and the class names.

Memory: rendering holds about RENDER_BYTES_PER_PIXEL (96) bytes per pixel of
every image in a chunk (float32 coordinates, masks and colour planes; 85-90
measured, see tests/test_synthetic.py). Before rendering, the chunk is cut so
that it uses at most half of the available memory (``data_tools.memory``),
and a single image that needs more than all of it is an error naming
``--size``: ``--size 100000`` ends with one line, not an OOM kill. The
output does not depend on the chunk. The disk space for the file is checked
by the writer (``PackedWriter``).
"""
import argparse
import sys

import numpy as np

from data_tools.cli import add_version, run
from data_tools.memory import available_memory, check_memory
from refimpl.checks import check_int
from refimpl.data.packed import PackedWriter
from refimpl.data.synthetic import MAX_CLASSES, SyntheticDataset

RENDER_BYTES_PER_PIXEL = 96


def write_synthetic(out_dir, num_images, size=32, num_classes=10, seed=0, chunk=4096,
                    overwrite=False):
    """Pack a finite synthetic dataset into ``out_dir`` (streamed, atomic); returns the Path.

    chunk: at most this many images are generated and written at a time
    (fewer if memory is short; see the module docstring).
    """
    chunk = check_int("chunk", chunk)
    ds = SyntheticDataset(num_images, size=size, num_classes=num_classes, seed=seed)
    per_image = RENDER_BYTES_PER_PIXEL * ds.size * ds.size
    check_memory(f"--size {ds.size}: rendering one {ds.size}x{ds.size} image", per_image)
    available = available_memory()
    if available is not None:
        chunk = max(1, min(chunk, available // (2 * per_image)))
    labels = ds.labels
    manifest = {"source": "synthetic", "spec": ds.spec, "class_names": ds.class_names}
    with PackedWriter(out_dir, ds.num_images, ds.size, ds.size, manifest=manifest,
                      overwrite=overwrite) as w:
        for start in range(0, ds.num_images, chunk):
            idx = np.arange(start, min(start + chunk, ds.num_images))
            w.write(start, ds.read(idx), labels[idx])
    return w.out_dir


def main(argv=None):
    """Command-line entry point; returns the exit status (0 ok, 1 error)."""
    parser = argparse.ArgumentParser(
        prog="python -m data_tools.synthetic",
        description="Pack a finite synthetic (shapes x textures) dataset to disk. "
                    "Training can also read 'synthetic:n=N,size=S,classes=K,seed=X' "
                    "directly, without files.")
    parser.add_argument("out", help="output folder (a packed dataset)")
    parser.add_argument("--n", type=int, required=True, help="number of images")
    parser.add_argument("--size", type=int, default=32, help="image side in pixels")
    parser.add_argument("--classes", type=int, default=10, help=f"number of classes (<= {MAX_CLASSES})")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--overwrite", action="store_true", help="replace an existing packed dataset")
    add_version(parser)
    args = parser.parse_args(argv)

    def work():
        path = write_synthetic(args.out, args.n, size=args.size, num_classes=args.classes,
                               seed=args.seed, overwrite=args.overwrite)
        return f"wrote {args.n} images ({args.size}x{args.size}, {args.classes} classes) to {path}"
    return run("synthetic", work)


if __name__ == "__main__":
    sys.exit(main())

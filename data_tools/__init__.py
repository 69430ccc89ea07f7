"""data_tools: turn images into packed datasets (see refimpl/data/packed.py).

Every tool writes a complete packed folder (images.npy, labels.npy,
manifest.json) atomically, or nothing at all; the converters that make
OUT/train and OUT/test publish both or neither
(``refimpl.data.packed.PackedSplits``). Every command ends with one line on
stderr, ``<tool>: error: <message>`` and exit status 1 on failure
(``data_tools.cli.run``). Sizes too large for this machine are refused from
an estimate before anything is allocated (memory: ``data_tools.memory``; disk:
``PackedWriter``), and a killed run's temporary folder is removed by the next
run for the same OUT. Run ``python -m data_tools`` for this list.

    python -m data_tools.pack_folder SRC OUT --size S [--resize shorter|exact]
                                     [--workers K] [--skip-bad] [--max-pixels P]
        a class-per-subfolder tree (ImageFolder layout) or a flat folder of
        images (labels -1) -> OUT

    python -m data_tools.cifar SRC OUT [--dataset cifar10|cifar100]
        CIFAR-10 / CIFAR-100 in the official python format (extracted folder or
        .tar.gz; pickled, so only files you trust) -> OUT/train, OUT/test

    python -m data_tools.digits OUT [--size 32] [--test-fraction 0.2] [--seed 0]
        scikit-learn's bundled 8x8 handwritten digits (1,797 images, no
        download), the project's embedded default data -> OUT/train, OUT/test

    python -m data_tools.clutter OUT [--size 32] [--copies 4] [--seed 0]
        the same real digits at random scale and position on a cluttered
        background (raw-pixel kNN collapses on it) -> OUT/train, OUT/test

    python -m data_tools.synthetic OUT --n N [--size 32] [--classes 10] [--seed 0]
        procedurally generated shapes and textures, each image a pure function
        of (seed, index); packs a finite one to OUT. For scale runs no files
        are needed: any dataset argument accepts "synthetic:n=1281167,size=32"

    python -m data_tools.preview DATASET --out grid.png [--n 8] [--augs 6]
        a grid of images and, beside each, several of its augmentations
"""

"""The datasets of the benchmarks that measure learning, defined once.

    train, test = prepare("shapes32", data_dir)   # dataset specs for Config.train / test

Used by bench_ablation.py (the method's variants) and bench_transfer.py
(pretraining, then fine-tuning), so that "shapes32" means the same images in
every table:

    digits    scikit-learn's handwritten digits at 16 x 16 (1,438 train / 359
              test, packed into data_dir on first use): raw pixels are already
              near the ceiling
    shapes    the synthetic shapes x textures at 16 x 16, 8 classes (2,000
              train / 500 test, drawn with different data seeds), where raw
              pixels fail
    shapes32  the same at 32 x 32
    shapes32b 8 other classes of the same generator at 32 x 32 (offset 8: no
              class's (shape, texture) pair is one of shapes32's), 2,000 train /
              500 test: the transfer target of shapes32

Data seeds 0 (train) and 1 (test), 2 and 3 for shapes32b; demos and tests
use other seeds.
"""
from pathlib import Path

DATASETS = ("digits", "shapes", "shapes32", "shapes32b")


def prepare(name, data_dir):
    """(train spec, test spec) of a dataset; packs the digits on first use."""
    if name == "digits":
        path = Path(data_dir) / "digits16"
        if not (path / "train" / "manifest.json").is_file():
            from data_tools.digits import make_digits
            make_digits(path, size=16)
        return str(path / "train"), str(path / "test")
    if name in ("shapes", "shapes32"):
        size = 16 if name == "shapes" else 32
        return (f"synthetic:n=2000,size={size},classes=8,seed=0",
                f"synthetic:n=500,size={size},classes=8,seed=1")
    if name == "shapes32b":
        return ("synthetic:n=2000,size=32,classes=8,seed=2,offset=8",
                "synthetic:n=500,size=32,classes=8,seed=3,offset=8")
    raise SystemExit(f"unknown dataset {name!r}; known: {', '.join(DATASETS)}")

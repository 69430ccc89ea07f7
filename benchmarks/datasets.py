"""The datasets of the benchmarks that measure learning, defined once.

    train, test = prepare("shapes32", data_dir)   # dataset specs for Config.train / test

Used by bench_ablation.py (the method's variants) and the transfer benchmark
(pretraining, then fine-tuning), so that "shapes32" means the same images in
every table:

    digits    scikit-learn's handwritten digits at 16 x 16 (1,438 train / 359
              test, packed into data_dir on first use): raw pixels are already
              near the ceiling
    shapes    the synthetic shapes x textures at 16 x 16, 8 classes (2,000
              train / 500 test, drawn with different data seeds), where raw
              pixels fail
    shapes32  the same at 32 x 32

Data seeds 0 (train) and 1 (test); demos and tests use other seeds.
"""
from pathlib import Path

DATASETS = ("digits", "shapes", "shapes32")


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
    raise SystemExit(f"unknown dataset {name!r}; known: {', '.join(DATASETS)}")

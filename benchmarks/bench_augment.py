"""Augmentation throughput: refimpl's batched augment_batch vs per-image Pillow.

    python benchmarks/bench_augment.py [--batch 256] [--sizes 32 96] [--threads 1] [--repeat 5]

For each input size S (output S x S too), one JSON line with images/s of

- refimpl: ``augment_batch`` on a (B, S, S, 3) uint8 batch (host parameter
  draws + vectorized pixel work), float32, CPU;
- pillow: what a typical PyTorch data loader does per image with Pillow:
  crop + resize (BILINEAR), flip, ImageEnhance brightness / contrast / colour
  in a random order, a hue shift through HSV (torchvision's PIL path), grayscale
  convert, then a float array, normalization and HWC -> CHW; images stacked.

Both use the same SimCLR settings (p = 0.5 flip, 0.8 jitter, 0.2 grayscale)
and one thread (``--threads``): one loader worker each. Then one line with the
synthetic-data generator's images/s (``refimpl.data.synthetic``, 32 x 32).
Absolute numbers on shared machines are noise; compare the ratio.
"""
import argparse
import math
import random
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # `benchmarks.common`

import numpy as np  # noqa: E402

from benchmarks.common import (emit, load_record, machine_info, median_time,  # noqa: E402
                               set_threads, snapshot)
from refimpl.data.augment import (IMAGENET_MEAN, IMAGENET_STD, AugmentConfig,  # noqa: E402
                                  augment_batch)


def pillow_augment(images, out_size, cfg, rnd):
    """Per-image Pillow pipeline (torchvision's transforms, written out)."""
    from PIL import Image, ImageEnhance
    mean = np.asarray(IMAGENET_MEAN, dtype=np.float32)
    std = np.asarray(IMAGENET_STD, dtype=np.float32)
    out = []
    for arr in images:
        img = Image.fromarray(arr)
        W, H = img.size
        # RandomResizedCrop.get_params
        box = None
        for _ in range(10):
            area = H * W * rnd.uniform(*cfg.crop_scale)
            ratio = math.exp(rnd.uniform(math.log(cfg.crop_ratio[0]), math.log(cfg.crop_ratio[1])))
            w, h = int(round(math.sqrt(area * ratio))), int(round(math.sqrt(area / ratio)))
            if 0 < w <= W and 0 < h <= H:
                top, left = rnd.randint(0, H - h), rnd.randint(0, W - w)
                box = (left, top, left + w, top + h)
                break
        if box is None:
            box = (0, 0, W, H)
        img = img.resize((out_size, out_size), Image.Resampling.BILINEAR, box=box)
        if rnd.random() < cfg.flip_p:
            img = img.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
        if rnd.random() < cfg.jitter_p:
            ops = [0, 1, 2, 3]
            rnd.shuffle(ops)
            for op in ops:
                if op == 0:
                    img = ImageEnhance.Brightness(img).enhance(rnd.uniform(0.6, 1.4))
                elif op == 1:
                    img = ImageEnhance.Contrast(img).enhance(rnd.uniform(0.6, 1.4))
                elif op == 2:
                    img = ImageEnhance.Color(img).enhance(rnd.uniform(0.6, 1.4))
                else:  # torchvision's PIL adjust_hue
                    h, s, v = img.convert("HSV").split()
                    hh = np.asarray(h, dtype=np.uint8) + np.uint8(
                        int(rnd.uniform(-cfg.hue, cfg.hue) * 255) % 256)
                    img = Image.merge("HSV", (Image.fromarray(hh, "L"), s, v)).convert("RGB")
        if rnd.random() < cfg.gray_p:
            img = img.convert("L").convert("RGB")
        x = (np.asarray(img, dtype=np.float32) / 255.0 - mean) / std
        out.append(x.transpose(2, 0, 1))
    return np.stack(out)                                   # (B, 3, S, S)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--batch", type=int, default=256)
    p.add_argument("--sizes", type=int, nargs="+", default=[32, 96])
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--repeat", type=int, default=5)
    args = p.parse_args(argv)
    set_threads(args.threads)
    info = machine_info()
    cfg = AugmentConfig()
    b = args.batch
    for size in args.sizes:
        images = np.random.default_rng(0).integers(0, 256, (b, size, size, 3), dtype=np.uint8)
        ids = np.arange(b)
        before = snapshot()
        epoch = iter(range(10 ** 6))  # a new epoch each call: fresh parameters
        t_ref = median_time(lambda: augment_batch(images, ids, 0, next(epoch), size, cfg),
                            repeat=args.repeat)
        rnd = random.Random(0)
        t_pil = median_time(lambda: pillow_augment(images, size, cfg, rnd), repeat=args.repeat)
        emit({"benchmark": "augment", "batch": b, "size": size, "threads": args.threads,
              "refimpl_img_per_s": round(b / t_ref, 1), "pillow_img_per_s": round(b / t_pil, 1),
              "ratio": round(t_pil / t_ref, 3), **load_record(before, args.threads),
              "machine": info})
    from refimpl.data.synthetic import SyntheticDataset
    ds = SyntheticDataset(1281167, size=32, num_classes=10, seed=0)
    starts = iter(range(0, 1281167 - b, b))  # a new batch each call

    def read_next():
        s = next(starts)
        return ds.read(np.arange(s, s + b))
    t_syn = median_time(read_next, repeat=args.repeat)
    emit({"benchmark": "synthetic", "batch": b, "size": 32, "threads": args.threads,
          "img_per_s": round(b / t_syn, 1)})


if __name__ == "__main__":
    main()

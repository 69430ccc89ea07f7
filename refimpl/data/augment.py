"""SimCLR/PIC-style image augmentations, vectorized over a batch (NumPy or CuPy).

Contract
--------
``augment_batch(images, ids, seed, epoch, out_size)`` turns a uint8 batch
``(n, H, W, 3)`` (as the packed-dataset reader returns it) into a normalized
float batch ``(n, 3, S, S)`` (NCHW) on the requested device. Image ``i`` gets
the augmentation drawn from ``backend.rng(seed, "augment", epoch, ids[i])`` and from
nothing else, so an instance is augmented identically whichever rank, batch or
batch position loads it. This is what makes a P-rank step equal a 1-rank step.

How the work is split: for every image a fixed number (``N_DRAWS``) of uniform
numbers is drawn on the host (a few numbers per image), turned into
parameters (crop box, flip, jitter factors and order, grayscale), and then the
pixel work runs vectorized over the whole batch with ``xp``. Each operation
reads its own fixed slots of the per-image vector, so disabling one operation
never changes the parameters another one gets.

Pipeline (torchvision names, SimCLR's order):

1. ``RandomResizedCrop(S, scale, ratio)``: the crop box is chosen exactly like
   torchvision's ``get_params`` (10 tries of area/log-ratio, then the central
   fallback), then the box is resized to ``S x S`` by **bilinear sampling
   without antialiasing**: exactly ``F.interpolate(mode="bilinear",
   align_corners=False, antialias=False)`` of the cropped tensor, so sample
   points are clamped to the box and no pixel outside it contributes, even at
   the box's edges when it is upscaled (``refimpl.data.resample``). torchvision's
   PIL path and its tensor path with ``antialias=True`` low-pass filter when
   downscaling; we do not (cheap, and 32x32 inputs are mostly upscaled).
2. ``RandomHorizontalFlip(p)``, folded into the sampling grid (free).
3. ``RandomApply(ColorJitter(b, c, s, h), p)``: torchvision's definitions on
   float images in [0, 1], each followed by a clip to [0, 1]:
   brightness ``x * f``; contrast ``f x + (1 - f) mean(gray(x))``;
   saturation ``f x + (1 - f) gray(x)``; hue: RGB -> HSV, ``h = (h + f) mod 1``,
   HSV -> RGB. Order: a **per-image random permutation** like torchvision's
   ``ColorJitter`` (``jitter_order="random"``), or the fixed order
   brightness, contrast, saturation, hue (``jitter_order="fixed"``).
4. ``RandomGrayscale(p)``: ITU-R 601 luma ``0.299 R + 0.587 G + 0.114 B``
   (PIL's ``convert("L")``; torchvision's tensor path uses 0.2989 for red),
   copied to three channels.
5. Normalize: ``(x - mean) / std`` per channel (default ImageNet's).

Gaussian blur (SimCLR/MoCo v2 on ImageNet) is not implemented; SimCLR omits
it for 32x32 CIFAR images.

Crop scale: the default ``(0.08, 1.0)`` is torchvision's and SimCLR's. PIC
states it follows the SimCLR/MoCo v2 augmentations; MoCo v2 uses
``(0.2, 1.0)``, so set ``crop_scale=(0.2, 1.0)`` for that choice.

``eval_transform`` has no randomness: the central square of side
``min(H, W)`` is resized to ``S x S`` (the same bilinear sampler), then
normalized. This equals torchvision's ``Resize(S) + CenterCrop(S)`` up to
where the sampling points fall.
"""
import dataclasses
import math

import numpy as np

from refimpl.backend import asarray, device_of, get_array_module, resolve_dtype, rng
from refimpl.checks import check_int
from refimpl.data.resample import bilinear_matrices

# ITU-R 601 luma weights (PIL's convert("L")).
GRAY_WEIGHTS = (0.299, 0.587, 0.114)
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

CROP_TRIES = 10  # torchvision's RandomResizedCrop.get_params tries 10 boxes
# Fixed layout of the per-image uniform draws (slot -> use).
_SLOT_AREA = 0                      # 10 areas
_SLOT_RATIO = CROP_TRIES            # 10 log-ratios
_SLOT_TOP = 2 * CROP_TRIES          # crop top
_SLOT_LEFT = 2 * CROP_TRIES + 1     # crop left
_SLOT_FLIP = 2 * CROP_TRIES + 2
_SLOT_JITTER = 2 * CROP_TRIES + 3   # apply jitter?
_SLOT_FACTORS = 2 * CROP_TRIES + 4  # brightness, contrast, saturation, hue
_SLOT_ORDER = 2 * CROP_TRIES + 8    # 4 keys, argsort -> permutation
_SLOT_GRAY = 2 * CROP_TRIES + 12
N_DRAWS = 2 * CROP_TRIES + 13       # uniforms drawn per image, always all of them

# Jitter operation codes, in the fixed order.
BRIGHTNESS, CONTRAST, SATURATION, HUE = range(4)


@dataclasses.dataclass(frozen=True)
class AugmentConfig:
    """Augmentation settings; every operation can be switched off.

    crop: RandomResizedCrop on/off (off: the whole image is resized).
    crop_scale: (min, max) fraction of the image area (0.08, 1.0) torchvision/SimCLR.
    crop_ratio: (min, max) aspect ratio w/h, sampled log-uniformly.
    flip_p: probability of a horizontal flip (0 disables).
    jitter_p: probability of applying colour jitter (0 disables).
    brightness, contrast, saturation: factor ~ U[max(0, 1 - v), 1 + v] (0 disables).
    hue: shift ~ U[-v, v], v in [0, 0.5] (0 disables).
    jitter_order: "random" (per image, like torchvision) or "fixed" (b, c, s, h).
    gray_p: probability of RandomGrayscale (0 disables).
    mean, std: per-channel normalization; normalize=False leaves [0, 1] values.
    """
    crop: bool = True
    crop_scale: tuple = (0.08, 1.0)
    crop_ratio: tuple = (3.0 / 4.0, 4.0 / 3.0)
    flip_p: float = 0.5
    jitter_p: float = 0.8
    brightness: float = 0.4
    contrast: float = 0.4
    saturation: float = 0.4
    hue: float = 0.1
    jitter_order: str = "random"
    gray_p: float = 0.2
    normalize: bool = True
    mean: tuple = IMAGENET_MEAN
    std: tuple = IMAGENET_STD

    def __post_init__(self):
        lo, hi = self.crop_scale
        if not 0 < lo <= hi <= 1:
            raise ValueError(f"crop_scale must satisfy 0 < min <= max <= 1, got {self.crop_scale}")
        lo, hi = self.crop_ratio
        if not 0 < lo <= hi:
            raise ValueError(f"crop_ratio must satisfy 0 < min <= max, got {self.crop_ratio}")
        for name in ("flip_p", "jitter_p", "gray_p"):
            p = getattr(self, name)
            if not 0 <= p <= 1:
                raise ValueError(f"{name} must be a probability in [0, 1], got {p}")
        for name in ("brightness", "contrast", "saturation"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")
        if not 0 <= self.hue <= 0.5:
            raise ValueError(f"hue must be in [0, 0.5], got {self.hue}")
        if self.jitter_order not in ("random", "fixed"):
            raise ValueError(f"jitter_order must be 'random' or 'fixed', got {self.jitter_order!r}")
        if len(self.mean) != 3 or len(self.std) != 3:
            raise ValueError(f"mean and std need 3 values each, got {self.mean}, {self.std}")
        if min(self.std) <= 0:
            raise ValueError(f"std must be > 0, got {self.std}")


# --------------------------------------------------------------------------
# host side: per-image parameters


def draw_uniforms(seed, epoch, ids):
    """The per-image uniform draws: (n, N_DRAWS) float64 in [0, 1).

    Row i comes from ``rng(seed, "augment", epoch, ids[i])`` only.
    """
    return np.stack([rng(seed, "augment", epoch, int(i)).random(N_DRAWS) for i in ids]) \
        if len(ids) else np.zeros((0, N_DRAWS))


def crop_boxes(u, height, width, config):
    """Crop boxes (top, left, h, w), each int64 (n,), from the uniforms ``u``.

    torchvision's ``RandomResizedCrop.get_params``: up to 10 tries of
    ``area = H W U(scale)``, ``ratio = exp(U(log ratio))``,
    ``w = round(sqrt(area ratio))``, ``h = round(sqrt(area / ratio))``; the first
    box that fits wins; else the central crop with the ratio clamped to range.
    """
    n = u.shape[0]
    if not config.crop:
        full = np.ones(n, dtype=np.int64)
        return 0 * full, 0 * full, height * full, width * full
    area = height * width * (config.crop_scale[0] + u[:, _SLOT_AREA:_SLOT_AREA + CROP_TRIES]
                             * (config.crop_scale[1] - config.crop_scale[0]))
    log_lo, log_hi = math.log(config.crop_ratio[0]), math.log(config.crop_ratio[1])
    ratio = np.exp(log_lo + u[:, _SLOT_RATIO:_SLOT_RATIO + CROP_TRIES] * (log_hi - log_lo))
    # np.round is round-half-even, like Python's round() that torchvision uses
    w = np.round(np.sqrt(area * ratio)).astype(np.int64)  # (n, 10)
    h = np.round(np.sqrt(area / ratio)).astype(np.int64)
    ok = (w > 0) & (w <= width) & (h > 0) & (h <= height)
    first = np.argmax(ok, axis=1)  # index of the first box that fits
    rows = np.arange(n)
    ch, cw = h[rows, first], w[rows, first]
    # fallback (no box fits): torchvision's central crop
    in_ratio = width / height
    if in_ratio < min(config.crop_ratio):
        fw, fh = width, int(round(width / min(config.crop_ratio)))
    elif in_ratio > max(config.crop_ratio):
        fh, fw = height, int(round(height * max(config.crop_ratio)))
    else:
        fw, fh = width, height
    none = ~ok.any(axis=1)
    ch = np.where(none, fh, ch)
    cw = np.where(none, fw, cw)
    # torch.randint(0, H - h + 1) from a uniform: floor(u (H - h + 1))
    top = np.minimum((u[:, _SLOT_TOP] * (height - ch + 1)).astype(np.int64), height - ch)
    left = np.minimum((u[:, _SLOT_LEFT] * (width - cw + 1)).astype(np.int64), width - cw)
    top = np.where(none, (height - ch) // 2, top)
    left = np.where(none, (width - cw) // 2, left)
    return top, left, ch, cw


def jitter_params(u, config):
    """Colour-jitter parameters from the uniforms ``u`` (n, N_DRAWS).

    Returns (apply bool (n,), factors float64 (n, 4) [brightness, contrast,
    saturation, hue], order int64 (n, 4) of op codes). Disabled ops get their
    identity factor (1, 1, 1, 0).
    """
    apply = u[:, _SLOT_JITTER] < config.jitter_p
    f = u[:, _SLOT_FACTORS:_SLOT_FACTORS + 4]
    factors = np.empty_like(f)
    for k, v in enumerate((config.brightness, config.contrast, config.saturation)):
        lo, hi = max(0.0, 1.0 - v), 1.0 + v
        factors[:, k] = lo + f[:, k] * (hi - lo)
    factors[:, HUE] = -config.hue + f[:, HUE] * 2 * config.hue
    if config.jitter_order == "random":
        order = np.argsort(u[:, _SLOT_ORDER:_SLOT_ORDER + 4], axis=1, kind="stable")
    else:
        order = np.tile(np.arange(4), (u.shape[0], 1))
    return apply, factors, order


# --------------------------------------------------------------------------
# device side: pixel operations on planar float (n, 3, h, w) arrays in [0, 1]
# (planar, not (n, h, w, 3): per-channel planes make max/min/weighted sums over
# the 3 channels plain elementwise ops instead of slow reductions over a
# length-3 axis)


def resized_crop(images, top, left, height, width, out_size, flip, dtype):
    """Bilinear resize of the boxes to (out_size, out_size), optionally flipped.

    images: uint8 (n, H, W, 3) on the device; top, left, height, width: int (n,)
    host arrays (the box of each image); flip: bool (n,) host array.
    Returns planar float (n, 3, S, S) of ``dtype`` in [0, 1].

    Output pixel ``(p, q)`` samples source point ``(top + (p + 0.5) h / S - 0.5,
    left + (q + 0.5) w / S - 0.5)`` (align_corners=False), clamped to the box,
    without antialiasing: torchvision's crop, then ``F.interpolate``. Bilinear
    sampling is separable and linear, so it is two batched matmuls with sparse
    (2 weights a row) sampling matrices (``refimpl.data.resample``, built on
    the images' device): ``out = Ry @ x @ Rx^T``; BLAS/cuBLAS beat a
    fancy-index gather here.
    """
    _, H, W, _ = images.shape
    top, left, height, width = (np.asarray(a, dtype=np.int64) for a in (top, left, height, width))
    outside = (top < 0) | (left < 0) | (height < 1) | (width < 1) | (top + height > H) \
        | (left + width > W)
    if outside.any():
        i = int(np.argmax(outside))
        raise ValueError(f"crop box {i} (top {top[i]}, left {left[i]}, h {height[i]}, "
                         f"w {width[i]}) is empty or outside the {H}x{W} image")
    device = device_of(images)
    ry = bilinear_matrices(top, height, out_size, H, dtype=dtype, device=device)  # (n, S, H)
    rx = bilinear_matrices(left, width, out_size, W, flip=flip, dtype=dtype,
                           device=device)                                     # (n, S, W)
    x = images.transpose(0, 3, 1, 2).astype(dtype)            # (n, 3, H, W)
    x = ry[:, None] @ x                                       # (n, 3, S, W)
    x = x @ rx[:, None].transpose(0, 1, 3, 2)                 # (n, 3, S, S)
    return x / dtype(255)


def grayscale(x):
    """ITU-R 601 luma of planar float (n, 3, h, w) -> (n, h, w)."""
    w0, w1, w2 = GRAY_WEIGHTS
    return w0 * x[:, 0] + w1 * x[:, 1] + w2 * x[:, 2]


def adjust_brightness(x, factor):
    """clip(x * f, 0, 1); x (n, 3, h, w), factor (n,) same dtype/device."""
    xp = get_array_module(x)
    return xp.clip(x * factor[:, None, None, None], 0, 1)


def adjust_contrast(x, factor):
    """clip(f x + (1 - f) m, 0, 1), m = mean of the image's grayscale (torchvision)."""
    xp = get_array_module(x)
    m = grayscale(x).mean(axis=(1, 2))                      # (n,)
    f = factor[:, None, None, None]
    return xp.clip(f * x + ((1 - factor) * m)[:, None, None, None], 0, 1)


def adjust_saturation(x, factor):
    """clip(f x + (1 - f) gray(x), 0, 1) (torchvision)."""
    xp = get_array_module(x)
    f = factor[:, None, None, None]
    return xp.clip(f * x + (1 - f) * grayscale(x)[:, None], 0, 1)


def rgb_to_hsv(x):
    """RGB (n, 3, h, w) in [0, 1] -> HSV (n, 3, h, w), all channels in [0, 1].

    torchvision's ``_rgb2hsv``: hue is 0 for gray pixels (max == min); when two
    channels tie for the max, red wins over green over blue.
    """
    xp = get_array_module(x)
    r, g, b = x[:, 0], x[:, 1], x[:, 2]
    maxc = xp.maximum(xp.maximum(r, g), b)
    minc = xp.minimum(xp.minimum(r, g), b)
    cr = maxc - minc
    gray = cr == 0
    one = xp.ones_like(maxc)
    s = cr / xp.where(gray, one, maxc)
    crd = xp.where(gray, one, cr)  # avoid 0/0; the hue of gray pixels is 0 anyway
    rc, gc, bc = (maxc - r) / crd, (maxc - g) / crd, (maxc - b) / crd
    is_r = maxc == r
    is_g = (maxc == g) & ~is_r
    h = xp.where(is_r, bc - gc, xp.where(is_g, 2 + rc - bc, 4 + gc - rc))
    h = xp.where(gray, 0, h)
    h = xp.mod(h / 6 + 1, 1)
    return xp.stack([h, s, maxc], axis=1)


def hsv_to_rgb(hsv):
    """HSV (n, 3, h, w) -> RGB (n, 3, h, w).

    Closed form ``c_k = v - v s clip(min(m, 4 - m), 0, 1)``,
    ``m = (k + 6 h) mod 6`` with k = 5, 3, 1 for R, G, B; identical to the
    six-sector formula (torchvision's ``_hsv2rgb``, colorsys).
    """
    xp = get_array_module(hsv)
    h, s, v = hsv[:, 0:1], hsv[:, 1:2], hsv[:, 2:3]
    k = xp.asarray([5, 3, 1], dtype=hsv.dtype)[None, :, None, None]
    m = xp.mod(k + 6 * h, 6)                               # (n, 3, h, w)
    return v - v * s * xp.clip(xp.minimum(m, 4 - m), 0, 1)


def adjust_hue(x, shift):
    """Rotate hue by ``shift`` (n,) turns (in [-0.5, 0.5]); x (n, 3, h, w) in [0, 1].

    Equals ``hsv_to_rgb`` of ``rgb_to_hsv(x)`` with ``h = (h + shift) mod 1``
    (torchvision's ``adjust_hue``), fused: a hue shift keeps ``v = max`` and
    ``v s = max - min``, so only the hue (in sixths, ``6h``) is computed and
    ``c_k = max - (max - min) clip(min(m, 4 - m), 0, 1)``,
    ``m = (k + 6h + 6 shift) mod 6``, k = 5, 3, 1.
    """
    xp = get_array_module(x)
    r, g, b = x[:, 0], x[:, 1], x[:, 2]
    maxc = xp.maximum(xp.maximum(r, g), b)
    cr = maxc - xp.minimum(xp.minimum(r, g), b)
    crd = xp.where(cr == 0, 1, cr)  # gray pixels: any hue gives c_k = max
    is_r = maxc == r
    is_g = (maxc == g) & ~is_r
    # 6h before the mod, red > green > blue on ties (as rgb_to_hsv)
    h6 = xp.where(is_r, g - b, xp.where(is_g, (b - r) + 2 * crd, (r - g) + 4 * crd)) / crd
    h6 += (6 * shift)[:, None, None]
    k = xp.asarray([5, 3, 1], dtype=x.dtype)[None, :, None, None]
    m = k + h6[:, None]                                       # (n, 3, h, w)
    m -= 6 * xp.floor(m * (1 / 6))                            # mod 6, cheaper than xp.mod
    w = xp.clip(xp.minimum(m, 4 - m), 0, 1)
    return xp.clip(maxc[:, None] - cr[:, None] * w, 0, 1)


_JITTER_FNS = (adjust_brightness, adjust_contrast, adjust_saturation, adjust_hue)


def color_jitter(x, apply, factors, order):
    """Apply each selected image's 4 jitter ops in its own order; a new array.

    x: planar float (n, 3, h, w) on the device (not modified); apply: bool (n,),
    factors (n, 4), order (n, 4) host arrays. Step k applies, to every image,
    the op it has at position k; images are grouped by op so each op runs once
    per step on its group (the index sets are built on the host: no device sync).
    """
    return _color_jitter_inplace(x.copy(), apply, factors, order)


def _color_jitter_inplace(x, apply, factors, order):
    """``color_jitter`` writing into ``x``; for augment_batch, which owns its buffer."""
    dev = device_of(x)
    for step in range(4):
        for op in range(4):
            sel = np.nonzero(apply & (order[:, step] == op))[0]
            if sel.size == 0:
                continue
            f = factors[sel, op]
            if op == HUE and not np.any(f):
                continue  # a zero shift is the identity
            idx = asarray(sel, device=dev)
            x[idx] = _JITTER_FNS[op](x[idx], asarray(f, device=dev, dtype=x.dtype))
    return x


def random_grayscale(x, mask):
    """A copy of x with the images selected by host bool ``mask`` (n,) replaced
    by their gray (3 channels); x is not modified."""
    return _random_grayscale_inplace(x.copy(), mask)


def _random_grayscale_inplace(x, mask):
    """``random_grayscale`` writing into ``x``; for augment_batch."""
    sel = np.nonzero(mask)[0]
    if sel.size:
        idx = asarray(sel, device=device_of(x))
        x[idx] = grayscale(x[idx])[:, None]  # broadcast to the 3 channels
    return x


def normalize(x, config):
    """(x - mean) / std per channel of planar (n, 3, h, w); a contiguous result."""
    xp = get_array_module(x)
    if config.normalize:
        mean = xp.asarray(config.mean, dtype=x.dtype)[None, :, None, None]
        inv_std = xp.asarray(1.0 / np.asarray(config.std, dtype=np.float64),
                             dtype=x.dtype)[None, :, None, None]
        x = (x - mean) * inv_std
    return xp.ascontiguousarray(x)


# --------------------------------------------------------------------------
# public entry points


def augment_batch(images, ids, seed, epoch, out_size, config=None, device=None, dtype=np.float32):
    """Randomly augment a batch; image i's randomness comes from (seed, epoch, ids[i]).

    images: uint8 (n, H, W, 3) host array (e.g. ``PackedDataset.read``).
    ids: int (n,) global instance ids.
    out_size: S, the output side.
    config: AugmentConfig (default: SimCLR's settings, ImageNet normalization).
    device: 'cpu' | 'gpu' | None (REFIMPL_DEVICE); dtype: float32 | float64.
    Returns (n, 3, S, S) normalized float array on ``device``.
    """
    config = AugmentConfig() if config is None else config
    dtype = resolve_dtype(dtype)
    images, ids = _check_batch(images, out_size, ids)
    check_int("seed", seed, minimum=0)
    check_int("epoch", epoch, minimum=0)
    n, H, W, _ = images.shape
    u = draw_uniforms(seed, epoch, ids)                     # host, (n, N_DRAWS)
    top, left, ch, cw = crop_boxes(u, H, W, config)
    flip = u[:, _SLOT_FLIP] < config.flip_p
    x = asarray(images, device=device)                      # uint8 to the device
    x = resized_crop(x, top, left, ch, cw, out_size, flip, dtype)  # (n, 3, S, S)
    # x is a fresh array owned here: jitter and grayscale write into it (no copies)
    apply, factors, order = jitter_params(u, config)
    if apply.any():
        x = _color_jitter_inplace(x, apply, factors, order)
    x = _random_grayscale_inplace(x, u[:, _SLOT_GRAY] < config.gray_p)
    return normalize(x, config)                             # (n, 3, S, S)


def eval_transform(images, out_size, config=None, device=None, dtype=np.float32):
    """Deterministic transform: central square crop, bilinear resize, normalize.

    images: uint8 (n, H, W, 3); returns (n, 3, S, S) float on ``device``.
    """
    config = AugmentConfig() if config is None else config
    dtype = resolve_dtype(dtype)
    images, _ = _check_batch(images, out_size)
    n, H, W, _ = images.shape
    side = min(H, W)
    full = np.ones(n, dtype=np.int64)
    x = asarray(images, device=device)
    x = resized_crop(x, full * ((H - side) // 2), full * ((W - side) // 2), full * side,
                     full * side, out_size, np.zeros(n, dtype=bool), dtype)
    return normalize(x, config)


def denormalize(x, config=None):
    """Undo ``normalize``: (n, 3, S, S) -> uint8 (n, S, S, 3) host array for display."""
    from refimpl.backend import to_numpy
    config = AugmentConfig() if config is None else config
    x = to_numpy(x).transpose(0, 2, 3, 1).astype(np.float64)
    if config.normalize:
        x = x * np.asarray(config.std) + np.asarray(config.mean)
    return np.clip(np.round(x * 255), 0, 255).astype(np.uint8)


def _check_batch(images, out_size, ids=None):
    if get_array_module(images) is not np:
        raise TypeError("images must be a host (NumPy) uint8 array; it is moved to the device here")
    images = np.asarray(images)
    if images.dtype != np.uint8 or images.ndim != 4 or images.shape[-1] != 3:
        raise ValueError(f"images must be uint8 (n, H, W, 3), got {images.dtype} {images.shape}")
    if images.shape[1] < 1 or images.shape[2] < 1:
        raise ValueError(f"images must have H, W >= 1, got {images.shape}")
    check_int("out_size", out_size)
    if ids is not None:
        ids = np.asarray(ids)
        if ids.ndim != 1 or ids.shape[0] != images.shape[0]:
            raise ValueError(f"ids must be (n,) = ({images.shape[0]},), got shape {ids.shape}")
        if ids.size and not np.issubdtype(ids.dtype, np.integer):
            raise ValueError(f"ids must be integers, got {ids.dtype}")
        if ids.size and ids.min() < 0:
            raise ValueError(f"ids must be >= 0 (global instance ids), got min {ids.min()}")
    return images, ids

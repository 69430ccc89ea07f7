"""Procedurally generated labeled images: shapes x textures, made on the fly.

Contract: image ``i`` of ``SyntheticDataset(n, size, num_classes, seed)`` is a
pure function of ``(seed, i)`` (and of ``size`` and ``num_classes``), computed
when it is read. Nothing is stored, so a dataset the size of ImageNet-1k
(1,281,167 instances) costs no disk, and any rank can read any instance.

Classes are (shape, texture) pairs: 8 shapes (disk, square, diamond, triangle,
ring, frame, plus, cross) x 4 textures on the shape (solid, stripes, checker,
dots) = at most 32 classes. Class ``c`` is shape ``c % 8`` with texture
``(c + c // 8) % 4``, so the first 8 classes already differ in shape and
texture, and the 32 pairs are all distinct. ``offset`` shifts the classes:
label c is drawn as class ``c + offset``, so ``classes=8,offset=8`` is 8
classes whose (shape, texture) pairs are disjoint from ``classes=8``'s (a
transfer target that shares no class with its source).

Nuisances (drawn per image, none of them tells the class): position (the shape
stays inside the canvas), size (radius 0.22-0.38 of the side), rotation
(+-20 degrees, small enough that plus != cross and square != diamond),
polarity (light shape on a dark background or the reverse), foreground and
texture colours, a background gradient between two random colours in a random
direction, plus smooth low-frequency noise (a 4x4 grid, bilinearly upsampled
by ``refimpl.data.resample.resize``). Edges are antialiased with a one-pixel
ramp of the shape's level function.

Randomness: no generator objects. Every per-image number is a counter-based
hash (SplitMix64) of ``(seed, index, slot)``, vectorized in NumPy, so the
labels of all 1,281,167 instances take milliseconds and a batch is generated
with array operations only (no Python loop over images).

    open_synthetic("synthetic:n=1281167,size=32,classes=10,seed=0")   # offset=0 by default

This module is the reader (training and ``refimpl.data.datasets.open_dataset``
use it directly, no files); ``python -m data_tools.synthetic`` packs a finite
one to disk with the same pixels.
"""
import numpy as np

from refimpl.checks import check_int
from refimpl.data.resample import resize

SHAPES = ("disk", "square", "diamond", "triangle", "ring", "frame", "plus", "cross")
TEXTURES = ("solid", "stripes", "checker", "dots")
MAX_CLASSES = len(SHAPES) * len(TEXTURES)
SPEC_PREFIX = "synthetic:"
SPEC_KEYS = {"n": None, "size": 32, "classes": 10, "seed": 0, "offset": 0}  # None: required

# Hash slots: which per-image number is which.
_S_LABEL, _S_CX, _S_CY, _S_RADIUS, _S_ROT, _S_POLARITY = range(6)
_S_FG = 6           # 3 slots
_S_BG1 = 9          # 3 slots
_S_BG2 = 12         # 3 slots
_S_GRAD = 15
_S_TEX_PHASE = 16   # 2 slots
_S_NOISE = 18       # NOISE_GRID**2 slots
NOISE_GRID = 4
NOISE_AMPLITUDE = 0.12
MIN_SIZE = 8


def _splitmix64(x):
    """SplitMix64 finalizer on a uint64 array (wrapping arithmetic)."""
    x = x + np.uint64(0x9E3779B97F4A7C15)
    x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return x ^ (x >> np.uint64(31))


def _keys(seed, indices):
    """One uint64 key per image: a hash of (seed, index). indices: int (n,)."""
    s = _splitmix64(np.asarray([seed & 0xFFFFFFFFFFFFFFFF], dtype=np.uint64))
    return _splitmix64(np.asarray(indices, dtype=np.uint64) ^ s)


def _uniform(keys, slot, count=1):
    """Uniforms in [0, 1), float64 (n, count), for hash slots slot..slot+count-1."""
    slots = np.arange(slot, slot + count, dtype=np.uint64)
    h = _splitmix64(keys[:, None] + (slots[None, :] + np.uint64(1)) * np.uint64(0xD1B54A32D192ED03))
    return (h >> np.uint64(11)).astype(np.float64) * (1.0 / (1 << 53))


def class_shape_texture(c):
    """(shape index, texture index) of class ``c`` (int or int array)."""
    return c % len(SHAPES), (c + c // len(SHAPES)) % len(TEXTURES)


def synthetic_labels(num_images, num_classes, seed):
    """Labels int64 (N,) of every instance: hash(seed, i) -> class. Vectorized, O(N)."""
    keys = _keys(seed, np.arange(num_images, dtype=np.uint64))
    u = _uniform(keys, _S_LABEL)[:, 0]
    return np.minimum((u * num_classes).astype(np.int64), num_classes - 1)


def _level(shape, u, v):
    """Signed level function of a shape in its own frame, in units of its radius.

    u, v: float (m, S, S) coordinates / radius; < 0 inside, ~ distance outside.
    """
    au, av = np.abs(u), np.abs(v)
    if shape == "disk":
        return np.sqrt(u * u + v * v) - 1
    if shape == "square":
        return np.maximum(au, av) - 0.8
    if shape == "diamond":
        return (au + av - 1) * np.float32(1 / np.sqrt(2))
    if shape == "triangle":
        # apex up (image v grows downwards): outward normals (0, 1), (+-sin 120, cos 120)
        s, c = np.float32(np.sqrt(3) / 2), np.float32(-0.5)
        return np.maximum(np.maximum(v, s * u + c * v), -s * u + c * v) - 0.5
    if shape == "ring":
        return np.abs(np.sqrt(u * u + v * v) - 0.75) - 0.25
    if shape == "frame":
        return np.abs(np.maximum(au, av) - 0.7) - 0.18
    if shape in ("plus", "cross"):
        if shape == "cross":  # the plus turned by 45 degrees
            h = np.float32(1 / np.sqrt(2))
            au, av = np.abs((u + v) * h), np.abs((v - u) * h)
        bar1 = np.maximum(au - 0.95, av - 0.28)
        bar2 = np.maximum(av - 0.95, au - 0.28)
        return np.minimum(bar1, bar2)
    raise ValueError(f"unknown shape {shape!r}")


def _texture(texture, u, v, phase, r_px):
    """Texture weight t in [0, 1] (m, S, S): 0 = foreground colour, 1 = texture colour.

    phase: float (m, 2) in [0, 1); r_px: radius in pixels (m, 1, 1) for the
    one-pixel antialiasing ramps. Frequencies are per radius (2 cycles).
    """
    freq = np.float32(2.0)
    px = phase[:, 0, None, None].astype(np.float32)
    py = phase[:, 1, None, None].astype(np.float32)
    if texture == "solid":
        return np.zeros_like(u)
    if texture == "stripes":
        return np.clip(0.5 + 2.0 * np.sin(2 * np.pi * (freq * u + px)), 0, 1)
    if texture == "checker":
        s = np.sin(np.pi * (freq * u + px)) * np.sin(np.pi * (freq * v + py))
        return np.clip(0.5 + 4.0 * s, 0, 1)
    if texture == "dots":
        fu = freq * u + px
        fv = freq * v + py
        du, dv = fu - np.floor(fu) - 0.5, fv - np.floor(fv) - 0.5
        dist = np.sqrt(du * du + dv * dv)                   # in cells
        return np.clip(0.5 + (0.28 - dist) * r_px / freq, 0, 1)
    raise ValueError(f"unknown texture {texture!r}")


def render(seed, indices, size, num_classes, offset=0):
    """Images uint8 (n, size, size, 3) of the given instance indices.

    Every image depends only on (seed, index, size, num_classes, offset): all
    numbers come from the hash, and the pixel maths is elementwise per image.
    Label c is drawn as class c + offset.
    """
    indices = np.asarray(indices, dtype=np.int64)
    n = indices.shape[0]
    keys = _keys(seed, indices)
    f32 = np.float32
    label = np.minimum((_uniform(keys, _S_LABEL)[:, 0] * num_classes).astype(np.int64),
                       num_classes - 1)
    shape_id, texture_id = class_shape_texture(label + offset)

    # geometry (n,) -> broadcast (n, 1, 1)
    r_px = (size * (0.22 + 0.16 * _uniform(keys, _S_RADIUS)[:, 0])).astype(f32)
    cx = r_px + _uniform(keys, _S_CX)[:, 0].astype(f32) * (size - 2 * r_px)
    cy = r_px + _uniform(keys, _S_CY)[:, 0].astype(f32) * (size - 2 * r_px)
    theta = np.deg2rad(-20 + 40 * _uniform(keys, _S_ROT)[:, 0]).astype(f32)
    grid = np.arange(size, dtype=f32) + f32(0.5)            # pixel centres
    dx = grid[None, None, :] - cx[:, None, None]            # (n, 1, S)
    dy = grid[None, :, None] - cy[:, None, None]            # (n, S, 1)
    cos, sin = np.cos(theta)[:, None, None], np.sin(theta)[:, None, None]
    inv_r = (1 / r_px)[:, None, None]
    u = (dx * cos + dy * sin) * inv_r                       # (n, S, S)
    v = (dy * cos - dx * sin) * inv_r

    # shape alpha and texture weight, grouped by kind (each group vectorized)
    alpha = np.empty((n, size, size), dtype=f32)
    tex = np.empty((n, size, size), dtype=f32)
    phase = _uniform(keys, _S_TEX_PHASE, 2)
    for k, name in enumerate(SHAPES):
        sel = np.nonzero(shape_id == k)[0]
        if sel.size:
            d = _level(name, u[sel], v[sel])
            # one-pixel ramp across the edge: antialiasing
            alpha[sel] = np.clip(0.5 - d * r_px[sel, None, None], 0, 1)
    for k, name in enumerate(TEXTURES):
        sel = np.nonzero(texture_id == k)[0]
        if sel.size:
            tex[sel] = _texture(name, u[sel], v[sel], phase[sel], r_px[sel, None, None])

    # colours (n, 3): light shape on dark ground, or the reverse
    light = _uniform(keys, _S_POLARITY)[:, 0] < 0.5
    fg = _uniform(keys, _S_FG, 3)
    bg1, bg2 = _uniform(keys, _S_BG1, 3), _uniform(keys, _S_BG2, 3)
    fg = np.where(light[:, None], 0.7 + 0.3 * fg, 0.3 * fg)
    tex_col = np.where(light[:, None], 0.5 * fg, fg + 0.45)  # mid-grey side of fg
    bg1 = np.where(light[:, None], 0.35 * bg1, 0.65 + 0.35 * bg1)
    bg2 = np.where(light[:, None], 0.35 * bg2, 0.65 + 0.35 * bg2)

    # background: gradient along a random direction + smooth noise
    phi = 2 * np.pi * _uniform(keys, _S_GRAD)[:, 0]
    gx, gy = np.cos(phi)[:, None, None], np.sin(phi)[:, None, None]
    ramp = ((grid[None, None, :] / size - 0.5) * gx + (grid[None, :, None] / size - 0.5) * gy
            + 0.5).astype(f32)                               # (n, S, S), about [0, 1]
    noise = _uniform(keys, _S_NOISE, NOISE_GRID * NOISE_GRID).astype(f32)
    noise = noise.reshape(n, NOISE_GRID, NOISE_GRID).transpose(1, 2, 0)  # (g, g, n)
    noise = resize(noise, size, size).transpose(2, 0, 1)                # (n, S, S)
    bg = (bg1[:, None, None, :].astype(f32)
          + (bg2 - bg1)[:, None, None, :].astype(f32) * ramp[..., None]
          + f32(NOISE_AMPLITUDE) * (noise[..., None] - f32(0.5)))      # (n, S, S, 3)
    shape_col = (fg[:, None, None, :].astype(f32) * (1 - tex[..., None])
                 + tex_col[:, None, None, :].astype(f32) * tex[..., None])
    a = alpha[..., None]
    img = bg + a * (shape_col - bg)
    return np.clip(np.rint(img * 255), 0, 255).astype(np.uint8)


class SyntheticDataset:
    """A generated dataset with the reader interface of ``PackedDataset``.

    num_images: N >= 1; size: side in pixels (>= MIN_SIZE = 8); num_classes:
    1..32; seed >= 0; offset >= 0: label c is drawn as class c + offset
    (offset + num_classes <= 32).
    Attributes: labels int64 (N,), class_names, image_size (size, size),
    manifest (dict), len(); read(indices) -> uint8 (n, size, size, 3).
    """

    def __init__(self, num_images, size=32, num_classes=10, seed=0, offset=0):
        self.num_images = check_int("num_images", num_images)
        self.size = check_int("size", size, minimum=MIN_SIZE)
        self.num_classes = check_int("num_classes", num_classes)
        self.seed = check_int("seed", seed, minimum=0)
        self.offset = check_int("offset", offset, minimum=0)
        if self.num_classes > MAX_CLASSES:
            raise ValueError(f"num_classes must be <= {MAX_CLASSES} "
                             f"({len(SHAPES)} shapes x {len(TEXTURES)} textures), got {num_classes}")
        if self.offset + self.num_classes > MAX_CLASSES:
            raise ValueError(f"offset + num_classes must be <= {MAX_CLASSES}, got "
                             f"{self.offset} + {self.num_classes}")
        self._labels = None

    @property
    def labels(self):
        """int64 (N,), computed once (one vectorized hash over all N)."""
        if self._labels is None:
            self._labels = synthetic_labels(self.num_images, self.num_classes, self.seed)
            self._labels.flags.writeable = False
        return self._labels

    @property
    def class_names(self):
        names = []
        for c in range(self.num_classes):
            s, t = class_shape_texture(c + self.offset)
            names.append(f"{SHAPES[s]}-{TEXTURES[t]}")
        return names

    @property
    def image_size(self):
        return (self.size, self.size)

    @property
    def spec(self):
        return (f"{SPEC_PREFIX}n={self.num_images},size={self.size},"
                f"classes={self.num_classes},seed={self.seed}"
                + (f",offset={self.offset}" if self.offset else ""))

    @property
    def manifest(self):
        return {"source": "synthetic", "spec": self.spec, "class_names": self.class_names,
                "image_size": [self.size, self.size], "num_images": self.num_images}

    def __len__(self):
        return self.num_images

    def __repr__(self):
        return f"SyntheticDataset({self.spec!r})"

    def read(self, indices):
        """Images uint8 (n, size, size, 3) for integer ``indices`` (n,) in [0, N)."""
        idx = np.asarray(indices)
        if idx.ndim == 0:
            idx = idx[None]
        if idx.ndim != 1 or (idx.size and not np.issubdtype(idx.dtype, np.integer)):
            raise ValueError(f"indices must be a 1-d integer array, got {idx.dtype} {idx.shape}")
        if idx.size and (idx.min() < 0 or idx.max() >= self.num_images):
            raise IndexError(f"indices must lie in [0, {self.num_images}), got "
                             f"[{idx.min()}, {idx.max()}]")
        return render(self.seed, idx, self.size, self.num_classes, self.offset)


def parse_spec(spec):
    """'synthetic:n=...,size=...,classes=...,seed=...,offset=...' -> dict of ints (n required)."""
    if not isinstance(spec, str) or not spec.startswith(SPEC_PREFIX):
        raise ValueError(f"a synthetic spec starts with {SPEC_PREFIX!r}, got {spec!r}")
    body = spec[len(SPEC_PREFIX):].strip()
    out = {}
    for item in filter(None, (s.strip() for s in body.split(","))):
        key, eq, value = item.partition("=")
        key = key.strip()
        if not eq:
            raise ValueError(f"{spec!r}: expected key=value, got {item!r}")
        if key not in SPEC_KEYS:
            raise ValueError(f"{spec!r}: unknown key {key!r}; known keys: {', '.join(SPEC_KEYS)}")
        if key in out:
            raise ValueError(f"{spec!r}: key {key!r} given twice")
        try:
            out[key] = int(value.strip())
        except ValueError:
            raise ValueError(f"{spec!r}: {key} must be an integer, got {value.strip()!r}") from None
    if "n" not in out:
        raise ValueError(f"{spec!r}: the number of images is required, e.g. "
                         f"'synthetic:n=50000,size=32,classes=10,seed=0'")
    return {k: out.get(k, default) for k, default in SPEC_KEYS.items()}


def open_synthetic(spec):
    """A SyntheticDataset from a 'synthetic:n=N,size=S,classes=K,seed=X' spec."""
    p = parse_spec(spec)
    return SyntheticDataset(p["n"], size=p["size"], num_classes=p["classes"], seed=p["seed"],
                            offset=p["offset"])

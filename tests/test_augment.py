"""Augmentations: determinism per (seed, epoch, id), shapes/dtypes, each op's maths;
and refimpl.data.resample, the bilinear sampler behind the crops."""
import colorsys
import math

import numpy as np
import pytest

from refimpl.data import augment as A
from refimpl.data import resample as R
from refimpl.data.augment import AugmentConfig, augment_batch, eval_transform
from tolerances import INDEPENDENT64, LAYER64, ROUNDINGS64

# everything off, no normalization: output = plain resize / 255
PLAIN = AugmentConfig(crop=False, flip_p=0.0, jitter_p=0.0, gray_p=0.0, normalize=False)


def images(n=6, h=12, w=10, seed=0):
    return np.random.default_rng(seed).integers(0, 256, (n, h, w, 3), dtype=np.uint8)


def planar(x):
    return x.transpose(0, 3, 1, 2).astype(np.float64) / 255.0


# ---------------------------------------------------------------- determinism

def test_same_seed_epoch_id_same_pixels_whatever_the_batch():
    x = images(8)
    ids = np.arange(100, 108)
    full = augment_batch(x, ids, seed=3, epoch=2, out_size=9)
    # reversed order, a subset, and mixed with other images: same pixels per id
    rev = augment_batch(x[::-1], ids[::-1], seed=3, epoch=2, out_size=9)
    np.testing.assert_array_equal(rev[::-1], full)
    other = images(5, seed=9)
    mixed_x = np.concatenate([other[:2], x[[5, 1]], other[2:]])
    mixed_ids = np.array([7, 8, 105, 101, 9, 10, 11])
    mixed = augment_batch(mixed_x, mixed_ids, seed=3, epoch=2, out_size=9)
    np.testing.assert_array_equal(mixed[2], full[5])
    np.testing.assert_array_equal(mixed[3], full[1])
    for i in range(8):  # alone in its batch
        one = augment_batch(x[i:i + 1], ids[i:i + 1], seed=3, epoch=2, out_size=9)
        np.testing.assert_array_equal(one[0], full[i])


def test_different_ids_epochs_seeds_differ():
    x = np.repeat(images(1), 4, axis=0)  # the same picture four times
    a = augment_batch(x, np.array([0, 1, 2, 3]), seed=0, epoch=0, out_size=8)
    for i in range(1, 4):
        assert not np.array_equal(a[0], a[i])
    b = augment_batch(x, np.array([0, 1, 2, 3]), seed=0, epoch=1, out_size=8)
    c = augment_batch(x, np.array([0, 1, 2, 3]), seed=1, epoch=0, out_size=8)
    for i in range(4):
        assert not np.array_equal(a[i], b[i])
        assert not np.array_equal(a[i], c[i])


def test_disabling_one_op_keeps_the_other_parameters():
    u = A.draw_uniforms(0, 0, np.arange(50))
    cfg = AugmentConfig()
    boxes = A.crop_boxes(u, 20, 20, cfg)
    boxes_nogray = A.crop_boxes(u, 20, 20, AugmentConfig(gray_p=0.0, jitter_p=0.0))
    for a, b in zip(boxes, boxes_nogray):
        np.testing.assert_array_equal(a, b)
    # fixed slots: the same per-image draws whatever the config
    np.testing.assert_array_equal(u, A.draw_uniforms(0, 0, np.arange(50)))


# ---------------------------------------------------------------- shapes, ranges

@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_shape_dtype_range(dtype):
    x = images(5)
    out = augment_batch(x, np.arange(5), 0, 0, 7, dtype=dtype)
    assert out.shape == (5, 3, 7, 7) and out.dtype == dtype and out.flags.c_contiguous
    raw = augment_batch(x, np.arange(5), 0, 0, 7, AugmentConfig(normalize=False), dtype=dtype)
    assert raw.dtype == dtype and raw.min() >= 0 and raw.max() <= 1
    # normalization is exactly (raw - mean) / std per channel
    mean = np.asarray(A.IMAGENET_MEAN)[None, :, None, None]
    std = np.asarray(A.IMAGENET_STD)[None, :, None, None]
    # (raw - mean) / std: ~6 roundings of |out| <= 2.7 in the dtype (float32: 1e-6)
    tol = 1e-5 if dtype == np.float32 else LAYER64
    np.testing.assert_allclose(out, (raw - mean) / std, atol=tol)


def test_eval_transform_deterministic_and_plain():
    x = images(3, h=8, w=8)
    a = eval_transform(x, 8, PLAIN, dtype=np.float64)
    np.testing.assert_array_equal(a, eval_transform(x, 8, PLAIN, dtype=np.float64))
    np.testing.assert_array_equal(a, planar(x))  # same size: exact identity
    # a wide image: the central square is used
    wide = images(2, h=6, w=10)
    np.testing.assert_array_equal(eval_transform(wide, 6, PLAIN, dtype=np.float64),
                                  planar(wide[:, :, 2:8]))


def test_bad_input_errors():
    x = images(2)
    with pytest.raises(ValueError, match="uint8"):
        augment_batch(x.astype(np.float32), np.arange(2), 0, 0, 8)
    with pytest.raises(ValueError, match="ids"):
        augment_batch(x, np.arange(3), 0, 0, 8)
    with pytest.raises(ValueError, match=">= 0"):
        augment_batch(x, np.array([0, -1]), 0, 0, 8)
    with pytest.raises(ValueError, match="out_size must be a positive integer, got 0"):
        augment_batch(x, np.arange(2), 0, 0, 0)
    with pytest.raises(ValueError, match="epoch must be a non-negative integer, got -1"):
        augment_batch(x, np.arange(2), 0, -1, 8)
    with pytest.raises(ValueError, match="float32 or float64"):
        augment_batch(x, np.arange(2), 0, 0, 8, dtype=np.float16)
    with pytest.raises(ValueError, match="crop_scale"):
        AugmentConfig(crop_scale=(0.5, 1.5))
    with pytest.raises(ValueError, match="jitter_order"):
        AugmentConfig(jitter_order="sorted")
    with pytest.raises(ValueError, match="hue"):
        AugmentConfig(hue=0.7)


# ---------------------------------------------------------------- crop + resize

def test_crop_boxes_follow_torchvision_rules():
    u = A.draw_uniforms(1, 0, np.arange(300))
    cfg = AugmentConfig()
    top, left, h, w = A.crop_boxes(u, 40, 30, cfg)
    assert np.all((top >= 0) & (left >= 0) & (top + h <= 40) & (left + w <= 30))
    assert np.all((h >= 1) & (w >= 1))
    # rounding of w, h moves area and ratio a little off their ranges only
    frac = h * w / (40 * 30)
    assert frac.min() > 0.08 * 0.7 and frac.max() <= 1.0
    ratio = w / h
    assert ratio.min() > 0.75 * 0.8 and ratio.max() < 4 / 3 * 1.25
    # no box fits (scale 1, ratio forced far from the image's): central fallback
    tall = AugmentConfig(crop_scale=(1.0, 1.0), crop_ratio=(2.0, 2.0))
    top, left, h, w = A.crop_boxes(u[:3], 40, 30, tall)
    np.testing.assert_array_equal(w, [30] * 3)
    np.testing.assert_array_equal(h, [15] * 3)        # round(30 / 2)
    np.testing.assert_array_equal(top, [12] * 3)      # (40 - 15) // 2


def _torchvision_box(u_area, u_ratio, H, W, scale=(0.08, 1.0), ratio=(3 / 4, 4 / 3)):
    """(h, w) of one get_params try, written out with torchvision's formulas."""
    area = H * W * (scale[0] + u_area * (scale[1] - scale[0]))
    log_lo, log_hi = math.log(ratio[0]), math.log(ratio[1])
    r = math.exp(log_lo + u_ratio * (log_hi - log_lo))
    return int(round(math.sqrt(area / r))), int(round(math.sqrt(area * r)))


def test_crop_box_is_the_first_try_that_fits():
    H, W = 40, 30
    u = np.full((1, A.N_DRAWS), 0.5)
    # try 0: nearly the whole area at ratio 1 -> w = 35 > 30, does not fit
    u[0, A._SLOT_AREA + 0], u[0, A._SLOT_RATIO + 0] = 0.999, 0.5
    # try 1: fits; tries 2..9: fit too, with another box
    u[0, A._SLOT_AREA + 1], u[0, A._SLOT_RATIO + 1] = 0.5, 0.5
    u[0, A._SLOT_AREA + 2:A._SLOT_AREA + A.CROP_TRIES] = 0.2
    u[0, A._SLOT_RATIO + 2:A._SLOT_RATIO + A.CROP_TRIES] = 0.3
    u[0, A._SLOT_TOP], u[0, A._SLOT_LEFT] = 0.7, 0.4
    h0, w0 = _torchvision_box(0.999, 0.5, H, W)
    h1, w1 = _torchvision_box(0.5, 0.5, H, W)
    h2, w2 = _torchvision_box(0.2, 0.3, H, W)
    assert w0 > W and (h1, w1) == (25, 25) and (h2, w2) == (19, 17)  # the premise
    top, left, h, w = A.crop_boxes(u, H, W, AugmentConfig())
    # get_params: i = randint(0, H - h + 1), j = randint(0, W - w + 1)
    assert (h[0], w[0]) == (h1, w1)
    assert top[0] == int(0.7 * (H - h1 + 1)) == 11
    assert left[0] == int(0.4 * (W - w1 + 1)) == 2


def test_crop_box_central_fallback_when_no_try_fits():
    # a wide 20 x 40 image, ~all of its area at any ratio in [3/4, 4/3]: h or w too big
    H, W = 20, 40
    u = np.full((2, A.N_DRAWS), 0.9)
    u[:, A._SLOT_AREA:A._SLOT_AREA + A.CROP_TRIES] = 0.999
    u[1, A._SLOT_RATIO:A._SLOT_RATIO + A.CROP_TRIES] = 0.0
    assert all(_torchvision_box(0.999, r, H, W)[0] > H for r in (0.0, 0.9))  # the premise
    top, left, h, w = A.crop_boxes(u, H, W, AugmentConfig())
    # in_ratio 2 > 4/3: h = H, w = round(H * 4/3) = 27, centred
    np.testing.assert_array_equal(h, [20, 20])
    np.testing.assert_array_equal(w, [27, 27])
    np.testing.assert_array_equal(top, [0, 0])
    np.testing.assert_array_equal(left, [(40 - 27) // 2] * 2)


def test_full_crop_identity_params_is_plain_resize():
    x = images(3, h=9, w=9)
    n = 3
    full = np.ones(n, dtype=np.int64)
    no = np.zeros(n, dtype=bool)
    same = A.resized_crop(x, 0 * full, 0 * full, 9 * full, 9 * full, 9, no, np.float64)
    np.testing.assert_array_equal(same, planar(x))
    up = A.resized_crop(x, 0 * full, 0 * full, 9 * full, 9 * full, 14, no, np.float64)
    np.testing.assert_allclose(up, _bilinear_reference(planar(x), 0, 0, 9, 9, 14), atol=LAYER64)


def _bilinear_reference(x, top, left, h, w, s):
    """Loop-based bilinear (align_corners=False) of the box: the slow twin.

    Sample points are clamped to the box, not the image (crop, then resize):
    no pixel outside the box ever contributes. s: the output side, or (s_h, s_w).
    """
    n, c, H, W = x.shape
    s_h, s_w = (s, s) if np.isscalar(s) else s
    out = np.zeros((n, c, s_h, s_w))
    for p in range(s_h):
        for q in range(s_w):
            y = min(max(top + (p + 0.5) * h / s_h - 0.5, top), top + h - 1)
            xx = min(max(left + (q + 0.5) * w / s_w - 0.5, left), left + w - 1)
            y0, x0 = int(np.floor(y)), int(np.floor(xx))
            y1, x1 = min(y0 + 1, top + h - 1), min(x0 + 1, left + w - 1)
            fy, fx = y - y0, xx - x0
            out[:, :, p, q] = ((1 - fy) * (1 - fx) * x[:, :, y0, x0] + (1 - fy) * fx * x[:, :, y0, x1]
                               + fy * (1 - fx) * x[:, :, y1, x0] + fy * fx * x[:, :, y1, x1])
    return out


@pytest.mark.parametrize("s", [5, 17])  # downscaled and upscaled box
def test_resized_crop_matches_loop_twin_on_a_box(s):
    x = images(1, h=11, w=13)
    one = np.ones(1, dtype=np.int64)
    got = A.resized_crop(x, 2 * one, 3 * one, 6 * one, 8 * one, s, np.zeros(1, bool), np.float64)
    np.testing.assert_allclose(got, _bilinear_reference(planar(x), 2, 3, 6, 8, s), atol=LAYER64)


# (top, left, h, w) in a 20 x 24 image: inner boxes, boxes touching each edge,
# a 1-pixel-wide box, the whole image; each upscaled to 32 and downscaled to 5
TORCH_BOXES = [(5, 7, 10, 12), (0, 0, 7, 9), (13, 15, 7, 9), (3, 0, 17, 5), (0, 23, 20, 1),
               (2, 4, 16, 16), (0, 0, 20, 24)]


@pytest.mark.torch
# values in [0, 1], 4 taps: ~10 roundings (float32: 10 u32 = 6e-7)
@pytest.mark.parametrize("dtype, atol", [(np.float64, LAYER64), (np.float32, 1e-6)])
def test_resized_crop_equals_torch_crop_then_interpolate(dtype, atol):
    """torchvision's resized_crop on a tensor: slice the box, F.interpolate it
    (bilinear, align_corners=False, antialias=False), then hflip. Pixels outside
    the box must not leak in at its edges. Reference in float64; float32 to 1e-6."""
    torch = pytest.importorskip("torch")
    F = torch.nn.functional
    x = images(3, h=20, w=24, seed=7)
    t = torch.from_numpy(planar(x))                              # (3, 3, 20, 24) float64
    n = x.shape[0]
    for top, left, h, w in TORCH_BOXES:
        box = [np.full(n, v, dtype=np.int64) for v in (top, left, h, w)]
        for s in (32, 5):
            ref = F.interpolate(t[:, :, top:top + h, left:left + w], size=(s, s), mode="bilinear",
                                align_corners=False, antialias=False).numpy()
            flip = np.array([False, True, False])
            got = A.resized_crop(x, *box, s, flip, dtype)
            assert got.dtype == dtype
            want = np.where(flip[:, None, None, None], ref[..., ::-1], ref)
            err = np.abs(got - want)
            where = np.unravel_index(err.argmax(), err.shape)
            assert err.max() <= atol, (f"box {(top, left, h, w)} -> {s}: max diff {err.max():.3g} "
                                       f"at {where}: got {got[where]}, torch {want[where]}")


def test_resized_crop_rejects_boxes_outside_the_image():
    x = images(1, h=11, w=13)
    one = np.ones(1, dtype=np.int64)
    no = np.zeros(1, bool)
    with pytest.raises(ValueError, match="box"):
        A.resized_crop(x, 6 * one, 0 * one, 6 * one, 8 * one, 5, no, np.float64)  # 6 + 6 > 11
    with pytest.raises(ValueError, match="box"):
        A.resized_crop(x, 0 * one, 0 * one, 0 * one, 8 * one, 5, no, np.float64)  # empty


@pytest.mark.torch
def test_resize_matches_torch_interpolate():
    import torch
    import torch.nn.functional as F
    x = images(2, h=10, w=10)
    one = np.ones(2, dtype=np.int64)
    for s in (7, 16):
        got = A.resized_crop(x, 0 * one, 0 * one, 10 * one, 10 * one, s, np.zeros(2, bool), np.float64)
        ref = F.interpolate(torch.from_numpy(planar(x)), size=(s, s), mode="bilinear",
                            align_corners=False, antialias=False).numpy()
        np.testing.assert_allclose(got, ref, atol=LAYER64)


def test_resample_resize_matches_loop_twin():
    x = images(1, h=7, w=5)[0]                                  # (7, 5, 3) uint8
    for oh, ow in ((13, 9), (3, 4), (7, 5)):                    # up, down, same
        ref = _bilinear_reference(x.transpose(2, 0, 1)[None].astype(np.float64), 0, 0, 7, 5,
                                  (oh, ow))[0].transpose(1, 2, 0)  # (oh, ow, 3)
        got = R.resize(x, oh, ow)                               # uint8 in: float64 out
        assert got.dtype == np.float64 and got.shape == (oh, ow, 3)
        # uint8 values up to 255: LAYER64 relative to them (~20 roundings of 255: 6e-13)
        np.testing.assert_allclose(got, ref, atol=255 * LAYER64)
        np.testing.assert_allclose(R.resize(x[..., 1], oh, ow), ref[..., 1], atol=255 * LAYER64)
    same = R.resize(x.astype(np.float32), 7, 5)                 # same size: identity
    assert same.dtype == np.float32
    np.testing.assert_array_equal(same, x)
    with pytest.raises(ValueError, match="out_w must be a positive integer"):
        R.resize(x, 4, 0)
    with pytest.raises(ValueError, match=r"\(h, w\) or \(h, w, c\)"):
        R.resize(x[None], 4, 4)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_resample_matrices_rows_flip_and_taps(dtype):
    start, length = np.array([0, 3, 5, 9]), np.array([10, 4, 1, 1])
    flip = np.array([False, True, False, True])
    m = R.bilinear_matrices(start, length, 7, 10, flip=flip, dtype=dtype)
    assert m.shape == (4, 7, 10) and m.dtype == dtype
    np.testing.assert_array_equal(m.sum(axis=2), np.ones((4, 7), dtype))  # rows sum to 1 exactly
    np.testing.assert_array_equal(m[1], R.bilinear_matrices(start[1:2], length[1:2], 7, 10,
                                                            dtype=dtype)[0][::-1])
    assert (m[1][:, :3] == 0).all() and (m[1][:, 7:] == 0).all()  # nothing outside its box
    np.testing.assert_array_equal(m[2][:, 5], np.ones(7, dtype))  # a 1-pixel box
    # the matrices hold the taps, so matmul and resize's gather agree
    x = np.random.default_rng(0).random((10, 6)).astype(dtype)
    # two nonzero taps per row summed, or gathered: <= 4 roundings each of values < 1
    tol = 1e-6 if dtype == np.float32 else ROUNDINGS64   # float32: 8 u32 = 4.8e-7
    np.testing.assert_allclose(m[0] @ x, R.resize(x, 7, 6), atol=tol)
    with pytest.raises(ValueError, match=r"box 1 \[3, 12\) is empty or outside \[0, 10\)"):
        R.bilinear_matrices([0, 3], [10, 9], 7, 10)
    with pytest.raises(ValueError, match="flip must be bool"):
        R.bilinear_matrices(start, length, 7, 10, flip=flip[:2])


def test_flip_reverses_columns():
    x = images(4, h=8, w=8)
    flipped = augment_batch(x, np.arange(4), 0, 0, 8, AugmentConfig(
        crop=False, flip_p=1.0, jitter_p=0.0, gray_p=0.0, normalize=False), dtype=np.float64)
    np.testing.assert_array_equal(flipped, planar(x)[..., ::-1])
    kept = augment_batch(x, np.arange(4), 0, 0, 8, PLAIN, dtype=np.float64)
    np.testing.assert_array_equal(kept, planar(x))


# ---------------------------------------------------------------- colour

def test_grayscale_601_weights_equal_channels():
    x = images(3, h=10, w=10)
    g = augment_batch(x, np.arange(3), 0, 0, 10, AugmentConfig(
        crop=False, flip_p=0.0, jitter_p=0.0, gray_p=1.0, normalize=False), dtype=np.float64)
    assert g.shape == (3, 3, 10, 10)
    np.testing.assert_array_equal(g[:, 0], g[:, 1])
    np.testing.assert_array_equal(g[:, 0], g[:, 2])
    src = eval_transform(x, 10, PLAIN, dtype=np.float64)
    want = 0.299 * src[:, 0] + 0.587 * src[:, 1] + 0.114 * src[:, 2]
    np.testing.assert_allclose(g[:, 0], want, atol=LAYER64)
    # PIL's convert("L") uses the same weights (rounded to integers): (19595 R + 38470 G
    # + 7471 B + 2^15) >> 16, half a level and weights off by <= 5.6e-6 per unit of value
    from PIL import Image
    pil = np.stack([np.asarray(Image.fromarray(im).convert("L")) for im in x]) / 255.0
    np.testing.assert_allclose(A.grayscale(planar(x)), pil, atol=0.5 / 255 + 6e-6)


def test_brightness_scales_and_clips():
    x = planar(images(2))
    f = np.array([0.5, 1.3])
    got = A.adjust_brightness(x, f)
    np.testing.assert_allclose(got[0], x[0] * 0.5, atol=ROUNDINGS64)  # one rounding, clipped
    np.testing.assert_allclose(got[1], np.minimum(x[1] * 1.3, 1), atol=ROUNDINGS64)


def test_contrast_and_saturation_formulas_on_pixels():
    # a 1x2 image: pixels (0.2, 0.4, 0.6) and (1.0, 0.0, 0.5)
    x = np.array([[0.2, 0.4, 0.6], [1.0, 0.0, 0.5]]).T.reshape(1, 3, 1, 2)
    gray = np.array([0.299 * 0.2 + 0.587 * 0.4 + 0.114 * 0.6, 0.299 * 1.0 + 0.114 * 0.5])
    f = 1.5
    sat = A.adjust_saturation(x, np.array([f]))
    want = np.clip(f * x[0, :, 0, :] + (1 - f) * gray[None, :], 0, 1)
    np.testing.assert_allclose(sat[0, :, 0, :], want, atol=ROUNDINGS64)  # the same formula
    con = A.adjust_contrast(x, np.array([f]))
    want = np.clip(f * x[0, :, 0, :] + (1 - f) * gray.mean(), 0, 1)
    np.testing.assert_allclose(con[0, :, 0, :], want, atol=ROUNDINGS64)


def test_contrast_saturation_brightness_match_pil_enhance():
    """PIL's ImageEnhance blends with the same references, in uint8 arithmetic."""
    from PIL import Image, ImageEnhance
    x8 = images(2, h=16, w=16, seed=4)
    x = planar(x8)
    for enhancer, ours in ((ImageEnhance.Color, A.adjust_saturation),
                           (ImageEnhance.Contrast, A.adjust_contrast),
                           (ImageEnhance.Brightness, A.adjust_brightness)):
        for f in (0.6, 1.4):
            pil = np.stack([np.asarray(enhancer(Image.fromarray(im)).enhance(f)) for im in x8])
            got = np.round(ours(x, np.full(2, f)) * 255)
            # PIL rounds the gray image and the contrast mean to integers first
            assert np.abs(got - planar(pil) * 255).max() <= 2, enhancer.__name__


def test_hsv_round_trip_and_colorsys():
    rng = np.random.default_rng(2)
    x = rng.random((2, 3, 4, 4))
    x[0, :, 0, 0] = 0.5                  # gray pixel
    x[0, :, 1, 1] = [0.7, 0.7, 0.1]      # tie between red and green
    x[1, :, 2, 2] = [0.3, 0.9, 0.9]      # tie between green and blue
    hsv = A.rgb_to_hsv(x)
    for i, p, q in [(0, 0, 0), (0, 1, 1), (1, 2, 2), (1, 3, 0), (0, 2, 3)]:
        # colorsys's formulas in another order: hue's u / (max - min), max - min >= 0.01 here
        np.testing.assert_allclose(hsv[i, :, p, q], colorsys.rgb_to_hsv(*x[i, :, p, q]),
                                   atol=LAYER64)
    np.testing.assert_allclose(A.hsv_to_rgb(hsv), x, atol=LAYER64)


def test_hue_shift_zero_is_identity_and_shift_matches_colorsys():
    x = np.random.default_rng(3).random((3, 3, 5, 5)).astype(np.float32)
    # float32 round trip: hue's ~4 roundings times the sector's 6, and ~5 on the way back,
    # on values <= 1: ~35 u32 = 2.1e-6
    np.testing.assert_allclose(A.adjust_hue(x, np.zeros(3, np.float32)), x, atol=3e-6)
    x = x.astype(np.float64)
    x[0, :, 0, 0] = 0.25  # gray stays gray
    shift = np.array([0.1, -0.37, 0.5])
    got = A.adjust_hue(x, shift)
    for i in range(3):
        for p in range(5):
            for q in range(5):
                h, s, v = colorsys.rgb_to_hsv(*x[i, :, p, q])
                want = colorsys.hsv_to_rgb((h + shift[i]) % 1.0, s, v)
                np.testing.assert_allclose(got[i, :, p, q], want, atol=LAYER64)


def test_color_jitter_applies_each_images_own_order():
    x = planar(images(6, seed=5))
    u = A.draw_uniforms(0, 4, np.arange(6))
    apply, factors, order = A.jitter_params(u, AugmentConfig(jitter_p=1.0))
    assert apply.all() and len({tuple(o) for o in order}) > 1  # orders really differ
    got = A.color_jitter(x.copy(), apply, factors, order)
    fns = (A.adjust_brightness, A.adjust_contrast, A.adjust_saturation, A.adjust_hue)
    for i in range(6):
        y = x[i:i + 1]
        for op in order[i]:
            y = fns[op](y, factors[i:i + 1, op])
        np.testing.assert_allclose(got[i], y[0], atol=LAYER64)  # the same ops, one image
    # factor ranges
    assert factors[:, :3].min() >= 0.6 and factors[:, :3].max() <= 1.4
    assert np.abs(factors[:, 3]).max() <= 0.1
    fixed = A.jitter_params(u, AugmentConfig(jitter_order="fixed"))[2]
    np.testing.assert_array_equal(fixed, np.tile(np.arange(4), (6, 1)))


def test_color_jitter_and_grayscale_leave_their_input_unchanged():
    x = planar(images(6, seed=5))
    keep = x.copy()
    u = A.draw_uniforms(0, 4, np.arange(6))
    apply, factors, order = A.jitter_params(u, AugmentConfig(jitter_p=1.0))
    jittered = A.color_jitter(x, apply, factors, order)
    np.testing.assert_array_equal(x, keep)
    assert jittered is not x and not np.array_equal(jittered, x)
    mask = np.array([True, False, True, False, False, True])
    gray = A.random_grayscale(x, mask)
    np.testing.assert_array_equal(x, keep)
    assert gray is not x
    np.testing.assert_array_equal(gray[~mask], x[~mask])
    np.testing.assert_array_equal(gray[mask][:, 0], gray[mask][:, 2])


@pytest.mark.gpu
def test_gpu_matches_cpu():
    x = images(6)
    cpu = augment_batch(x, np.arange(6), 1, 2, 9, device="cpu", dtype=np.float64)
    gpu = augment_batch(x, np.arange(6), 1, 2, 9, device="gpu", dtype=np.float64)
    from refimpl.backend import to_numpy
    np.testing.assert_allclose(to_numpy(gpu), cpu, atol=INDEPENDENT64)  # another device's kernels

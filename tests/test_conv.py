"""conv2d: finite differences, the loop-based twin, PyTorch, dtypes."""
import numpy as np
import pytest
from refimpl.oracle import check_tensor, numerical_grad

import refimpl.layers.conv as _conv
from refimpl.layers.conv import (conv2d_backward, conv2d_backward_naive, conv2d_forward,
                                 conv2d_forward_naive)
from tolerances import FD64, INDEPENDENT64, LAYER64, SHORT64, float32_bound

DEFAULTS = {k: getattr(_conv, k) for k in ("WINOGRAD_DTYPES", "WINOGRAD_MAX_PIXELS",
                                           "PIXEL_MAJOR_MAX_PIXELS", "DW_FROM_DX_COLUMNS")}

# (x shape, w shape, stride, pad): every code path of the fast version
CASES = [
    ((2, 3, 5, 5), (4, 3, 3, 3), 1, 1),    # 3x3 stride 1, F > C: col2im
    ((2, 4, 5, 6), (3, 4, 3, 3), 1, 1),    # 3x3 stride 1, F <= C: dx as a conv
    ((2, 3, 6, 5), (4, 3, 3, 3), 2, 1),    # 3x3 stride 2 pad 1, non-square
    ((2, 3, 5, 5), (4, 3, 1, 1), 2, 0),    # 1x1 stride 2 (downsample)
    ((2, 4, 4, 4), (3, 4, 1, 1), 1, 0),    # 1x1 stride 1
    ((1, 2, 7, 7), (3, 2, 7, 7), 2, 3),    # 7x7 stride 2 pad 3 (ImageNet stem), tiny
    ((2, 3, 7, 6), (2, 3, 2, 3), 3, 2),    # non-square kernel, stride 3, pad 2 > HH-1
    ((2, 3, 6, 6), (2, 3, 3, 3), 1, 0),    # no padding
    ((2, 3, 6, 5), (2, 3, 2, 3), 1, 1),    # non-square kernel, stride 1: dx as a conv
]


@pytest.fixture(params=["channel-major", "pixel-major", "winograd"], autouse=True)
def layout(request, monkeypatch):
    """Every test runs with each way of the fast path: im2col with channel-major
    (C, N, H', W') or pixel-major (C, H', W', N) columns (``conv._pixel_major``),
    and Winograd F(2x2, 3x3) wherever it applies (3x3, stride 1, pad 1)."""
    import refimpl.layers.conv as conv
    monkeypatch.setattr(conv, "PIXEL_MAJOR_MAX_PIXELS",
                        0 if request.param == "channel-major" else 10 ** 9)
    monkeypatch.setattr(conv, "WINOGRAD_MAX_PIXELS", 10 ** 9 if request.param == "winograd" else 0)
    monkeypatch.setattr(conv, "WINOGRAD_DTYPES", (np.float32, np.float64))  # float64 here too
    return request.param


@pytest.fixture(params=["dw-from-dx-columns", "dw-own-columns"], autouse=True)
def dw_columns(request, monkeypatch):
    """... and with dw from the columns of dx's convolution (where dx is one,
    by im2col) or from an im2col of its own (``conv.DW_FROM_DX_COLUMNS``)."""
    import refimpl.layers.conv as conv
    monkeypatch.setattr(conv, "DW_FROM_DX_COLUMNS", request.param == "dw-from-dx-columns")
    return request.param


def test_winograd_is_float32_only_by_default():
    """refimpl's float64 (the oracle's dtype) keeps im2col's direct sums; the
    module's defaults, as imported (the fixture changes them for the others)."""
    assert DEFAULTS == {"WINOGRAD_DTYPES": (np.float32,), "WINOGRAD_MAX_PIXELS": 64,
                        "PIXEL_MAJOR_MAX_PIXELS": 256, "DW_FROM_DX_COLUMNS": True}


def test_layout_rule(layout):
    from refimpl.layers.conv import _pixel_major, _winograd
    assert _pixel_major(8, 8, 3, 3) == (layout != "channel-major")
    assert not _pixel_major(8, 8, 1, 1)  # 1x1 kernels keep channel-major
    x = np.zeros(1)
    assert _winograd(x, 8, 8, 3, 3, 1, 1, 1) == (layout == "winograd")
    assert not _winograd(np.zeros(1, np.float16), 8, 8, 3, 3, 1, 1, 1)
    for args in ((8, 8, 3, 3, 2, 1, 1), (8, 8, 3, 3, 1, 0, 0), (8, 8, 1, 1, 1, 1, 1)):
        assert not _winograd(x, *args)  # stride 2, no padding, 1x1: im2col


@pytest.mark.parametrize("shape", [(3, 5, 8, 8), (2, 4, 7, 5), (1, 3, 1, 1), (2, 6, 4, 3)])
def test_winograd_equals_the_definition(shape):
    """Even and odd maps (one more zero row/column of tiles), a 1x1 map; float64
    at 1e-12 of the loop-based twin, float32 no worse than im2col."""
    from refimpl.layers.winograd import winograd_conv_into, winograd_weights
    g = np.random.default_rng(20)
    x = g.standard_normal(shape)
    w = g.standard_normal((6, shape[1], 3, 3))
    ref = conv2d_forward_naive(x, w, 1, 1)[0]
    out = np.full(ref.shape, np.nan)
    winograd_conv_into(out, x, winograd_weights(w))
    check_tensor("winograd", out, ref, LAYER64)  # 9 C <= 54 terms and the transforms' few
    x32, w32 = x.astype(np.float32), w.astype(np.float32)
    out32 = np.empty(ref.shape, np.float32)
    winograd_conv_into(out32, x32, winograd_weights(w32))
    assert out32.dtype == np.float32
    scale = np.abs(ref).max()
    # im2col's float32 bound for 9 C terms; Winograd's transforms add ~16 roundings
    assert np.abs(out32 - ref).max() / scale <= float32_bound(9 * shape[1])


def _ids(case):
    (x, w, s, p) = case
    return f"x{'x'.join(map(str, x))}-w{'x'.join(map(str, w))}-s{s}p{p}"


def _random(case, seed=0, dtype=np.float64):
    x_shape, w_shape, stride, pad = case
    rng = np.random.default_rng(seed)
    x = rng.standard_normal(x_shape).astype(dtype)
    w = rng.standard_normal(w_shape).astype(dtype)
    return x, w, stride, pad


@pytest.mark.parametrize("case", CASES, ids=_ids)
def test_conv_backward_matches_finite_differences(case):
    x, w, stride, pad = _random(case)
    out, cache = conv2d_forward(x, w, stride, pad)
    dout = np.random.default_rng(1).standard_normal(out.shape)
    dx, dw = conv2d_backward(dout, cache)
    dx_num = numerical_grad(lambda t: conv2d_forward(t, w, stride, pad)[0], x.copy(), dout)
    dw_num = numerical_grad(lambda t: conv2d_forward(x, t, stride, pad)[0], w.copy(), dout)
    check_tensor("dx", dx, dx_num, FD64)
    check_tensor("dw", dw, dw_num, FD64)


def _check_fast_against_naive(x, w, stride, pad, dout_seed):
    """out, dx and dw of the fast path against the loop twin's; returns out."""
    out, cache = conv2d_forward(x, w, stride, pad)
    out_n, cache_n = conv2d_forward_naive(x, w, stride, pad)
    check_tensor("out", out, out_n, LAYER64)
    dout = np.random.default_rng(dout_seed).standard_normal(out.shape)
    dx, dw = conv2d_backward(dout, cache)
    dx_n, dw_n = conv2d_backward_naive(dout, cache_n)
    check_tensor("dx", dx, dx_n, LAYER64)
    check_tensor("dw", dw, dw_n, LAYER64)
    return out


@pytest.mark.parametrize("case", CASES, ids=_ids)
def test_conv_fast_matches_naive(case):
    x, w, stride, pad = _random(case, seed=2)
    out = _check_fast_against_naive(x, w, stride, pad, dout_seed=3)
    H, W = x.shape[2:]
    HH, WW = w.shape[2:]
    assert out.shape == (x.shape[0], w.shape[0],
                         (H + 2 * pad - HH) // stride + 1, (W + 2 * pad - WW) // stride + 1)


def test_conv_naive_by_definition():
    """The twin itself against the equation, written as explicit sums."""
    x, w, stride, pad = _random(((1, 2, 5, 4), (2, 2, 3, 2), 2, 1), seed=4)
    out, _ = conv2d_forward_naive(x, w, stride, pad)
    xpad = np.pad(x, ((0, 0), (0, 0), (pad, pad), (pad, pad)))
    for f in range(2):
        for i in range(out.shape[2]):
            for j in range(out.shape[3]):
                ref = sum(w[f, c, kh, kw] * xpad[0, c, i * stride + kh, j * stride + kw]
                          for c in range(2) for kh in range(3) for kw in range(2))
                assert abs(out[0, f, i, j] - ref) < LAYER64  # 12 O(1) terms, another order


def test_conv_non_contiguous_inputs():
    """Transposed/sliced views give the same results as contiguous copies."""
    rng = np.random.default_rng(5)
    x_big = rng.standard_normal((3, 5, 2, 9))          # (C, W, N, H)-ish storage
    x = x_big.transpose(2, 0, 3, 1)[:, :, ::2, 1:]     # (N=2, C=3, H=5, W=4), non-contiguous
    w = rng.standard_normal((3, 4, 3, 3)).transpose(1, 0, 2, 3)  # (F=4, C=3, 3, 3) view
    assert not x.flags.c_contiguous and not w.flags.c_contiguous
    for stride, pad in ((1, 1), (2, 1)):
        out, cache = conv2d_forward(x, w, stride, pad)
        out_c, cache_c = conv2d_forward(np.ascontiguousarray(x), np.ascontiguousarray(w), stride, pad)
        # im2col copies the views: the same GEMMs as the copies' (measured 0)
        check_tensor("out", out, out_c, SHORT64)
        dout_full = rng.standard_normal(out.shape + (2,))
        dout = dout_full[..., 0]                        # non-contiguous upstream gradient
        dout_before = dout.copy()
        dx, dw = conv2d_backward(dout, cache)
        dx_c, dw_c = conv2d_backward(np.ascontiguousarray(dout), cache_c)
        check_tensor("dx", dx, dx_c, SHORT64)
        check_tensor("dw", dw, dw_c, SHORT64)
        np.testing.assert_array_equal(dout, dout_before)  # backward never mutates dout
        # and finite differences on the views themselves
        dx_num = numerical_grad(lambda t: conv2d_forward(t, w, stride, pad)[0],
                                np.ascontiguousarray(x), dout)
        check_tensor("dx vs FD", dx, dx_num, FD64)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("case", [CASES[0], CASES[1], CASES[2], CASES[3]], ids=_ids)
def test_conv_preserves_dtype(case, dtype):
    x, w, stride, pad = _random(case, seed=6, dtype=dtype)
    out, cache = conv2d_forward(x, w, stride, pad)
    dx, dw = conv2d_backward(np.ones_like(out), cache)
    assert out.dtype == dtype and dx.dtype == dtype and dw.dtype == dtype
    assert dx.shape == x.shape and dw.shape == w.shape
    if dtype == np.float32:  # and float32 still agrees with float64
        out64, _ = conv2d_forward(x.astype(np.float64), w.astype(np.float64), stride, pad)
        check_tensor("out float32", out, out64, float32_bound(36))  # up to 4 x 3 x 3 terms


def test_conv_rejects_mismatched_shapes():
    x = np.zeros((1, 3, 5, 5))
    with pytest.raises(ValueError, match="channels"):
        conv2d_forward(x, np.zeros((2, 4, 3, 3)))
    with pytest.raises(ValueError, match="larger than padded"):
        conv2d_forward(x, np.zeros((2, 3, 7, 7)), pad=0)


@pytest.mark.torch
@pytest.mark.parametrize("case", CASES + [((4, 8, 8, 8), (16, 8, 3, 3), 1, 1),
                                          ((4, 16, 8, 8), (8, 16, 3, 3), 2, 1)], ids=_ids)
def test_conv_matches_pytorch(case):
    torch = pytest.importorskip("torch")
    x, w, stride, pad = _random(case, seed=7)
    out, cache = conv2d_forward(x, w, stride, pad)
    dout = np.random.default_rng(8).standard_normal(out.shape)
    dx, dw = conv2d_backward(dout, cache)

    xt = torch.tensor(x, requires_grad=True)
    wt = torch.tensor(w, requires_grad=True)
    outt = torch.nn.functional.conv2d(xt, wt, stride=stride, padding=pad)
    outt.backward(torch.tensor(dout))
    # elementwise relative: an entry near 0 has a condition of its own, so these are
    # measured over the kernel matrix: out, dx at most 7e-13; dw, sums of up to 256
    # products, at most 2.2e-11 (100x: 2.2e-9)
    check_tensor("out", out, outt.detach().numpy(), INDEPENDENT64, kind="rel")
    check_tensor("dx", dx, xt.grad.numpy(), INDEPENDENT64, kind="rel")
    check_tensor("dw", dw, wt.grad.numpy(), 1e-8, kind="rel")


def test_conv_chunked_batch_matches_naive(monkeypatch):
    """Force one image per im2col/GEMM chunk (big layers run that way)."""
    import refimpl.layers.conv as conv
    monkeypatch.setattr(conv, "COLS_BYTES", 1)
    monkeypatch.setattr(conv, "MIN_COLUMNS", 1)
    for case in (CASES[0], CASES[1], CASES[2], CASES[3]):
        x, w, stride, pad = _random(case, seed=9)
        x = np.concatenate([x, x[::-1] * 0.5 + 1.0])  # N = 4, distinct images
        assert conv._images_per_chunk(x.shape[0], *w.shape[1:], 3, 3, 8) == 1
        _check_fast_against_naive(x, w, stride, pad, dout_seed=10)



def _run(x, w, stride, pad, dout_seed):
    out, cache = conv2d_forward(x, w, stride, pad)
    dout = np.random.default_rng(dout_seed).standard_normal(out.shape).astype(x.dtype)
    return (out, *conv2d_backward(dout, cache)), dout


@pytest.mark.parametrize("n_threads", [2, 3])
@pytest.mark.parametrize("chunk_per_image", [False, True])
@pytest.mark.parametrize("case", CASES, ids=_ids)
def test_conv_threads_match_one_thread_and_naive(case, chunk_per_image, n_threads, threads,
                                                 monkeypatch):
    """Shards of the batch on several threads: same results as one thread.

    N = 5 gives uneven shards (3 + 2, or 2 + 2 + 1); one image per chunk
    makes each shard loop over several chunks and sum several partial dw.
    """
    import refimpl.layers.conv as conv
    if chunk_per_image:
        monkeypatch.setattr(conv, "COLS_BYTES", 1)
        monkeypatch.setattr(conv, "MIN_COLUMNS", 1)
    x, w, stride, pad = _random(case, seed=11)
    x = np.concatenate([x, x[::-1] * 0.5 + 1.0, x[:1] - 2.0])[:5]  # N = 5, distinct images
    threads(1)
    serial, dout = _run(x, w, stride, pad, 12)
    threads(n_threads)
    parallel, _ = _run(x, w, stride, pad, 12)
    # only the order of the dw sum changes
    for name, a, b in zip(("out", "dx", "dw"), parallel, serial):
        check_tensor(name, a, b, LAYER64)
    out_n, cache_n = conv2d_forward_naive(x, w, stride, pad)
    for name, a, b in zip(("out", "dx", "dw"), parallel, (out_n, *conv2d_backward_naive(dout, cache_n))):
        check_tensor(name + " vs naive", a, b, LAYER64)


def test_conv_threads_are_bitwise_repeatable(threads, monkeypatch):
    """dw is summed over shards in a fixed order: every run gives the same bits."""
    import refimpl.layers.conv as conv
    monkeypatch.setattr(conv, "COLS_BYTES", 1)  # several chunks per shard
    monkeypatch.setattr(conv, "MIN_COLUMNS", 1)
    rng = np.random.default_rng(13)
    x = rng.standard_normal((9, 8, 12, 12)).astype(np.float32)
    w = rng.standard_normal((16, 8, 3, 3)).astype(np.float32)
    for stride in (1, 2):  # dx as a conv, and col2im
        threads(2)
        first, _ = _run(x, w, stride, 1, 14)
        for _ in range(5):  # same process and thread count: bitwise
            again, _ = _run(x, w, stride, 1, 14)
            for a, b in zip(again, first):
                np.testing.assert_array_equal(a, b)
        threads(1)  # and one thread is close (not identical: the dw sum order differs)
        serial, _ = _run(x, w, stride, 1, 14)
        for name, a, b in zip(("out", "dx", "dw"), first, serial):
            check_tensor(name, a, b, 1e-5)  # 9 per-image dw: sum_bound(9, 3, U32) = 3.2e-6


@pytest.mark.parametrize("x_shape, w_shape, stride, pad, match", [
    ((1, 2, 5, 5), (3, 2, 3, 3), 0, 1, "stride must be a positive integer"),
    ((1, 2, 5, 5), (3, 2, 3, 3), 1, -1, "pad must be a non-negative integer"),
    ((1, 2, 5, 5), (3, 2, 3, 3), 2.0, 1, "stride must be a positive integer"),
    ((1, 2, 2, 2), (3, 2, 5, 5), 1, 1, "larger than padded input"),
    ((1, 2, 5, 5), (3, 4, 3, 3), 1, 1, "x has 2 channels but w expects 4"),
])
def test_conv_rejects_impossible_arguments(x_shape, w_shape, stride, pad, match):
    with pytest.raises(ValueError, match=match):
        conv2d_forward(np.zeros(x_shape), np.zeros(w_shape), stride, pad)


@pytest.mark.parametrize("stride,pad,filters", [(1, 1, 5), (2, 3, 5), (1, 1, 2), (1, 0, 3)])
def test_backward_without_dx_gives_the_same_dw(stride, pad, filters):
    """need_dx=False (the stem: the image needs no gradient) returns dx None and
    bitwise the dw of the full backward (also where F <= C, dx a convolution)."""
    g = np.random.default_rng(3)
    x, w = g.standard_normal((4, 3, 9, 9)), g.standard_normal((filters, 3, 3, 3))
    out, cache = conv2d_forward(x, w, stride, pad)
    dout = g.standard_normal(out.shape)
    dx, dw = conv2d_backward(dout, cache)
    none, dw2 = conv2d_backward(dout, cache, need_dx=False)
    assert none is None and np.array_equal(dw, dw2)


def test_network_backward_without_image_gradient():
    """Network.backward(need_dx=False): the same parameter gradients, no dx."""
    from refimpl.models.network import build_model
    x = np.random.default_rng(4).standard_normal((4, 3, 8, 8))
    grads = []
    for need in (True, False):
        net = build_model("resnet18", "cifar", 2, 8, 8, np.float64, seed=0)
        z = net.forward(x, train=True)
        dx = net.backward(np.ones_like(z) + np.arange(z.size).reshape(z.shape), need_dx=need)
        assert (dx is None) == (not need)
        grads.append(net.store.grad.copy())
    assert np.array_equal(*grads) and np.abs(grads[0]).max() > 0

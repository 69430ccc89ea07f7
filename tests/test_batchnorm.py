"""BatchNorm: finite differences, the readable twin, PyTorch parity, synchronized (allreduce) mode.

The synchronized path is tested in one process: a batch is split into unequal
"ranks", and each rank's allreduce returns the sum of all ranks' vectors (one
thread per rank, meeting at a barrier). The
concatenated result must equal one full-batch BatchNorm.
"""
import threading

import numpy as np
import pytest

from refimpl.oracle import check_tensor, numerical_grad
from refimpl.layers.batchnorm import (batchnorm_backward, batchnorm_backward_naive,
                                      batchnorm_forward, batchnorm_forward_naive)
from tolerances import FD64, INDEPENDENT64, LAYER32, LAYER64, SHORT64

SHAPES = [(7, 4), (3, 2, 3, 3)]


def make_inputs(shape, seed=0, dtype=np.float64):
    """x with a per-channel offset and scale, non-trivial gamma, beta and running stats."""
    r = np.random.default_rng(seed)
    C = shape[1]
    bshape = (1, C) + (1,) * (len(shape) - 2)
    x = r.standard_normal(shape) * r.uniform(0.5, 2.0, C).reshape(bshape) \
        + r.uniform(-2, 2, C).reshape(bshape)
    gamma = r.uniform(0.5, 1.5, C)
    beta = r.uniform(-1, 1, C)
    rm = r.standard_normal(C)
    rv = r.uniform(0.5, 2.0, C)
    return [a.astype(dtype) for a in (x, gamma, beta, rm, rv)]


def run_ranks(fns):
    """Run fns[i](allreduce) on one thread per "rank"; allreduce sums over ranks.

    Every rank posts its vector, waits for the others, and gets the sum (added
    in rank order, so every rank sees the same bits). Returns each fn's result
    and how many times each rank called allreduce.
    """
    n = len(fns)
    barrier = threading.Barrier(n, timeout=20)
    slots, results, errors, n_calls = [None] * n, [None] * n, [], [0] * n

    def allreduce_for(i):
        def allreduce(v):
            n_calls[i] += 1
            slots[i] = v.copy()
            barrier.wait()
            total = sum(slots)
            barrier.wait()  # nobody overwrites a slot before all have read it
            return total
        return allreduce

    def target(i):
        try:
            results[i] = fns[i](allreduce_for(i))
        except BaseException as e:  # re-raised in the main thread
            errors.append(e)
            barrier.abort()

    threads = [threading.Thread(target=target, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if errors:
        raise errors[0]
    return results, n_calls


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("train", [True, False])
def test_gradients_match_finite_differences(shape, train):
    x, gamma, beta, rm, rv = make_inputs(shape, seed=1)
    dout = np.random.default_rng(2).standard_normal(shape)
    out, cache, _, _ = batchnorm_forward(x, gamma, beta, rm, rv, train=train)
    dx, dgamma, dbeta = batchnorm_backward(dout, cache)

    def f_x(x_):
        return batchnorm_forward(x_, gamma, beta, rm, rv, train=train)[0]

    def f_gamma(g_):
        return batchnorm_forward(x, g_, beta, rm, rv, train=train)[0]

    def f_beta(b_):
        return batchnorm_forward(x, gamma, b_, rm, rv, train=train)[0]

    check_tensor("dx", dx, numerical_grad(f_x, x.copy(), dout), FD64)
    check_tensor("dgamma", dgamma, numerical_grad(f_gamma, gamma.copy(), dout), FD64)
    check_tensor("dbeta", dbeta, numerical_grad(f_beta, beta.copy(), dout), FD64)
    if train:
        # The batch-statistics gradient removes the mean of dout per channel: 0 up to
        # <= 27 entries of ~10 roundings each (27 * 10 u * max|dx| ~ 1e-13).
        assert np.abs(dx.sum(axis=tuple(i for i in range(x.ndim) if i != 1))).max() < 1e-10


# (N, C) and (N, C, H, W), N*H*W from 7 to 147 values per channel
TWIN_SHAPES = [(7, 4), (16, 5), (3, 2, 3, 3), (4, 3, 5, 6), (3, 3, 7, 7)]


def _fast_and_naive(x, gamma, beta, rm, rv, dout, train):
    """{name: (fast, naive)} for out, the new running statistics, dx, dgamma, dbeta."""
    kwargs = dict(train=train, momentum=0.3, eps=1e-4)
    fast = batchnorm_forward(x, gamma, beta, rm, rv, **kwargs)
    naive = batchnorm_forward_naive(x, gamma, beta, rm, rv, **kwargs)
    names = ("out", "running_mean", "running_var", "dx", "dgamma", "dbeta")
    results = [(f[0], f[2], f[3]) + backward(dout, f[1]) for f, backward in
               ((fast, batchnorm_backward), (naive, batchnorm_backward_naive))]
    return {name: pair for name, pair in zip(names, zip(*results))}


@pytest.mark.parametrize("shape", TWIN_SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("train", [True, False], ids=["train", "eval"])
def test_fast_matches_naive(shape, train):
    """The chunked in-place passes against the docstring's equations on the
    whole array: the per-channel sums in another order."""
    x, gamma, beta, rm, rv = make_inputs(shape, seed=20)
    dout = np.random.default_rng(21).standard_normal(shape)
    for name, (fast, naive) in _fast_and_naive(x, gamma, beta, rm, rv, dout, train).items():
        # sums of <= 147 values per channel: sum_bound(147, sqrt(147)) = 4e-13
        check_tensor(name, fast, naive, LAYER64)


@pytest.mark.parametrize("train", [True, False], ids=["train", "eval"])
def test_fast_matches_naive_on_non_contiguous_inputs(train):
    for x, gamma, beta, rm, rv, dout in non_contiguous_inputs(22):
        for name, (fast, naive) in _fast_and_naive(x, gamma, beta, rm, rv, dout, train).items():
            check_tensor(name, fast, naive, LAYER64)  # <= 36 values per channel


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("train", [True, False], ids=["train", "eval"])
def test_naive_gradients_match_finite_differences(shape, train):
    """The twin is right on its own, not only equal to the fast path."""
    x, gamma, beta, rm, rv = make_inputs(shape, seed=23)
    dout = np.random.default_rng(24).standard_normal(shape)
    _, cache, _, _ = batchnorm_forward_naive(x, gamma, beta, rm, rv, train=train)
    dx, dgamma, dbeta = batchnorm_backward_naive(dout, cache)

    def f(x_=x, g_=gamma, b_=beta):
        return batchnorm_forward_naive(x_, g_, b_, rm, rv, train=train)[0]

    check_tensor("dx", dx, numerical_grad(lambda t: f(x_=t), x.copy(), dout), FD64)
    check_tensor("dgamma", dgamma, numerical_grad(lambda t: f(g_=t), gamma.copy(), dout), FD64)
    check_tensor("dbeta", dbeta, numerical_grad(lambda t: f(b_=t), beta.copy(), dout), FD64)


def test_train_statistics_and_running_update():
    x, gamma, beta, rm, rv = make_inputs((6, 3, 2, 2), seed=3)
    rm0, rv0 = rm.copy(), rv.copy()
    out, _, new_rm, new_rv = batchnorm_forward(x, gamma, beta, rm, rv, momentum=0.25)
    axes = (0, 2, 3)
    mean, var = x.mean(axis=axes), x.var(axis=axes)
    # Per channel: out has mean beta and (biased) std gamma * sqrt(var / (var + eps)).
    check_tensor("out mean", out.mean(axis=axes), beta, LAYER64)
    check_tensor("out std", out.std(axis=axes), gamma * np.sqrt(var / (var + 1e-5)), LAYER64)
    check_tensor("running_mean", new_rm, 0.75 * rm0 + 0.25 * mean, SHORT64)   # 24 terms
    check_tensor("running_var", new_rv, 0.75 * rv0 + 0.25 * x.var(axis=axes, ddof=1), SHORT64)
    # Inputs untouched, outputs are new arrays.
    np.testing.assert_array_equal(rm, rm0)
    np.testing.assert_array_equal(rv, rv0)
    assert new_rm is not rm and new_rv is not rv


def test_eval_uses_and_returns_running_stats():
    x, gamma, beta, rm, rv = make_inputs((5, 3), seed=4)
    out, _, new_rm, new_rv = batchnorm_forward(x, gamma, beta, rm, rv, train=False)
    check_tensor("out", out, gamma * (x - rm) / np.sqrt(rv + 1e-5) + beta, SHORT64)  # elementwise
    np.testing.assert_array_equal(new_rm, rm)
    np.testing.assert_array_equal(new_rv, rv)


def test_no_running_stats_in_train_mode():
    x, gamma, beta, rm, rv = make_inputs((5, 3), seed=4)
    out, _, new_rm, new_rv = batchnorm_forward(x, gamma, beta, None, None)
    ref = batchnorm_forward(x, gamma, beta, rm, rv)[0]
    np.testing.assert_array_equal(out, ref)
    assert new_rm is None and new_rv is None


def non_contiguous_inputs(seed):
    """[(x, gamma, beta, rm, rv, dout)]: NHWC memory viewed as NCHW, and a
    strided (N, C) view; dout a reversed view as well."""
    r = np.random.default_rng(seed)
    x4 = (r.standard_normal((4, 3, 3, 2)) * 2 + 1).transpose(0, 3, 1, 2)   # (4, 2, 3, 3)
    x2 = r.standard_normal((6, 8))[:, ::2]                                 # (6, 4)
    cases = []
    for x in (x4, x2):
        assert not x.flags.c_contiguous
        C = x.shape[1]
        gamma, beta = r.uniform(0.5, 1.5, C), r.uniform(-1, 1, C)
        rm, rv = r.standard_normal(C), r.uniform(0.5, 2, C)
        cases.append((x, gamma, beta, rm, rv, r.standard_normal(x.shape)[..., ::-1]))
    return cases


@pytest.mark.parametrize("train", [True, False])
def test_non_contiguous_input(train):
    for x, gamma, beta, rm, rv, dout in non_contiguous_inputs(5):
        out, cache, new_rm, new_rv = batchnorm_forward(x, gamma, beta, rm, rv, train=train)
        grads = batchnorm_backward(dout, cache)
        xc, doutc = np.ascontiguousarray(x), np.ascontiguousarray(dout)
        out_c, cache_c, rm_c, rv_c = batchnorm_forward(xc, gamma, beta, rm, rv, train=train)
        grads_c = batchnorm_backward(doutc, cache_c)
        # sums over <= 36 values per channel, in another order for a view
        check_tensor("out", out, out_c, SHORT64)
        check_tensor("running_mean", new_rm, rm_c, SHORT64)
        check_tensor("running_var", new_rv, rv_c, SHORT64)
        for name, g, gc in zip(("dx", "dgamma", "dbeta"), grads, grads_c):
            # 36 random-sign terms: sum_bound(36, cond=6) = 4.8e-14
            check_tensor(name, g, gc, 1e-13)
        dx_fd = numerical_grad(
            lambda x_: batchnorm_forward(x_, gamma, beta, rm, rv, train=train)[0],
            xc.copy(), dout)
        check_tensor("dx vs fd", grads[0], dx_fd, FD64)


def test_backward_does_not_mutate():
    x, gamma, beta, rm, rv = make_inputs((4, 3, 2, 2), seed=6)
    dout = np.random.default_rng(7).standard_normal(x.shape)
    saved = [a.copy() for a in (x, gamma, beta, rm, rv, dout)]
    for train in (True, False):
        _, cache, _, _ = batchnorm_forward(x, gamma, beta, rm, rv, train=train)
        batchnorm_backward(dout, cache)
    for a, s in zip((x, gamma, beta, rm, rv, dout), saved):
        np.testing.assert_array_equal(a, s)


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("train", [True, False])
def test_dtype_preserved(shape, train):
    x, gamma, beta, rm, rv = make_inputs(shape, seed=8, dtype=np.float32)
    dout = np.random.default_rng(9).standard_normal(shape).astype(np.float32)
    out, cache, new_rm, new_rv = batchnorm_forward(x, gamma, beta, rm, rv, train=train)
    dx, dgamma, dbeta = batchnorm_backward(dout, cache)
    for a in (out, new_rm, new_rv, dx, dgamma, dbeta):
        assert a.dtype == np.float32
    # And float32 agrees with float64 to float32 precision.
    f64 = [a.astype(np.float64) for a in (x, gamma, beta, rm, rv)]
    out64, cache64, rm64, rv64 = batchnorm_forward(*f64, train=train)
    dx64 = batchnorm_backward(dout.astype(np.float64), cache64)[0]
    check_tensor("out f32", out, out64, LAYER32)   # <= 27 values per channel
    check_tensor("dx f32", dx, dx64, LAYER32)
    check_tensor("rv f32", new_rv, rv64, LAYER32)


def test_float32_synced_keeps_dtype():
    x, gamma, beta, rm, rv = make_inputs((6, 3), seed=10, dtype=np.float32)
    out, cache, new_rm, new_rv = batchnorm_forward(
        x, gamma, beta, rm, rv, allreduce=lambda v: v)
    dout = np.random.default_rng(10).standard_normal(x.shape).astype(np.float32)
    dx, dgamma, dbeta = batchnorm_backward(dout, cache)
    for a in (out, new_rm, new_rv, dx, dgamma, dbeta):
        assert a.dtype == np.float32


@pytest.mark.parametrize("shape", [(12, 3), (9, 2, 2, 3)])
def test_synced_equals_full_batch(shape):
    x, gamma, beta, rm, rv = make_inputs(shape, seed=11)
    dout = np.random.default_rng(12).standard_normal(shape)
    bounds = [0, 2, 7, shape[0]]  # three unequal "ranks"
    parts = [slice(a, b) for a, b in zip(bounds[:-1], bounds[1:])]

    def rank(s):
        def step(allreduce):
            out, cache, new_rm, new_rv = batchnorm_forward(
                x[s], gamma, beta, rm, rv, momentum=0.2, allreduce=allreduce)
            return (out, new_rm, new_rv) + batchnorm_backward(dout[s], cache)
        return step

    results, n_calls = run_ranks([rank(s) for s in parts])
    assert n_calls == [2, 2, 2]  # once in forward, once in backward
    fwd = [r[:3] for r in results]
    bwd = [r[3:] for r in results]

    out, cache, ref_rm, ref_rv = batchnorm_forward(x, gamma, beta, rm, rv, momentum=0.2)
    dx, dgamma, dbeta = batchnorm_backward(dout, cache)
    # the sums over the batch in three parts (sync BN's one-pass statistics)
    check_tensor("out", np.concatenate([f[0] for f in fwd]), out, LAYER64)
    for f in fwd:  # every rank holds the same, global running stats
        check_tensor("running_mean", f[1], ref_rm, LAYER64)
        check_tensor("running_var", f[2], ref_rv, LAYER64)
    check_tensor("dx", np.concatenate([g[0] for g in bwd]), dx, LAYER64)
    # dgamma, dbeta are each rank's share: they sum to the full-batch ones.
    check_tensor("dgamma", sum(g[1] for g in bwd), dgamma, LAYER64)
    check_tensor("dbeta", sum(g[2] for g in bwd), dbeta, LAYER64)
    check_tensor("dbeta rank 0", bwd[0][2], dout[parts[0]].sum(
        axis=tuple(i for i in range(x.ndim) if i != 1)), SHORT64)  # 2 x 4 terms


def test_synced_differs_from_local_per_rank():
    """Negative control: per-rank (local) BN on the parts is not the full-batch BN."""
    x, gamma, beta, rm, rv = make_inputs((12, 3), seed=13)
    out = batchnorm_forward(x, gamma, beta, rm, rv)[0]
    local = np.concatenate([batchnorm_forward(x[s], gamma, beta, rm, rv)[0]
                            for s in (slice(0, 5), slice(5, 12))])
    assert np.abs(local - out).max() > 1e-2  # another normalization: O(1), not rounding (1e-12)


@pytest.mark.parametrize("shape", SHAPES)
def test_identity_allreduce_equals_local(shape):
    x, gamma, beta, rm, rv = make_inputs(shape, seed=14)
    dout = np.random.default_rng(15).standard_normal(shape)
    calls = []

    def identity(v):
        calls.append(v.shape)
        return v
    out_s, cache_s, rm_s, rv_s = batchnorm_forward(x, gamma, beta, rm, rv, allreduce=identity)
    grads_s = batchnorm_backward(dout, cache_s)
    C = shape[1]
    assert calls == [(2 * C + 1,), (2 * C,)]
    out, cache, rm_l, rv_l = batchnorm_forward(x, gamma, beta, rm, rv)
    grads = batchnorm_backward(dout, cache)
    # one-pass statistics (sums of d and d^2) against the two-pass ones
    check_tensor("out", out_s, out, LAYER64)
    check_tensor("running_mean", rm_s, rm_l, 1e-13)  # 27 terms: sum_bound(27, cond=10) = 6e-14
    check_tensor("running_var", rv_s, rv_l, LAYER64)
    for name, a, b in zip(("dx", "dgamma", "dbeta"), grads_s, grads):
        check_tensor(name, a, b, LAYER64)


def test_bad_shapes_are_refused_naming_the_argument():
    x, gamma, beta, rm, rv = make_inputs((4, 3), seed=16)
    with pytest.raises(ValueError, match="gamma"):
        batchnorm_forward(x, gamma[:2], beta, rm, rv)
    with pytest.raises(ValueError, match="running_var"):
        batchnorm_forward(x, gamma, beta, rm, rv[:2])
    with pytest.raises(ValueError, match="shape"):
        batchnorm_forward(x[0], gamma, beta, rm, rv)


def test_eval_without_running_stats_is_refused():
    x, gamma, beta, _, _ = make_inputs((4, 3), seed=16)
    with pytest.raises(ValueError, match="running_mean"):
        batchnorm_forward(x, gamma, beta, None, None, train=False)


def test_an_allreduce_of_the_wrong_shape_is_refused():
    x, gamma, beta, rm, rv = make_inputs((4, 3), seed=16)
    with pytest.raises(ValueError, match="allreduce"):
        batchnorm_forward(x, gamma, beta, rm, rv, allreduce=lambda v: v[:-1])


def test_batch_statistics_need_more_than_one_value_per_channel_in_the_group():
    x, gamma, beta, rm, rv = make_inputs((4, 3), seed=16)
    with pytest.raises(ValueError, match="more than 1 value"):
        batchnorm_forward(x[:1], gamma, beta, rm, rv)
    # One value per channel on this rank is fine when the group has more.
    out = batchnorm_forward(x[:1], gamma, beta, rm, rv, allreduce=lambda v: 3 * v)[0]
    assert np.isfinite(out).all()
    # Eval mode with one sample is fine too (no batch statistics).
    batchnorm_forward(x[:1], gamma, beta, rm, rv, train=False)


@pytest.mark.torch
@pytest.mark.parametrize("shape", [(8, 5), (4, 3, 5, 5)])
@pytest.mark.parametrize("train", [True, False])
def test_matches_pytorch(shape, train):
    torch = pytest.importorskip("torch")
    F = torch.nn.functional
    x, gamma, beta, rm, rv = make_inputs(shape, seed=17)
    dout = np.random.default_rng(18).standard_normal(shape)
    out, cache, new_rm, new_rv = batchnorm_forward(
        x, gamma, beta, rm, rv, train=train, momentum=0.3, eps=1e-4)
    dx, dgamma, dbeta = batchnorm_backward(dout, cache)

    tx = torch.tensor(x, requires_grad=True)
    tg = torch.tensor(gamma, requires_grad=True)
    tb = torch.tensor(beta, requires_grad=True)
    trm, trv = torch.tensor(rm), torch.tensor(rv)  # updated in place by torch
    tout = F.batch_norm(tx, trm, trv, tg, tb, training=train, momentum=0.3, eps=1e-4)
    (tout * torch.tensor(dout)).sum().backward()

    # PyTorch's own kernels: another implementation (measured <= 4e-16)
    check_tensor("out", out, tout.detach().numpy(), INDEPENDENT64)
    check_tensor("running_mean", new_rm, trm.numpy(), INDEPENDENT64)
    check_tensor("running_var", new_rv, trv.numpy(), INDEPENDENT64)
    check_tensor("dx", dx, tx.grad.numpy(), INDEPENDENT64)
    check_tensor("dgamma", dgamma, tg.grad.numpy(), INDEPENDENT64)
    check_tensor("dbeta", dbeta, tb.grad.numpy(), INDEPENDENT64)


def test_synced_float32_keeps_its_digits_when_the_mean_is_large():
    """Sync BN's one-message statistics, sum(d) and sum(d^2) with d = x - running_mean,
    stay accurate in float32 for a channel with mean 30 and std 0.05 (where
    sum(x^2)/m - mean^2 would keep no digit), once the running mean is near."""
    rng = np.random.default_rng(5)
    x64 = 30.0 + 0.05 * rng.standard_normal((64, 4, 8, 8))
    gamma, beta = rng.standard_normal(4) + 1.5, rng.standard_normal(4)
    rm64 = x64.mean(axis=(0, 2, 3)) + 0.01 * rng.standard_normal(4)   # a running mean nearby
    rv64 = np.ones(4)
    ref, _, ref_rm, ref_rv = batchnorm_forward(x64, gamma, beta, rm64, rv64)

    f32 = [a.astype(np.float32) for a in (x64, gamma, beta, rm64, rv64)]
    out, _, new_rm, new_rv = batchnorm_forward(*f32, allreduce=lambda v: v)
    # The reference uses the unrounded x: float32's rounding of x (u32 * 30 / std 0.05 =
    # 3.6e-5 of xhat) and of 4096-term sums; measured 8e-6, 4.5e-8 (100x below).
    check_tensor("out (float32 synced)", out, ref, 2e-3)
    check_tensor("running_var (float32 synced)", new_rv, ref_rv, 1e-3)
    # A mean of ~30: a few float32 roundings (4 u32 = 2.4e-7) and the shifted sum's
    # gamma_4096(u32) * 0.04 / 30 = 3.2e-7
    check_tensor("running_mean (float32 synced)", new_rm, ref_rm, 1e-6)
    # Negative control: with a zero shift (running mean 0) the same data
    # loses the variance entirely in float32 (an error of O(1), 500x the 2e-3 above).
    zero = np.zeros(4, np.float32)
    bad, _, _, _ = batchnorm_forward(f32[0], f32[1], f32[2], zero, f32[4], allreduce=lambda v: v)
    assert np.abs(bad - ref).max() / np.abs(ref).max() > 1e-2


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("mode", ["train", "sync", "eval", "no-running"])
def test_threads_give_the_same_bits(threads, dtype, mode):
    """On 2 and 3 threads each thread normalizes its own channels: forward
    (out, new running statistics) and backward (dx, dgamma, dbeta) are
    bitwise those of 1 thread, also for C not divisible by the threads."""
    from refimpl.layers import batchnorm
    shape = (24, 7, 80, 80)                                  # above THREAD_MIN_ELEMENTS
    assert np.prod(shape) >= batchnorm.THREAD_MIN_ELEMENTS
    x, gamma, beta, rm, rv = make_inputs(shape, seed=3, dtype=dtype)
    dout = np.random.default_rng(4).standard_normal(shape).astype(dtype)
    if mode == "no-running":
        rm = rv = None
    kwargs = dict(train=mode != "eval", allreduce=(lambda v: v.copy()) if mode == "sync" else None)
    results = []
    for n in (1, 2, 3):
        threads(n)
        assert len(batchnorm._channel_chunks(x)) == n
        out, cache, m, v = batchnorm_forward(x, gamma, beta, rm, rv, **kwargs)
        results.append((out, m, v) + batchnorm_backward(dout, cache))
    for n, r in zip((2, 3), results[1:]):
        for name, a, b in zip(("out", "running_mean", "running_var", "dx", "dgamma", "dbeta"),
                              r, results[0]):
            assert (a is None and b is None) or np.array_equal(a, b), \
                f"{name} differs on {n} threads ({mode}, {np.dtype(dtype).name})"

"""SGD and the warm-up + cosine schedule against torch.optim, in float64."""
import math

import numpy as np
import pytest

from refimpl.oracle import check_tensor
from refimpl.params import ParamStore, is_bn_or_bias
from refimpl.optim.schedule import warmup_cosine
from refimpl.optim.sgd import SGD
from tolerances import LAYER64, ROUNDINGS64, SHORT64

SHAPES = {"conv.weight": (4, 3, 3, 3), "bn.weight": (4,), "bn.bias": (4,),
          "fc.weight": (5, 4), "fc.bias": (5,)}


def make_store(seed=0):
    g = np.random.default_rng(seed)
    s = ParamStore(dtype=np.float64)
    for name, shape in SHAPES.items():
        s.add_param(name, g.standard_normal(shape))
    return s.finalize()


@pytest.mark.torch
@pytest.mark.parametrize("momentum,nesterov,wd,masked", [
    (0.0, False, 0.0, False),
    (0.0, False, 5e-4, False),
    (0.9, False, 0.0, False),
    (0.9, False, 1e-2, False),
    (0.9, True, 1e-2, False),
    (0.9, False, 1e-2, True),
    (0.8, True, 1e-1, True),
])
def test_sgd_matches_torch(momentum, nesterov, wd, masked):
    torch = pytest.importorskip("torch")
    store = make_store()
    tparams = {n: torch.tensor(v.copy(), requires_grad=True) for n, v in store.named_params()}
    mask = store.decay_mask(exclude=is_bn_or_bias) if masked else None
    if masked:  # PyTorch's way: a param group without decay
        groups = [{"params": [p for n, p in tparams.items() if not is_bn_or_bias(n, p.shape)]},
                  {"params": [p for n, p in tparams.items() if is_bn_or_bias(n, p.shape)],
                   "weight_decay": 0.0}]
    else:
        groups = list(tparams.values())
    topt = torch.optim.SGD(groups, lr=0.1, momentum=momentum, weight_decay=wd,
                           nesterov=nesterov)
    opt = SGD(store.data, store.grad, lr=0.1, momentum=momentum, weight_decay=wd,
              nesterov=nesterov, decay_mask=mask)
    g = np.random.default_rng(1)
    for step in range(6):
        lr = 0.1 * (1 + step) / 6  # a changing lr, as under a schedule
        for n, p in tparams.items():
            grad = g.standard_normal(p.shape)
            p.grad = torch.tensor(grad)
            store.grads[n][...] = grad
        for group in topt.param_groups:
            group["lr"] = lr
        topt.step()
        opt.step(lr=lr)
    # 6 elementwise steps of <= 6 roundings, in torch's order: 2 gamma_36 ~ 1e-14 each
    for n, p in tparams.items():
        check_tensor(n, store.params[n], p.detach().numpy(), LAYER64)
        if momentum > 0:
            tbuf = topt.state[p]["momentum_buffer"].numpy()
            a, b = store.offsets[n]
            check_tensor(n + " momentum", opt.momentum_buffer[a:b].reshape(p.shape), tbuf, LAYER64)


def test_sgd_plain_formula_and_untouched_grad():
    p = np.array([1.0, -2.0]); g = np.array([0.5, 0.25]); mask = np.array([1.0, 0.0])
    opt = SGD(p, g, lr=0.1, momentum=0.9, weight_decay=0.1, decay_mask=mask)
    opt.step()
    # v1 = g + wd*mask*p = [0.6, 0.25]; p1 = p - 0.1 v1
    np.testing.assert_allclose(p, [1.0 - 0.06, -2.0 - 0.025], rtol=0, atol=ROUNDINGS64)  # 3 u * 2
    np.testing.assert_array_equal(g, [0.5, 0.25])
    opt.step()
    v2 = 0.9 * np.array([0.6, 0.25]) + np.array([0.5 + 0.1 * 0.94, 0.25])
    np.testing.assert_allclose(opt.momentum_buffer, v2, rtol=ROUNDINGS64)  # 4 roundings


def test_sgd_dtype_and_errors():
    p = np.ones(3, np.float32); g = np.ones(3, np.float32)
    opt = SGD(p, g, lr=0.5, momentum=0.9, weight_decay=1e-4)
    opt.step()
    assert p.dtype == np.float32 and opt.momentum_buffer.dtype == np.float32
    with pytest.raises(ValueError, match="nesterov"):
        SGD(p, g, nesterov=True)
    with pytest.raises(ValueError, match="must match"):
        SGD(p, np.ones(3))
    with pytest.raises(ValueError, match="decay_mask"):
        SGD(p, g, decay_mask=np.ones(4))


@pytest.mark.parametrize("kwargs", [dict(lr=float("nan")), dict(lr=float("inf")),
                                    dict(momentum=float("nan")), dict(weight_decay=-1e-4)])
def test_sgd_refuses_non_finite_or_negative_hyperparameters(kwargs):
    """SGD(lr=nan) was taken, and the first step made every parameter NaN."""
    p, g = np.ones(3), np.ones(3)
    with pytest.raises(ValueError, match="must be finite and >= 0"):
        SGD(p, g, **kwargs)
    opt = SGD(p, g, lr=0.1)
    with pytest.raises(ValueError, match=r"SGD.step: lr must be finite and >= 0, got nan"):
        opt.step(lr=float("nan"))
    np.testing.assert_array_equal(p, np.ones(3))  # nothing was updated


def test_schedule_endpoints_and_monotonicity():
    kw = dict(base_lr=0.4, total_steps=100, warmup_steps=10, warmup_start_lr=0.01,
              final_lr=0.001)
    lrs = [warmup_cosine(s, **kw) for s in range(101)]
    # cos(pi) = -1: 0.001 up to a few roundings
    assert lrs[0] == 0.01 and lrs[10] == 0.4 and lrs[100] == pytest.approx(0.001, abs=ROUNDINGS64)
    assert warmup_cosine(1000, **kw) == 0.001
    assert all(a < b for a, b in zip(lrs[:10], lrs[1:11]))      # warm-up rises
    assert all(a > b for a, b in zip(lrs[10:100], lrs[11:101]))  # decay falls
    assert lrs[55] == pytest.approx(0.001 + 0.399 / 2, rel=SHORT64)  # half way: a few roundings
    assert warmup_cosine(0, 0.4, 100) == 0.4                      # no warm-up
    # approx's default rel 1e-6: far above the few roundings of 0.4 * 5 / 10
    assert warmup_cosine(5, 0.4, 100, warmup_steps=10) == pytest.approx(0.2)
    with pytest.raises(ValueError):
        warmup_cosine(-1, **kw)
    with pytest.raises(ValueError):
        warmup_cosine(0, 0.4, 10, warmup_steps=10)


@pytest.mark.torch
def test_schedule_matches_torch_schedulers():
    torch = pytest.importorskip("torch")
    base, start, final, W, T = 0.4, 0.02, 0.001, 8, 40
    p = torch.zeros(1, requires_grad=True)

    opt = torch.optim.SGD([p], lr=base)
    warm = torch.optim.lr_scheduler.LinearLR(opt, start_factor=start / base,
                                             end_factor=1.0, total_iters=W)
    for s in range(W + 1):  # torch multiplies the lr step by step: 8 steps of ~3 roundings
        assert warmup_cosine(s, base, T, W, start, final) == pytest.approx(
            opt.param_groups[0]["lr"], rel=LAYER64), s
        opt.step(); warm.step()

    opt = torch.optim.SGD([p], lr=base)
    cos = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=T - W, eta_min=final)
    for s in range(W, T + 1):  # torch's recursive form: 32 steps of ratios of (1 + cos)
        assert warmup_cosine(s, base, T, W, start, final) == pytest.approx(
            opt.param_groups[0]["lr"], rel=LAYER64, abs=ROUNDINGS64), s
        opt.step(); cos.step()

    # And the whole schedule as a LambdaLR with the docstring's formula.
    def factor(s):
        if s < W:
            return (start + (base - start) * s / W) / base
        return (final + (base - final) * (1 + math.cos(math.pi * (s - W) / (T - W))) / 2) / base
    opt = torch.optim.SGD([p], lr=base)
    lam = torch.optim.lr_scheduler.LambdaLR(opt, factor)
    for s in range(T):  # the same formula: a few roundings
        assert warmup_cosine(s, base, T, W, start, final) == pytest.approx(
            opt.param_groups[0]["lr"], rel=SHORT64), s
        opt.step(); lam.step()

"""The benchmarks' own comparators compute what they claim to.

A benchmark's ratio means something only if both sides do the same work:
the blocked PyTorch classifier of ``bench_classifier.py`` must give the
dense PyTorch loss and weight gradient, and the GEMM rate its FLOP count.
"""
import sys
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import best_call, sgemm_rate  # noqa: E402


@pytest.mark.torch
@pytest.mark.parametrize("block", [7, 64, 1000])
def test_blocked_pytorch_classifier_equals_dense_autograd(block):
    """Loss and dW of refimpl's algorithm written in PyTorch = F.cross_entropy's, float64."""
    torch = pytest.importorskip("torch")
    from benchmarks.bench_classifier import TAU, blocked_cosine_softmax
    F = torch.nn.functional
    g = np.random.default_rng(0)
    N, D, B = 100, 16, 12
    W = torch.tensor(g.standard_normal((N, D)), requires_grad=True)
    z = torch.tensor(g.standard_normal((B, D)))
    y = torch.tensor(g.integers(0, N, B))
    with torch.no_grad():
        W[5] = 0.0                                        # a clamped norm
    loss = F.cross_entropy(F.normalize(z) @ F.normalize(W).T / TAU, y)
    loss.backward()
    with torch.no_grad():
        bloss, dW = blocked_cosine_softmax(z, y, W.detach(), block)
    loss = float(loss.detach())
    assert abs(float(bloss) - loss) <= 1e-12 * abs(loss)
    err = float((dW - W.grad).abs().max() / W.grad.abs().max())
    assert err <= 1e-12, f"dW relative error {err:.1e}"


def test_sgemm_rate_and_best_call():
    """A positive, finite GFLOP/s; best_call reports wall, user and system time."""
    rate = sgemm_rate([(64, 32, 128)], parts=1, repeat=2)
    assert 0 < rate < 1e5
    calls = []
    best = best_call(lambda: calls.append(np.ones((256, 256)).sum()), repeat=3)
    assert len(calls) == 4 and set(best) == {"s", "user_s", "sys_s"} and best["s"] > 0

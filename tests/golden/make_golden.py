"""Write the golden trace: two refimpl training steps that the tests recompute.

    python tests/golden/make_golden.py            (rewrites tests/golden/trace/)

The problem is tiny and fixed: ResNet-18 at width 1 (CIFAR stem; every
layer and code path of a wide one, 3,133 parameters, so that the files stay
near 300 KiB), 8 x 8
images, head 8 -> D = 16, N = 16 instances, global batch B = 8 normalized
as P = 2 local BatchNorm groups, smoothed targets (alpha = 0.2, K = 3),
SGD with Nesterov momentum 0.9, weight decay 5e-4 off BatchNorm and biases,
learning rates 0.1 then 0.05, float64. The classifier rows are +-1/2, so
their cosines are exact multiples of 1/8 and tie often: the neighbour table
depends on the tie rule (the lower id wins). Everything comes from named
random streams, so the trace is the same on every machine up to float
rounding.

tests/test_oracle_golden.py replays this trace in refimpl (every tensor at
1e-12) and records it again with this script's ``record`` (the same names,
order and values); a difference means that something in the step changed.
If the change is intended, run this script and commit the new files.
"""
import shutil
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from refimpl.backend import rng as make_rng  # noqa: E402
from refimpl.method.neighbours import hardest_neighbours  # noqa: E402
from refimpl.method.targets import target_entries  # noqa: E402
from refimpl.models import build_model  # noqa: E402
from refimpl.optim.sgd import SGD  # noqa: E402
from refimpl.oracle.recorder import TraceRecorder  # noqa: E402
from refimpl.params import is_bn_or_bias  # noqa: E402
from refimpl.parallel import CosineClassifier, SelfComm  # noqa: E402
from refimpl.train.step import forward_backward, update  # noqa: E402

HERE = Path(__file__).resolve().parent
TRACE = HERE / "trace"
N, D, B, K, ALPHA, TAU, GROUPS = 16, 16, 8, 3, 0.2, 0.15, 2
LRS = (0.1, 0.05)


def record(out):
    """Run the two golden steps in refimpl and record them into ``out``."""
    comm = SelfComm()
    net = build_model("resnet18", "cifar", width=1, head_hidden=8, dim=D, dtype=np.float64,
                      seed=0)
    net.bn.groups = GROUPS                       # 2 local BatchNorms, as on 2 ranks
    clf = CosineClassifier(N, D, comm, TAU, np.float64)
    g = make_rng(0, "golden")
    clf.weight[...] = g.choice([-0.5, 0.5], size=(N, D))
    net_opt = SGD(net.store.data, net.store.grad, LRS[0], 0.9, 5e-4, nesterov=True,
                  decay_mask=net.store.decay_mask(is_bn_or_bias))
    clf_opt = SGD(clf.weight.ravel(), clf.grad.ravel(), LRS[0], 0.9, 5e-4, nesterov=True)
    rec = TraceRecorder(out, net, clf, net_opt, clf_opt, comm,
                        {"alpha": ALPHA, "K": K, "seed": 0, "neighbours": "initial_weight"},
                        steps=len(LRS), producer="tests/golden/make_golden.py")
    table = hardest_neighbours(clf, comm, K)     # (N, K), from the initial W
    for lr in LRS:
        x = g.normal(size=(B, 3, 8, 8))          # (B, 3, 8, 8)
        ids = g.permutation(N)[:B]               # (B,)
        targets = target_entries(ids, N, table, ALPHA)
        rec.begin()
        out_ = forward_backward(net, clf, x, ids, comm, targets)
        rec.record(x, ids, out_, lr, targets)
        update(net, comm, net_opt, clf_opt, lr)
        rec.end()
    return Path(out)


def compress(path):
    """Rewrite every .npz of a trace compressed (np.load reads both kinds)."""
    for f in sorted(Path(path).glob("*.npz")):
        with np.load(f, allow_pickle=False) as z:
            arrays = {k: z[k] for k in z.files}
        np.savez_compressed(f, **arrays)


def main():
    tmp = HERE / "trace.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    record(tmp)
    compress(tmp)
    shutil.rmtree(TRACE, ignore_errors=True)
    tmp.rename(TRACE)
    size = sum(f.stat().st_size for f in TRACE.iterdir())
    print(f"wrote {TRACE} ({len(list(TRACE.iterdir()))} files, {size / 1024:.0f} KiB)")


if __name__ == "__main__":
    main()

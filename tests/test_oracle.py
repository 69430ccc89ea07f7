"""The oracle's traces without PyTorch: format, record, replay, compare, errors, interop.

A refimpl run is recorded through the library (``TraceRecorder``) and through
``refimpl-train --trace``; its tensors are checked against the dense
single-process classifier; replay reproduces it; compare names the first
planted difference and its constant ratio; bad traces are refused with the
key named. PyTorch traces are in test_oracle_torch.py, P-rank ones in
test_oracle_mpi.py, the golden files in test_oracle_golden.py.
"""
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from refimpl.backend import rng as make_rng
from refimpl.method.neighbours import hardest_neighbours
from refimpl.method.targets import target_entries
from refimpl.models import build_model
from refimpl.models.state_dict import export_torchvision
from refimpl.optim.sgd import SGD
from refimpl.oracle import (Trace, TraceError, TraceRecorder, compare_traces,
                            dense_cosine_softmax, format_trace_report, ratio_hint, replay)
from refimpl.oracle.trace import order_key, shard_checksums
from refimpl.params import is_bn_or_bias
from refimpl.parallel import CosineClassifier, SelfComm
from refimpl.train.step import forward_backward, update
from tolerances import INDEPENDENT32, LAYER64, ROUNDINGS64, SHORT64

ROOT = Path(__file__).resolve().parents[1]
from mpi_run import ENV  # noqa: E402  (one BLAS thread per rank)
N, D, B, K, ALPHA, TAU = 16, 16, 8, 3, 0.2, 0.15


def record(path, dtype=np.float64, groups=2, classifier="auto", steps=2, alpha=ALPHA,
           momentum=0.9, width=1):
    """Record ``steps`` refimpl steps into ``path``; returns what went in."""
    comm = SelfComm()
    net = build_model("resnet18", "cifar", width=width, head_hidden=8, dim=D, dtype=dtype)
    net.bn.groups = groups
    clf = CosineClassifier(N, D, comm, TAU, dtype)
    g = make_rng(1, "test")
    # rows of +-1/2 in 16 dimensions: cosines are exact multiples of 1/8 in any
    # precision, so their many ties are ties in float32 too
    clf.weight[...] = g.choice([-0.5, 0.5], size=(N, D))
    W0 = clf.weight.copy()
    net_opt = SGD(net.store.data, net.store.grad, 0.1, momentum, 5e-4,
                  decay_mask=net.store.decay_mask(is_bn_or_bias))
    clf_opt = SGD(clf.weight.ravel(), clf.grad.ravel(), 0.1, momentum, 5e-4)
    hp = {"alpha": alpha, "seed": 1}
    if alpha:
        hp.update(K=K, neighbours="initial_weight")
    rec = TraceRecorder(path, net, clf, net_opt, clf_opt, comm, hp, steps,
                        classifier=classifier)
    table = hardest_neighbours(clf, comm, K)
    batches = []
    for s in range(steps):
        x, ids = g.normal(size=(B, 3, 8, 8)).astype(dtype), g.permutation(N)[:B]
        targets = target_entries(ids, N, table, alpha) if alpha else None
        rec.begin()
        out = forward_backward(net, clf, x, ids, comm, targets)
        rec.record(x, ids, out, 0.1 / (s + 1), targets)
        update(net, comm, net_opt, clf_opt, 0.1 / (s + 1))
        rec.end()
        batches.append((x, ids, targets, out))
    return {"W0": W0, "table": table, "batches": batches, "net": net, "clf": clf}


@pytest.fixture(scope="module")
def traced(tmp_path_factory):
    path = tmp_path_factory.mktemp("trace") / "refimpl"
    return path, record(path)


def test_importing_the_oracle_does_not_import_torch():
    code = "import sys, refimpl.oracle, refimpl.oracle.__main__; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=ENV)
    assert out.returncode == 0 and out.stdout.strip() == "False", out.stderr


def test_trace_files_order_and_values(traced):
    """The files, the forward-then-backward order, and values checked against the dense
    classifier (loss, z_hat, row max, log-sum-exp, dz, dW) at 1e-12."""
    path, run = traced
    assert sorted(p.name for p in path.iterdir()) == ["classifier.npy", "init.npz", "meta.json",
                                                      "step_000000.npz", "step_000001.npz"]
    meta = json.loads((path / "meta.json").read_text())
    assert (meta["format"], meta["version"], meta["classifier"]) == ("refimpl-trace", 1, "full")
    hp = meta["hparams"]
    assert (hp["N"], hp["D"], hp["K"], hp["world_size"], hp["batch_size"]) == (N, D, K, 2, B)
    assert (hp["weight_decay_mask"], hp["bn"], hp["dtype"]) == ("no_bn_bias", "local", "float64")
    assert [s["lr"] for s in meta["steps"]] == [0.1, 0.05]
    t = Trace(path)
    assert t.hparams["arch"] == "resnet18" and t.hparams["width"] == 1  # read from init.npz
    init = t.init()
    assert "layer1.0.conv1.weight" in init and "head.1.running_var" in init
    assert not any(n.startswith("momentum/") for n in init)  # zero at the start: absent
    np.testing.assert_array_equal(t.classifier(), run["W0"])
    with np.load(path / "step_000000.npz") as z:
        names = z.files
    keys = [order_key(n, t.params, t.buffers) for n in names]
    assert keys == sorted(keys), "the file is not in forward-then-backward order"
    assert names[:9] == ["lr", "input", "ids", "neighbours", "z", "z_hat", "row_max",
                         "logsumexp", "loss"]
    assert names.index("grad/head.3.bias") < names.index("grad/conv1.weight")  # backward order
    assert names[-2:] == ["momentum/classifier.weight", "classifier.weight"]
    st = t.step(0)
    x, ids, targets, out = run["batches"][0]
    np.testing.assert_array_equal(st["ids"], ids)
    np.testing.assert_array_equal(st["neighbours"], run["table"][ids])
    loss, dz, dW, _ = dense_cosine_softmax(st["z"], ids, run["W0"], TAU, targets)
    # the sharded classifier against the dense one: sums over 16 classes in blocks
    assert abs(float(st["loss"]) - loss) < LAYER64 * abs(loss)
    np.testing.assert_allclose(st["dz"], dz, rtol=0, atol=LAYER64 * np.abs(dz).max())
    np.testing.assert_allclose(st["grad/classifier.weight"], dW, rtol=0,
                               atol=LAYER64 * np.abs(dW).max())
    # unit rows of D = 16: (D + 3) u = 2.1e-15
    np.testing.assert_allclose(np.linalg.norm(st["z_hat"], axis=1), 1.0, rtol=SHORT64)
    # logits recomputed: 16-term dot products, cond <= 10 at a row's largest:
    # sum_bound(16, 10) = 3.6e-14, and a 16-term sum of exponentials
    logits = st["z_hat"] @ (run["W0"] / np.linalg.norm(run["W0"], axis=1, keepdims=True)).T / TAU
    np.testing.assert_allclose(st["row_max"], logits.max(axis=1), rtol=1e-13)
    lse = logits.max(axis=1) + np.log(np.exp(logits - logits.max(axis=1, keepdims=True)).sum(1))
    np.testing.assert_allclose(st["logsumexp"], lse, rtol=1e-13)
    # after the step: SGD's first step from v = 0 gives v = g + wd p for decayed weights
    # (the same two or three roundings as refimpl's update: measured 0)
    g, p0 = st["grad/layer1.0.conv1.weight"], init["layer1.0.conv1.weight"]
    np.testing.assert_allclose(st["momentum/layer1.0.conv1.weight"], g + 5e-4 * p0, rtol=1e-13)
    np.testing.assert_allclose(st["layer1.0.conv1.weight"], p0 - 0.1 * (g + 5e-4 * p0),
                               rtol=1e-13)
    np.testing.assert_array_equal(st["momentum/bn1.bias"], st["grad/bn1.bias"])  # no decay
    assert int(st["bn1.num_batches_tracked"]) == 1


@pytest.mark.parametrize("free_run", [False, True])
def test_replay_reproduces_a_refimpl_trace(traced, tmp_path, free_run):
    path, _ = traced
    replay(path, tmp_path / "again", free_run=free_run)
    # recorded in this process by the same code: equal in fact (measured 0 on every
    # kernel); LAYER64 relative, SHORT64 for tensors that are 0 up to rounding
    result = compare_traces(tmp_path / "again", path, LAYER64, SHORT64)
    assert result["ok"], format_trace_report(result, True)
    assert result["count"] == 130 + 2 * 274 and result["first"] is None


def test_float32_trace_replays_in_float64_with_a_noise_floor(tmp_path):
    """A float32 trace: refimpl replays in float64; defaults rtol 1e-4, atol 1e-6.

    At width 1 some gradients are single numbers made of sums that cancel
    (a BatchNorm weight of one channel), and float32 gets ~3 digits of them
    right in any implementation: without the noise floor the report would
    call that a bug; with it (refimpl's own float32 error on the tensor, x 30)
    the trace passes, and the report says how many tensors needed it.
    """
    from refimpl.oracle import replay_and_compare
    record(tmp_path / "f32", dtype=np.float32)
    assert Trace(tmp_path / "f32").hparams["dtype"] == "float32"
    strict = replay_and_compare(tmp_path / "f32", out_dir=tmp_path / "ours", noise=False)
    assert Trace(tmp_path / "ours").hparams["dtype"] == "float64"
    assert (strict["rtol"], strict["atol"]) == (1e-4, 1e-6)  # the float32 defaults
    assert not strict["ok"] and strict["first"]["name"].startswith(("grad/", "momentum/"))
    # float32 rounding of a cancelling sum (measured up to 3.5e-3 over the kernel matrix),
    # not a convention bug (x P, 1/P, 1/B: >= 0.5); 5e-2 lies 10x from each
    assert strict["first"]["rel"] < 5e-2
    result = replay_and_compare(tmp_path / "f32")
    assert result["ok"], format_trace_report(result, True)
    rows = [r for _, rs in result["sections"] for r in rs]
    # the rows outside the float32 defaults (atol 1e-6, rtol INDEPENDENT32): the floor's
    floored = [r for r in rows if r["max_abs"] > 1e-6 + INDEPENDENT32 * r["scale"]]
    assert floored and all(r["max_abs"] <= 30 * r["noise"] for r in floored)
    assert "within the noise floor" in format_trace_report(result, True)


def test_rows_mode_touched_rows_and_checksums(tmp_path):
    run = record(tmp_path / "rows", classifier="rows")
    t = Trace(tmp_path / "rows")
    st = t.step(0)
    _, ids, targets, _ = run["batches"][0]
    rows = np.unique(targets[0])
    np.testing.assert_array_equal(st["classifier.rows"], rows)
    assert "grad/classifier.weight" not in st and "classifier.weight" not in st
    full = record(tmp_path / "full")
    sf = Trace(tmp_path / "full").step(0)
    np.testing.assert_array_equal(st["grad/classifier.weight@rows"],
                                  sf["grad/classifier.weight"][rows])
    np.testing.assert_array_equal(st["classifier.weight@rows"], sf["classifier.weight"][rows])
    W = sf["classifier.weight"]
    want = [[W[a:c].sum(), np.square(W[a:c]).sum()] for a, c in ((0, 8), (8, 16))]
    # np.sum of the same rows in the same order: equal
    np.testing.assert_allclose(st["checksum/classifier.weight"], want, rtol=ROUNDINGS64)
    np.testing.assert_allclose(shard_checksums(W, 0, N, 2), want, rtol=ROUNDINGS64)
    assert full["clf"].num_classes == N
    replay(tmp_path / "rows", tmp_path / "again")
    result = compare_traces(tmp_path / "again", tmp_path / "rows", LAYER64, SHORT64)  # as above
    assert result["ok"], format_trace_report(result, True)


def corrupt(src, dst, step=0, **changes):
    """A copy of a trace with tensors of one step replaced (None deletes)."""
    shutil.copytree(src, dst)
    f = dst / f"step_{step:06d}.npz"
    with np.load(f) as z:
        arrays = {k: z[k] for k in z.files}
    for k, v in changes.items():
        k = k.replace("__", "/").replace("_DOT_", ".")
        if v is None:
            del arrays[k]
        else:
            arrays[k] = v(arrays[k]) if callable(v) else v
    np.savez(f, **arrays)
    return dst


def cli(*args):
    return subprocess.run([sys.executable, "-m", "refimpl.oracle", *map(str, args)],
                          capture_output=True, text=True, env=ENV, cwd=ROOT, timeout=120)


def test_compare_cli_names_the_first_divergence_and_the_ratio(traced, tmp_path):
    path, _ = traced
    same = cli("compare", path, path)
    assert same.returncode == 0 and "result: all 678 tensors agree" in same.stdout
    bad = corrupt(path, tmp_path / "bad", 0, dz=lambda a: 2 * a,
                  **{"grad__head_DOT_3_DOT_weight": lambda a: 2 * a})
    proc = cli("compare", path, bad, "--rtol", "1e-9", "--atol", "1e-12")
    assert proc.returncode == 1, proc.stderr
    out = proc.stdout
    assert "first divergence: step 0, dz (backward)" in out
    assert "is 2 x" in out and "(P = 2, the world size)" in out
    line = next(x for x in out.splitlines() if x.strip().startswith("dz "))
    assert "MISMATCH" in line and "(8, 16)" in line
    assert out.rstrip().endswith("result: 2 of 678 tensors differ")
    quiet = cli("compare", path, bad, "-q")
    assert len(quiet.stdout.splitlines()) < len(out.splitlines()) - 200


def test_ratio_hints_for_every_named_constant():
    g = np.random.default_rng(0)
    ref = g.normal(size=(6, 5))
    P, Bt = 4, 32
    for factor, words in [(4, "P = 4, the world size"), (1 / 4, "1/P = 1/4"),
                          (32, "B = 32, the global batch"), (1 / 32, "1/B = 1/32"),
                          (8, "b = B/P = 8, the local batch"), (-1, "-1")]:
        hint = ratio_hint("dz", ref, factor * ref, P, Bt, ("refimpl", "yours"))
        assert hint.startswith(f"dz: yours is {factor:.6g} x refimpl's ({words})"), hint
    assert "constant 3 x" in ratio_hint("dz", ref, 3 * ref, P, Bt)
    assert ratio_hint("dz", ref, ref + 1e-3 * g.normal(size=ref.shape), P, Bt) is None
    assert ratio_hint("loss", np.array(2.0), np.array(6.0), P, Bt) is None  # a scalar, 3x
    assert "P = 4" in ratio_hint("loss", np.array(2.0), np.array(8.0), P, Bt)
    # any constant the constancy test resolves (|c - 1| > 10 x spread), not only >= 1%
    assert "constant 1.001 x" in ratio_hint("dz", ref, 1.001 * ref, P, Bt)
    assert ratio_hint("dz", ref, (1 + 5e-6) * ref, P, Bt) is None
    # no hint on a tensor that is zero up to the tolerance's atol (rounding noise)
    assert ratio_hint("grad/head.0.bias", 1e-17 * ref, 2e-17 * ref, P, Bt, zero=1e-12) is None


def edit_meta(src, dst, **hp):
    shutil.copytree(src, dst)
    meta = json.loads((dst / "meta.json").read_text())
    for k, v in hp.items():
        if v is None:
            del meta["hparams"][k]
        else:
            meta["hparams"][k] = v
    (dst / "meta.json").write_text(json.dumps(meta))
    return dst


@pytest.mark.parametrize("hp,message", [
    ({"tau": None}, "hparams['tau'] is missing (the temperature"),
    ({"K": None}, "hparams['K'] is missing (hardest classes per instance"),
    ({"bn": "group"}, "hparams['bn'] = 'group': must be 'local' or 'sync'"),
    ({"batch_size": 7}, "hparams['batch_size'] = 7: is not divisible by world_size = 2"),
    ({"dim": 8}, "hparams['dim'] = 8: contradicts D = 16"),
    ({"width": 2}, "hparams['width'] = 2 contradicts init.npz, whose shapes say 1"),
    ({"D": 9, "dim": None}, "hparams['D'] = 9 but head.3.weight has 16 outputs"),
    ({"dtype": "float32"}, "is float64 but the run's dtype is float32: a run has ONE dtype"),
    ({"momentum": "0.9"}, "hparams['momentum'] must be a float, got '0.9'"),
    ({"lr_scale": 2.0}, "unknown hparams key 'lr_scale'"),
])
def test_bad_metadata_names_the_key(traced, tmp_path, hp, message):
    path, _ = traced
    with pytest.raises(TraceError) as e:
        Trace(edit_meta(path, tmp_path / "bad", **hp))
    assert message in str(e.value)


@pytest.mark.parametrize("changes,message", [
    ({"input": None}, "the input 'input' is missing"),
    ({"ids": lambda a: a[:4]}, "ids must be (8,) integers"),
    ({"neighbours": lambda a: a[:, :2]}, "neighbours must be (8, K = 3) integers"),
    ({"z": lambda a: a.astype(np.float32)}, "z is float32 but the run's dtype is float64"),
    ({"features": np.zeros(3)}, "unknown tensor name 'features'"),
])
def test_bad_step_files_are_refused(traced, tmp_path, changes, message):
    path, _ = traced
    bad = corrupt(path, tmp_path / "bad", 0, **changes)
    with pytest.raises(TraceError) as e:
        Trace(bad).step(0)
    assert message in str(e.value)
    proc = cli("replay", bad)
    assert proc.returncode == 2 and message in proc.stderr and "Traceback" not in proc.stderr


def test_replay_refuses_what_refimpl_cannot_reproduce(traced, tmp_path):
    path, _ = traced
    with pytest.raises(TraceError, match="hparams\\['bn_momentum'\\] = 0.01, but refimpl's "
                                         "BatchNorm uses 0.1"):
        replay(edit_meta(path, tmp_path / "m", bn_momentum=0.01), tmp_path / "out")
    from refimpl.oracle.replay import build_from_trace

    class FakeComm(SelfComm):
        size = 4
    with pytest.raises(TraceError, match="recorded on P = 2 ranks with local BatchNorm: replay "
                                         "it on 2 ranks or on 1 \\(not 4\\)"):
        build_from_trace(Trace(path), FakeComm())


def test_one_dtype_for_the_whole_run(tmp_path):
    """A float64 network with a float32 classifier is refused by the step and the recorder."""
    comm = SelfComm()
    net = build_model("resnet18", "cifar", width=1, head_hidden=8, dim=D, dtype=np.float64)
    clf = CosineClassifier(N, D, comm, TAU, np.float32)
    net_opt = SGD(net.store.data, net.store.grad, 0.1, 0.9)
    clf_opt = SGD(clf.weight.ravel(), clf.grad.ravel(), 0.1, 0.9)
    with pytest.raises(TraceError, match="classifier.weight is float32 but the run's dtype is "
                                         "float64: a run has ONE dtype"):
        TraceRecorder(tmp_path / "t", net, clf, net_opt, clf_opt, comm)
    x = np.zeros((B, 3, 8, 8))
    with pytest.raises(ValueError, match="z and w must have one dtype, got float64 and float32"):
        forward_backward(net, clf, x, np.arange(B), comm)


TINY = ["train=synthetic:n=48,size=8,classes=4,seed=0", "width=1", "head_hidden=8", "dim=8",
        "batch_size=8", "epochs=1", "warmup_epochs=0", "k=3", "lr=0.1", "smooth_from_epoch=0",
        "knn_k=[5]", "eval_every=0", "dtype=float64"]


def train(*args):
    return subprocess.run([sys.executable, "-m", "refimpl.train", *map(str, args)],
                          capture_output=True, text=True, env=ENV, cwd=ROOT, timeout=300)


def test_refimpl_train_trace_replays(tmp_path):
    proc = train(*TINY, f"out={tmp_path / 'run'}", "--trace", tmp_path / "trace",
                 "--trace-steps", 2)
    assert proc.returncode == 0, proc.stderr[-3000:]
    t = Trace(tmp_path / "trace")
    assert len(t.steps) == 2 and t.meta["producer"].endswith("(refimpl-train)")
    hp = t.hparams
    assert (hp["N"], hp["batch_size"], hp["neighbours"], hp["weight_decay_mask"]) == \
        (48, 8, "initial_weight", "no_bn_bias")
    st = t.step(1)
    metrics = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    step1 = next(m for m in metrics if m.get("kind") == "step" and m["step"] == 1)
    assert st["neighbours"].shape == (8, 3) and float(st["lr"]) == step1["lr"] < 0.1  # cosine
    assert float(st["loss"]) == pytest.approx(step1["loss"], rel=LAYER64)  # one run's loss, twice
    rep = cli("replay", tmp_path / "trace", "-q")
    assert rep.returncode == 0, rep.stdout[-3000:] + rep.stderr[-2000:]
    assert rep.stdout.rstrip().endswith("result: all 678 tensors agree")
    bad = train(*TINY, f"out={tmp_path / 'run2'}", "--trace", tmp_path / "t2",
                "--trace-steps", 0)
    assert bad.returncode == 2 and "--trace-steps must be >= 1" in bad.stderr


def test_init_encoder_starts_the_run_from_torchvision_names(tmp_path):
    from refimpl.train.config import ConfigError, load_config
    from refimpl.train.loop import Trainer
    donor = build_model("resnet18", "cifar", width=1, head_hidden=8, dim=8, seed=7)
    weights = export_torchvision(donor)
    extra = {"fc.weight": np.zeros((10, 8)), "fc.bias": np.zeros(10),
             "head.0.weight": np.ones((8, 8))}   # torchvision's fc and a head are ignored
    np.savez(tmp_path / "enc.npz", **weights, **extra)
    cfg = load_config(None, TINY + [f"out={tmp_path / 'run'}",
                                    f"init_encoder={tmp_path / 'enc.npz'}"])
    trainer = Trainer(cfg, SelfComm(), log=lambda s: None)
    for name, value in weights.items():
        np.testing.assert_array_equal(trainer.net.store.state_dict()[name], value)
    fresh = build_model("resnet18", "cifar", width=1, head_hidden=8, dim=8, dtype="float64")
    np.testing.assert_array_equal(trainer.net.store.params["head.0.weight"],
                                  fresh.store.params["head.0.weight"])  # the head is not loaded
    wrong = {k: v for k, v in weights.items() if k != "layer4.1.bn2.bias"}
    np.savez(tmp_path / "missing.npz", **wrong)
    cfg = load_config(None, TINY + [f"init_encoder={tmp_path / 'missing.npz'}"])
    with pytest.raises(ConfigError, match="init_encoder: load_state_dict: missing keys: "
                                          "layer4.1.bn2.bias"):
        Trainer(cfg, SelfComm(), log=lambda s: None)
    proc = train(*TINY, f"out={tmp_path / 'r'}", "init_encoder=weights.h5")
    assert proc.returncode == 2 and "init_encoder must be a .pt or .npz" in proc.stderr
    proc = train(*TINY, f"out={tmp_path / 'r'}", f"init_encoder={tmp_path / 'no.npz'}")
    assert proc.returncode == 2 and "init_encoder: no such file" in proc.stderr

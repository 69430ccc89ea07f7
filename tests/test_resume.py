"""Checkpoints and resume: exact continuation on the same P (the same machine, kernel and
thread count: the same bits), 1e-10 on another P (tests/tolerances.py, INDEPENDENT64),
clear errors for checkpoints that do not fit or are damaged, atomic saves,
export, a NaN that stops the run, signals.

Tiny runs (see test_train.py); P-rank runs under mpirun.
"""
import json
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from refimpl import checkpoint
from test_train import ENV, ROOT, TINY, final_checkpoint, state_errors, train
from tolerances import INDEPENDENT64

pytestmark = pytest.mark.mpi
EXACT = [*TINY, "dtype=float64", "epochs=3", "eval_every=0", "keep=5"]


def step_losses(run):
    return [json.loads(x)["loss"] for x in (run / "metrics.jsonl").read_text().splitlines()
            if json.loads(x)["kind"] == "step"]


def same_state(a, b, exact=True, tol=INDEPENDENT64):
    """Every saved tensor of run a's and run b's final checkpoints: bitwise equal
    (exact) or within tol (``test_train.state_errors``)."""
    ra, Wa, Ma, meta_a = final_checkpoint(a)
    rb, Wb, Mb, meta_b = final_checkpoint(b)
    assert meta_a["state"] == meta_b["state"]
    if exact:
        pairs = [(k, ra[k], rb[k]) for k in ra] + [("W", Wa, Wb), ("momentum", Ma, Mb)]
        for name, x, y in pairs:
            assert np.array_equal(x, y), f"{name} differs"
    else:
        errors = state_errors(a, b)
        worst = max(errors, key=errors.get)
        assert errors[worst] <= tol, f"{worst}: {errors[worst]:.3e}"


def test_resume_same_P_is_bitwise(tmp_path):
    """P = 2 -> P = 2 from the epoch-1 checkpoint: parameters, momenta, BN statistics,
    W, sampler position and the loss curve bitwise equal to the uninterrupted run."""
    full, part = tmp_path / "full", tmp_path / "part"
    assert train(*EXACT, f"out={full}", ranks=2).returncode == 0
    assert train(*EXACT, f"out={part}", "epochs=3", ranks=2).returncode == 0
    # go back to the first checkpoint, as if the run had died after epoch 1
    first = checkpoint.list_checkpoints(part)[0]
    (part / "latest").write_text(first.name + "\n")
    for later in checkpoint.list_checkpoints(part)[1:]:
        import shutil
        shutil.rmtree(later)
    proc = train(*EXACT, f"out={part}", "--resume", "auto", ranks=2)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert f"resumed from {first}" in proc.stdout
    same_state(full, part, exact=True)
    assert step_losses(full) == step_losses(part)  # the loss curve, bitwise, no duplicates


def test_resume_on_another_P(tmp_path):
    """P = 3 -> P = 2 with sync BN: within 1e-10 of the uninterrupted P = 3 run (measured
    1e-14 over the kernel matrix).
    (Width 4 and lr 0.05, as test_train's P = 2 vs 1: rounding grows slowly.)"""
    common = [*EXACT, "bn=sync", "batch_size=12", "width=4", "lr=0.05"]
    full, part = tmp_path / "full", tmp_path / "part"
    assert train(*common, f"out={full}", ranks=3).returncode == 0
    assert train(*common, f"out={part}", "epochs=3", ranks=3).returncode == 0
    first = checkpoint.list_checkpoints(part)[0]
    proc = train(*common, f"out={part}", "--resume", str(first), ranks=2)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert json.loads((part / (part / "latest").read_text().strip() / "meta.json")
                      .read_text())["world_size"] == 2
    same_state(full, part, exact=False)


def test_checkpoint_that_does_not_fit_or_is_damaged(tmp_path):
    run = tmp_path / "run"
    assert train(*EXACT, f"out={run}", "epochs=1").returncode == 0
    ckpt = checkpoint.latest_checkpoint(run)
    proc = train(*EXACT, f"out={run}", "width=4", "--resume", str(ckpt))
    assert proc.returncode == 2 and "width: checkpoint 2, config 4" in proc.stderr
    proc = train(*EXACT, f"out={run}", "dtype=float32", "train=synthetic:n=40,size=8,classes=4",
                 "--resume", str(ckpt))
    assert "dtype: checkpoint 'float64', config 'float32'" in proc.stderr
    assert "N (instances): checkpoint 48, training set 40" in proc.stderr
    # a fresh start into a run directory with checkpoints would overwrite them
    config_before = (run / "config.toml").read_text()
    proc = train(*EXACT, f"out={run}")
    assert proc.returncode == 2 and "already holds checkpoints (latest: ckpt-000000006)" \
        in proc.stderr and "--resume auto" in proc.stderr
    assert (run / "config.toml").read_text() == config_before  # nothing touched
    # a truncated classifier file is named, never silently re-initialized
    weight = ckpt / "classifier.weight.npy"
    data = weight.read_bytes()
    weight.write_bytes(data[:-100])
    proc = train(*EXACT, f"out={run}", "--resume", str(ckpt))
    assert proc.returncode == 2
    assert f"{weight}: checksum mismatch" in proc.stderr and "Traceback" not in proc.stderr
    weight.write_bytes(data)
    (ckpt / "meta.json").write_text("{not json")
    proc = train(*EXACT, f"out={run}", "--resume", str(ckpt))
    assert "meta.json: not valid JSON" in proc.stderr


def test_stale_temporaries_removed_and_keep(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    stale = run / ".tmp-ckpt-000000006"
    stale.mkdir()
    (stale / "classifier.weight.npy").write_bytes(b"half")
    proc = train(*EXACT, f"out={run}", "keep=2")
    assert proc.returncode == 0 and "removed .tmp-ckpt-000000006" in proc.stdout
    assert not stale.exists()
    names = [p.name for p in checkpoint.list_checkpoints(run)]
    assert names == ["ckpt-000000012", "ckpt-000000018"]  # the last 2 of 3
    assert (run / "latest").read_text().strip() == "ckpt-000000018"
    assert not list(run.glob(".tmp-*"))


def test_export_torchvision_names(tmp_path):
    run = tmp_path / "run"
    assert train(*EXACT, f"out={run}", "epochs=1").returncode == 0
    out = tmp_path / "net.npz"
    proc = subprocess.run([sys.executable, "-m", "refimpl.checkpoint", str(run), str(out),
                           "--classifier"], capture_output=True, text=True, env=ENV, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr
    with np.load(out) as z:
        keys = list(z.files)
        W = z["classifier.weight"]
    assert "conv1.weight" in keys and "layer4.1.bn2.num_batches_tracked" in keys
    assert "head.3.bias" in keys and not any(k.startswith("momentum/") for k in keys)
    np.testing.assert_array_equal(W, final_checkpoint(run)[1])
    torch = pytest.importorskip("torch")
    pt = tmp_path / "net.pt"
    proc = subprocess.run([sys.executable, "-m", "refimpl.checkpoint", str(run), str(pt)],
                          capture_output=True, text=True, env=ENV, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr
    sd = torch.load(pt)
    assert list(sd)[0] == "conv1.weight" and sd["conv1.weight"].dtype == torch.float64


def test_nan_loss_stops_the_run_and_keeps_the_last_checkpoint(tmp_path):
    """A learning rate that blows the weights up: the loss turns NaN at some
    step; the run names the step and the rank-0 batch ids, exits 3, and the
    checkpoint of the last good epoch stays the latest."""
    run = tmp_path / "run"
    proc = train(*TINY, f"out={run}", "epochs=3", "lr=1e38", "warmup_epochs=0", "alpha=0",
                 ranks=2)
    assert proc.returncode == 3, proc.stderr[-2000:]
    assert "refimpl-train: stopped: the loss is nan at step" in proc.stderr
    assert "rank-0 batch ids [" in proc.stderr
    assert proc.stderr.count("refimpl-train: stopped") == 1 and "Traceback" not in proc.stderr
    latest = checkpoint.latest_checkpoint(run)
    if latest is not None:
        checkpoint.verify(latest)


def launch(args, ranks):
    """Start refimpl-train in its own process group; returns the Popen."""
    from refimpl.parallel.launch import mpirun_command
    argv = ["-m", "refimpl.train", *map(str, args)]
    cmd = [sys.executable, *argv] if ranks is None else mpirun_command(ranks, *argv)
    return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env=ENV, cwd=ROOT, start_new_session=True)


def wait_for_step(run, step, proc, timeout=120):
    """Block until metrics.jsonl has a record of ``step`` (the run is training)."""
    start = time.monotonic()
    while time.monotonic() - start < timeout:
        m = run / "metrics.jsonl"
        if m.exists() and any(json.loads(x).get("step", -1) >= step
                              for x in m.read_text().splitlines() if x.strip()):
            return
        assert proc.poll() is None, proc.communicate()
        time.sleep(0.05)
    raise AssertionError("the run never reached step %d" % step)


@pytest.mark.parametrize("ranks,signum,save", [(None, signal.SIGINT, True),
                                               (2, signal.SIGUSR1, True),
                                               (2, signal.SIGTERM, False)],
                         ids=["alone-SIGINT-save", "mpirun-SIGUSR1-save", "mpirun-SIGTERM"])
def test_signals_stop_every_rank_with_one_message(tmp_path, ranks, signum, save):
    run = tmp_path / "run"
    args = [*TINY, f"out={run}", "epochs=200", "eval_every=0", "save_every=0"]
    proc = launch(args + (["--save-on-interrupt"] if save else []), ranks)
    wait_for_step(run, 3, proc)
    start = time.monotonic()
    proc.send_signal(signum)
    out, err = proc.communicate(timeout=60)
    assert time.monotonic() - start < 30
    assert proc.returncode != 0
    assert "Traceback" not in err and "KeyboardInterrupt" not in err
    if save:
        name = signal.Signals(signum).name
        assert err.count(f"refimpl-train: {name} received") == 1
        assert err.count("refimpl-train: interrupted:") == 1
        assert proc.returncode == 128 + signum
        ckpt = checkpoint.latest_checkpoint(run)
        meta = checkpoint.verify(ckpt)
        assert meta["state"]["step"] >= 3 and f"checkpoint {ckpt}" in err


def tree(run):
    """{relative path: bytes} of every file under run: to show that nothing changed."""
    return {str(p.relative_to(run)): p.read_bytes() for p in sorted(run.rglob("*"))
            if p.is_file()}


def refused(proc, message):
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert proc.stderr.startswith(f"refimpl-train: error: {message}"), proc.stderr[-3000:]
    assert proc.stderr.count("\n") == 1 and "Traceback" not in proc.stderr


def test_a_damaged_run_is_never_written_over(tmp_path):
    """meta.json files deleted (all, or the latest's), listing no files, a checkpoint
    folder replaced by a file, a `latest` that is not text: each start is refused in one
    line naming the folder, and the run directory is left as it was."""
    run = tmp_path / "run"
    assert train(*EXACT, f"out={run}", "epochs=2").returncode == 0
    first, second = checkpoint.list_checkpoints(run)
    metas = {c: (c / "meta.json").read_bytes() for c in (first, second)}
    (second / "meta.json").unlink()
    before = tree(run)
    refused(train(*EXACT, f"out={run}", "--resume", "auto"),
            f"{second}: not a complete checkpoint (no meta.json; an interrupted save leaves "
            f"only a .tmp-* directory); --resume will not pass over it: move {second.name} out "
            f"of {run} (--resume auto then continues from {first.name})")
    (first / "meta.json").unlink()
    refused(train(*EXACT, f"out={run}"), f"{run} already holds checkpoint folders that do not "
                                         f"verify ({first.name}, {second.name})")
    refused(train(*EXACT, f"out={run}", "--resume", "auto"), f"{second}: not a complete "
                                                              f"checkpoint")
    assert tree(run) == {k: v for k, v in before.items() if k != f"{first.name}/meta.json"}
    for c, meta in metas.items():
        (c / "meta.json").write_bytes(meta)
    weight = second / "classifier.weight.npy"  # a flipped bit, and a meta.json listing nothing
    weight.write_bytes(weight.read_bytes()[:-1] + bytes([weight.read_bytes()[-1] ^ 1]))
    meta = json.loads(metas[second])
    (second / "meta.json").write_text(json.dumps({**meta, "files": {}}))
    refused(train(*EXACT, f"out={run}", "--resume", str(second)),
            f"{second / 'meta.json'}: does not list replicated.npz, classifier.weight.npy, "
            f"classifier.momentum.npy")
    (run / "latest").write_bytes(b"\xff\xfe\n")
    refused(train(*EXACT, f"out={run}", "--resume", "auto"),
            f"{run / 'latest'}: cannot be read as a checkpoint's name (UnicodeDecodeError)")
    (run / "latest").write_text(f"{second.name}\n")
    import shutil
    shutil.rmtree(second)
    second.write_text("a file where a checkpoint was")
    before = tree(run)
    refused(train(*EXACT, f"out={run}", "--resume", "auto"),
            f"{second}: not a checkpoint (a file, not a folder); --resume will not pass over it")
    assert tree(run) == before and not list(run.glob(".tmp-*"))


def test_resume_with_another_batch_size(tmp_path):
    """Refused in the middle of an epoch (the epoch's position would be counted in other
    batches); at an epoch boundary allowed, said, and the schedule goes on by epoch."""
    run = tmp_path / "run"
    assert train(*EXACT, f"out={run}", "epochs=1").returncode == 0
    ckpt = checkpoint.latest_checkpoint(run)
    meta = json.loads((ckpt / "meta.json").read_text())
    mid = run / "ckpt-000000003"  # the same files, as if saved after step 3 of epoch 1
    import shutil
    shutil.copytree(ckpt, mid)
    (mid / "meta.json").write_text(json.dumps(
        {**meta, "state": {**meta["state"], "epoch": 0, "step_in_epoch": 3, "step": 3}}))
    refused(train(*EXACT, f"out={tmp_path / 'other'}", "batch_size=16", "--resume", str(mid)),
            f"{mid} was saved in the middle of epoch 1 (after step 3 of it) with batch_size 8: "
            f"resuming with batch_size 16 would count the epoch's position in other batches; "
            f"resume with batch_size=8, or from a checkpoint at the end of an epoch")
    shutil.rmtree(mid)
    proc = train(*EXACT, f"out={run}", "--resume", str(ckpt), "batch_size=16", "epochs=2")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert ("batch_size 8 -> 16 at the start of epoch 2: 3 steps per epoch; the learning-rate "
            "schedule continues at its step 3 of 6") in proc.stdout
    records = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in records if r["kind"] == "step"]
    assert [r["step"] for r in steps] == list(range(9))  # 6 of B = 8, then 3 of B = 16
    # the schedule in B = 16 steps (6 in all, warm-up round(0.5 * 3) = 2): epoch 2 starts
    # at its step 3, not at step 6 (the end)
    assert steps[6]["lr"] == pytest.approx(0.1 * (1 + np.cos(np.pi * (3 - 2) / (6 - 2))) / 2)
    assert checkpoint.latest_checkpoint(run).name == "ckpt-000000009"


def test_resume_takes_a_run_directory_and_overrides_in_any_position(tmp_path):
    """--resume RUN_DIR was refused as an interrupted save; key=value after --resume gave
    "unrecognized arguments"."""
    run = tmp_path / "run"
    assert train(*EXACT, f"out={run}", "epochs=1").returncode == 0
    proc = train(*EXACT, "--resume", str(run), f"out={run}", "epochs=2")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert f"resumed from {run / 'ckpt-000000006'}: epoch 2, step 6" in proc.stdout
    assert checkpoint.latest_checkpoint(run).name == "ckpt-000000012"
    refused(train(*EXACT, "--resume", str(tmp_path / "nothing"), f"out={run}"),
            f"{tmp_path / 'nothing'}: no such checkpoint or run directory")


def test_eval_arguments_out_of_range_are_one_line(tmp_path):
    """refimpl-eval: the message was right but inside two tracebacks; --temperature 0 was
    silently replaced by 0.07."""
    run = tmp_path / "run"
    assert train(*EXACT, f"out={run}", "epochs=1").returncode == 0

    def evaluate(*args):
        return subprocess.run([sys.executable, "-m", "refimpl.evaluate", str(run), *args],
                              capture_output=True, text=True, env=ENV, cwd=ROOT, timeout=120)
    for args, message in ((["--knn-k", "0"], "--knn-k must be >= 1, got [0]"),
                          (["--temperature", "-1"], "--temperature must be > 0 and finite, got "
                                                    "-1.0"),
                          (["--temperature", "0"], "--temperature must be > 0 and finite, got "
                                                   "0.0"),
                          (["--batch-size", "0"], "--batch-size must be >= 1, got 0"),
                          (["--knn-k", "1000"], "--knn-k 1000 is more than the bank's 48 images "
                                                "(the train split)")):
        proc = evaluate(*args)
        assert proc.returncode == 2, proc.stderr[-2000:]
        assert proc.stderr == f"refimpl-eval: error: {message}\n"
    proc = evaluate("--knn-k", "5", "--temperature", "0.5")
    assert proc.returncode == 0 and "kNN encoder (pooled)  @5 " in proc.stdout, proc.stderr

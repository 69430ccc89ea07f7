"""refimpl-finetune end to end on tiny runs: from a refimpl-train run, P = 2 = P = 1,
every bad input with one message and exit 2, resume, a NaN, a signal.

A tiny phase-1 run (test_train.py's ResNet-18 at width 2, 8 x 8 synthetic
images, 48 instances of 4 classes, float64) is trained once per module; the
fine-tunes start from it with half of the labels (24 images, 3 steps of
B = 8 per epoch). The P-rank runs use the real launcher (mpirun).
"""
import json
import signal
import subprocess
import sys

import numpy as np
import pytest

from refimpl import checkpoint
from refimpl.parallel.launch import mpirun_command, run_mpirun
from test_resume import launch, wait_for_step
from test_train import ENV, ROOT, TINY, train
from tolerances import STEPS64

DATA = ["train=synthetic:n=48,size=8,classes=4,seed=0",
        "test=synthetic:n=24,size=8,classes=4,seed=1"]
FT = [*DATA, "labels=0.5", "batch_size=8", "epochs=2", "warmup_epochs=0.5", "dtype=float64",
      "lr_fc=0.1", "lr_encoder=0.02", "log_every=2"]


def finetune(*args, ranks=None, timeout=300):
    """refimpl-finetune (python -m refimpl.finetune) alone or under mpirun -np ranks."""
    argv = ["-m", "refimpl.finetune", *map(str, args)]
    if ranks is not None:
        return run_mpirun(mpirun_command(ranks, *argv), timeout=timeout, env=ENV, cwd=ROOT)
    return subprocess.run([sys.executable, *argv], capture_output=True, text=True,
                          timeout=timeout, env=ENV, cwd=ROOT)


@pytest.fixture(scope="module")
def pretrained(tmp_path_factory):
    """A refimpl-train run directory (1 epoch, float64) to fine-tune from."""
    run = tmp_path_factory.mktemp("pretrain") / "run"
    proc = train(*TINY, "epochs=1", "eval_every=0", "dtype=float64", f"out={run}")
    assert proc.returncode == 0, proc.stderr[-3000:]
    return run


def final_state(run):
    """(replicated arrays, meta) of a run directory's latest checkpoint."""
    ckpt = checkpoint.latest_checkpoint(run)
    with np.load(ckpt / "replicated.npz") as z:
        return {k: z[k] for k in z.files}, json.loads((ckpt / "meta.json").read_text())


def records(run, kind):
    return [r for r in map(json.loads, (run / "metrics.jsonl").read_text().splitlines())
            if r["kind"] == kind]


def test_finetune_a_train_run(pretrained, tmp_path):
    run = tmp_path / "ft"
    proc = finetune(*FT, f"init={pretrained}", f"out={run}")
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = proc.stdout
    for line in (f"fine-tuning resnet18 width 2 from the encoder of {pretrained}/ckpt-000000006",
                 "its head and instance classifier dropped",
                 "C = 4 classes; 24 of 48 training images labeled (labels = 0.5, 6-6 per class); "
                 "3 steps of B = 8 per epoch on 1 rank(s)",
                 "epoch 2/2: loss", "test top-1", "summary (encoder + FC trained",
                 f"run directory: {run.resolve()}"):
        assert line in out, line
    subset = json.loads((run / "label_subset.json").read_text())
    assert subset["num_labeled"] == 24 and subset["per_class"] == [6, 6, 6, 6]
    assert len(subset["ids"]) == 24 and subset["fraction"] == 0.5 and subset["seed"] == 0
    steps, epochs = records(run, "step"), records(run, "epoch")
    assert [r["step"] for r in steps] == list(range(6)) and len(epochs) == 2
    assert steps[0]["lr_fc"] == pytest.approx(0.1 * 0.1)  # warm-up from 0.1 x lr
    assert steps[0]["lr_encoder"] == pytest.approx(0.1 * 0.02)
    assert all(0 <= e["test_top1"] <= e["test_top5"] == 1 for e in epochs)  # C = 4 <= 5
    assert (run / "curves.png").stat().st_size > 10_000
    config = (run / "config.toml").read_text()  # the architecture taken from the checkpoint
    assert 'arch = "resnet18"' in config and "width = 2" in config
    arrays, meta = final_state(run)
    assert meta["kind"] == "finetune" and meta["num_classes"] == 4 and meta["state"]["step"] == 6
    assert arrays["fc.weight"].shape == (4, 16) and "momentum/conv1.weight" in arrays
    assert not any(k.startswith(("head.", "classifier")) for k in arrays)


def test_unset_train_and_test_are_the_pretraining_runs(pretrained, tmp_path):
    run = tmp_path / "ft"
    proc = finetune(*FT[len(DATA):], "epochs=1", f"init={pretrained}", f"out={run}")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "C = 4 classes; 24 of 48 training images labeled" in proc.stdout
    config = (run / "config.toml").read_text()
    for spec in DATA:  # the same data as test_train's TINY: written out in full
        key, value = spec.split("=", 1)
        assert f'{key} = "{value}"' in config, (spec, config)
    bad = finetune("init=scratch", "labels=0.5", f"out={tmp_path / 'none'}")
    assert bad.returncode == 2 and "train: no training set given" in bad.stderr


def test_a_run_directory_in_use_is_refused_and_released_at_the_end(pretrained, tmp_path):
    from refimpl.rundir import RunLock
    run = tmp_path / "ft"
    run.mkdir()
    with RunLock(run):  # another run holds it
        proc = finetune(*FT, f"init={pretrained}", f"out={run}")
    assert proc.returncode == 2 and f"{run} is in use by another run" in proc.stderr, proc.stderr
    assert proc.stderr.count("refimpl-finetune: error:") == 1 and "Traceback" not in proc.stderr
    proc = finetune(*FT, f"init={pretrained}", f"out={run}", "epochs=1")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert not (run / "lock").exists()  # released when the run ended
    assert (run / "config.toml").read_text().startswith("# made with refimpl ")


def test_frozen_encoder_keeps_the_pretrained_encoder_and_exports(pretrained, tmp_path):
    """freeze_encoder: the encoder (BatchNorm statistics included) is the pretraining
    checkpoint's, bit for bit, after training; only fc.* moved. refimpl-export writes
    the result under torchvision's names, fc included."""
    run = tmp_path / "frozen"
    proc = finetune(*FT, f"init={pretrained}", "freeze_encoder=true", f"out={run}")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "encoder frozen (eval-mode BN), FC trained" in proc.stdout
    arrays, _ = final_state(run)
    before, _ = final_state(pretrained)
    encoder = [k for k in arrays if not k.startswith(("fc.", "momentum/"))]
    assert len(encoder) == 122 - 2  # torchvision's resnet18 without fc
    for k in encoder:
        np.testing.assert_array_equal(arrays[k], before[k], err_msg=k)
    assert sorted(k for k in arrays if k.startswith("momentum/")) == ["momentum/fc.bias",
                                                                     "momentum/fc.weight"]
    out = tmp_path / "ft.npz"
    proc = subprocess.run([sys.executable, "-m", "refimpl.checkpoint", str(run), str(out)],
                          capture_output=True, text=True, env=ENV, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr
    with np.load(out) as z:
        keys = list(z.files)
    assert keys[0] == "conv1.weight" and keys[-2:] == ["fc.weight", "fc.bias"]
    proc = subprocess.run([sys.executable, "-m", "refimpl.evaluate", str(run)],
                          capture_output=True, text=True, env=ENV, cwd=ROOT)
    assert proc.returncode != 0 and "a finetune checkpoint (encoder + fc, no head)" in proc.stderr


@pytest.mark.mpi
def test_two_ranks_equal_one_rank(pretrained, tmp_path):
    """2 epochs on P = 2 equal P = 1 with sync BN, float64: the same labeled ids, every
    saved tensor and the loss curve within 1e-9 (tests/tolerances.py, STEPS64; 6 steps).
    Negative control: local BN (each rank normalizes its own 4 images) differs."""
    common = [*FT, f"init={pretrained}", "bn=sync", "eval_every=0"]
    one, two, local = tmp_path / "p1", tmp_path / "p2", tmp_path / "local"
    p1 = finetune(*common, f"out={one}")
    p2 = finetune(*common, f"out={two}", ranks=2)
    assert p1.returncode == 0 and p2.returncode == 0, p1.stderr[-2000:] + p2.stderr[-2000:]
    assert "on 2 rank(s)" in p2.stdout
    assert (one / "label_subset.json").read_text() == (two / "label_subset.json").read_text()
    (a, meta_a), (b, _) = final_state(two), final_state(one)
    assert meta_a["world_size"] == 2
    errors = {k: float(np.abs(a[k] - b[k]).max() / max(np.abs(b[k]).max(), 1e-300))
              for k in b if b[k].dtype.kind == "f" and np.abs(b[k]).max() > 1e-12}
    worst = max(errors, key=errors.get)
    assert errors[worst] <= STEPS64, f"{worst}: {errors[worst]:.3e}"
    losses = [[r["loss"] for r in records(d, "step")] for d in (one, two)]
    assert len(losses[0]) == 6 and max(abs(x - y) for x, y in zip(*losses)) <= STEPS64
    p3 = finetune(*[a for a in common if a != "bn=sync"], "bn=local", f"out={local}", ranks=2)
    assert p3.returncode == 0, p3.stderr[-2000:]
    c, _ = final_state(local)
    assert np.abs(c["conv1.weight"] - b["conv1.weight"]).max() > 1e-6  # not rounding


def unlabeled_dataset(path):
    from refimpl.data.packed import write_packed
    images = np.zeros((16, 8, 8, 3), dtype=np.uint8)
    write_packed(path, images, np.full(16, -1, dtype=np.int64))
    return path


@pytest.mark.parametrize("case", ["fraction 0", "fraction 1.5", "fraction -0.1",
                                  "no labels", "one class", "another architecture",
                                  "state file of another architecture", "no init",
                                  "resume a train run", "unknown key"])
def test_bad_inputs_exit_2_with_one_message(pretrained, tmp_path, case):
    run = tmp_path / "ft"
    args, message = {
        "fraction 0": (["labels=0"], "labels must be the fraction of the training labels to "
                                     "use, in (0, 1] (0.01 = 1%), got 0.0"),
        "fraction 1.5": (["labels=1.5"], "in (0, 1] (0.01 = 1%), got 1.5"),
        "fraction -0.1": (["labels=-0.1"], "in (0, 1] (0.01 = 1%), got -0.1"),
        "no labels": ([f"train={unlabeled_dataset(tmp_path / 'unlabeled')}"],
                      "has no labels (every label is -1)"),
        "one class": (["train=synthetic:n=48,size=8,classes=1,seed=0", "test="],
                      "has one class only (C = 1): a classifier needs C >= 2 classes"),
        "another architecture": (["width=4"], "holds an encoder of another architecture than "
                                 "this config asks for"),
        "state file of another architecture": (
            [f"init={tmp_path / 'enc.npz'}", "width=4"], "shape mismatches: conv1.weight: "
            "expected shape (4, 3, 3, 3), got (2, 3, 3, 3)"),
        "no init": (["init="], "init: where the encoder starts is not given"),
        "resume a train run": ([f"out={pretrained}", "--resume", "auto"],
                               "not a fine-tuning checkpoint"),
        "unknown key": (["lables=0.1"], "unknown key 'lables' (did you mean 'labels'?)"),
    }[case]
    if case == "state file of another architecture":
        subprocess.run([sys.executable, "-m", "refimpl.checkpoint", str(pretrained),
                        str(tmp_path / "enc.npz")], check=True, env=ENV, cwd=ROOT,
                       capture_output=True)
    proc = finetune(*FT, f"init={pretrained}", f"out={run}", *args)
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert proc.stderr.startswith("refimpl-finetune: error:") and message in proc.stderr, \
        proc.stderr
    assert proc.stderr.count("refimpl-finetune: error:") == 1 and "Traceback" not in proc.stderr
    if case == "another architecture":
        assert "width: checkpoint 2, config 4" in proc.stderr
    if case != "resume a train run":
        assert not run.exists()  # nothing written


@pytest.mark.mpi
def test_a_bad_input_under_mpirun_ends_every_rank_with_one_message(pretrained, tmp_path):
    proc = finetune(*FT, f"init={pretrained}", f"out={tmp_path / 'ft'}", "labels=2",
                    ranks=2, timeout=120)
    assert proc.returncode == 2 and proc.stderr.count("refimpl-finetune: error:") == 1


def test_resume_is_bitwise_and_checks_the_subset(pretrained, tmp_path):
    """3 epochs straight = 1 epoch, then --resume auto (the same P, machine and threads:
    the same bits), the loss curve without duplicates. A checkpoint of another labeled
    subset is refused."""
    common = [*FT, f"init={pretrained}", "epochs=3", "keep=5"]
    full, part = tmp_path / "full", tmp_path / "part"
    assert finetune(*common, f"out={full}").returncode == 0
    assert finetune(*common, f"out={part}").returncode == 0
    first = checkpoint.list_checkpoints(part)[0]
    for later in checkpoint.list_checkpoints(part)[1:]:
        import shutil
        shutil.rmtree(later)
    (part / "latest").write_text(first.name + "\n")
    proc = finetune(*common, f"out={part}", "--resume", "auto")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert f"resumed from {first}: epoch 2, step 3" in proc.stdout
    (a, meta_a), (b, meta_b) = final_state(part), final_state(full)
    assert meta_a["state"] == meta_b["state"] and list(a) == list(b)
    for k in b:
        np.testing.assert_array_equal(a[k], b[k], err_msg=k)
    assert [r["loss"] for r in records(part, "step")] == [r["loss"] for r in records(full, "step")]
    proc = finetune(*common, f"out={part}", "labels_seed=1", "--resume", str(first))
    assert proc.returncode == 2 and "labels_seed: checkpoint 0, config 1" in proc.stderr
    assert "the labeled images: the checkpoint's 24 are not this run's 24" in proc.stderr


@pytest.mark.mpi
def test_resume_on_another_P(pretrained, tmp_path):
    """Saved on 1 rank, resumed on 2 (sync BN): within 1e-9 of the run straight through."""
    common = [*FT, f"init={pretrained}", "epochs=3", "bn=sync", "eval_every=0"]
    full, part = tmp_path / "full", tmp_path / "part"
    assert finetune(*common, f"out={full}").returncode == 0
    assert finetune(*common, "epochs=3", f"out={part}", "save_every=1").returncode == 0
    first = checkpoint.list_checkpoints(part)[0]
    proc = finetune(*common, f"out={part}", "--resume", str(first), ranks=2)
    assert proc.returncode == 0, proc.stderr[-3000:]
    (a, meta), (b, _) = final_state(part), final_state(full)
    assert meta["world_size"] == 2
    for k in b:
        if b[k].dtype.kind == "f" and np.abs(b[k]).max() > 1e-12:
            assert np.abs(a[k] - b[k]).max() <= STEPS64 * np.abs(b[k]).max(), k


def test_nan_loss_stops_the_run_with_exit_3(pretrained, tmp_path):
    proc = finetune(*FT, f"init={pretrained}", f"out={tmp_path / 'ft'}", "lr_fc=1e300",
                    "lr_encoder=1e300", "warmup_epochs=0", "epochs=3")
    assert proc.returncode == 3, proc.stderr[-2000:]
    assert "refimpl-finetune: stopped: the loss is" in proc.stderr
    assert "rank-0 image ids [" in proc.stderr and "Traceback" not in proc.stderr


def test_sigint_saves_and_the_run_continues(pretrained, tmp_path):
    run = tmp_path / "ft"
    args = ["-m", "refimpl.finetune", *FT, f"init={pretrained}", f"out={run}", "epochs=400",
            "eval_every=0", "save_every=0", "--save-on-interrupt"]
    proc = subprocess.Popen([sys.executable, *args], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=ENV, cwd=ROOT,
                            start_new_session=True)
    wait_for_step(run, 3, proc)
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 128 + signal.SIGINT, err[-2000:]
    assert err.count("refimpl-finetune: SIGINT received") == 1
    assert "refimpl-finetune: interrupted: SIGINT at step" in err and "Traceback" not in err
    ckpt = checkpoint.latest_checkpoint(run)
    state = checkpoint.verify(ckpt)["state"]
    assert state["step"] >= 3 and f"checkpoint {ckpt}" in err
    # continue it to the end of its epoch (a shorter schedule: epochs is not fixed on resume)
    proc = finetune(*FT, f"init={pretrained}", f"out={run}", f"epochs={state['epoch'] + 1}",
                    "--resume", "auto")
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert f"resumed from {ckpt}" in proc.stdout

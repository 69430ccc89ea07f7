"""refimpl-train, checkpoints, the dry run and the oracle's replay on the GPU.

- 2 epochs of ``refimpl-train device="gpu"`` (the prior, the neighbour table,
  smoothed targets from the second epoch, 6 steps, the kNN monitor, the
  linear probe) on 1 rank and on 2 ranks sharing the GPU, each against the
  same run in one CPU process: float64 with sync BatchNorm, every tensor of
  the final checkpoint and every step's loss within TRAIN64 (the bound of P
  ranks against 1: another device's kernels sum in other orders, like
  another P's shards).
- A checkpoint written by the GPU run resumed on the CPU, and the CPU run's
  resumed on the GPU: both end within TRAIN64 of the uninterrupted CPU run.
- ``refimpl-train --dry-run`` with device = "gpu": the activations measured
  on the device, the neighbour search's device memory, the table on the host.
- ``refimpl-oracle replay --device gpu`` of the golden trace: every tensor
  within the golden trace's tolerance (tests/test_oracle_golden.py), and
  ``refimpl-train --trace`` recorded on the device against the CPU's trace.
- ``refimpl-eval --device gpu`` of a checkpoint: the CPU's kNN lines.

The runs are the tiny ones of tests/test_train.py, made once per session
(``runs``) and shared by the tests. Marked ``gpu``; RUNS_DRY (tests/gpu_util.py).
"""
import shutil
import subprocess
import sys

import numpy as np
import pytest

from refimpl import checkpoint
from refimpl.oracle import compare_traces, format_trace_report, replay

from gpu_util import DEVICE, assert_run_matches_cpu, assert_runs_match, train_on
from mpi_run import ENV, ROOT
from test_oracle_golden import ATOL, RTOL, TRACE
from test_train import TINY

pytestmark = pytest.mark.gpu
RUNS_DRY = True
# test_train.test_two_ranks_equal_one_rank's run (TRAIN64 is measured on it),
# with a checkpoint after every epoch, kept, the linear probe at the end, and 2
# threads for the CPU runs (gpu_check.sh runs five test sessions at once)
RUN = [*TINY, "dtype=float64", "bn=sync", "eval_every=0", "width=4", "batch_size=16",
       "lr=0.05", "save_every=1", "keep=5", "linear_probe=true", "threads=2"]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Run directories made once: "cpu" (one CPU process), then the device's on demand."""
    base = tmp_path_factory.mktemp("gpu_train")
    made = {}

    def get(name):
        if name not in made:
            if name == "cpu":
                proc = train_on("cpu", *RUN, f"out={base / 'cpu-P1'}")
                assert proc.returncode == 0, proc.stderr[-3000:]
                made[name] = (base / "cpu-P1", proc.stdout)
            else:
                ranks = {"device-P1": 1, "device-P2": 2}[name]
                run, _, stdout = assert_run_matches_cpu(RUN, base, ranks=ranks,
                                                        cpu_run=get("cpu")[0])
                made[name] = (run, stdout)
        return made[name]
    return get


def probe_line(stdout):
    """The accuracy the linear probe line prints (percent)."""
    line = next(x for x in stdout.splitlines() if x.startswith("linear probe"))
    return float(line.rsplit(" ", 1)[1].rstrip("%"))


def test_two_epochs_on_the_device_equal_the_cpu(runs):
    """P = 1 on the device against one CPU process: every tensor and loss (TRAIN64)."""
    run, _ = runs("device-P1")
    assert checkpoint.read_meta(checkpoint.latest_checkpoint(run))["config"]["device"] == DEVICE


@pytest.mark.mpi
def test_two_ranks_sharing_the_device_equal_one_cpu_process(runs):
    """P = 2 ranks on one GPU (sync BN) against one CPU process (TRAIN64)."""
    run, _ = runs("device-P2")
    assert checkpoint.read_meta(checkpoint.latest_checkpoint(run))["world_size"] == 2


def test_linear_probe_after_a_device_run_matches_cpu(runs):
    """The probe's accuracy after the device run (features from the device) equals
    the CPU run's to one test image (24 images: 4.2%)."""
    _, cpu = runs("cpu")
    _, device = runs("device-P1")
    assert abs(probe_line(device) - probe_line(cpu)) <= 100 / 24 + 1e-9


def resume_elsewhere(run, device, out):
    """A copy of run directory ``run`` cut back to its first checkpoint, continued on
    ``device`` with --resume auto; returns the continued run directory."""
    shutil.copytree(run, out)
    first, *later = checkpoint.list_checkpoints(out)
    (out / "latest").write_text(first.name + "\n")
    for ckpt in later:
        shutil.rmtree(ckpt)
    proc = train_on(device, *RUN, f"out={out}", "--resume", "auto")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert f"resumed from {first}" in proc.stdout
    return out


def test_checkpoint_of_a_device_run_resumes_on_the_cpu(runs, tmp_path):
    """Epoch 1 on the device, epoch 2 on the CPU = 2 epochs on the CPU (TRAIN64)."""
    cpu_run, _ = runs("cpu")
    device_run, _ = runs("device-P1")
    assert_runs_match(resume_elsewhere(device_run, "cpu", tmp_path / "to_cpu"), cpu_run)


def test_checkpoint_of_a_cpu_run_resumes_on_the_device(runs, tmp_path):
    """Epoch 1 on the CPU, epoch 2 on the device = 2 epochs on the CPU (TRAIN64)."""
    cpu_run, _ = runs("cpu")
    resumed = resume_elsewhere(cpu_run, DEVICE, tmp_path / "to_device")
    assert_runs_match(resumed, cpu_run)
    meta = checkpoint.read_meta(checkpoint.latest_checkpoint(resumed))
    assert meta["config"]["device"] == DEVICE and meta["state"]["step"] == 6


def test_dry_run_on_the_device(tmp_path):
    """The dry run measures the activations where the run will put them."""
    proc = train_on(DEVICE, *TINY, "--dry-run")
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = proc.stdout
    assert "dry run: N = 48 instances, P = 1 ranks, B = 8" in out and "fits" in out
    if DEVICE == "gpu":
        for part in ("memory on rank 0 (on its GPU):", "activations of 8 images (8x8), "
                     "measured on the GPU", "neighbour search, before each epoch",
                     "neighbour table 48 x 3 (host memory)"):
            assert part in out, part
    act = next(x for x in out.splitlines() if "activations of 8 images" in x)
    assert float(act.split()[-2].replace(",", "")) > 0


@pytest.mark.parametrize("free_run", [False, True], ids=["step_by_step", "free_run"])
def test_replay_of_the_golden_trace_on_the_device(tmp_path, free_run):
    """The golden trace's two float64 steps replayed on the device: every tensor
    within the golden tolerance (RTOL, ATOL of tests/test_oracle_golden.py)."""
    replay(TRACE, tmp_path / "refimpl", free_run=free_run, device=DEVICE)
    result = compare_traces(tmp_path / "refimpl", TRACE, RTOL, ATOL)
    assert result["ok"], format_trace_report(result, mismatches_only=True)[-6000:]
    assert result["count"] == 130 + 2 * 274 and not result["not_compared"]


def test_refimpl_oracle_replay_device_option():
    """The command line: refimpl-oracle replay TRACE --device gpu, exit 0."""
    proc = subprocess.run([sys.executable, "-m", "refimpl.oracle", "replay", str(TRACE),
                           "--device", DEVICE, "--rtol", str(RTOL), "--atol", str(ATOL), "-q"],
                          capture_output=True, text=True, env=ENV, cwd=ROOT, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "result: all 678 tensors agree" in proc.stdout


def test_refimpl_eval_on_the_device_matches_cpu(runs):
    """refimpl-eval --device gpu of the CPU run's checkpoint (float64): its kNN lines
    (features extracted on the device) are the CPU's."""
    cpu_run, _ = runs("cpu")
    lines = {}
    for name, device in (("cpu", "cpu"), ("device", DEVICE)):
        proc = subprocess.run([sys.executable, "-m", "refimpl.evaluate", str(cpu_run),
                               "--device", device, "--knn-k", "5", "20"],
                              capture_output=True, text=True, env=ENV, cwd=ROOT, timeout=600)
        assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
        lines[name] = [x for x in proc.stdout.splitlines() if "kNN" in x]
    assert len(lines["cpu"]) == 2 and lines["device"] == lines["cpu"]


def test_trace_recorded_on_the_device_matches_the_cpus(tmp_path):
    """refimpl-train --trace of 2 float64 steps on the device against the same trace
    recorded on the CPU: every tensor within the golden trace's tolerance."""
    for name, device in (("cpu", "cpu"), ("device", DEVICE)):
        proc = train_on(device, *TINY, "dtype=float64", "eval_every=0",
                        f"out={tmp_path / name}", "--trace", tmp_path / f"trace-{name}",
                        "--trace-steps", 2)
        assert proc.returncode == 0, proc.stderr[-3000:]
    result = compare_traces(tmp_path / "trace-cpu", tmp_path / "trace-device", RTOL, ATOL)
    assert result["ok"], format_trace_report(result, mismatches_only=True)[-6000:]
    assert result["count"] > 100 and not result["not_compared"]


@pytest.mark.parametrize("variant", [["prior=centered"], ["prior=whitened"],
                                     ["prior_bn=initial", "prior_transform=train"],
                                     ["prior_scale=0.5", "prior_mix=0.5"]],
                         ids=["centered", "whitened", "initial-bn-augmented", "scaled-mixed"])
def test_prior_variants_on_the_device_equal_the_cpu(variant, tmp_path):
    """The prior's variants (issue 24: centring, whitening, BN statistics, the
    pass's augmentation, scale and mix) on the device = one CPU process."""
    assert_run_matches_cpu([*RUN, "linear_probe=false", *variant], tmp_path)


def test_finetune_on_the_device_equals_the_cpu(tmp_path):
    """refimpl-finetune (issue 23) from a CPU-trained run: 2 epochs on the device =
    the same on the CPU (float64): every saved tensor and the loss curve within TRAIN64."""
    from test_finetune_run import FT, final_state, finetune, records
    from tolerances import TRAIN64
    pre = tmp_path / "pre"
    proc = train_on("cpu", *TINY, "epochs=1", "eval_every=0", "dtype=float64", f"out={pre}")
    assert proc.returncode == 0, proc.stderr[-3000:]
    common = [*FT, f"init={pre}", "eval_every=0"]
    cpu, dev = tmp_path / "cpu", tmp_path / "dev"
    p1 = finetune(*common, "device=cpu", f"out={cpu}")
    p2 = finetune(*common, f"device={DEVICE}", f"out={dev}")
    assert p1.returncode == 0 and p2.returncode == 0, p1.stderr[-2000:] + p2.stderr[-2000:]
    (a, _), (b, _) = final_state(dev), final_state(cpu)
    assert sorted(a) == sorted(b)
    for k in b:
        if b[k].dtype.kind == "f":
            scale = max(float(np.abs(b[k]).max()), 1e-300)
            assert float(np.abs(a[k] - b[k]).max()) <= TRAIN64 * scale, k
    losses = [[r["loss"] for r in records(d, "step")] for d in (cpu, dev)]
    assert losses[0] and max(abs(x - y) for x, y in zip(*losses)) <= TRAIN64

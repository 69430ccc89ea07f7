"""The golden trace: refimpl's training step must reproduce tests/golden/trace/ at 1e-12.

tests/golden/make_golden.py wrote two float64 steps (ResNet-18 width 1, N = 16,
local BN in 2 groups, smoothed targets with exact neighbour ties, Nesterov
SGD with a decay mask). Two checks, every tensor of every step:

- replay: refimpl runs the golden steps from the golden inputs and initial
  state (``oracle.replay``), free-running and step by step;
- record: the generator's own loop, run again, writes the same tensors under
  the same names in the same order.

A failure names the first tensor that moved and how to regenerate.
"""
import importlib.util
import json
from pathlib import Path

import numpy as np
import pytest

from refimpl.oracle import compare_traces, format_trace_report, replay
from refimpl.oracle.trace import VERSION, Trace, TraceError

GOLDEN = Path(__file__).resolve().parent / "golden"
TRACE = GOLDEN / "trace"
REGENERATE = ("regenerate with python tests/golden/make_golden.py if the change is intended "
              "(tests/golden/README.md)")
RTOL, ATOL = 1e-12, 1e-14


def make_golden():
    spec = importlib.util.spec_from_file_location("make_golden", GOLDEN / "make_golden.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def check(result):
    """Assert a comparison passed; the message: the first divergence and the hint."""
    assert result["ok"], (f"the golden trace no longer matches: {REGENERATE}\n"
                          + format_trace_report(result, mismatches_only=True)[-6000:])


def test_golden_files_are_small_and_current():
    meta = json.loads((TRACE / "meta.json").read_text())
    assert meta["version"] == VERSION, f"golden format {meta['version']}: {REGENERATE}"
    size = sum(f.stat().st_size for f in TRACE.iterdir())
    assert size < 400 * 1024, f"the golden trace has grown to {size / 1024:.0f} KiB"
    t = Trace(TRACE)
    assert len(t.steps) == 2 and t.hparams["dtype"] == "float64"
    assert t.hparams["world_size"] == 2 and t.hparams["neighbours"] == "initial_weight"
    # the tie rule decides real entries: some class has tied candidates at its K-th place
    W = t.classifier()
    S = (W / 2.0) @ (W / 2.0).T               # rows of +-1/2 in 16 dims: norm 2, exact cosines
    np.fill_diagonal(S, -np.inf)
    kth = np.sort(S, axis=1)[:, ::-1][:, 2:4]  # the 3rd and 4th best of every row
    assert np.any(kth[:, 0] == kth[:, 1])


@pytest.mark.parametrize("free_run", [False, True], ids=["step_by_step", "free_run"])
def test_replay_reproduces_the_golden_trace(tmp_path, free_run):
    replay(TRACE, tmp_path / "refimpl", free_run=free_run)
    result = compare_traces(tmp_path / "refimpl", TRACE, RTOL, ATOL)
    check(result)
    assert result["count"] == 130 + 2 * 274 and not result["not_compared"]


def test_recording_again_gives_the_golden_tensors(tmp_path):
    make_golden().record(tmp_path / "again")
    result = compare_traces(tmp_path / "again", TRACE, RTOL, ATOL)
    check(result)
    again = Trace(tmp_path / "again")
    golden = Trace(TRACE)
    assert list(again.step(1)) == list(golden.step(1))        # names and order
    with np.load(TRACE / "step_000000.npz") as z:             # the order on disk
        assert z.files == list(golden.step(0))


def test_a_changed_number_is_named_with_the_regeneration_hint(tmp_path):
    """Negative control: perturb one gradient of the golden trace by 1e-9 relative."""
    import shutil
    bad = tmp_path / "bad"
    shutil.copytree(TRACE, bad)
    with np.load(bad / "step_000001.npz") as z:
        arrays = {k: z[k] for k in z.files}
    arrays["grad/layer3.0.conv2.weight"] = arrays["grad/layer3.0.conv2.weight"] * (1 + 1e-9)
    np.savez(bad / "step_000001.npz", **arrays)
    result = compare_traces(TRACE, bad, RTOL, ATOL)
    assert not result["ok"]
    assert (result["first"]["where_step"], result["first"]["name"]) == \
        ("step 1", "grad/layer3.0.conv2.weight")
    with pytest.raises(AssertionError, match="make_golden.py") as e:
        check(result)
    assert "first divergence: step 1, grad/layer3.0.conv2.weight (backward)" in str(e.value)


def test_a_newer_format_version_is_refused(tmp_path):
    import shutil
    new = tmp_path / "new"
    shutil.copytree(TRACE, new)
    meta = json.loads((new / "meta.json").read_text())
    meta["version"] = VERSION + 1
    (new / "meta.json").write_text(json.dumps(meta))
    with pytest.raises(TraceError, match=f"version {VERSION + 1}.*reads version {VERSION}"):
        Trace(new)

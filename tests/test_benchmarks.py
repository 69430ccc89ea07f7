"""The benchmarks' own comparators compute what they claim to.

A benchmark's ratio means something only if both sides do the same work:
the blocked PyTorch classifier of ``bench_classifier.py`` must give the
dense PyTorch loss and weight gradient, and the GEMM rate its FLOP count.
"""
import json
import os
import sys
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import best_call, sgemm_rate  # noqa: E402
from tolerances import LAYER64  # noqa: E402


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
    # the same sums over N = 100 classes in blocks: sum_bound(100, cond=10) = 2.2e-13
    assert abs(float(bloss) - loss) <= LAYER64 * abs(loss)
    err = float((dW - W.grad).abs().max() / W.grad.abs().max())
    assert err <= LAYER64, f"dW relative error {err:.1e}"


def test_sgemm_rate_and_best_call():
    """A positive, finite GFLOP/s; best_call reports wall, user and system time."""
    rate = sgemm_rate([(64, 32, 128)], parts=1, repeat=2)
    assert 0 < rate < 1e5
    calls = []
    best = best_call(lambda: calls.append(np.ones((256, 256)).sum()), repeat=3)
    assert len(calls) == 4 and set(best) == {"s", "user_s", "sys_s"} and best["s"] > 0


def test_compare_times_alternates_sides_and_divides_by_the_first(monkeypatch):
    """Each side's step advances a fake clock by its own cost: the medians and
    the ratios (other / first) come out of that arithmetic exactly."""
    import benchmarks.common as common

    class Clock:
        now = 0.0

        def perf_counter(self):
            return self.now

        process_time = perf_counter

    clock, calls = Clock(), []
    monkeypatch.setattr(common, "time", clock)

    def side(name, cost):
        def step():
            calls.append(name)
            clock.now += cost
        return step
    t = common.compare_times({"ours": side("ours", 2.0), "a": side("a", 1.0),
                              "b": side("b", 4.0)}, rounds=3, per_round=2, warmup=1)
    assert calls[:3] == ["ours", "a", "b"]                       # warm-up, then blocks
    assert calls[3:] == (["ours"] * 2 + ["a"] * 2 + ["b"] * 2) * 3
    assert t["ours_s"] == 2.0 and t["a_cpu_s"] == 1.0 and t["b_spread_s"] == [4.0, 4.0]
    assert t["ratio_a"] == 0.5 and t["cpu_ratio_b"] == 2.0
    assert "ratio_ours" not in t


def test_tables_from_bench_output(tmp_path):
    from benchmarks import tables
    records = [
        {"benchmark": "resnet_step", "threads": 2, "width": 16, "batch": 128, "ratio_nchw": 0.712,
         "cpu_ratio_nchw": 0.75, "ratio_cl": 0.6, "cpu_ratio_cl": 0.65, "refimpl_img_per_s": 140.0,
         "torch_img_per_s": 196.6, "torch_cl_img_per_s": 233.3, "load_before": 1.2,
         "load_after": 1.9, "other_cpu_cores": 0.04, "steal_cores": 0.0, "loaded": False},
        {"benchmark": "conv_all", "width": 64, "batch": 64, "refimpl_fwd_ms": 1000.0,
         "refimpl_bwd_ms": 2000.0, "torch_fwd_ms": 900.0, "torch_bwd_ms": 1900.0,
         "total_speed_ratio": 0.933},
        {"benchmark": "classifier_step", "device": "cpu", "N": 1281167, "P": 2, "refimpl_s": 7.1,
         "fraction_of_gemm_limit": 0.58, "torch_s": 14.2, "ratio": 2.0, "torch_blocked_s": 9.0,
         "ratio_blocked": 1.27, "refimpl_sys_s": 0.01, "torch_sys_s": 10.5,
         "refimpl_peak_mb": 1596.0, "torch_peak_mb": 6356.0, "memory_ratio": 0.251,
         "load_before": 3.1, "load_after": 2.0, "loaded": True},
        {"benchmark": "comm_bytes", "P": 2, "match": True},
        {"benchmark": "comm_bytes", "P": 4, "match": False},
    ]
    path = tmp_path / "bench.jsonl"
    path.write_text("make: text lines are skipped\n" + "\n".join(map(json.dumps, records)) + "\n")
    text = capsys_text(tables, path)
    assert ("| 2 | 16 | 128 | 140.0 | 196.6 | 0.71 (0.75) | 233.3 | 0.60 (0.65) "
            "| load 1.2-1.9, others 0.04 cores |") in text
    assert "| width 64, batch 64 | 0.93 | ms: refimpl 3000, PyTorch 2800; " in text
    assert ("| cpu | 1,281,167 | 2 | 7.100 | 0.58 | 14.200 | 2.00 | 9.000 | 1.27 | 0.01, 10.50 "
            "| 1,596 | 6,356 | 0.251 | load 2.0-3.1 (LOADED: do not trust) |") in text
    assert "1 of 2 configurations (P = 2, 4) send exactly" in text
    empty = tmp_path / "empty.jsonl"
    empty.write_text("no records\n")
    with pytest.raises(SystemExit, match="holds no benchmark records"):
        tables.main([str(empty)])
    with pytest.raises(SystemExit, match="cannot read"):
        tables.main([str(tmp_path / "missing.jsonl")])


def test_tables_write_between_the_markers_of_the_docs_page(tmp_path):
    """--write replaces only the generated block of docs/benchmarks.md; the
    machine line comes from the first record that describes the machine."""
    from benchmarks import tables
    records = [
        {"benchmark": "conv", "cpus": 2, "python": "3.11.9", "numpy": "2.3.0",
         "blas": [{"internal_api": "openblas", "version": "0.3.31",
                   "architecture": "Haswell"}], "torch": "2.13.0+cpu"},
        {"benchmark": "comm_bytes", "P": 2, "match": True},
    ]
    jsonl = tmp_path / "bench.jsonl"
    jsonl.write_text("\n".join(map(json.dumps, records)) + "\n")
    page = tmp_path / "benchmarks.md"
    page.write_text(f"# Benchmarks\n\nbefore\n\n{tables.BEGIN}\nold tables\n{tables.END}\n\n"
                    "after\n")
    tables.main([str(jsonl), "--write", str(page)])
    text = page.read_text()
    assert text.startswith("# Benchmarks\n\nbefore\n\n" + tables.BEGIN + "\n")
    assert text.endswith(tables.END + "\n\nafter\n") and "old tables" not in text
    assert ("Machine: 2 CPUs; Python 3.11.9, NumPy 2.3.0; openblas 0.3.31 (Haswell kernel); "
            "PyTorch 2.13.0+cpu.") in text
    assert "1 of 1 configurations (P = 2) send exactly" in text
    tables.main([str(jsonl), "--write", str(page)])         # a second run changes nothing
    assert page.read_text() == text
    page.write_text("no markers\n")
    with pytest.raises(SystemExit, match="no marker lines"):
        tables.main([str(jsonl), "--write", str(page)])


def test_the_docs_page_has_the_markers():
    """make bench writes into docs/benchmarks.md: its marker lines must be there."""
    from benchmarks import tables
    text = (Path(__file__).resolve().parents[1] / "docs" / "benchmarks.md").read_text()
    assert text.count(tables.BEGIN) == 1 and text.count(tables.END) == 1
    assert text.index(tables.BEGIN) < text.index(tables.END)


def capsys_text(tables, path):
    """What tables.main prints for path."""
    import contextlib
    import io
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        tables.main([str(path)])
    return buf.getvalue()


def test_load_record_counts_other_processes_cpu_not_our_own():
    """A busy loop in this process is not "other load"; a busy child process
    that this process does not wait for is. Checked against each process's own
    CPU time, so that other load on the machine (which only adds to "other")
    cannot make it fail."""
    import subprocess
    import time as time_mod
    from benchmarks import common
    if common.machine_cpu()[0] is None:
        pytest.skip("no /proc/stat")
    tick = os.sysconf("SC_CLK_TCK")

    def proc_cpu(pid):  # utime + stime of a live process, seconds (/proc/<pid>/stat)
        fields = open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / tick

    before = common.snapshot()
    t0 = time_mod.process_time()
    while time_mod.process_time() - t0 < 0.3:
        pass
    after = common.snapshot()
    mine = common.load_record(before, threads=1)
    assert set(mine) >= {"load_before", "load_after", "other_cpu_cores", "steal_cores", "loaded"}
    wall = after["wall"] - before["wall"]
    own = after["own"] - before["own"]
    assert own >= 0.3 - 2 / tick                          # our loop counts as our own
    # ... and not as other load: at most the machine's busy time minus it (+ a tick's
    # rounding of each /proc/stat reading and the time between the two snapshots)
    assert mine["other_cpu_cores"] * wall <= (after["busy"] - before["busy"]) - own + 4 / tick
    spinner = subprocess.Popen([sys.executable, "-c", "import time\nt = time.time()\n"
                                "while time.time() - t < 1.5: pass"])
    try:
        time_mod.sleep(0.2)                                # past its start-up
        spun = proc_cpu(spinner.pid)
        before = common.snapshot()
        time_mod.sleep(0.8)
        other = common.load_record(before, threads=1)
        wall = time_mod.perf_counter() - before["wall"]
        spun = proc_cpu(spinner.pid) - spun
    finally:
        spinner.wait()
    # the child's CPU in the window is "other" (one tick of rounding on each side)
    assert other["other_cpu_cores"] * wall >= spun - 3 / tick, (other, spun)
    assert spun > 0.1, spun    # it did run, even on a loaded machine

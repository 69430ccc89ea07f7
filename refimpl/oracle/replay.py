"""Replay: run another implementation's traced steps in refimpl, in float64, and compare.

Contract. ``replay(trace_dir, out_dir, comm)`` reads a trace (``oracle.trace``)
written by any implementation, builds refimpl's network, classifier and
optimizers in float64 from the trace's initial state and hyper-parameters,
runs the same steps on the same inputs (``train.step.forward_backward``, then
``update`` with the step's lr) on comm's P ranks, and records refimpl's own
trace of them into ``out_dir`` (``TraceRecorder``). ``replay_and_compare``
does that (in this process, or on P ranks under mpirun) and then compares
every tensor the trace holds with refimpl's (``compare.compare_traces``,
refimpl the reference).

    taken from the trace   the initial parameters, BN buffers, momenta, the
                           classifier weight (and its momentum); each step's
                           input, ids and lr; the neighbour rows when
                           hparams["neighbours"] is "given"
    recomputed by refimpl  everything else, the neighbour table too when it is
                           "initial_weight" (refimpl's hardest_neighbours of
                           the initial W, so the tie rule is checked)

Each step after the first starts from the state the trace recorded after the
step before (``resync``: whatever it holds in full), so every step is checked
from the same state and float32 rounding does not compound; ``free_run=True``
carries refimpl's own state instead (the trajectory as a whole).

The replay is float64 whatever the trace's dtype (one switch: network,
classifier and optimizer state); the comparison's default tolerance follows
the trace's dtype (``compare.default_tolerances``). ``device="gpu"`` replays
on CuPy (each rank the GPU of its node-local rank): the trace's host arrays
go to the device where they are loaded, refimpl's trace comes back to the
host as it is recorded.

World size. A trace's tensors are of the global batch, so any P' replays it:
with "sync" BatchNorm any P' that divides B; with "local" BatchNorm P' = P
(each rank its own statistics, rank 0's broadcast) or P' = 1
(``net.bn.groups = P``: the same statistics in one process)."""
import os
import tempfile
from pathlib import Path

import numpy as np

from refimpl import __version__
from refimpl.backend import asarray, get_array_module
from refimpl.method.neighbours import hardest_neighbours
from refimpl.method.targets import entries_from_rows
from refimpl.models.network import build_model
from refimpl.optim.sgd import SGD
from refimpl.oracle.compare import compare_traces
from refimpl.oracle.recorder import TraceRecorder
from refimpl.oracle.trace import INIT, Trace, TraceError
from refimpl.params import StateDictError, is_bn_or_bias
from refimpl.parallel.classifier import CosineClassifier
from refimpl.parallel.comm import SelfComm
from refimpl.parallel.data_parallel import set_batchnorm_mode
from refimpl.parallel.launch import mpirun_command, run_mpirun, select_gpu
from refimpl.train.step import forward_backward, update

# refimpl's BatchNorm (models.blocks.BatchNorm defaults)
BN_MOMENTUM, BN_EPS = 0.1, 1e-5


def build_from_trace(trace, comm, dtype=np.float64, device="cpu", bn=None):
    """(net, clf, net_opt, clf_opt) of one dtype (float64 unless told), in the trace's
    initial state, on comm, on ``device`` ('cpu' or 'gpu'). bn: None (the trace's
    BatchNorm mode) or "local" / "sync" (the other mode, to see which one a trace's
    z follows)."""
    hp = trace.hparams
    bn = hp["bn"] if bn is None else bn
    P, P_t, B = comm.size, hp["world_size"], hp["batch_size"]
    if B % P:
        raise TraceError(f"the trace's batch B = {B} does not split over {P} ranks")
    for key, ours in (("bn_momentum", BN_MOMENTUM), ("bn_eps", BN_EPS)):
        if hp[key] != ours:
            raise TraceError(f"{trace.path}: hparams[{key!r}] = {hp[key]}, but refimpl's "
                             f"BatchNorm uses {ours} (PyTorch's default; docs/oracle.md, "
                             f"BatchNorm): replay cannot reproduce another value")
    net = build_model(hp["arch"], hp["stem"], hp["width"], hp["head_hidden"], hp["dim"],
                      dtype=dtype, device=device)
    if bn == "sync":
        set_batchnorm_mode(net, comm, "sync")
    elif P == P_t:
        set_batchnorm_mode(net, comm, "local")
    elif P == 1:
        net.bn.groups = P_t  # P local BatchNorms in one process
    else:
        raise TraceError(f"the trace was recorded on P = {P_t} ranks with local BatchNorm: "
                         f"replay it on {P_t} ranks or on 1 (not {P})")
    init = trace.init()
    try:
        net.store.load_state_dict({n: v for n, v in init.items()
                                   if not n.startswith("momentum/")})
    except StateDictError as e:
        raise TraceError(f"{trace.path / INIT}: does not fit refimpl's {hp['arch']} "
                         f"(stem {hp['stem']}, width {hp['width']}) + head: {e}") from None
    clf = CosineClassifier(hp["N"], hp["D"], comm, hp["tau"], dtype, device)
    # host rows to the device first: CuPy assigns no NumPy array into its own
    clf.weight[...] = asarray(trace.classifier(clf.lo, clf.hi), device=device, dtype=dtype)
    mask = None if hp["weight_decay_mask"] == "all" else net.store.decay_mask(is_bn_or_bias)
    mu, wd, nesterov = hp["momentum"], hp["weight_decay"], hp["nesterov"]
    net_opt = SGD(net.store.data, net.store.grad, 0.0, mu, wd, nesterov, mask)
    clf_opt = SGD(clf.weight.ravel(), clf.grad.ravel(), 0.0, mu, wd, nesterov)
    momenta = any(n.startswith("momentum/") for n in init)
    clf_momentum = trace.classifier_momentum(clf.lo, clf.hi)
    if mu == 0 and (momenta or clf_momentum is not None):
        raise TraceError(f"{trace.path}: momentum buffers recorded but hparams['momentum'] "
                         f"= 0")
    if momenta:  # a buffer not recorded is zero (no step taken yet)
        net.store.load_flat(net_opt.momentum_buffer, init, "momentum/", strict=False)
    if clf_momentum is not None:
        clf_opt.momentum_buffer[...] = asarray(clf_momentum.ravel(), device=device, dtype=dtype)
    return net, clf, net_opt, clf_opt


def targets_from_rows(ids, rows, num_classes, alpha):
    """Sparse smoothed targets of a batch from its neighbour rows (B, K).

    The same entries as ``method.targets.target_entries`` with a table whose
    rows ``ids`` are ``rows``; an id that appears twice with different rows is
    an error.
    """
    entries = entries_from_rows(ids, num_classes, rows, alpha)  # checks ids and rows
    ids, rows = np.asarray(ids), np.asarray(rows)
    _, first, which = np.unique(ids, return_index=True, return_inverse=True)
    if not np.array_equal(rows[first[which]], rows):  # each id's first row, for every row
        raise TraceError("the trace's neighbour rows differ for one id that appears twice "
                         "in the batch")
    return entries


def resync(st, net, clf, net_opt, clf_opt):
    """Start the next step from the state the trace recorded after the last one.

    st: the last step's tensors (``Trace.step``). Whatever it holds in full
    is loaded: parameters, BN buffers, momenta, the classifier weight and
    momentum ("full" traces). Each step is then checked from the same state
    on both sides, so a float32 trace's rounding does not compound over
    steps (and a divergence is pinned to its step).
    """
    net.store.load_state_dict({n: st[n] for n in net.store.names() if n in st}, strict=False)
    if net_opt.momentum_buffer is not None:
        net.store.load_flat(net_opt.momentum_buffer, st, "momentum/", strict=False)
    for key, dst in (("classifier.weight", clf.weight),
                     ("momentum/classifier.weight", clf_opt.momentum_buffer)):
        if key in st and dst is not None:
            dst[...] = asarray(np.asarray(st[key][clf.lo:clf.hi]).reshape(dst.shape),
                               device=net.store.device, dtype=dst.dtype)


def nudge(arrays, g):
    """Move every element of the float arrays by -1, 0 or +1 unit of rounding
    of its dtype (``g``: a NumPy Generator), in place: the same values as
    another rounding of them, to sample a computation's rounding noise."""
    for a in arrays:
        if a is not None and a.dtype.kind == "f" and a.size:
            xp = get_array_module(a)  # the draws on the host, the multiply where a lives
            a *= 1 + np.finfo(a.dtype).eps * xp.asarray(g.integers(-1, 2, a.shape)
                                                        .astype(a.dtype))


def replay(trace_dir, out_dir, comm=None, steps=None, free_run=False, dtype=np.float64,
           nudge_seed=None, device="cpu", bn=None):
    """Run a trace's steps in refimpl (float64, comm's ranks); write refimpl's trace.

    steps: how many of the trace's steps (default all). free_run: False (the
    default) starts every step after the first from the state the trace
    recorded after the step before (``resync``); True carries refimpl's own
    state from step to step. dtype: float64, the replay; float32 measures
    refimpl's own float32 rounding of the same steps (``replay_and_compare``'s
    noise floor). nudge_seed: None, or an int: every input, parameter,
    buffer, momentum and classifier row is moved by one unit of rounding
    (``nudge``) after it is loaded, so that the rounding errors of this run
    are another sample of the same noise (``float32_noise``). device: 'cpu'
    or 'gpu' (each rank the GPU of its node-local rank). bn: None (the
    trace's BatchNorm mode) or the mode to replay instead (``bn_mode_hint``).
    Every rank calls this; returns out_dir as a Path.
    """
    comm = SelfComm() if comm is None else comm
    if device == "gpu":
        select_gpu(comm)
    trace = Trace(trace_dir)
    if Path(out_dir).resolve() == trace.path.resolve():
        raise TraceError(f"{out_dir}: refimpl's trace would overwrite the one it replays")
    hp = trace.hparams
    n = len(trace.steps) if steps is None else min(int(steps), len(trace.steps))
    if n < 1:
        raise TraceError(f"{trace.path}: the trace holds no step")
    net, clf, net_opt, clf_opt = build_from_trace(trace, comm, dtype, device, bn)
    g = None if nudge_seed is None else np.random.default_rng(nudge_seed)

    def nudge_state():
        if g is not None:
            nudge([net.store.data, net.store.buffer_data, clf.weight, net_opt.momentum_buffer,
                   clf_opt.momentum_buffer], g)
    nudge_state()
    given = {k: hp[k] for k in ("alpha", "K", "neighbours", "batch_size", "seed",
                                "world_size") if hp.get(k) is not None}
    rec = TraceRecorder(out_dir, net, clf, net_opt, clf_opt, comm, given, n,
                        classifier=trace.meta["classifier"], checksum_shards=hp["world_size"],
                        producer=f"refimpl {__version__} replay of {trace.path} on "
                                 f"{comm.size} rank{'s' if comm.size > 1 else ''}")
    table = None
    if hp["alpha"] > 0 and hp["neighbours"] == "initial_weight":
        table = hardest_neighbours(clf, comm, hp["K"])   # (N, K), the tie rule included
    b = hp["batch_size"] // comm.size
    rows = slice(comm.rank * b, (comm.rank + 1) * b)
    st = None
    for i in range(n):
        prev, st = st, trace.step(i)
        x = np.array(st["input"][rows], dtype=dtype)                    # (b, 3, H, W)
        if g is not None:
            nudge([x], g)
        x = asarray(x, device=device)
        ids = st["ids"][rows].astype(np.int64)                           # (b,)
        targets = None
        if "neighbours" in st:
            nb = table[st["ids"]] if table is not None else st["neighbours"]
            targets = targets_from_rows(st["ids"].astype(np.int64), nb, hp["N"], hp["alpha"])
        lr = float(st["lr"])
        if i > 0 and not free_run:
            resync(prev, net, clf, net_opt, clf_opt)               # after step i - 1
            nudge_state()
        rec.begin()
        out = forward_backward(net, clf, x, ids, comm, targets, step=i)
        rec.record(x, ids, out, lr, targets)
        update(net, comm, net_opt, clf_opt, lr)
        rec.end()
    return Path(out_dir)


NOISE_SAMPLES = 3


def float32_noise(trace_dir, ref_dir, work, steps=None, free_run=False, samples=NOISE_SAMPLES,
                  device="cpu"):
    """{(section, name): max |diff|}: refimpl in float32 against refimpl in float64.

    The same steps from the same state (one process), so the differences
    are refimpl's own float32 rounding of each tensor: the floor below
    which a float32 implementation cannot be told from another. One run's
    error is one sample of that rounding noise, and another implementation's
    (or another BLAS kernel's) is another: on a tensor whose sums cancel, it
    is 30 x larger than a single sample of ours about 2% of the time. So the
    floor is the largest of ``samples`` runs: as they are, then with every
    input and state element moved by one float32 unit of rounding (``nudge``,
    seeds 1, 2, ...), which rounds every sum anew; 30 x the largest of 3 is
    exceeded by chance about once in 10^5 tensors. device: where the float32
    runs go (the rounding of that device's kernels).
    """
    floor = {}
    for seed in range(samples):
        out = Path(work) / f"refimpl-float32-{seed}"
        replay(trace_dir, out, steps=steps, free_run=free_run, dtype=np.float32,
               nudge_seed=seed or None, device=device)
        result = compare_traces(ref_dir, out, rtol=np.inf, atol=np.inf, steps=steps)
        for title, rows in result["sections"]:
            for r in rows:
                key = (title, r["name"])
                floor[key] = max(floor.get(key, 0.0), r["max_abs"])
    return floor


def replay_and_compare(trace_dir, ranks=1, out_dir=None, rtol=None, atol=None, steps=None,
                       free_run=False, timeout=None, noise=True, device="cpu"):
    """Replay a trace in refimpl on ``ranks`` processes, then compare.

    ranks = 1 runs here; ranks > 1 launches ``mpirun -np ranks python -m
    refimpl.oracle replay TRACE --out OUT --no-compare`` and waits. out_dir:
    where refimpl's trace goes (default: a temporary directory, removed).
    noise: for a float32 trace, also replay it in float32 (here, one
    process) and let each tensor pass within 30 x refimpl's own float32
    error on it (``compare_traces``' noise floor). device: 'cpu' or 'gpu',
    for the replay and the noise floor. Returns
    ``compare_traces(refimpl's, the trace)``'s result dict; its "ok" says
    whether every recorded tensor agrees within the tolerance.
    """
    with tempfile.TemporaryDirectory(prefix="refimpl-replay-") as tmp:
        out = Path(out_dir) if out_dir is not None else Path(tmp) / "refimpl"
        if ranks == 1:
            replay(trace_dir, out, steps=steps, free_run=free_run, device=device)
        else:
            argv = ["-m", "refimpl.oracle", "replay", str(trace_dir), "--out", str(out),
                    "--no-compare", "--device", device] \
                + ([] if steps is None else ["--steps", str(steps)]) \
                + (["--free-run"] if free_run else [])
            env = dict(os.environ, OPENBLAS_NUM_THREADS="1", OMP_NUM_THREADS="1",
                       REFIMPL_NUM_THREADS="1")
            proc = run_mpirun(mpirun_command(ranks, *argv), env=env, timeout=timeout)
            if proc.returncode != 0:
                tail = (proc.stderr or proc.stdout)[-3000:]
                raise TraceError(f"the replay on {ranks} ranks failed (mpirun exit "
                                 f"{proc.returncode}):\n{tail}")
        return compare_replay(trace_dir, out, tmp, rtol, atol, steps, free_run, noise, device)


def compare_replay(trace_dir, out, work, rtol=None, atol=None, steps=None, free_run=False,
                   noise=True, device="cpu"):
    """refimpl's replay in ``out`` against the trace: ``compare_traces``' result.

    noise: for a float32 trace, first replay it in float32 (one process,
    into ``work``) and let each tensor pass within 30 x refimpl's own
    float32 error on it (the noise floor). The one comparison both
    ``replay_and_compare`` and ``mpirun -n P refimpl-oracle replay`` make.
    """
    floor = None
    if noise and Trace(trace_dir).hparams["dtype"] == "float32":
        floor = float32_noise(trace_dir, out, work, steps, free_run, device=device)
    result = compare_traces(out, trace_dir, rtol, atol, labels=("refimpl", "yours"),
                            steps=steps, noise=floor)
    hint = bn_mode_hint(trace_dir, result, work, free_run, device)
    if hint:  # in place of the section's generic advice
        generic = f"first divergence ({result['first']['name']}): "
        result["hints"] = [hint] + [h for h in result["hints"] if not h.startswith(generic)]
    return result


BN_MODES = {"local": "each rank's own statistics", "sync": "the global batch's statistics"}


def bn_mode_hint(trace_dir, result, work, free_run=False, device="cpu"):
    """If the first divergence is z or a BatchNorm buffer, replay that step with the
    other BatchNorm mode (one process on ``device``, into ``work``): when the trace's
    z and buffers agree with it, a hint that says the mode is swapped; else None."""
    first = result["first"]
    hp = Trace(trace_dir).hparams
    if first is None or hp["world_size"] == 1 or not (
            first["name"] == "z" or first["section"] == "BN statistics"):
        return None
    declared = hp["bn"]
    other = "sync" if declared == "local" else "local"
    i = int(first["where_step"].split()[-1])
    out = Path(work) / f"refimpl-bn-{other}"
    replay(trace_dir, out, steps=i + 1, free_run=free_run, bn=other, device=device)
    alt = compare_traces(out, trace_dir, result["rtol"], result["atol"], steps=i + 1)
    rows = dict(alt["sections"])[f"step {i}"]
    checked = [r for r in rows if r["name"] == "z" or r["section"] == "BN statistics"]
    if not checked or not all(r["ok"] for r in checked):
        return None
    why = ("was the SyncBatchNorm conversion forgotten (nn.SyncBatchNorm."
           "convert_sync_batchnorm; on gloo refimpl.oracle.torch_sync_bn."
           "convert_sync_batchnorm)? Or declare hparams['bn'] = 'local'"
           if declared == "sync" else
           "your BatchNorm is synchronized (SyncBatchNorm), or one process ran the model on "
           "the whole batch instead of once per rank's b rows; declare hparams['bn'] = "
           "'sync', or use per-rank BatchNorm")
    return (f"first divergence ({first['name']}): BN mode swapped: your z and BatchNorm "
            f"buffers match refimpl's replay with bn = '{other}' ({BN_MODES[other]}), not "
            f"the trace's bn = '{declared}' ({BN_MODES[declared]}): {why} (docs/oracle.md, "
            f"Sync vs local BN)")

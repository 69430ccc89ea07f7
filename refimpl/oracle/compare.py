"""Comparing tensors: how refimpl says two implementations agree, and where they do not.

Contract. Two measures, both max-based so that one bad element shows:

    scaled_error(a, b) = max |a - b| / max |b|            (the default)
    rel_error(a, b)    = max |a - b| / max(|a|, |b|)      elementwise, then max

``scaled_error`` is robust to entries near zero (a gradient with a few tiny
elements); ``rel_error`` is stricter and is what finite-difference checks of
tiny tensors use. In float64, implementations that compute the same function
agree to about 1e-13 scaled; anything above about 1e-8 is a bug, not
rounding. float32 agrees to about 1e-6.

``check_tensor(name, ours, ref, tol)`` raises AssertionError with the tensor
name, the error, the largest |difference| and where it is, and the first
values side by side (llm.c's check_tensor); ``compare_tensors`` does the same
for two name -> array dicts and ``format_report`` prints one line per tensor.

Traces (``oracle/trace.py``). ``compare_traces(ref, other)`` compares every
tensor of the trace ``other`` (its initial state and each step) with the
reference trace: a float tensor passes when

    max |other - ref| <= atol + rtol * max |ref|      (or a noise floor, below)

and an integer tensor must be equal. Defaults by dtype (``TOLERANCES``):
float64 rtol 1e-10, atol 1e-12; float32 1e-4, 1e-6. It finds the first
divergence in forward-then-backward order and adds hints: what to check
at that tensor (``SECTION_HINTS``), a constant ratio other / ref
(``ratio_hint``: P, 1/P, B, 1/B, b, -1 and what each usually means), a tie
in the neighbour rows. An optional per-tensor noise floor (refimpl's own
float32 error, measured by ``replay.replay_and_compare``) keeps float32
rounding of cancelling sums from being called a bug.
``format_trace_report`` prints the table: one line per tensor, the first
values side by side for mismatches, the first divergence and the hints.
"""
import numpy as np

from refimpl.backend import to_numpy


def _host64(x):
    return np.asarray(to_numpy(x), dtype=np.float64)


def scaled_error(a, b):
    """max |a - b| / max |b|: robust when some entries are ~0 (0 for empty arrays)."""
    a, b = _host64(a), _host64(b)
    scale = max(float(np.max(np.abs(b))) if b.size else 0.0, 1e-300)
    return float(np.max(np.abs(a - b))) / scale if a.size else 0.0


def rel_error(a, b):
    """max |a - b| / max(|a|, |b|, tiny), elementwise max over the arrays."""
    a, b = _host64(a), _host64(b)
    denom = np.maximum(np.maximum(np.abs(a), np.abs(b)), 1e-300)
    return float(np.max(np.abs(a - b) / denom)) if a.size else 0.0


ERRORS = {"scaled": scaled_error, "rel": rel_error}


def tensor_diff(name, ours, ref, kind="scaled"):
    """One comparison as a dict: name, shape, error (``kind``), max_abs (largest
    |ours - ref|), where (its index), first (the first 5 pairs of values).

    A shape mismatch gives error = inf and says so in ``shape``.
    """
    ours, ref = _host64(ours), _host64(ref)
    if ours.shape != ref.shape:
        return {"name": name, "shape": f"{ours.shape} != {ref.shape}", "error": float("inf"),
                "max_abs": float("inf"), "where": None, "first": []}
    diff = np.abs(ours - ref)
    # NaN anywhere is the worst possible difference
    err = ERRORS[kind](ours, ref) if not np.isnan(diff).any() else float("nan")
    where = np.unravel_index(int(np.nanargmax(diff)), diff.shape) if diff.size and \
        not np.isnan(diff).all() else ()
    return {"name": name, "shape": ours.shape, "error": err,
            "max_abs": float(np.nanmax(diff)) if diff.size else 0.0,
            "where": tuple(int(i) for i in where),
            "first": list(zip(ours.ravel()[:5].tolist(), ref.ravel()[:5].tolist()))}


def _failure_text(d, tol, kind):
    lines = [f"{d['name']}: {kind} error {d['error']:.3e} > tol {tol:.1e}; "
             f"max |diff| {d['max_abs']:.3e} at {d['where']} (shape {d['shape']})",
             "    ours                    ref"]
    lines += [f"    {a: .16e} {b: .16e}" for a, b in d["first"]]
    return "\n".join(lines)


def check_tensor(name, ours, ref, tol, kind="scaled"):
    """Assert ours ~= ref within ``tol``; returns the error.

    kind: "scaled" (max |diff| / max |ref|, the default) or "rel"
    (elementwise relative error). On failure (NaN included) raises
    AssertionError with the side-by-side report.
    """
    d = tensor_diff(name, ours, ref, kind)
    if not d["error"] <= tol:  # also catches NaN
        raise AssertionError(_failure_text(d, tol, kind))
    return d["error"]


def compare_tensors(ours, ref, tol, names=None, kind="scaled"):
    """Compare two {name: array} dicts tensor by tensor, in ``names`` order.

    names: default the keys of ``ref`` in order. A name missing on either side
    is a failed row (error inf). Returns (rows, ok): ``tensor_diff`` dicts
    with an extra "ok" each, and whether every row passed.
    """
    names = list(ref) if names is None else list(names)
    rows = []
    for n in names:
        if n not in ours or n not in ref:
            side = "ours" if n not in ours else "ref"
            d = {"name": n, "shape": f"missing in {side}", "error": float("inf"),
                 "max_abs": float("inf"), "where": None, "first": []}
        else:
            d = tensor_diff(n, ours[n], ref[n], kind)
        d["ok"] = bool(d["error"] <= tol)
        rows.append(d)
    return rows, all(d["ok"] for d in rows)


def format_report(rows, width=32):
    """One line per ``compare_tensors`` row: name, error, max |diff|, ok."""
    lines = []
    for d in rows:
        flag = "" if d.get("ok", True) else "   <-- MISMATCH"
        lines.append(f"  {d['name']:{width}s} {d['error']:.1e}  max|diff| {d['max_abs']:.1e}"
                     f"{flag}")
    return "\n".join(lines)


# ---------------------------------------------------------------- traces
# Default (rtol, atol) by the less precise dtype of two traces: float64
# implementations of the same step agree to ~1e-13; float32 ones to ~1e-6
# on the tensors and ~1e-5 after a few steps of drift. atol absorbs tensors
# that are zero in exact arithmetic (the bias before a BatchNorm has a zero
# gradient; each side rounds it to its own ~1e-17 or ~1e-9).
TOLERANCES = {"float64": (1e-10, 1e-12), "float32": (1e-4, 1e-6)}
FULL_COMPARE = 1 << 22  # N * D up to which the initial classifier is compared in full


def default_tolerances(*dtypes):
    """(rtol, atol) for traces of these dtype names: the loosest of TOLERANCES."""
    return max(TOLERANCES[d] for d in dtypes)


def trace_diff(name, ref, other, rtol, atol, floor=0.0):
    """One row of a trace comparison.

    pass: max |other - ref| <= max(atol + rtol * max |ref|, floor) (float), or
    exactly equal (integer tensors: ids, neighbours, counters). floor: a
    tolerance of its own for this tensor (the float32 noise floor of
    ``compare_traces``). Returns a dict: name,
    shape, max_abs, rel (max |diff| / max |ref|), where (index of the largest
    difference; the first differing one for integers), first (up to 4 pairs),
    at (the pair at ``where``), scale (max |ref|), used (max |diff| / (atol +
    rtol max |ref|): the share of the tolerance used, <= 1 passes), ok.
    """
    ref, other = np.asarray(ref), np.asarray(other)
    row = {"name": name, "shape": tuple(ref.shape), "max_abs": 0.0, "rel": 0.0, "where": None,
           "first": [], "at": None, "used": 0.0, "ok": True}
    if ref.shape != other.shape:
        row.update(shape=f"{tuple(other.shape)} vs {tuple(ref.shape)}", max_abs=float("inf"),
                   rel=float("inf"), used=float("inf"), ok=False)
        return row
    if ref.size == 0:
        return row
    exact = ref.dtype.kind in "iub" and other.dtype.kind in "iub"
    r, o = ref.astype(np.float64), other.astype(np.float64)
    diff = np.abs(o - r)
    if exact:
        bad = np.nonzero((ref != other).ravel())[0]
        flat = int(bad[0]) if bad.size else int(np.argmax(diff))
    else:
        flat = int(np.nanargmax(diff)) if not np.isnan(diff).all() else 0
    where = tuple(int(i) for i in np.unravel_index(flat, ref.shape))
    max_abs = float(np.max(diff)) if not np.isnan(diff).any() else float("nan")
    scale = float(np.max(np.abs(r)))
    rel = max_abs / scale if scale > 0 else (0.0 if max_abs == 0 else float("inf"))
    tol = max(atol + rtol * scale, floor)
    ok = (max_abs == 0) if exact else bool(max_abs <= tol)                # NaN fails
    used = max_abs if exact else max_abs / tol if tol > 0 \
        else (0.0 if max_abs == 0 else float("inf"))
    row.update(max_abs=max_abs, rel=rel, where=where, ok=ok, used=used, scale=scale,
               first=list(zip(r.ravel()[:4].tolist(), o.ravel()[:4].tolist())),
               at=(float(r.ravel()[flat]), float(o.ravel()[flat])))
    return row


def ratio_hint(name, ref, other, world_size, batch_size, labels=("ref", "other"),
               spread=1e-6, zero=0.0):
    """A sentence when other / ref is one constant (P, 1/P, B, 1/B, b, 1/b, -1, ...).

    Constant: the elementwise ratio c over the entries with |ref| > 1e-3 max
    |ref| varies by at most ``spread`` relative (1e-6 suits float64; float32
    rounding needs ~1e-4), and |other - c ref| <= spread max |other|
    everywhere. A named constant is matched within 1e-3. Any other constant
    gets a hint at any distance from 1 that the constancy test resolves
    (|c - 1| > 10 spread) if seen on at least 4 entries; a scalar only when
    its ratio is a named constant. None otherwise, and None for a tensor that
    is zero (max |ref| <= ``zero``, e.g. the comparison's atol: the gradient
    of a bias before a BatchNorm is rounding noise, whose ratio means nothing).
    """
    r = np.asarray(ref, dtype=np.float64).ravel()
    o = np.asarray(other, dtype=np.float64).ravel()
    if r.shape != o.shape or r.size == 0 or not (np.isfinite(r).all() and np.isfinite(o).all()):
        return None
    if np.max(np.abs(r)) <= zero:
        return None
    big = np.abs(r) > 1e-3 * np.max(np.abs(r))
    if not big.any():
        return None
    ratio = o[big] / r[big]
    c = float(np.median(ratio))
    if c == 0 or np.max(np.abs(ratio - c)) > spread * abs(c) or \
            np.max(np.abs(o - c * r)) > spread * np.max(np.abs(o)):
        return None
    P, B = world_size, batch_size
    b = B // P
    theirs, ours = labels[1], f"{labels[0]}'s"
    named = [
        (P, f"P = {P}, the world size", "x P without DDP's averaging: a feature gradient "
            "multiplied by P (Partial FC's all-gather backward, or a per-rank mean loss) with "
            "the network's gradients then summed, not averaged (or DistributedTraceWriter's "
            "gradients='summed' for a run that averages)? refimpl's gradients are of the "
            "global-mean loss, SUMMED over ranks, never x P (docs/oracle.md, Gradient scale)"),
        (1 / P, f"1/P = 1/{P}", "DDP averaging without x P: the network's gradients averaged "
            "over the ranks while each rank's dz is already of the global-mean loss; for "
            "DDP's average to come out right the all-gather's backward must multiply dz by P "
            "(as Partial FC does), or the gradients be summed (or DistributedTraceWriter's "
            "gradients='averaged' for a run that sums)? refimpl sums the gradients of the "
            "global-mean loss over ranks (docs/oracle.md, Gradient scale)"),
        (B, f"B = {B}, the global batch", "the loss summed over the batch instead of "
            "averaged? refimpl's loss is the mean over the global batch"),
        (1 / B, f"1/B = 1/{B}", "the loss divided by the batch size twice?"),
        (b, f"b = B/P = {b}, the local batch", "the local batch size in place of the global "
            "one (or summed per rank)? refimpl's loss is the mean over the global batch B"),
        (1 / b, f"1/b = 1/{b}", "divided by the local batch size once more?"),
        (-1.0, "-1", "the sign is flipped (gradient ascent, or y - softmax)?"),
    ]
    seen = set()
    for k, what, why in named:
        if k in seen or k == 1 or (k in (P, 1 / P) and P == 1) or (k in (b, 1 / b) and b in (1, B)):
            continue
        seen.add(k)
        if abs(c / k - 1) < 1e-3:
            return f"{name}: {theirs} is {c:.6g} x {ours} ({what}): {why}"
    if big.sum() < 4 or abs(c - 1) <= 10 * spread:
        return None
    return (f"{name}: {theirs} is a constant {c:.6g} x {ours}: a scale convention differs "
            f"(loss scale, learning rate, temperature tau, or a mean or variance over another "
            f"count)")


# What to look at when the first divergence is in a given tensor or section.
SECTION_HINTS = {
    "init": "the traces start from different weights or buffers: compare runs started "
            "from the same state (refimpl-oracle replay starts refimpl from yours)",
    "input": "the inputs differ: both traces must start from the same batch, ids and lr",
    "neighbours": "the hardest-class neighbours differ: the K classes j != i with the largest "
                  "cosine <w_hat_i, w_hat_j> of the initial classifier rows, ordered by "
                  "similarity, ties to the LOWER id (docs/oracle.md, Tie-break)",
    "z": "the network's forward differs (before the classifier): BatchNorm normalizes with "
         "the BIASED batch variance, eps 1e-5 inside the square root, statistics per rank "
         "('local') or of the global batch ('sync'); stem, architecture, initial weights "
         "(docs/oracle.md, BatchNorm)",
    "z_hat": "the feature normalization: z / max(||z||, 1e-12) (F.normalize)",
    "row_max": "the logits: <z_hat, w_hat> / tau, w_hat = w / max(||w||, 1e-12); check tau",
    "logsumexp": "the logits: <z_hat, w_hat> / tau, w_hat = w / max(||w||, 1e-12); check tau",
    "loss": "the loss: cross entropy against (1 - alpha) e_i + alpha/K sum_j e_j (j in NK(i)), "
            "the MEAN over the global batch B",
    "BN statistics": "the running statistics: new = (1 - 0.1) old + 0.1 batch (PyTorch's "
                     "momentum), the UNBIASED variance stored, under 'local' BN rank 0's "
                     "statistics kept (docs/oracle.md, BatchNorm)",
    "dz": "the feature gradient: dz = d loss / dz of the GLOBAL-mean loss, each rank its own "
          "rows of the reduce-scattered sum over the classifier shards, never x P (Partial "
          "FC multiplies it by P before DDP averages; docs/oracle.md, Gradient scale)",
    "backward": "the backward: gradients of the global-mean loss, summed over ranks "
                "(docs/oracle.md, Gradient scale)",
    "update": "the SGD step: d = g + wd p (weight-decay mask!), v = mu v + d, p -= lr v "
              "(PyTorch's form; docs/oracle.md, SGD)",
}


def _tie_hint(ref_trace, row, ref_arrays, other_nb, labels, float32=False):
    """If the first differing neighbour entry is a tie in the initial W, say so
    (or, for a float32 trace, a near-tie that rounding may decide)."""
    if ref_trace.hparams.get("neighbours") != "initial_weight" or row["where"] is None:
        return None
    b, k = row["where"]
    ref_nb = ref_arrays["neighbours"]
    i, j_ref, j_other = int(ref_arrays["ids"][b]), int(ref_nb[b, k]), int(other_nb[b, k])
    W = np.concatenate([ref_trace.classifier(j, j + 1) for j in (i, j_ref, j_other)])  # 3 rows
    Wn = W / np.maximum(np.linalg.norm(W, axis=1, keepdims=True), 1e-12)
    s_ref, s_other = float(Wn[0] @ Wn[1]), float(Wn[0] @ Wn[2])
    gap = abs(s_ref - s_other)
    if 1e-14 < gap <= 1e-6 and float32:
        return (f"class {i} (batch row {b}), neighbour {k}: {labels[0]} has {j_ref} (cosine "
                f"{s_ref:.9g}), {labels[1]} {j_other} ({s_other:.9g}): a near-tie that float32 "
                f"rounding can decide either way, not necessarily a bug; record "
                f"hparams['neighbours'] = 'given' to replay with your rows")
    if gap <= 1e-14:  # equal up to the float64 rounding of this check
        return (f"class {i} (batch row {b}), neighbour {k}: {labels[0]} has {j_ref}, "
                f"{labels[1]} {j_other}; both have cosine {s_ref:.6g} with it, a TIE: the "
                f"rule is that the lower id wins (a stable sort by similarity, descending); "
                f"torch.topk and an unstable argsort do not promise it (docs/oracle.md, "
                f"Tie-break)")
    return None


def compare_traces(ref, other, rtol=None, atol=None, labels=None, steps=None, noise=None,
                   noise_factor=30.0):
    """Compare the trace ``other`` with the reference trace ``ref``, tensor by tensor.

    Every tensor ``other`` holds is compared (its init state and the first
    ``steps`` steps, default all of other's): floats pass when
    max |other - ref| <= atol + rtol * max |ref| (defaults:
    ``default_tolerances`` of the two dtypes), integers must be equal. A
    tensor ``other`` holds and ``ref`` does not is a failure; what only
    ``ref`` holds is listed as not compared.

    noise: None, or {(section title, name): max |diff|} of a same-dtype run
    of the reference (``replay_and_compare`` measures refimpl's own float32
    error for a float32 trace): a tensor also passes within noise_factor
    times that. A float32 gradient that is a sum of cancelling terms (a
    BatchNorm bias) carries ~1e-3 relative rounding error in any float32
    implementation; this floor tells that from a bug.

    labels: what the report calls the two (default "ref", "other").
    Returns a dict: ref, other (paths), labels, rtol, atol, hparams_diff
    [(key, ref value, other value)], sections [(title, rows)] ("init", "step
    0", ...; rows from ``trace_diff`` plus "section"), not_compared, first
    (the first failing row in forward-then-backward order, with "where_step";
    or None), hints [str], ok, count.
    """
    from refimpl.oracle.diagnose import Evidence, decay_explains, first_hint
    from refimpl.oracle.trace import CLF, Trace, TraceError, section
    R, O = Trace(ref), Trace(other)
    labels = labels or ("ref", "other")
    d_rtol, d_atol = default_tolerances(R.hparams["dtype"], O.hparams["dtype"])
    rtol = d_rtol if rtol is None else rtol
    atol = d_atol if atol is None else atol
    keys = sorted(set(R.hparams) | set(O.hparams))
    hp_diff = [(k, R.hparams.get(k), O.hparams.get(k)) for k in keys
               if k not in ("dtype",) and R.hparams.get(k) != O.hparams.get(k)]
    n = len(O.steps) if steps is None else min(int(steps), len(O.steps))
    result = {"ref": str(R.path), "other": str(O.path), "labels": labels, "rtol": rtol,
              "atol": atol, "hparams_diff": hp_diff, "sections": [], "not_compared": [],
              "first": None, "hints": [], "ok": True, "count": 0,
              "dtypes": (R.hparams["dtype"], O.hparams["dtype"]),
              "world_sizes": (R.hparams["world_size"], O.hparams["world_size"]),
              "producers": (R.meta.get("producer"), O.meta.get("producer")),
              "noise_factor": noise_factor if noise else None}
    P, B = O.hparams["world_size"], O.hparams["batch_size"]
    spread = 1e-6 if result["dtypes"] == ("float64", "float64") else 1e-4

    ratios = {}  # the explanation of a constant ratio -> the tensors that show it
    evidence = [False]  # whether the first divergence's hint came from its numbers

    def add(title, ref_arrays, other_arrays, i=None):
        ev = None if i is None else Evidence(R, O, i, ref_arrays, other_arrays, rtol, atol,
                                             spread)
        rows = []
        for name, value in other_arrays.items():
            if name in ref_arrays:
                floor = noise_factor * noise.get((title, name), 0.0) if noise else 0.0
                row = trace_diff(name, ref_arrays[name], value, rtol, atol, floor)
                if noise:
                    row["noise"] = noise.get((title, name))
            else:
                row = {"name": name, "shape": f"not in {labels[0]}", "max_abs": float("inf"),
                       "rel": float("inf"), "where": None, "first": [], "at": None,
                       "used": float("inf"), "ok": False}
            row["section"] = section(name) if title != "init" else "init"
            rows.append(row)
            if row["ok"]:
                continue
            ratio = None
            if name in ref_arrays and value.dtype.kind == "f" and \
                    not (ev is not None and decay_explains(name, ev)):  # pure weight decay
                ratio = ratio_hint(name, ref_arrays[name], value, P, B, labels, spread, atol)
            if result["first"] is None:
                result["first"] = dict(row, where_step=title)
                hint = None
                if ev is not None:  # what the numbers say, before the section's advice
                    hint = first_hint(name, ev, ratio and ratio[len(name) + 2:])
                if name == "neighbours" and name in ref_arrays:
                    hint = _tie_hint(R, row, ref_arrays, value, labels,
                                     "float32" in result["dtypes"]) or hint
                evidence[0] = hint is not None
                hint = hint or SECTION_HINTS.get(name, SECTION_HINTS.get(row["section"]))
                if hint:
                    result["hints"].append(f"first divergence ({name}): {hint}")
            if ratio:
                ratios.setdefault(ratio[len(name) + 2:], []).append(f"{title} {name}")
        result["not_compared"] += [f"{title}: {nm}" for nm in ref_arrays
                                   if nm not in other_arrays]
        result["sections"].append((title, rows))
        result["count"] += len(rows)
        result["ok"] &= all(r["ok"] for r in rows)

    init_r, init_o = R.init(), O.init()
    if R.hparams["N"] * R.hparams["D"] <= FULL_COMPARE:
        for t, arrays in ((R, init_r), (O, init_o)):
            arrays[CLF] = t.classifier()
            m = t.classifier_momentum()
            if m is not None:
                arrays["momentum/" + CLF] = m
    add("init", init_r, init_o)
    if n > len(R.steps):
        raise TraceError(f"{O.path} has {n} steps, the reference {R.path} only {len(R.steps)}")
    for i in range(n):
        add(f"step {i}", R.step(i), O.step(i), i)
    # the explanations seen most often first, at most 4; the first divergence's own
    # ratio, when it is its hint, is said there once, with the count
    for why, where in sorted(ratios.items(), key=lambda kv: -len(kv[1]))[:4]:
        more = f" (and {len(where) - 1} more tensors)" if len(where) > 1 else ""
        if result["hints"] and result["hints"][0].endswith(": " + why):
            if more:
                result["hints"][0] += f" [the same ratio on {len(where) - 1} more tensors]"
            continue
        first = result["first"]
        if evidence[0] and where == [f"{first['where_step']} {first['name']}"]:
            continue  # its own hint said more
        result["hints"].append(f"{where[0]}{more}: {why}")
    return result


def worst_row(rows, rtol=None, atol=None):
    """The row with the largest relative error among those the relative test
    governs (max |ref| >= atol / rtol: not ~0 in exact arithmetic, like the
    gradient of a bias before a BatchNorm); NaN counts as worst. None if no row
    qualifies. Without rtol and atol: over every row.
    """
    if rtol and atol:
        rows = [r for r in rows if not r["ok"] or r.get("scale", 0) >= atol / rtol]
    return max(rows, key=lambda r: r["rel"] if r["rel"] == r["rel"] else np.inf,
               default=None)


def _fmt_shape(shape):
    return str(shape) if isinstance(shape, str) else "(" + ", ".join(map(str, shape)) + ")"


def format_trace_report(result, mismatches_only=False, width=40, details=8, max_rows=30):
    """The per-tensor table of ``compare_traces``, the first divergence and the hints.

    One line per tensor: name, shape, max |diff|, rel err (max |diff| / max
    |ref|), where, ok / MISMATCH; the first ``details`` mismatches of each
    step add the first values and the values at ``where`` side by side.
    mismatches_only: only the failing lines, at most ``max_rows`` per step
    (and a count per step).
    """
    ref_l, oth_l = result["labels"]
    lines = [f"{oth_l}: {result['other']} ({result['producers'][1]}, "
             f"{result['dtypes'][1]}, P = {result['world_sizes'][1]})",
             f"{ref_l}: {result['ref']} ({result['producers'][0]}, "
             f"{result['dtypes'][0]}, P = {result['world_sizes'][0]})",
             f"pass: max|{oth_l} - {ref_l}| <= atol + rtol * max|{ref_l}| per tensor, "
             f"rtol {result['rtol']:.0e}, atol {result['atol']:.0e}; integers exactly"]
    if result.get("noise_factor"):
        lines.append(f"  or <= {result['noise_factor']:g} x {ref_l}'s own error on the tensor in "
                     f"{result['dtypes'][1]} (its rounding noise: sums that cancel)")
    for key, a, b in result["hparams_diff"]:
        lines.append(f"note: hparams[{key!r}]: {ref_l} {a!r}, {oth_l} {b!r}")
    head = f"  {'tensor':{width}s} {'shape':16s} {'max|diff|':>9s} {'rel err':>9s}  where"
    for title, rows in result["sections"]:
        bad = [r for r in rows if not r["ok"]]
        worst = worst_row(rows, result["rtol"], result["atol"])
        floor = sum(1 for r in rows if r["ok"] and r.get("noise") is not None
                    and r["max_abs"] > result["atol"] + result["rtol"] * r.get("scale", 0))
        summary = (f"{title}: {len(rows)} tensors, {len(bad)} differ"
                   + (f"; worst rel err {worst['rel']:.1e} ({worst['name']})" if worst else "")
                   + (f"; {floor} within the noise floor" if floor else ""))
        lines.append(summary)
        shown = bad[:max_rows] if mismatches_only else rows
        if shown:
            lines.append(head)
        detailed = 0
        for r in shown:
            where = "" if r["where"] is None else str(r["where"])
            lines.append(f"  {r['name']:{width}s} {_fmt_shape(r['shape']):16s} "
                         f"{r['max_abs']:9.1e} {r['rel']:9.1e}  {where:14s} "
                         f"{'ok' if r['ok'] else 'MISMATCH'}")
            if not r["ok"] and r["first"] and detailed < details:
                detailed += 1
                lines.append(f"      first values  {ref_l:>8s} "
                             + " ".join(f"{a: .8e}" for a, _ in r["first"]))
                lines.append(f"                    {oth_l:>8s} "
                             + " ".join(f"{b: .8e}" for _, b in r["first"]))
                lines.append(f"      at {where:10s} {ref_l:>8s} {r['at'][0]: .8e}  "
                             f"{oth_l} {r['at'][1]: .8e}")
                if r.get("noise") is not None:
                    lines.append(f"      {ref_l}'s own {result['dtypes'][1]} error on it: "
                                 f"{r['noise']:.1e}")
        if mismatches_only and len(bad) > max_rows:
            lines.append(f"  ... and {len(bad) - max_rows} more tensors differ (without -q: "
                         f"every tensor)")
    if result["not_compared"]:
        lines.append(f"not recorded by {oth_l} (not compared): {len(result['not_compared'])} "
                     f"tensors, e.g. {', '.join(result['not_compared'][:3])}")
    first = result["first"]
    if first is None:
        lines.append(f"result: all {result['count']} tensors agree")
    else:
        lines.append(f"first divergence: {first['where_step']}, {first['name']} "
                     f"({first['section']}): max|diff| {first['max_abs']:.3e}, rel err "
                     f"{first['rel']:.3e} at {first['where']}")
        lines += [f"hint: {h}" for h in result["hints"]]
        n_bad = sum(not r["ok"] for _, rows in result["sections"] for r in rows)
        lines.append(f"result: {n_bad} of {result['count']} tensors differ")
    return "\n".join(lines)

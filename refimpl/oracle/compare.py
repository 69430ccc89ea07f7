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

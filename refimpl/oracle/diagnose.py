"""What a divergence means: hints from the evidence in the tensors.

Contract. ``compare_traces`` finds the first tensor where two traces differ;
this module says why, from the numbers of that tensor and of the reference
trace, never from the tensor's name alone. ``first_hint(name, ev)`` returns
a sentence that names the bug, or None when no signature fits (the caller
then gives the section's generic advice). ``Evidence`` holds one step of
both traces and the state before it.

    signature                                              the bug it names
    other / ref one constant: 1/P, P, B, ...               DDP averaging without x P,
                                                           x P without averaging, ...
    row_max = c x ref's in every row                       tau differs (tau / c)
    row_max <= ref's everywhere, equal in some rows        the softmax max per rank
      (= the max over one rank's classes, if the logits    (no all_reduce MAX)
      rebuilt from ref's z_hat and W say so)
    logsumexp < ref's in every row, by per-row amounts     the softmax sum per rank
      (= the log-sum-exp over one rank's classes)          (no all_reduce SUM)
    logsumexp - ref's = one constant c                     the sum scaled by exp(c)
    loss (or dz) = that of other targets, recomputed from  smoothing normalized per rank,
      ref's logits (per-rank alpha / K_r, uniform over N,  uniform label smoothing,
      one-hot)                                             smoothing off
    momentum/p (or p) - ref's = +-wd x p_before            the weight-decay mask
                                                           (decayed / not decayed)

``decay_explains(name, ev)`` says whether a difference is pure weight decay
(no ratio hint is then given: 1 - lr wd is a constant ratio that means
nothing about scale). The BatchNorm mode is found by replaying the other
mode (``replay.bn_mode_hint``), which needs refimpl's step, not only traces.
"""
import numpy as np

from refimpl.layers.normalize import l2_normalize_backward, l2_normalize_forward
from refimpl.oracle.trace import is_buffer
from refimpl.parallel.sharding import shard_range

MAX_LOGITS = 1 << 24  # B * N up to which the logits are rebuilt from ref's z_hat and W


def partial_fc_range(N, P, r):
    """Rank r's rows [lo, hi) under Partial FC's rule: the first N mod P ranks one more."""
    base, extra = divmod(N, P)
    lo = r * base + min(r, extra)
    return lo, lo + base + (r < extra)


RULES = (("refimpl's", shard_range), ("Partial FC's", partial_fc_range))


def _rules(names):
    return f"{' and '.join(names)} split{'s' if len(names) > 1 else ''}"


def splits(N, P):
    """{(lo, hi): 'rank r's shard under ...'} of the usual ways to split N rows over P."""
    out = {}
    for rule, f in RULES:
        for r in range(P):
            out.setdefault(f(N, P, r), []).append((r, rule))
    return {k: f"rank {v[0][0]}'s shard under {_rules([rule for _, rule in v])}"
            for k, v in out.items()}


class Evidence:
    """One step of the reference and the other trace, and the state before it.

    ref, other: the step's {name: array}; R, O: the Trace objects; i: the
    step's index; rtol, atol: the comparison's tolerance; spread: how
    constant a ratio must be (1e-6 in float64, 1e-4 with float32). The
    state before step i is the other trace's (a replay starts each step
    from it; two traces that agreed so far have the same), else the
    reference's.
    """

    def __init__(self, R, O, i, ref, other, rtol, atol, spread=1e-6):
        self.R, self.O, self.i, self.ref, self.other = R, O, i, ref, other
        self.rtol, self.atol, self.spread = rtol, atol, spread
        hp = O.hparams
        self.P, self.B, self.N = hp["world_size"], hp["batch_size"], hp["N"]
        self.tau, self.alpha, self.K = R.hparams["tau"], R.hparams["alpha"], R.hparams.get("K")
        self._before, self._logits = None, False

    def tol(self, ref):
        return self.atol + self.rtol * float(np.max(np.abs(ref))) if np.size(ref) else 0.0

    def before(self, name):
        """A parameter (or classifier.weight) before this step, float64; None if unknown."""
        if self._before is None:
            prev = []
            if self.i == 0:
                prev = [self.O.init(), self.R.init()]
            else:
                prev = [self.O.step(self.i - 1), self.R.step(self.i - 1)]
            self._before = prev
        for arrays in self._before:
            if name in arrays:
                return np.asarray(arrays[name], dtype=np.float64)
        if name == "classifier.weight" and self.i == 0:
            return np.asarray(self.R.classifier(), dtype=np.float64)
        return None

    def logits(self):
        """(B, N) the logits rebuilt from ref's z_hat and the classifier before the
        step, if they reproduce ref's row_max and logsumexp (else None)."""
        if self._logits is not False:
            return self._logits
        self._logits = None
        W, ref = self.before("classifier.weight"), self.ref
        if W is None or "z_hat" not in ref or self.B * self.N > MAX_LOGITS:
            return None
        wh = l2_normalize_forward(W)[0]
        L = np.asarray(ref["z_hat"], dtype=np.float64) @ wh.T / self.tau       # (B, N)
        m = L.max(axis=1)
        lse = m + np.log(np.exp(L - m[:, None]).sum(axis=1))
        for name, mine in (("row_max", m), ("logsumexp", lse)):
            if name in ref and np.max(np.abs(mine - ref[name])) > 1e-8 * np.max(np.abs(mine)):
                return None
        self._logits = L
        return L


def _ratio(ref, other, spread):
    """The constant c with other = c ref (over the entries with |ref| > 1e-3 max |ref|,
    to ``spread`` relative), or None."""
    r, o = (np.asarray(a, dtype=np.float64).ravel() for a in (ref, other))
    if not r.size or not np.any(r):
        return None
    big = np.abs(r) > 1e-3 * np.max(np.abs(r))
    c = float(np.median(o[big] / r[big]))
    if c == 0 or np.max(np.abs(o - c * r)) > spread * np.max(np.abs(o)):
        return None
    return c


# ------------------------------------------------------------------ the logits
def _row_max(ev):
    r, o = (np.asarray(ev.ref["row_max"], dtype=np.float64),
            np.asarray(ev.other["row_max"], dtype=np.float64))
    tol = ev.tol(r)
    c = _ratio(r, o, ev.spread)
    if c is not None and abs(c - 1) * np.max(np.abs(r)) > tol:
        return (f"the temperature: your logits are a constant {c:.6g} x refimpl's (row_max, "
                f"every row), as with tau = {ev.tau / c:.6g}, i.e. tau x {1 / c:.6g}, where "
                f"the trace declares tau = {ev.tau:g} (hparams['tau']): your logits divide by "
                f"another tau than the one you declared")
    equal = np.abs(o - r) <= tol
    if np.all(o <= r + tol) and equal.any() and not equal.all():
        subset = _which_classes(ev, lambda L: L.max(axis=1), o, tol)
        what = (f"{'a per-rank softmax max' if ev.P > 1 else 'a partial softmax max'}: yours "
                f"<= refimpl's in every row and equal in {int(equal.sum())} of {len(r)} rows "
                f"(those whose largest logit lies in the subset), the signature of a max over "
                f"a subset of the classes{subset}")
        if ev.P == 1:
            return what + ": some classes are left out of the row max"
        return (what + ": the row max taken over each rank's classes without the all_reduce "
                       "MAX over the classifier shards (docs/design.md, One training step, "
                       "row 4)")
    return None


def _logsumexp(ev):
    r, o = (np.asarray(ev.ref["logsumexp"], dtype=np.float64),
            np.asarray(ev.other["logsumexp"], dtype=np.float64))
    tol = ev.tol(r)
    if "row_max" in ev.other and "row_max" in ev.ref and \
            np.max(np.abs(ev.other["row_max"] - ev.ref["row_max"])) > ev.tol(ev.ref["row_max"]):
        return None                                 # the max is wrong already: said there
    deficit = r - o
    if np.ptp(deficit) <= tol:
        c = float(np.mean(-deficit))
        what = ""
        if ev.P > 1 and abs(c - np.log(ev.P)) <= 1e-6 + tol:
            what = (" = log(P): the sum counted P times (an all_reduce SUM of a sum that every "
                    "rank already holds whole)")
        elif ev.P > 1 and abs(c + np.log(ev.P)) <= 1e-6 + tol:
            what = " = -log(P): the sum averaged over the ranks instead of summed"
        return (f"the softmax's sum: your log-sum-exp is refimpl's {c:+.6g} in every row, the "
                f"sum of exp scaled by exp({c:.6g}) = {np.exp(c):.6g}{what}")
    if np.all(deficit > tol):
        subset = _which_classes(ev, lambda L: np.log(np.exp(L - L.max(axis=1, keepdims=True))
                                                     .sum(axis=1)) + L.max(axis=1), o, tol,
                                full=False)
        what = (f"{'a per-rank softmax sum' if ev.P > 1 else 'a partial softmax sum'}: your "
                f"log-sum-exp is below refimpl's in every row, by a different amount in each "
                f"({deficit.min():.3g} to {deficit.max():.3g}), the signature of a sum over a "
                f"subset of the classes{subset}")
        if ev.P == 1:
            return what + ": some classes are left out of the softmax's sum"
        return (what + ": the sum of exp(l - max) taken over each rank's classes without the "
                       "all_reduce SUM over the classifier shards (docs/design.md, One "
                       "training step, row 5)")
    return None


def _which_classes(ev, f, o, tol, full=True):
    """', exactly the ... over classes [lo, hi) (rank r's shard under ...)' when the
    rebuilt logits restricted to one rank's classes give ``o``; '' otherwise."""
    L = ev.logits()
    if L is None or ev.P < 2:
        return ""
    for (lo, hi), who in splits(ev.N, ev.P).items():
        if np.max(np.abs(f(L[:, lo:hi]) - o)) <= tol:
            return f", exactly that over the classes [{lo}, {hi}) ({who})"
    return ""


# ------------------------------------------------------------------ the targets
def _targets(ev, rule):
    """(B, N) targets of the batch under a hypothesis; None if it does not apply."""
    ids = np.asarray(ev.ref["ids"])
    B, N, alpha = len(ids), ev.N, ev.alpha
    y = np.zeros((B, N))
    rows = np.arange(B)
    if rule == "one-hot":
        if alpha == 0:
            return None
        y[rows, ids] = 1.0
        return y
    if rule == "uniform":
        if alpha == 0:
            return None
        y[:] = alpha / N
        y[rows, ids] += 1 - alpha
        return y
    if "neighbours" not in ev.ref or alpha == 0:
        return None
    nb = np.asarray(ev.ref["neighbours"])                        # (B, K)
    y[rows, ids] = 1 - alpha
    for lo, hi in rule:         # each rank spreads alpha over the K_r neighbours it holds
        own = (nb >= lo) & (nb < hi)                               # (B, K)
        share = np.broadcast_to(alpha / np.maximum(own.sum(axis=1, keepdims=True), 1),
                                nb.shape)
        np.add.at(y, (np.broadcast_to(rows[:, None], nb.shape)[own], nb[own]), share[own])
    return y


def _loss_and_dz(ev, y):
    """(loss, dz (B, D)) of targets y (rows need not sum to 1) on ref's logits."""
    L = ev.logits()
    m = L.max(axis=1, keepdims=True)
    lse = m + np.log(np.exp(L - m).sum(axis=1, keepdims=True))     # (B, 1)
    ysum = y.sum(axis=1, keepdims=True)
    B = L.shape[0]
    loss = float(np.sum(ysum * lse - (y * L).sum(axis=1, keepdims=True)) / B)
    dz = None
    if "z" in ev.ref:
        W = ev.before("classifier.weight")
        wh = l2_normalize_forward(W)[0]
        dL = (ysum * np.exp(L - lse) - y) / B                          # (B, N)
        _, cache = l2_normalize_forward(np.asarray(ev.ref["z"], dtype=np.float64))
        dz = l2_normalize_backward(dL @ wh / ev.tau, cache)            # (B, D)
    return loss, dz


def _targets_hint(name, ev):
    """The first divergence is the loss or dz: which other targets give yours?"""
    if ev.logits() is None:
        return None
    o = np.asarray(ev.other[name], dtype=np.float64)
    tol = ev.tol(ev.ref[name])
    candidates = []
    if ev.P > 1:
        rules = {}
        for rule, f in RULES:
            rules.setdefault(tuple(f(ev.N, ev.P, r) for r in range(ev.P)), []).append(rule)
        for ranges, names in rules.items():
            candidates.append((ranges, "smoothing normalized per rank: each rank spreads alpha "
                                       "over the K_r neighbours among its own classes (alpha / "
                                       f"K_r, the classes as {_rules(names)} give them), not "
                                       "alpha / K over all K: a row's targets then do not sum "
                                       "to 1; count the neighbours over all shards "
                                       "(docs/oracle.md, Targets)"))
    candidates += [("uniform", "uniform label smoothing: alpha spread over all N classes "
                               "(F.cross_entropy(label_smoothing=alpha)) instead of alpha / K "
                               "on the K hardest classes NK(i) (docs/oracle.md, Targets)"),
                   ("one-hot", f"smoothing off: one-hot targets, while the trace declares "
                               f"alpha = {ev.alpha:g} on the K = {ev.K} hardest classes")]
    for rule, what in candidates:
        y = _targets(ev, rule)
        if y is None:
            continue
        loss, dz = _loss_and_dz(ev, y)
        mine = np.asarray(loss) if name == "loss" else dz
        if mine is not None and np.max(np.abs(mine - o)) <= tol:
            return (f"the targets: {what} (your {name} is that of these targets, recomputed "
                    f"from refimpl's logits, within the tolerance)")
    return None


# ------------------------------------------------------------------ weight decay
def _decay(name, ev):
    """(sign, param, coefficient) if other - ref = sign x coefficient x p_before, the
    coefficient that weight decay has in ``name`` (wd in the momentum, -lr wd or
    Nesterov's -lr (1 + mu) wd in the parameter); None otherwise."""
    if name.startswith(("grad/", "checksum/")) or "@rows" in name or is_buffer(name):
        return None
    hp = ev.R.hparams
    wd, mu, lr = hp["weight_decay"], hp["momentum"], float(ev.ref["lr"])
    param = name[len("momentum/"):] if name.startswith("momentum/") else name
    p = ev.before(param)
    if wd == 0 or p is None or not np.any(p):
        return None
    diff = np.asarray(ev.other[name], dtype=np.float64) - np.asarray(ev.ref[name],
                                                                    dtype=np.float64)
    if diff.shape != p.shape:
        return None
    if name.startswith("momentum/"):
        coef = wd
    else:                       # p -= lr v; Nesterov: p -= lr (d + mu v)
        coef = -lr * wd * (1 + mu) if hp["nesterov"] and mu else -lr * wd
    tol = max(ev.tol(ev.ref[name]), ev.spread * float(np.max(np.abs(diff))))
    for sign in (1, -1):
        if np.max(np.abs(diff - sign * coef * p)) <= tol:
            return sign, param, coef
    return None


def decay_explains(name, ev):
    """Whether other - ref at ``name`` is exactly weight decay of the parameter."""
    return name in ev.other and name in ev.ref and _decay(name, ev) is not None


def _decay_hint(name, ev):
    found = _decay(name, ev)
    if found is None:
        return None
    sign, param, coef = found
    mask, wd = ev.R.hparams["weight_decay_mask"], ev.R.hparams["weight_decay"]
    one_d = np.ndim(ev.before(param)) <= 1
    if sign > 0:
        why = (f"your {param} was decayed, and the trace declares weight_decay_mask = "
               f"'{mask}' (1-D parameters, BatchNorm and biases, not decayed): the "
               f"weight-decay mask is swapped; does your optimizer decay every parameter (a "
               f"weight-decay schedule that sets every param group's weight_decay, the 1-D "
               f"group's zero too)?" if one_d else
               f"your {param} was decayed twice (weight decay in the loss and in SGD?)")
    else:
        why = (f"your {param} was not decayed, and the trace declares weight_decay_mask = "
               f"'{mask}'{' (every parameter decayed)' if mask == 'all' else ''}: the "
               f"weight-decay mask is swapped (1-D parameters in a group of weight_decay 0 "
               f"is 'no_bn_bias')" if one_d else
               f"your {param}, a weight, was not decayed (every mask decays weights)")
    term = "weight_decay" if name.startswith("momentum/") else "the update's weight-decay term"
    return (f"the weight decay: {name} differs from refimpl's by exactly "
            f"{sign * coef:+.6g} x {param} ({'+' if sign > 0 else '-'}{term}): {why} "
            f"(docs/oracle.md, Weight-decay mask)")


# ------------------------------------------------------------------ the entry point
def first_hint(name, ev, ratio_text=None):
    """The hint for the first divergent tensor ``name`` from its evidence, or None.

    ratio_text: ``compare.ratio_hint``'s sentence for this tensor (a constant
    ratio named: P, 1/P, B, ...), used where no more specific signature fits.
    """
    if name not in ev.ref or name not in ev.other or \
            np.asarray(ev.ref[name]).shape != np.asarray(ev.other[name]).shape:
        return None
    hint = None
    if name == "row_max":
        hint = _row_max(ev)
    elif name == "logsumexp":
        hint = _logsumexp(ev)
    elif name in ("loss", "dz"):
        if ratio_text is None or name == "loss":
            hint = _targets_hint(name, ev)
    elif not name.startswith(("grad/", "checksum/")) and name not in ("z", "z_hat"):
        hint = _decay_hint(name, ev)
    return hint or ratio_text

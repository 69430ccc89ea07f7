"""The oracle's trace: training steps of any implementation, tensor by tensor, in NumPy files.

Contract. A trace is a directory that NumPy alone can read (``np.load`` with
``allow_pickle=False``; ``meta.json`` is plain JSON). refimpl writes it
(``oracle/recorder.py``'s ``TraceRecorder``, ``refimpl-train --trace``), the
PyTorch writer writes it (``oracle/torch_writer.py``), and anyone can write
it by hand; ``Trace`` reads it, checked, for ``replay`` and ``compare``.
This module holds the format: its names and their order, the
hyper-parameters and their checks, the reader, and the writers' helpers
(``save_npz``, ``write_meta``: each file whole or not at all).
docs/oracle.md is the user's page.

    meta.json                {"format": "refimpl-trace", "version": 1, "producer",
                              "hparams": {...}, "classifier": "full" | "rows",
                              "steps": [{"file", "step", "lr"}, ...]}
    init.npz                 the state before the first traced step: every parameter
                             and BatchNorm buffer under torchvision-style names
                             (conv1.weight, layer1.0.bn1.running_mean, head.0.weight),
                             and momentum/<name> where a momentum buffer is non-zero
                             (absent = zero: PyTorch creates it at the first step)
    classifier.npy           (N, D) the classifier weight before the first step
    classifier_momentum.npy  (N, D) its momentum buffer, only when non-zero
    step_000000.npz          one file per step, in forward-then-backward order:

    section    tensor                                   shape
    input      lr                                       ()      float64, this step's
               input                                    (B, C, H, W)
               ids                                      (B,)    int64 instance ids
               neighbours                               (B, K)  int64, NK(ids): smoothed steps only
    forward    z, z_hat                                 (B, D)
               row_max, logsumexp                       (B,)    max_j l_bj, log sum_j exp l_bj
               loss                                     ()
               <BN buffers> at the step's end           (C,), counters () int64
                 (the forward's update; local BN: rank 0's)
    backward   grad/classifier.weight                   (N, D)  "full"
               or classifier.rows (R,) int64, grad/classifier.weight@rows (R, D),
                  checksum/grad/classifier.weight (S, 2)        "rows"
               dz                                       (B, D)
               grad/<param>, the last layer first (the order backward makes them),
                 summed over ranks, before weight decay
    update     momentum/<param>, <param> (updated), parameter by parameter
               momentum/classifier.weight, classifier.weight     (N, D) "full"
               or ...@rows (R, D) and checksum/... (S, 2)               "rows"

Every tensor is of the GLOBAL batch, B rows with the ranks' local batches
in rank order, whatever the world size P it was recorded on. A trace may
leave out any tensor but the inputs (``replay`` compares those it finds).
Float tensors have the trace's one dtype (``hparams["dtype"]``), except
``lr`` and the checksums (float64); a trace mixing dtypes is refused.

The classifier: in full while N * D <= FULL_LIMIT ("auto"), otherwise the
touched rows R (the sorted union of the batch's target ids: labels and
neighbours) plus per-shard checksums: for the S = world_size shards of
``shard_range``, [sum, sum of squares] of the shard's rows (float64).

Hyper-parameters (``HPARAMS`` says what each means): required are N, D,
tau, alpha, momentum, weight_decay, weight_decay_mask, nesterov, bn,
bn_momentum, bn_eps, dtype, world_size, batch_size; K and neighbours when
alpha > 0; arch, stem, width, head_hidden, dim are read from init.npz's
shapes (``architecture_of``) and, if given, must agree. A missing key, a
bad value or a contradiction raises TraceError naming the key.
"""
import json
import re
from pathlib import Path

import numpy as np

from refimpl.backend import to_numpy
from refimpl.deps import version_line
from refimpl.fileio import atomic_file
from refimpl.parallel.sharding import shard_range

FORMAT, VERSION = "refimpl-trace", 1
META, INIT = "meta.json", "init.npz"
CLASSIFIER, CLASSIFIER_MOMENTUM = "classifier.npy", "classifier_momentum.npy"
CLF = "classifier.weight"
FULL_LIMIT = 1 << 20  # N * D elements up to which the classifier is traced in full
INPUTS = ("lr", "input", "ids", "neighbours")
FORWARD = ("z", "z_hat", "row_max", "logsumexp", "loss")
BUFFER_SUFFIXES = (".running_mean", ".running_var", ".num_batches_tracked")
MASKS = ("all", "no_bn_bias")
NEIGHBOUR_RULES = ("initial_weight", "given")

# key -> (type, meaning); the meaning is quoted in every error about the key.
HPARAMS = {
    "N": (int, "the number of instances = classifier rows"),
    "D": (int, "the feature dimension = classifier columns"),
    "tau": (float, "the temperature: logit = <z_hat, w_hat> / tau"),
    "alpha": (float, "the smoothing weight on the K hardest classes (0: one-hot)"),
    "K": (int, "hardest classes per instance (needed when alpha > 0)"),
    "neighbours": (str, "'initial_weight' if the neighbour table was computed from the "
                        "classifier weight in classifier.npy (replay recomputes and "
                        "compares it), 'given' if it came from elsewhere (replay uses the "
                        "recorded rows)"),
    "momentum": (float, "SGD momentum mu (v = mu v + g + wd p; p -= lr v)"),
    "weight_decay": (float, "SGD weight decay wd (L2, added to the gradient)"),
    "weight_decay_mask": (str, "'all' (every parameter, PyTorch's default) or 'no_bn_bias' "
                               "(1-D parameters, i.e. BatchNorm and biases, not decayed)"),
    "nesterov": (bool, "Nesterov momentum"),
    "bn": (str, "'local' (per-rank batch statistics, DDP) or 'sync' (global batch)"),
    "bn_momentum": (float, "BatchNorm momentum, PyTorch's sense (0.1)"),
    "bn_eps": (float, "BatchNorm eps inside the square root (1e-5)"),
    "dtype": (str, "'float32' or 'float64': network, classifier and optimizer state"),
    "world_size": (int, "P, the number of ranks the trace was recorded on"),
    "batch_size": (int, "B, the global batch"),
    "arch": (str, "resnet18 | resnet34 | resnet50 (read from init.npz if absent)"),
    "stem": (str, "'cifar' or 'imagenet' (read from init.npz if absent)"),
    "width": (int, "the ResNet base width (read from init.npz if absent)"),
    "head_hidden": (int, "the head's hidden width (read from init.npz if absent)"),
    "dim": (int, "the head's output width = D (read from init.npz if absent)"),
    "seed": (int, "the run's seed (information only)"),
}
REQUIRED = ("N", "D", "tau", "alpha", "momentum", "weight_decay", "weight_decay_mask",
            "nesterov", "bn", "bn_momentum", "bn_eps", "dtype", "world_size", "batch_size")


class TraceError(ValueError):
    """A trace that cannot be read or replayed; the message names the file and key."""


# ---------------------------------------------------------------- names and order
def is_buffer(name):
    """True for BatchNorm buffers (running_mean, running_var, num_batches_tracked)."""
    return name.endswith(BUFFER_SUFFIXES)


def step_file(i):
    return f"step_{int(i):06d}.npz"


def section(name):
    """The part of the step a tensor belongs to: input, forward, BN statistics,
    backward or update."""
    if name in INPUTS:
        return "input"
    if name in FORWARD:
        return "forward"
    if is_buffer(name):
        return "BN statistics"
    if name.startswith("grad/") or name in ("dz", "classifier.rows"):
        return "backward"
    return "update"


def order_key(name, params, buffers):
    """Sort key of a step tensor in forward-then-backward order.

    params, buffers: the parameter and buffer names in state-dict order (the
    order of init.npz). Raises TraceError for a name the format does not know.
    """
    pidx = {p: i for i, p in enumerate(params)}
    if name in INPUTS:
        return (0, INPUTS.index(name))
    if name in FORWARD:
        return (1, FORWARD.index(name))
    if name in buffers:
        return (2, buffers.index(name))
    clf_back = ("grad/" + CLF, "classifier.rows", f"grad/{CLF}@rows", f"checksum/grad/{CLF}")
    if name in clf_back:
        return (3, clf_back.index(name))
    if name == "dz":
        return (4, 0)
    if name.startswith("grad/") and name[5:] in pidx:
        return (5, -pidx[name[5:]])                         # backward: the last layer first
    if name.startswith("momentum/") and name[9:] in pidx:
        return (6, pidx[name[9:]], 0)
    if name in pidx:
        return (6, pidx[name], 1)
    clf_update = (f"momentum/{CLF}", f"momentum/{CLF}@rows", f"checksum/momentum/{CLF}",
                  CLF, f"{CLF}@rows", f"checksum/{CLF}")
    if name in clf_update:
        return (7, clf_update.index(name))
    raise TraceError(f"unknown tensor name {name!r}: not one of the trace format's names "
                     f"(inputs {INPUTS}, forward {FORWARD}, grad/<param>, <param>, "
                     f"momentum/<param>, BN buffers, {CLF}...; docs/oracle.md)"
                     + _prefix_note([name]))


def canonical_order(names, params, buffers):
    """``names`` sorted in forward-then-backward order (``order_key``)."""
    return sorted(names, key=lambda n: order_key(n, params, buffers))


# ---------------------------------------------------------------- hyper-parameters
def check_hparams(hp, where="meta.json"):
    """Raise TraceError naming the first missing, mistyped or impossible key of hp."""
    if not isinstance(hp, dict):
        raise TraceError(f"{where}: 'hparams' must be a JSON object, got {type(hp).__name__}")
    need = list(REQUIRED)
    if hp.get("alpha", 0) not in (0, 0.0):
        need += ["K", "neighbours"]
    for key in need:
        if key not in hp or hp[key] is None:
            raise TraceError(f"{where}: hparams[{key!r}] is missing ({HPARAMS[key][1]})")
    for key, value in hp.items():
        if key not in HPARAMS:
            raise TraceError(f"{where}: unknown hparams key {key!r} (known: "
                             f"{', '.join(HPARAMS)})")
        kind = HPARAMS[key][0]
        ok = value is None or (isinstance(value, kind) if kind is not float else
                               isinstance(value, (int, float)) and not isinstance(value, bool))
        if kind is int and isinstance(value, bool):
            ok = False
        if not ok:
            raise TraceError(f"{where}: hparams[{key!r}] must be a {kind.__name__}, got "
                             f"{value!r} ({HPARAMS[key][1]})")

    def bad(key, why):
        raise TraceError(f"{where}: hparams[{key!r}] = {hp[key]!r}: {why} ({HPARAMS[key][1]})")
    for key in ("N", "D", "world_size", "batch_size"):
        if hp[key] < 1:
            bad(key, "must be >= 1")
    if not 0 < hp["tau"] < float("inf"):
        bad("tau", "must be > 0 and finite")
    if not 0 <= hp["alpha"] < 1:
        bad("alpha", "must lie in [0, 1)")
    if hp["alpha"] > 0:
        if not 1 <= hp["K"] < hp["N"]:
            bad("K", f"must lie in [1, N = {hp['N']})")
        if hp["neighbours"] not in NEIGHBOUR_RULES:
            bad("neighbours", f"must be one of {NEIGHBOUR_RULES}")
    for key in ("momentum", "weight_decay"):
        if not 0 <= hp[key] < float("inf"):
            bad(key, "must be finite and >= 0")
    if hp["nesterov"] and hp["momentum"] <= 0:
        bad("nesterov", "needs momentum > 0")
    if hp["weight_decay_mask"] not in MASKS:
        bad("weight_decay_mask", f"must be one of {MASKS}")
    if hp["bn"] not in ("local", "sync"):
        bad("bn", "must be 'local' or 'sync'")
    if not 0 <= hp["bn_momentum"] <= 1:
        bad("bn_momentum", "must lie in [0, 1] (PyTorch's sense; Keras' 0.99 is PyTorch's 0.01)")
    if not 0 <= hp["bn_eps"] < 1:
        bad("bn_eps", "must lie in [0, 1)")
    if hp["dtype"] not in ("float32", "float64"):
        bad("dtype", "must be 'float32' or 'float64'")
    if hp["batch_size"] % hp["world_size"]:
        bad("batch_size", f"is not divisible by world_size = {hp['world_size']}")
    if hp["N"] < hp["world_size"]:
        bad("N", f"is smaller than world_size = {hp['world_size']} (every rank owns a row)")
    if hp.get("dim") is not None and hp["dim"] != hp["D"]:
        bad("dim", f"contradicts D = {hp['D']}")
    return hp


def _prefix_note(names):
    """What to say when names carry DDP's ``module.`` prefix ('' otherwise)."""
    if not any(n.split("/")[-1].startswith("module.") for n in names):
        return ""
    return ("; its names start with 'module.', DistributedDataParallel's prefix: write the "
            "state of the module DDP wraps (model.module.state_dict(); refimpl's TraceWriters "
            "unwrap DDP themselves). init_encoder accepts the prefix; a trace does not")


def architecture_of(state):
    """{arch, stem, width, head_hidden, dim} read from a state dict's names and shapes.

    state: {name: array or shape tuple}, torchvision names plus head.*; raises
    TraceError when
    the names are not those of a refimpl ResNet-18/34/50 + MLP head.
    """
    from refimpl.models.resnet import ARCHS
    from refimpl.models.blocks import Bottleneck
    for key in ("conv1.weight", "head.0.weight", "head.3.weight"):
        if key not in state:
            raise TraceError(f"init.npz: no {key!r}: the state must be a torchvision-named "
                             f"ResNet encoder plus the head head.0 (Linear), head.1 "
                             f"(BatchNorm1d), head.3 (Linear) (docs/oracle.md, The architecture)"
                             + _prefix_note(state))
    def shape(name):
        v = state[name]
        return tuple(v) if isinstance(v, tuple) else tuple(v.shape)
    conv1 = shape("conv1.weight")
    depths = tuple(len({m.group(1) for k in state
                        if (m := re.match(rf"layer{i}\.(\d+)\.conv1\.weight$", k))})
                   for i in range(1, 5))
    bottleneck = "layer1.0.conv3.weight" in state
    arch = [a for a, (block, d) in ARCHS.items()
            if d == depths and (block is Bottleneck) == bottleneck]
    if not arch:
        raise TraceError(f"init.npz: blocks per stage {depths} "
                         f"({'Bottleneck' if bottleneck else 'BasicBlock'}) are not one of "
                         f"{sorted(ARCHS)}")
    return {"arch": arch[0], "stem": "imagenet" if conv1[-1] == 7 else "cifar",
            "width": int(conv1[0]), "head_hidden": int(shape("head.0.weight")[0]),
            "dim": int(shape("head.3.weight")[0])}


# ---------------------------------------------------------------- writing
def save_npz(path, arrays):
    """np.savez to path, whole or not at all (``fileio.atomic_file``)."""
    with atomic_file(path) as f:
        np.savez(f, **arrays)


def write_meta(path, hparams, steps, classifier, producer):
    """Write meta.json (atomic). steps: [{"file", "step", "lr"}, ...]."""
    meta = {"format": FORMAT, "version": VERSION, "producer": producer,
            "made_with": version_line(), "hparams": hparams, "classifier": classifier,
            "steps": steps}
    with atomic_file(Path(path) / META) as f:
        f.write((json.dumps(meta, indent=1) + "\n").encode())
    return meta


def check_one_dtype(named, dtype, where):
    """Raise TraceError unless every float array in ``named`` has ``dtype``.

    The one-switch rule: network, classifier and optimizer state share one dtype
    (a float64 network with a float32 classifier would run at float32 accuracy
    without saying so).
    """
    for name, v in named.items():
        kind = np.dtype(v.dtype)
        if kind.kind == "f" and kind != np.dtype(dtype):
            raise TraceError(f"{where}: {name} is {kind.name} but the run's dtype is "
                             f"{np.dtype(dtype).name}: a run has ONE dtype for the network, "
                             f"the classifier and the optimizer state (mixed dtypes are "
                             f"refused; cast everything, e.g. model.double())")


def shard_checksums(rows, lo, num_classes, shards, comm=None):
    """(shards, 2) float64: [sum, sum of squares] of each shard of an (N, D) array.

    rows: (n, D) the rows [lo, lo + n) that this rank holds (the whole array
    with lo = 0 in one process); shards S: the shards of ``shard_range(N, S, s)``.
    Each rank adds what it holds of each shard; ``comm`` sums over the ranks, so
    any P computes the checksums of any S.
    """
    rows = np.asarray(to_numpy(rows), dtype=np.float64)
    out = np.zeros((shards, 2))
    for s in range(shards):
        a, c = shard_range(num_classes, shards, s)
        a, c = max(a, lo), min(c, lo + rows.shape[0])
        if c > a:
            part = rows[a - lo:c - lo]
            out[s] = part.sum(), np.square(part).sum()
    return out if comm is None else to_numpy(comm.all_reduce(out, "sum"))


# ---------------------------------------------------------------- reading
class Trace:
    """A trace directory, checked when opened.

    Attributes: path, meta, hparams (architecture keys filled in from init.npz),
    params and buffers (names in state-dict order), steps (meta's list).
    ``init()`` -> {name: array}; ``classifier(lo, hi)`` and
    ``classifier_momentum(lo, hi)`` -> rows of the (N, D) arrays (or None);
    ``step(i)`` -> {name: array} in forward-then-backward order, checked.
    """

    def __init__(self, path):
        self.path = Path(path)
        if not (self.path / META).is_file():
            raise TraceError(f"{self.path}: not a trace (no {META})")
        try:
            meta = json.loads((self.path / META).read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise TraceError(f"{self.path / META}: not valid JSON ({e})") from None
        where = str(self.path / META)
        if not isinstance(meta, dict) or meta.get("format") != FORMAT:
            raise TraceError(f"{where}: 'format' must be {FORMAT!r}")
        if meta.get("version") != VERSION:
            raise TraceError(f"{where}: trace format version {meta.get('version')!r}; this "
                             f"refimpl reads version {VERSION}")
        for key in ("hparams", "steps", "classifier"):
            if key not in meta:
                raise TraceError(f"{where}: {key!r} is missing")
        if meta["classifier"] not in ("full", "rows"):
            raise TraceError(f"{where}: 'classifier' must be 'full' or 'rows', got "
                             f"{meta['classifier']!r}")
        self.meta, self.steps = meta, meta["steps"]
        if not isinstance(self.steps, list) or not all(
                isinstance(s, dict) and "file" in s for s in self.steps):
            raise TraceError(f"{where}: 'steps' must be a list of {{'file': ...}} objects")
        hp = dict(check_hparams(meta["hparams"], where))
        with self._load(INIT) as z:
            names = list(z.files)
            arrays = {n: z[n] for n in names}
        self.params = [n for n in names if not n.startswith("momentum/") and not is_buffer(n)]
        self.buffers = [n for n in names if is_buffer(n)]
        for n in names:
            if n.startswith("momentum/") and n[9:] not in self.params:
                raise TraceError(f"{self.path / INIT}: {n} has no parameter {n[9:]}")
        check_one_dtype(arrays, hp["dtype"], str(self.path / INIT))
        arch = architecture_of(arrays)
        for key, value in arch.items():
            if hp.get(key) is not None and hp[key] != value:
                raise TraceError(f"{where}: hparams[{key!r}] = {hp[key]!r} contradicts "
                                 f"init.npz, whose shapes say {value!r}")
            hp[key] = value
        if hp["dim"] != hp["D"]:
            raise TraceError(f"{where}: hparams['D'] = {hp['D']} but head.3.weight has "
                             f"{hp['dim']} outputs (init.npz)")
        self.hparams = hp
        w = self._classifier_file(CLASSIFIER)
        if w is None:
            raise TraceError(f"{self.path}: no {CLASSIFIER} (the (N, D) initial classifier "
                             f"weight)")
        self._check_classifier(CLASSIFIER, w)
        m = self._classifier_file(CLASSIFIER_MOMENTUM)
        if m is not None:
            self._check_classifier(CLASSIFIER_MOMENTUM, m)

    # -- files
    def _load(self, name):
        f = self.path / name
        if not f.is_file():
            raise TraceError(f"{f}: missing")
        try:
            return np.load(f, allow_pickle=False)
        except (OSError, ValueError) as e:
            raise TraceError(f"{f}: not a readable .npz ({e})") from None

    def _classifier_file(self, name):
        f = self.path / name
        if not f.is_file():
            return None
        try:
            return np.load(f, mmap_mode="r", allow_pickle=False)
        except (OSError, ValueError) as e:
            raise TraceError(f"{f}: not a readable .npy ({e})") from None

    def _check_classifier(self, name, w):
        hp = self.hparams
        if w.shape != (hp["N"], hp["D"]):
            raise TraceError(f"{self.path / name}: shape {w.shape}, but hparams say N = "
                             f"{hp['N']}, D = {hp['D']}")
        check_one_dtype({name: w}, hp["dtype"], str(self.path / name))

    def init(self):
        """{name: array}: parameters, buffers, momentum/<name> before the first step."""
        with self._load(INIT) as z:
            return {n: z[n] for n in z.files}

    def classifier(self, lo=0, hi=None):
        """Rows [lo, hi) of the initial classifier weight (a copy)."""
        return np.array(self._classifier_file(CLASSIFIER)[lo:hi])

    def classifier_momentum(self, lo=0, hi=None):
        """Rows [lo, hi) of the initial classifier momentum, or None (zero)."""
        m = self._classifier_file(CLASSIFIER_MOMENTUM)
        return None if m is None else np.array(m[lo:hi])

    def step(self, i):
        """Step i's tensors, {name: array} in forward-then-backward order, checked."""
        entry = self.steps[i]
        where = str(self.path / entry["file"])
        with self._load(entry["file"]) as z:
            arrays = {n: z[n] for n in z.files}
        hp = self.hparams
        for key in ("lr", "input", "ids"):
            if key not in arrays:
                raise TraceError(f"{where}: the input {key!r} is missing (a step needs lr, "
                                 f"input, ids; neighbours when smoothed)")
        B = hp["batch_size"]
        ids = arrays["ids"]
        if ids.shape != (B,) or ids.dtype.kind not in "iu":
            raise TraceError(f"{where}: ids must be ({B},) integers (hparams batch_size), got "
                             f"{ids.dtype} {ids.shape}")
        if ids.min() < 0 or ids.max() >= hp["N"]:
            raise TraceError(f"{where}: ids must lie in [0, N = {hp['N']}), got "
                             f"[{ids.min()}, {ids.max()}]")
        x = arrays["input"]
        if x.ndim != 4 or x.shape[0] != B or x.shape[1] != 3:
            raise TraceError(f"{where}: input must be (B = {B}, 3, H, W) images, got {x.shape}")
        if arrays["lr"].shape != () or not 0 <= float(arrays["lr"]) < float("inf"):
            raise TraceError(f"{where}: lr must be a finite scalar >= 0, got {arrays['lr']!r}")
        if "neighbours" in arrays:
            nb = arrays["neighbours"]
            if hp["alpha"] == 0:
                raise TraceError(f"{where}: neighbours recorded but hparams['alpha'] = 0 "
                                 f"(one-hot targets use no neighbours)")
            if nb.shape != (B, hp["K"]) or nb.dtype.kind not in "iu":
                raise TraceError(f"{where}: neighbours must be ({B}, K = {hp['K']}) integers, "
                                 f"got {nb.dtype} {nb.shape}")
        check_one_dtype({n: v for n, v in arrays.items()
                         if n != "lr" and not n.startswith("checksum/")},
                        hp["dtype"], where)
        return {n: arrays[n] for n in canonical_order(arrays, self.params, self.buffers)}

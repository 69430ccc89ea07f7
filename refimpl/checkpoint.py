"""Checkpoints: world-size-independent, atomic, verified.

Contract (docs/design.md, "Checkpoints"). A checkpoint is a directory

    meta.json               format version, config, epoch, step, N, D, dtype, arch,
                            the version line of the code that wrote it (made_with),
                            world size at save time, sampler position, RNG rule,
                            one sha256 per file (written last: its presence
                            means the rest is complete)
    replicated.npz          the replicated state by name: parameters
                            (``layer1.0.conv1.weight``, ``head.0.weight``), BN
                            buffers, and SGD momenta (``momentum/<name>``);
                            read with allow_pickle=False
    classifier.weight.npy   the FULL N x D classifier weight, and its momentum
    classifier.momentum.npy (``.npy``: every rank writes its own rows through a
                            memory map; any rank reads any row range back)
    neighbours.npy          the (N, K) neighbour table in use, if any

so a run saved on P ranks resumes on any P'. ``save`` writes into the
temporary directory ``.tmp-ckpt-<step>`` beside the final one (every rank
writes its rows there: its name is known to all) and publishes it when
complete (``fileio.publish``: every file and the directory fsynced, one
rename); then the ``latest`` file (``fileio.atomic_file``) names it and
checkpoints beyond the last ``keep`` are deleted. A crash or ``kill -9`` at
any moment leaves the previous checkpoint intact; ``clean_stale`` removes
what a killed save left behind.

``load`` checks that the checkpoint fits the run (N, D, arch, stem, width,
dim, dtype: a mismatch names the field; never a silent re-initialization)
and that every file is complete and unchanged (its sha256; a truncated,
corrupt or foreign file is named), then fills the network, the classifier
shard of this rank (its rows of the full file), both momenta and returns
the saved training state.

Every rank calls ``save`` and ``load`` (collective: barriers and one
broadcast); rank 0 writes the small files.
"""
import json
import shutil
from pathlib import Path

import numpy as np

from refimpl.backend import asarray
from refimpl.deps import add_version_argument, require, version_line
from refimpl.fileio import (atomic_file, publish, remove_stale_temporaries, sha256_file,
                            write_shard_rows)
from refimpl.models.state_dict import write_state_file
from refimpl.params import StateDictError

FORMAT_VERSION = 1
META = "meta.json"
REPLICATED = "replicated.npz"
WEIGHT, MOMENTUM = "classifier.weight.npy", "classifier.momentum.npy"
NEIGHBOURS = "neighbours.npy"
LATEST = "latest"
PREFIX = "ckpt-"
TMP_PREFIX = ".tmp-"
# The fields that must match between a checkpoint and the run that loads it.
MUST_MATCH = ("arch", "stem", "width", "head_hidden", "dim", "dtype")


class CheckpointError(ValueError):
    """A checkpoint that is missing, incomplete, damaged or does not fit the run."""


def checkpoint_name(step):
    """The directory name of the checkpoint taken after global step ``step``."""
    return f"{PREFIX}{int(step):09d}"


def clean_stale(run_dir):
    """Remove what a killed save left in ``run_dir`` (rank 0): its temporary
    checkpoint directories, and its ``latest`` file not yet renamed into place."""
    run_dir = Path(run_dir)
    removed = []
    if run_dir.is_dir():
        for p in run_dir.iterdir():
            if p.name.startswith(TMP_PREFIX + PREFIX) and p.is_dir():
                shutil.rmtree(p, ignore_errors=True)
                removed.append(p.name)
    removed += [p.name for p in remove_stale_temporaries(run_dir, LATEST)]
    return removed


def list_checkpoints(run_dir):
    """Complete checkpoints in ``run_dir`` (those with meta.json), oldest first."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        return []
    return sorted(p for p in run_dir.iterdir()
                  if p.name.startswith(PREFIX) and (p / META).is_file())


def latest_checkpoint(run_dir):
    """The checkpoint ``latest`` names, else the newest complete one, else None."""
    run_dir = Path(run_dir)
    pointer = run_dir / LATEST
    if pointer.is_file():
        target = run_dir / pointer.read_text().strip()
        if (target / META).is_file():
            return target
    found = list_checkpoints(run_dir)
    return found[-1] if found else None


def save(run_dir, state, cfg_dict, net, clf, net_opt, clf_opt, comm, neighbours=None, keep=2):
    """Write a checkpoint of the run's state after global step ``state['step']``.

    state: {"epoch", "step_in_epoch", "step"} (where training resumes) plus any
    JSON-serializable extras; cfg_dict: the run's config as a dict. Collective.
    Returns the final Path.
    """
    run_dir = Path(run_dir)
    name = checkpoint_name(state["step"])
    final, tmp = run_dir / name, run_dir / (TMP_PREFIX + name)
    rank = comm.rank
    if rank == 0:
        run_dir.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir()
    comm.barrier()
    N, D = clf.num_classes, clf.dim
    dtype = np.dtype(clf.weight.dtype)
    write_shard_rows(tmp / WEIGHT, clf.weight, clf.lo, (N, D), dtype, comm)
    if clf_opt.momentum_buffer is not None:
        write_shard_rows(tmp / MOMENTUM, clf_opt.momentum_buffer.reshape(clf.weight.shape),
                         clf.lo, (N, D), dtype, comm)
    comm.barrier()  # every rank's rows are on disk
    if rank == 0:
        arrays = net.store.state_dict()
        if net_opt.momentum_buffer is not None:
            arrays.update(net.store.flat_dict(net_opt.momentum_buffer, "momentum/"))
        np.savez(tmp / REPLICATED, **arrays)
        files = [REPLICATED, WEIGHT] + ([MOMENTUM] if (tmp / MOMENTUM).exists() else [])
        if neighbours is not None:
            np.save(tmp / NEIGHBOURS, np.asarray(neighbours, dtype=np.int64), allow_pickle=False)
            files.append(NEIGHBOURS)
        meta = {"format_version": FORMAT_VERSION, "state": state, "config": cfg_dict,
                "num_classes": N, "dim": D, "dtype": dtype.name, "world_size": comm.size,
                "sampler": {"epoch": state["epoch"], "step_in_epoch": state["step_in_epoch"]},
                "rng": "stateless: every draw is rng(seed, stream, keys) (refimpl.backend.rng)",
                "made_with": version_line(),
                "files": {f: sha256_file(tmp / f) for f in files}}
        (tmp / META).write_text(json.dumps(meta, indent=1))
        # fsync every file, then one rename (the same step saved twice, e.g. on
        # interrupt: the earlier copy is moved aside, then deleted)
        publish([(tmp, final)])
        with atomic_file(run_dir / LATEST) as f:
            f.write((name + "\n").encode())
        for old in list_checkpoints(run_dir)[:-keep]:
            shutil.rmtree(old, ignore_errors=True)
    comm.barrier()
    return final


def read_meta(path):
    """meta.json of a checkpoint directory, checked for the format version."""
    path = Path(path)
    if not (path / META).is_file():
        raise CheckpointError(f"{path}: not a complete checkpoint (no {META}; an interrupted "
                              f"save leaves only a {TMP_PREFIX}* directory)")
    try:
        meta = json.loads((path / META).read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{path / META}: not valid JSON ({e})") from None
    if not isinstance(meta, dict) or meta.get("format_version") != FORMAT_VERSION:
        raise CheckpointError(f"{path / META}: format_version "
                              f"{meta.get('format_version') if isinstance(meta, dict) else None!r}, "
                              f"this refimpl reads version {FORMAT_VERSION}")
    return meta


def verify(path, meta=None):
    """Raise CheckpointError naming the first file that is missing or changed."""
    path = Path(path)
    meta = read_meta(path) if meta is None else meta
    for name, digest in meta["files"].items():
        f = path / name
        if not f.is_file():
            raise CheckpointError(f"{f}: missing (the checkpoint is incomplete)")
        if sha256_file(f) != digest:
            raise CheckpointError(f"{f}: checksum mismatch: the file is truncated, corrupt "
                                  f"or not this checkpoint's")
    return meta


def check_fits(meta, cfg_dict, num_classes):
    """Raise CheckpointError naming every field where the checkpoint and the run differ."""
    saved = meta["config"]
    bad = [f"{k}: checkpoint {saved.get(k)!r}, config {cfg_dict.get(k)!r}"
           for k in MUST_MATCH if saved.get(k) != cfg_dict.get(k)]
    if meta["num_classes"] != num_classes:
        bad.append(f"N (instances): checkpoint {meta['num_classes']}, training set {num_classes}")
    if bad:
        raise CheckpointError("the checkpoint does not fit this run (refusing to start from "
                              "scratch or from mismatched weights):\n  " + "\n  ".join(bad))


def load(path, cfg_dict, net, clf, net_opt, clf_opt, comm):
    """Fill net, this rank's classifier rows and both momenta from a checkpoint.

    Rank 0 verifies the checksums; its verdict is broadcast, so every rank
    raises the same CheckpointError. Returns (state, neighbours or None).
    """
    path = Path(path)
    ok = np.zeros(1)
    message = ""
    if comm.rank == 0:
        try:
            meta = verify(path)
            check_fits(meta, cfg_dict, clf.num_classes)
        except CheckpointError as e:
            ok[0], message = 1, str(e)
    comm.bcast(ok)
    if ok[0]:
        # the same message everywhere: rank 0's, else a pointer to it
        raise CheckpointError(message or f"{path}: rank 0 refused the checkpoint (see its "
                                         f"message)")
    meta = read_meta(path)
    with np.load(path / REPLICATED, allow_pickle=False) as z:
        arrays = {k: z[k] for k in z.files}
    net.store.load_state_dict({n: arrays[n] for n in net.store.names()})
    if net_opt.momentum_buffer is not None:
        try:
            net.store.load_flat(net_opt.momentum_buffer, arrays, "momentum/")
        except StateDictError as e:
            raise CheckpointError(f"{path / REPLICATED}: {e} (saved without momentum)") from None
    weight = np.load(path / WEIGHT, mmap_mode="r")
    clf.weight[...] = asarray(np.array(weight[clf.lo:clf.hi]), device=net.store.device)
    if clf_opt.momentum_buffer is not None:
        if not (path / MOMENTUM).is_file():
            raise CheckpointError(f"{path / MOMENTUM}: missing (saved without momentum)")
        m = np.load(path / MOMENTUM, mmap_mode="r")
        clf_opt.momentum_buffer[...] = asarray(np.array(m[clf.lo:clf.hi]).ravel(),
                                               device=net.store.device)
    neighbours = None
    if (path / NEIGHBOURS).is_file():
        neighbours = np.load(path / NEIGHBOURS, allow_pickle=False)
    comm.barrier()
    return meta["state"], neighbours


def resolve(path):
    """A checkpoint directory from a checkpoint or a run directory (its latest)."""
    path = Path(path)
    if (path / META).is_file():
        return path
    found = latest_checkpoint(path)
    if found is None:
        raise CheckpointError(f"{path}: neither a checkpoint nor a run directory with one")
    return found


def load_network(path, device=None):
    """(net, meta): the encoder + head of a checkpoint (or a run's latest), verified.

    The network is built from the saved config (arch, stem, width, head,
    dim, dtype, seed) on ``device`` (default: the saved one) and filled with
    the saved parameters and BN running statistics.
    """
    from refimpl.models.network import build_model
    path = resolve(path)
    meta = verify(path)
    if "kind" in meta:  # refimpl.finetune's checkpoints: encoder + fc, no head
        raise CheckpointError(f"{path}: a {meta['kind']} checkpoint (encoder + fc, no head): "
                              f"its test accuracy is in the run's metrics.jsonl, and "
                              f"refimpl-export writes its weights")
    c = meta["config"]
    net = build_model(c["arch"], c["stem"], c["width"], c["head_hidden"] or None, c["dim"],
                      c["dtype"], device or c["device"], c["seed"])
    with np.load(path / REPLICATED, allow_pickle=False) as z:
        net.store.load_state_dict({n: z[n] for n in net.store.names()})
    return net, meta


def export(path, out, classifier=False):
    """Write a checkpoint's network under torchvision-style names; returns ``out``.

    The encoder's keys are torchvision's (``conv1.weight``, ``layer1.0.bn1.running_mean``,
    ...; load with ``strict=False``: there is no ``fc``), the head's are
    ``head.0.weight`` ... ``head.3.bias``; classifier=True adds
    ``classifier.weight`` (N x D). ``out`` ending in ``.pt``: a dict of torch
    tensors (``torch.save``; needs PyTorch); ``.npz``: NumPy arrays.
    """
    path, out = resolve(path), Path(out)
    meta = verify(path)
    with np.load(path / REPLICATED, allow_pickle=False) as z:
        arrays = {k: z[k] for k in z.files if not k.startswith("momentum/")}
    if classifier:
        arrays["classifier.weight"] = np.load(path / WEIGHT)
    try:
        write_state_file(out, arrays)
    except ValueError as e:  # not .pt / .npz, or .pt without PyTorch
        raise CheckpointError(str(e)) from None
    return out, meta


def main(argv=None):
    """refimpl-export CKPT|RUN OUT.pt|OUT.npz [--classifier]"""
    import argparse
    import sys
    p = argparse.ArgumentParser(
        prog="refimpl-export",
        description="Export a checkpoint's encoder and head (torchvision names) to .pt or .npz.")
    p.add_argument("checkpoint", help="a checkpoint directory, or a run directory (its latest)")
    p.add_argument("out", help="output file, .pt (PyTorch) or .npz (NumPy)")
    p.add_argument("--classifier", action="store_true", help="also the N x D classifier weight")
    add_version_argument(p)
    args = p.parse_args(argv)
    if args.out.endswith(".pt"):
        require("refimpl-export", ["torch"], "writing .pt; .npz needs only NumPy")
    try:
        out, meta = export(args.checkpoint, args.out, args.classifier)
    except (CheckpointError, OSError) as e:
        print(f"refimpl-export: error: {e}", file=sys.stderr)
        return 1
    cfg = meta["config"]
    print(f"refimpl-export: wrote {out} ({cfg['arch']} width {cfg['width']} + head, step "
          f"{meta['state']['step']}{', classifier' if args.classifier else ''})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

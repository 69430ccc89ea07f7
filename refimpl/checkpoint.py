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
the saved training state. meta.json must list every file the checkpoint
has (``expected_files``): an empty or partial list does not verify.

What may be written over. A ``ckpt-*`` entry that does not verify is kept:
``save`` refuses to replace one of the same step and ``keep`` never removes
one; ``resume_point`` (``--resume auto`` or a run directory) refuses,
naming it, when ``latest`` names it or it is the newest, rather than step
back to an older checkpoint; ``check_overwritable`` refuses a run that could
reach its step. ``save`` also checks the disk's room first
(``checkpoint_bytes``), and its memory-mapped rows are allocated before they
are written (``fileio.write_shard_rows``): a full disk is an OSError with a
message on every rank, and the temporary folder is removed.

Every rank calls ``save`` and ``load`` (collective: barriers and one
broadcast); rank 0 writes the small files.
"""
import json
import os
import re
import shutil
from pathlib import Path

import numpy as np

from refimpl.backend import asarray
from refimpl.deps import add_version_argument, require, version_line
from refimpl.fileio import (atomic_file, check_room, publish, remove_stale_temporaries,
                            sha256_file, write_shard_rows)
from refimpl.models.state_dict import write_state_file
from refimpl.parallel.agreement import raise_together
from refimpl.params import StateDictError

FORMAT_VERSION = 1
META = "meta.json"
REPLICATED = "replicated.npz"
WEIGHT, MOMENTUM = "classifier.weight.npy", "classifier.momentum.npy"
NEIGHBOURS = "neighbours.npy"
LATEST = "latest"
PREFIX = "ckpt-"
NAME = re.compile(PREFIX + r"(?P<step>\d+)")
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


def checkpoint_entries(run_dir):
    """Every entry of ``run_dir`` named like a checkpoint (``ckpt-<step>``), complete or
    not, a folder or not, oldest first: what a run must not write over unawares."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        return []
    return sorted(p for p in run_dir.iterdir() if NAME.fullmatch(p.name))


def step_of(path):
    """The global step in a checkpoint's name (``ckpt-000000012`` -> 12)."""
    return int(NAME.fullmatch(Path(path).name)["step"])


def list_checkpoints(run_dir):
    """Complete checkpoints in ``run_dir`` (folders with meta.json), oldest first."""
    return [p for p in checkpoint_entries(run_dir) if (p / META).is_file()]


def _pointer(run_dir):
    """The folder ``latest`` names: None without a ``latest``, CheckpointError when it
    does not name a checkpoint (not UTF-8 text, another name)."""
    pointer = Path(run_dir) / LATEST
    if not os.path.lexists(pointer):
        return None
    try:
        name = pointer.read_bytes().decode("utf-8").strip()
    except (OSError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{pointer}: cannot be read as a checkpoint's name "
                              f"({type(e).__name__}): resume from a checkpoint by name "
                              f"(--resume {run_dir}/ckpt-<step>)") from None
    if not NAME.fullmatch(name):
        raise CheckpointError(f"{pointer}: names {name[:40]!r}, not a checkpoint "
                              f"(ckpt-<step>): resume from a checkpoint by name "
                              f"(--resume {run_dir}/ckpt-<step>)")
    return Path(run_dir) / name


def latest_checkpoint(run_dir):
    """The checkpoint ``latest`` names, else the newest complete one, else None.

    Lenient (for messages and readers); ``resume_point`` is the strict choice
    of where a run continues.
    """
    try:
        target = _pointer(run_dir)
    except CheckpointError:
        target = None
    if target is not None and (target / META).is_file():
        return target
    found = list_checkpoints(run_dir)
    return found[-1] if found else None


def resume_point(run_dir):
    """Where ``--resume auto`` (or ``--resume RUN_DIR``) continues: a checkpoint, or None.

    None: ``run_dir`` holds no checkpoint folder. Else the folder ``latest``
    names (without a ``latest``: the newest ``ckpt-*``), if it is complete
    (``check_complete``; the checksums are checked by ``load``). A
    CheckpointError, naming the folder, when it is not: never a silent step
    back to an older checkpoint that would then be trained and saved over
    the newer one.
    """
    run_dir = Path(run_dir)
    entries = checkpoint_entries(run_dir)
    target = _pointer(run_dir)
    if target is None and not entries:
        return None
    target = entries[-1] if target is None else target
    others = [p for p in list_checkpoints(run_dir) if p != target]
    try:
        check_complete(target)
    except CheckpointError as e:
        older = (f"move {target.name} out of {run_dir} (--resume auto then continues from "
                 f"{others[-1].name}), or resume from {others[-1]} into another run "
                 f"directory (--resume {others[-1]} out=NEW)" if others else
                 f"move {target.name} out of {run_dir}, or give another out=")
        raise CheckpointError(f"{e}; --resume will not pass over it: {older}") from None
    return target


def check_overwritable(run_dir, after_step):
    """Raise CheckpointError naming the first ``ckpt-*`` of ``run_dir`` after ``after_step``
    that does not verify: a run continuing from ``after_step`` could save over it.
    (Verified ones are simply replaced when the run reaches their step.)"""
    for entry in checkpoint_entries(run_dir):
        if step_of(entry) > after_step:
            try:
                verify(entry)
            except CheckpointError as e:
                raise CheckpointError(
                    f"{e}; it is kept, and this run (from step {after_step}) could save over "
                    f"it: move {entry.name} out of {run_dir}, or give another out=") from None


def checkpoint_bytes(num_classes, dim, dtype, replicated, momentum=True, k=0):
    """Bytes one checkpoint takes on disk, within its headers (64 KiB are added for them).

    replicated: elements of the replicated state as saved (parameters, BN
    buffers and, with momentum, the parameters' momenta); momentum: whether
    the classifier's momentum is saved; k: K of the neighbour table (0: none).
    The dry run prints it; ``save`` checks the disk's room for it first.
    """
    f = np.dtype(dtype).itemsize
    return ((2 if momentum else 1) * num_classes * dim * f + replicated * f
            + num_classes * k * 8 + (1 << 16))


def _peer_failed(rank):
    return CheckpointError(f"rank {rank} could not write the checkpoint (its message is above)")


def save(run_dir, state, cfg_dict, net, clf, net_opt, clf_opt, comm, neighbours=None, keep=2,
         log=None):
    """Write a checkpoint of the run's state after global step ``state['step']``.

    state: {"epoch", "step_in_epoch", "step"} (where training resumes) plus any
    JSON-serializable extras; cfg_dict: the run's config as a dict; log: a
    function of one line (rank 0), told when an old checkpoint is kept because
    it does not verify. Collective. Returns the final Path.

    Refused before anything is written, on every rank (CheckpointError, or
    OSError for the disk): a folder of the same name that does not verify
    (it is kept), too little room on the disk (``checkpoint_bytes``). A failure
    while writing (OSError on any rank) is raised on every rank and the
    temporary folder removed; the checkpoints already there are untouched.
    """
    run_dir = Path(run_dir)
    name = checkpoint_name(state["step"])
    final, tmp = run_dir / name, run_dir / (TMP_PREFIX + name)
    rank = comm.rank
    N, D = clf.num_classes, clf.dim
    dtype = np.dtype(clf.weight.dtype)
    error = None
    if rank == 0:
        try:
            run_dir.mkdir(parents=True, exist_ok=True)
            if os.path.lexists(final):  # the same step saved again: replaced only if it verifies
                try:
                    verify(final)
                except CheckpointError as e:
                    raise CheckpointError(f"{e}; not saving over it: move {final.name} out of "
                                          f"{run_dir}") from None
            replicated = net.store.data.size + net.store.buffer_data.size + (
                0 if net_opt.momentum_buffer is None else net_opt.momentum_buffer.size)
            need = checkpoint_bytes(N, D, dtype, replicated, clf_opt.momentum_buffer is not None,
                                    0 if neighbours is None else np.shape(neighbours)[1])
            check_room(run_dir, need, f"{final}: the checkpoint's files")
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir()
        except (OSError, CheckpointError) as e:
            error = e
    raise_together(comm, error, _peer_failed)
    try:
        write_shard_rows(tmp / WEIGHT, clf.weight, clf.lo, (N, D), dtype, comm)
        if clf_opt.momentum_buffer is not None:
            write_shard_rows(tmp / MOMENTUM, clf_opt.momentum_buffer.reshape(clf.weight.shape),
                             clf.lo, (N, D), dtype, comm)
    except OSError:  # raised on every rank together: every rank's rows are settled
        if rank == 0:
            shutil.rmtree(tmp, ignore_errors=True)
        raise
    if rank == 0:
        try:
            arrays = net.store.state_dict()
            if net_opt.momentum_buffer is not None:
                arrays.update(net.store.flat_dict(net_opt.momentum_buffer, "momentum/"))
            np.savez(tmp / REPLICATED, **arrays)
            files = [REPLICATED, WEIGHT] + ([MOMENTUM] if (tmp / MOMENTUM).exists() else [])
            if neighbours is not None:
                np.save(tmp / NEIGHBOURS, np.asarray(neighbours, dtype=np.int64),
                        allow_pickle=False)
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
            _prune(run_dir, keep, log)
        except CheckpointError as e:
            shutil.rmtree(tmp, ignore_errors=True)
            error = e
        except OSError as e:
            shutil.rmtree(tmp, ignore_errors=True)
            error = OSError(e.errno, f"writing {final}: {e.strerror or e}")
    raise_together(comm, error, _peer_failed)
    return final


def _prune(run_dir, keep, log=None):
    """Delete the complete checkpoints before the last ``keep``, each only if it verifies."""
    for old in list_checkpoints(run_dir)[:-keep]:
        try:
            verify(old)
        except CheckpointError as e:
            if log is not None:
                log(f"kept {old.name} beyond keep = {keep}: it does not verify ({e})")
            continue
        shutil.rmtree(old, ignore_errors=True)


def read_meta(path):
    """meta.json of a checkpoint directory, checked for the format version and its keys."""
    path = Path(path)
    if os.path.lexists(path) and not path.is_dir():
        raise CheckpointError(f"{path}: not a checkpoint (a file, not a folder)")
    if not path.is_dir():
        raise CheckpointError(f"{path}: no such checkpoint folder")
    if not (path / META).is_file():
        raise CheckpointError(f"{path}: not a complete checkpoint (no {META}; an interrupted "
                              f"save leaves only a {TMP_PREFIX}* directory)")
    try:
        meta = json.loads((path / META).read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{path / META}: not valid JSON ({e})") from None
    except OSError as e:
        raise CheckpointError(f"{path / META}: cannot be read ({e})") from None
    if not isinstance(meta, dict) or meta.get("format_version") != FORMAT_VERSION:
        raise CheckpointError(f"{path / META}: format_version "
                              f"{meta.get('format_version') if isinstance(meta, dict) else None!r}, "
                              f"this refimpl reads version {FORMAT_VERSION}")
    state, files = meta.get("state"), meta.get("files")
    bad = [k for k, ok in (
        ("state", isinstance(state, dict) and all(isinstance(state.get(x), int)
                                                   for x in ("epoch", "step_in_epoch", "step"))),
        ("config", isinstance(meta.get("config"), dict)),
        ("num_classes", isinstance(meta.get("num_classes"), int)),
        ("dim", isinstance(meta.get("dim"), int)),
        ("world_size", isinstance(meta.get("world_size"), int)),
        ("files", isinstance(files, dict) and all(isinstance(v, str) for v in files.values())),
    ) if not ok]
    if bad:
        raise CheckpointError(f"{path / META}: {', '.join(bad)} missing or malformed (not a "
                              f"meta.json this refimpl wrote, or an edited one)")
    return meta


def expected_files(path, meta):
    """The files a checkpoint must list in meta.json: the replicated state and the
    classifier weight always, its momentum when the config has momentum, and the
    neighbour table when the folder holds one."""
    names = [REPLICATED, WEIGHT]
    if meta["config"].get("momentum", 0) > 0 or (Path(path) / MOMENTUM).exists():
        names.append(MOMENTUM)
    if (Path(path) / NEIGHBOURS).exists():
        names.append(NEIGHBOURS)
    return names


def check_complete(path, meta=None):
    """Raise CheckpointError unless meta.json reads, lists every file the checkpoint
    must have (``expected_files``) and every listed file is there (no checksums)."""
    path = Path(path)
    meta = read_meta(path) if meta is None else meta
    unlisted = [f for f in expected_files(path, meta) if f not in meta["files"]]
    if unlisted:
        raise CheckpointError(f"{path / META}: does not list {', '.join(unlisted)} (its files: "
                              f"{sorted(meta['files']) or 'none'}), so they cannot be verified")
    for name in meta["files"]:
        f = path / name
        if not f.is_file():
            raise CheckpointError(f"{f}: missing (the checkpoint is incomplete)")
    return meta


def verify(path, meta=None):
    """Raise CheckpointError naming the first file that is missing, unlisted or changed."""
    path = Path(path)
    meta = check_complete(path, meta)
    for name, digest in meta["files"].items():
        f = path / name
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
    if NEIGHBOURS in meta["files"]:
        neighbours = np.load(path / NEIGHBOURS, allow_pickle=False)
    comm.barrier()
    return meta["state"], neighbours


def resolve(path):
    """A checkpoint directory from a checkpoint or a run directory (``resume_point``)."""
    path = Path(path)
    if (path / META).is_file() or NAME.fullmatch(path.name):
        return path
    if not path.is_dir():
        raise CheckpointError(f"{path}: no such checkpoint or run directory")
    found = resume_point(path)
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

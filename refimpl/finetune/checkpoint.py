"""Fine-tuning checkpoints: refimpl's checkpoint format without the sharded classifier.

Contract. A fine-tuning checkpoint is a directory of ``refimpl.checkpoint``'s
format version 1, with ``"kind": "finetune"`` in its meta.json:

    meta.json        format version, kind, state (epoch, step_in_epoch, step),
                     config, num_classes C, dim (the encoder's feature width F),
                     made_with (``deps.version_line``), dtype, world size at save time, the
                     labeled subset's size and sha256, one sha256 per file
                     (written last)
    replicated.npz   the encoder's and the FC's parameters and BN buffers by
                     torchvision name (``conv1.weight`` ... ``fc.bias``), and
                     the SGD momenta (``momentum/<name>``; the encoder's only
                     when it is trained)

Everything is replicated, so rank 0 writes it all and a run saved on P ranks
resumes on any P'. It is staged in ``.tmp-ckpt-<step>`` and published by one
rename (``fileio.publish``), then ``latest`` names it (``fileio.atomic_file``)
and checkpoints beyond the last ``keep`` are deleted: the same guarantees,
names and helpers as phase 1 (``checkpoint.clean_stale``,
``latest_checkpoint``, ``verify``, ``resolve``), so a crash never damages the
last good checkpoint. ``load`` verifies every file's sha256 on rank 0 and
refuses a checkpoint that is not a fine-tune's or does not fit the run (the
fields of ``MUST_MATCH``, C, the labeled subset), naming every field.
``refimpl-export`` reads it like any checkpoint (its ``fc.*`` keys are
torchvision's).
"""
import hashlib
import json
import shutil
from pathlib import Path

import numpy as np

from refimpl.backend import asarray, to_numpy
from refimpl.checkpoint import (FORMAT_VERSION, LATEST, META, REPLICATED, TMP_PREFIX,
                                CheckpointError, checkpoint_name, list_checkpoints, read_meta,
                                verify)
from refimpl.deps import version_line
from refimpl.fileio import atomic_file, publish, sha256_file

KIND = "finetune"
# The fields that must match between a fine-tuning checkpoint and the run resuming it.
MUST_MATCH = ("arch", "stem", "width", "dtype", "freeze_encoder", "labels", "labels_seed",
              "train")


def subset_digest(ids):
    """sha256 of the labeled ids (int64 bytes): a resumed run must use the same images."""
    return hashlib.sha256(np.ascontiguousarray(ids, dtype=np.int64).tobytes()).hexdigest()


def _momenta(net, encoder_opt, fc_opt):
    """{"momentum/<name>": host array} of the optimizers that keep a velocity."""
    out = {}
    for opt, names in ((encoder_opt, net.encoder.state_names), (fc_opt, ("fc.weight", "fc.bias"))):
        if opt is None or opt.momentum_buffer is None:
            continue
        v, lo = to_numpy(opt.momentum_buffer), _start(net, opt is fc_opt)
        for n in names:
            if n in net.store.offsets:  # parameters only (no BN buffers)
                a, b = net.store.offsets[n]
                out["momentum/" + n] = v[a - lo:b - lo].reshape(net.store.shapes[n]).copy()
    return out


def _start(net, fc):
    """Where an optimizer's part of the flat buffer starts: 0 (encoder) or E (FC)."""
    return net.encoder_size if fc else 0


def save(run_dir, state, cfg_dict, net, encoder_opt, fc_opt, comm, subset_ids, keep=2):
    """Write a checkpoint after global step ``state['step']``; collective. Returns its Path."""
    run_dir = Path(run_dir)
    name = checkpoint_name(state["step"])
    final, tmp = run_dir / name, run_dir / (TMP_PREFIX + name)
    if comm.rank == 0:
        run_dir.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir()
        arrays = net.store.state_dict()
        arrays.update(_momenta(net, encoder_opt, fc_opt))
        np.savez(tmp / REPLICATED, **arrays)
        meta = {"format_version": FORMAT_VERSION, "kind": KIND, "state": state,
                "config": cfg_dict, "num_classes": net.num_classes,
                "dim": int(net.encoder.out_features), "made_with": version_line(),
                "dtype": np.dtype(net.store.dtype).name, "world_size": comm.size,
                "labeled": {"count": int(len(subset_ids)), "sha256": subset_digest(subset_ids)},
                "rng": "stateless: every draw is rng(seed, stream, keys) (refimpl.backend.rng)",
                "files": {REPLICATED: sha256_file(tmp / REPLICATED)}}
        (tmp / META).write_text(json.dumps(meta, indent=1))
        publish([(tmp, final)])
        with atomic_file(run_dir / LATEST) as f:
            f.write((name + "\n").encode())
        for old in list_checkpoints(run_dir)[:-keep]:
            shutil.rmtree(old, ignore_errors=True)
    comm.barrier()
    return final


def check_fits(meta, cfg_dict, num_classes, subset_ids):
    """Raise CheckpointError naming every field where the checkpoint and the run differ."""
    if meta.get("kind") != KIND:
        raise CheckpointError("the checkpoint is not a fine-tuning checkpoint (a refimpl-train "
                              "checkpoint starts a fine-tune as init=..., it is not resumed)")
    saved = meta["config"]
    bad = [f"{k}: checkpoint {saved.get(k)!r}, config {cfg_dict.get(k)!r}"
           for k in MUST_MATCH if saved.get(k) != cfg_dict.get(k)]
    if meta["num_classes"] != num_classes:
        bad.append(f"C (classes): checkpoint {meta['num_classes']}, training set {num_classes}")
    if meta["labeled"]["sha256"] != subset_digest(subset_ids):
        bad.append(f"the labeled images: the checkpoint's {meta['labeled']['count']} are not "
                   f"this run's {len(subset_ids)}")
    if bad:
        raise CheckpointError("the checkpoint does not fit this run:\n  " + "\n  ".join(bad))


def load(path, cfg_dict, net, encoder_opt, fc_opt, comm, subset_ids):
    """Fill net and both momenta from a fine-tuning checkpoint; returns its state.

    Rank 0 verifies it; its verdict is broadcast, so every rank raises the
    same CheckpointError.
    """
    path = Path(path)
    verdict, message = np.zeros(1), ""
    if comm.rank == 0:
        try:
            check_fits(verify(path), cfg_dict, net.num_classes, subset_ids)
        except CheckpointError as e:
            verdict[0], message = 1, str(e)
    comm.bcast(verdict)
    if verdict[0]:
        raise CheckpointError(message or f"{path}: rank 0 refused the checkpoint (see its "
                                         f"message)")
    meta = read_meta(path)
    with np.load(path / REPLICATED, allow_pickle=False) as z:
        arrays = {k: z[k] for k in z.files}
    store, E = net.store, net.encoder_size
    store.load_state_dict({n: arrays[n] for n in store.names()})
    for opt, fc in ((encoder_opt, False), (fc_opt, True)):
        if opt is None or opt.momentum_buffer is None:
            continue
        lo = _start(net, fc)
        host = np.zeros(opt.momentum_buffer.shape[0], dtype=store.dtype)
        for n, (a, b) in store.offsets.items():
            if (a >= E) != fc:
                continue
            if "momentum/" + n not in arrays:
                raise CheckpointError(f"{path / REPLICATED}: no momentum/{n} (saved without "
                                      f"momentum, or with a frozen encoder)")
            host[a - lo:b - lo] = arrays["momentum/" + n].ravel()
        opt.momentum_buffer[...] = asarray(host, device=store.device)
    comm.barrier()
    return meta["state"]

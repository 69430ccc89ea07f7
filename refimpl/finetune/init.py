"""Where the fine-tuned encoder starts: a refimpl-train run, a state file, or scratch.

Contract. ``FineTuneConfig.init`` is one of

    "scratch"                 the random initialization (seed), the baseline
    a run directory           of refimpl-train (its latest checkpoint), or one
    a checkpoint directory    ``ckpt-*`` of it: verified (every file's sha256)
                              before anything is read
    a .pt or .npz file        torchvision-named encoder weights
                              (``refimpl-export``'s output, or a real
                              torchvision ResNet's state dict; its fc.* keys,
                              a refimpl export's head.* and classifier.* are
                              ignored)

``checkpoint_architecture(init)`` reads a checkpoint's arch, stem and width,
``checkpoint_data(init)`` the train and test specs it was pretrained on (the
fine-tune config may leave them to it); ``load_init(net, init)`` fills
``net``'s encoder and nothing else: the MLP head, the instance classifier
and every momentum of phase 1 are dropped, the FC keeps its fresh values.
The BatchNorm running statistics come with the encoder (the frozen
protocol normalizes with them). Every problem (a missing or damaged
checkpoint, another architecture, a file whose keys or shapes do not fit)
is a ``ConfigError`` that names it.
"""
from pathlib import Path

import numpy as np

from refimpl import checkpoint
from refimpl.models.state_dict import load_encoder_file
from refimpl.train.config import ConfigError

SCRATCH = "scratch"
ARCH_FIELDS = ("arch", "stem", "width")


def init_kind(init):
    """"scratch", "file" (.pt/.npz) or "checkpoint" (a directory)."""
    if init == SCRATCH:
        return "scratch"
    return "file" if str(init).endswith((".pt", ".npz")) else "checkpoint"


def _checkpoint(init):
    """(checkpoint directory, its verified meta) of a run or checkpoint directory."""
    path = Path(init)
    if not path.is_dir():
        raise ConfigError(f"init: no such run or checkpoint directory {str(init)!r} (give a "
                          f"refimpl-train run directory, one of its ckpt-* directories, a "
                          f".pt/.npz encoder, or 'scratch')")
    try:
        ckpt = checkpoint.resolve(path)
        meta = checkpoint.verify(ckpt)
    except checkpoint.CheckpointError as e:
        raise ConfigError(f"init: {e}") from None
    return ckpt, meta


def checkpoint_architecture(init):
    """{"arch", "stem", "width"} of the checkpoint ``init`` names (verified)."""
    _, meta = _checkpoint(init)
    return {k: meta["config"][k] for k in ARCH_FIELDS}


def checkpoint_data(init):
    """{"train", "test"}: the dataset specs the checkpoint ``init`` was pretrained on."""
    _, meta = _checkpoint(init)
    return {k: meta["config"].get(k, "") for k in ("train", "test")}


def check_architecture(init, cfg):
    """ConfigError unless the checkpoint ``init`` has cfg's arch, stem and width."""
    saved = checkpoint_architecture(init)
    bad = [f"{k}: checkpoint {saved[k]!r}, config {getattr(cfg, k)!r}" for k in ARCH_FIELDS
           if saved[k] != getattr(cfg, k)]
    if bad:
        raise ConfigError(f"init: {init} holds an encoder of another architecture than this "
                          f"config asks for (leave arch, stem and width unset to take the "
                          f"checkpoint's):\n  " + "\n  ".join(bad))


def load_init(net, init):
    """Fill ``net.encoder`` from ``init`` (module docstring); returns a one-line description."""
    kind = init_kind(init)
    if kind == "scratch":
        return "random initialization (scratch)"
    if kind == "file":
        try:
            load_encoder_file(net, init)
        except (ValueError, OSError) as e:  # StateDictError is a ValueError
            raise ConfigError(f"init: {e}") from None
        return f"encoder weights of {init}"
    ckpt, meta = _checkpoint(init)
    names = net.encoder.state_names
    with np.load(ckpt / checkpoint.REPLICATED, allow_pickle=False) as z:
        missing = [n for n in names if n not in z.files]
        if missing:
            raise ConfigError(f"init: {ckpt / checkpoint.REPLICATED} has no {missing[0]} "
                              f"({len(missing)} encoder entries missing)")
        state = {n: z[n] for n in names}
    try:
        net.store.load_state_dict(state, names=names)
    except ValueError as e:
        raise ConfigError(f"init: {ckpt}: {e}") from None
    c = meta["config"]
    return (f"the encoder of {ckpt} ({c['arch']} width {c['width']}, step "
            f"{meta['state']['step']}; its head and instance classifier dropped)")

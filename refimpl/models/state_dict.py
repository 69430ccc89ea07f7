"""Export and import of torchvision-compatible ResNet state dicts.

Contract. ``export_torchvision(model)`` returns the encoder's parameters and
BatchNorm buffers as ``{key: np.ndarray}`` with exactly the keys, order, shapes
and dtypes of ``torchvision.models.resnet18/34/50(...).state_dict()``:
float tensors in the model's dtype (float32 by default, as torchvision) and
``num_batches_tracked`` as 0-d int64. A model built with the ImageNet stem,
``width=64`` and ``num_classes=1000`` matches ``torchvision.models.resnet50()``
key for key (tests/fixtures/torchvision_resnet_names.json records the real
list); a model without ``fc`` exports everything but ``fc.weight``/``fc.bias``
(load it into torchvision with ``strict=False``). The MLP head ("head.*") is
not part of a torchvision ResNet and is never exported here.

In PyTorch:

    sd = export_torchvision(net)
    tv_model.load_state_dict({k: torch.from_numpy(v) for k, v in sd.items()})

``import_torchvision(model, state)`` is the reverse: ``state`` may hold torch
tensors or arrays; keys, shapes and (with strict=True) the exact key set are
checked before anything is written (``params.StateDictError`` names every
problem). ``drop_fc=True`` explicitly ignores ``fc.*`` keys, for loading an
ImageNet classifier's weights into a headless encoder.

State files: ``read_state_file(path)`` / ``write_state_file(path, arrays)``
read and write {name: array} as ``.npz`` (NumPy; read with
allow_pickle=False) or ``.pt`` (``torch.save`` of a dict of tensors; needs
PyTorch, imported only then). ``load_encoder_file(net, path)`` starts an
encoder from such a file (``Config.init_encoder``, another implementation's
weights); ``refimpl-export`` writes one from a checkpoint.
"""
from pathlib import Path

import numpy as np

from refimpl.backend import to_numpy


def _encoder(model):
    """The ResNet inside ``model`` (a ResNet itself, or a Network)."""
    return getattr(model, "encoder", model)


def export_torchvision(model, dtype=None):
    """{torchvision key: NumPy array} of the encoder, in torchvision's order.

    dtype: None keeps the model's float dtype; e.g. np.float32 casts the float
    tensors (counters stay int64).
    """
    enc = _encoder(model)
    full = enc.store.state_dict()
    out = {}
    for name in enc.state_names:
        v = full[name]
        if dtype is not None and v.dtype.kind == "f":
            v = v.astype(dtype)
        out[name] = v
    return out


def import_torchvision(model, state, strict=True, drop_fc=False):
    """Load a torchvision ResNet state dict into the encoder of ``model``.

    state: {key: torch.Tensor or array}. strict: the key set must equal the
    encoder's (missing and unexpected keys are errors). drop_fc: ignore
    ``fc.weight``/``fc.bias`` in ``state`` (for an encoder built without fc).
    Returns (missing, unexpected) like ``ParamStore.load_state_dict``.
    """
    enc = _encoder(model)
    converted = {}
    for key, value in state.items():
        if drop_fc and key.startswith("fc."):
            continue
        if hasattr(value, "detach"):  # a torch tensor, without importing torch
            value = value.detach().cpu().numpy()
        converted[key] = np.asarray(to_numpy(value))
    return enc.store.load_state_dict(converted, strict=strict, names=enc.state_names)


def read_state_file(path):
    """{name: np.ndarray} from a state-dict file: .npz (NumPy) or .pt (torch.save).

    A .pt may hold the dict itself or {"state_dict": dict}; DDP's "module."
    prefix is removed. Raises ValueError with the path for anything else.
    """
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"{path}: no such file")
    if path.suffix == ".npz":
        with np.load(path, allow_pickle=False) as z:
            state = {k: z[k] for k in z.files}
    elif path.suffix == ".pt":
        try:
            import torch
        except ImportError:
            raise ValueError(f"{path}: reading a .pt file needs PyTorch; save the state "
                             f"dict as .npz instead") from None
        obj = torch.load(path, map_location="cpu", weights_only=True)
        if isinstance(obj, dict) and isinstance(obj.get("state_dict"), dict):
            obj = obj["state_dict"]
        if not isinstance(obj, dict):
            raise ValueError(f"{path}: expected a state dict (name -> tensor), got "
                             f"{type(obj).__name__}")
        state = {k: v.detach().cpu().numpy() for k, v in obj.items() if hasattr(v, "detach")}
    else:
        raise ValueError(f"{path}: a state dict must be a .pt or .npz file")
    if state and all(k.startswith("module.") for k in state):
        state = {k[len("module."):]: v for k, v in state.items()}
    return state


def write_state_file(path, arrays):
    """Write {name: array} to ``path``: .pt (a dict of torch tensors, torch.save) or .npz.

    Raises ValueError for another suffix, or a .pt without PyTorch installed.
    """
    path = Path(path)
    if path.suffix == ".pt":
        try:
            import torch
        except ImportError:
            raise ValueError("exporting to .pt needs PyTorch; write .npz instead") from None
        torch.save({k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in arrays.items()},
                   path)
    elif path.suffix == ".npz":
        np.savez(path, **arrays)
    else:
        raise ValueError(f"{path}: export to a .pt or .npz file")
    return path


def load_encoder_file(net, path):
    """Load a torchvision-named encoder from .pt/.npz into ``net``'s encoder.

    Keys ``fc.*`` (torchvision's classifier), ``head.*`` and
    ``classifier.*`` (a refimpl export) are ignored; every encoder key must
    be there with its shape (``params.StateDictError`` names what is not).
    """
    state = {k: v for k, v in read_state_file(path).items()
             if not k.startswith(("head.", "classifier."))}
    return import_torchvision(net, state, strict=True, drop_fc=True)

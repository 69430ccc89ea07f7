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
"""
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

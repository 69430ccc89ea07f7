"""torchvision-compatible export/import of the encoder's state dict.

The key/shape/dtype lists of the real torchvision models are recorded once in
tests/fixtures/torchvision_resnet_names.json (by
tests/fixtures/record_torchvision_names.py, run in a venv with torchvision), so
the first tests need no torch at all.
"""
import json
from pathlib import Path

import numpy as np
import pytest

from refimpl.oracle import check_tensor
from refimpl.models import build_model
from refimpl.models.resnet import ResNet
from refimpl.models.state_dict import export_torchvision, import_torchvision
from refimpl.params import StateDictError
from tolerances import INDEPENDENT64

FIXTURE = Path(__file__).parent / "fixtures" / "torchvision_resnet_names.json"


@pytest.mark.parametrize("arch", ["resnet18", "resnet50"])
def test_export_matches_torchvision_keys_shapes_dtypes(arch):
    expected = json.loads(FIXTURE.read_text())[arch]
    model = ResNet(arch, stem="imagenet", width=64, num_classes=1000)  # float32 default
    sd = export_torchvision(model)
    got = [[k, list(v.shape), str(v.dtype)] for k, v in sd.items()]
    assert got == expected  # keys, order, shapes and dtypes
    assert model.store.num_params == {"resnet18": 11689512, "resnet50": 25557032}[arch]


def test_network_export_is_the_encoder_without_fc_or_head():
    expected = json.loads(FIXTURE.read_text())["resnet18"]
    net = build_model("resnet18", stem="imagenet", width=64, head_hidden=32)
    sd = export_torchvision(net, dtype=np.float32)
    assert [k for k, _, _ in expected if not k.startswith("fc.")] == list(sd)
    assert not any(k.startswith("head.") for k in sd)


def _random_state(model, seed):
    """Every parameter and buffer random (BN variances positive), loaded into model."""
    g = np.random.default_rng(seed)
    sd = model.store.state_dict()
    for k, v in sd.items():
        if k.endswith("num_batches_tracked"):
            sd[k] = np.array(g.integers(0, 100), dtype=np.int64)
        elif k.endswith("running_var"):
            sd[k] = g.uniform(0.5, 2.0, v.shape)
        elif k.endswith("running_mean") or v.ndim == 1:
            sd[k] = (1.0 if k.endswith("weight") else 0.0) + 0.2 * g.standard_normal(v.shape)
        else:
            sd[k] = v + 0.1 * np.std(v) * g.standard_normal(v.shape)
    model.store.load_state_dict(sd)
    return sd


@pytest.mark.torch
def test_torch_model_with_our_export_gives_our_outputs():
    torch = pytest.importorskip("torch")
    from refimpl.oracle.torch_resnet import TorchResNet
    model = ResNet("resnet18", stem="imagenet", width=64, num_classes=1000,
                   dtype=np.float64, seed=0)
    _random_state(model, 1)
    tmodel = TorchResNet("resnet18", "imagenet", 64, num_classes=1000).double().eval()
    tmodel.load_state_dict({k: torch.from_numpy(v) for k, v in export_torchvision(model).items()})
    x = np.random.default_rng(2).standard_normal((2, 3, 64, 64))
    with torch.no_grad():
        ref = tmodel(torch.from_numpy(x)).numpy()
    check_tensor("logits", model.forward(x, train=False), ref, INDEPENDENT64)  # PyTorch


@pytest.mark.torch
def test_import_torch_state_dict_roundtrips():
    torch = pytest.importorskip("torch")
    from refimpl.oracle.torch_resnet import TorchResNet
    torch.manual_seed(0)
    tmodel = TorchResNet("resnet50", "cifar", 8, num_classes=10).double()
    with torch.no_grad():  # non-trivial buffers
        for name, buf in tmodel.named_buffers():
            if name.endswith("running_var"):
                buf.uniform_(0.5, 2.0)
            elif name.endswith("running_mean"):
                buf.normal_(0, 0.2)
            else:
                buf.fill_(7)
    tsd = tmodel.state_dict()
    model = ResNet("resnet50", stem="cifar", width=8, num_classes=10, dtype=np.float64)
    assert import_torchvision(model, tsd) == ([], [])
    back = export_torchvision(model)
    assert list(back) == list(tsd)
    for k, v in tsd.items():
        assert back[k].dtype == v.numpy().dtype, k
        np.testing.assert_array_equal(back[k], v.numpy(), err_msg=k)
    # The flat buffer holds the imported values (the views were written, not replaced).
    assert np.shares_memory(model.store.params["fc.weight"], model.store.data)
    x = np.random.default_rng(0).standard_normal((2, 3, 16, 16))
    with torch.no_grad():
        ref = tmodel.eval()(torch.from_numpy(x)).numpy()
    check_tensor("logits", model.forward(x, train=False), ref, INDEPENDENT64)  # PyTorch


def test_import_into_network_and_drop_fc():
    src = ResNet("resnet18", stem="cifar", width=4, num_classes=10, dtype=np.float64, seed=1)
    sd = export_torchvision(src)
    net = build_model("resnet18", stem="cifar", width=4, head_hidden=8, dim=6,
                      dtype=np.float64, seed=2)
    head_before = {k: v for k, v in net.store.state_dict().items() if k.startswith("head.")}
    with pytest.raises(StateDictError, match="unexpected keys: fc.weight, fc.bias"):
        import_torchvision(net, sd)
    import_torchvision(net, sd, drop_fc=True)
    after = net.store.state_dict()
    for k, v in sd.items():
        if not k.startswith("fc."):
            np.testing.assert_array_equal(after[k], v)
    for k, v in head_before.items():  # the head is not part of the import
        np.testing.assert_array_equal(after[k], v)


def test_load_errors_are_clear_and_load_nothing():
    model = ResNet("resnet18", stem="cifar", width=4, num_classes=10, dtype=np.float64)
    before = model.store.state_dict()
    sd = export_torchvision(model)

    bad = dict(sd)
    del bad["layer1.0.bn1.running_var"]
    with pytest.raises(StateDictError, match=r"missing keys: layer1\.0\.bn1\.running_var"):
        import_torchvision(model, bad)

    bad = {k: v + 1 if v.dtype.kind == "f" else v for k, v in sd.items()}
    bad["layer5.0.conv1.weight"] = np.zeros((4, 4, 3, 3))
    with pytest.raises(StateDictError, match=r"unexpected keys: layer5\.0\.conv1\.weight"):
        import_torchvision(model, bad)

    bad = {k: v + 1 if v.dtype.kind == "f" else v for k, v in sd.items()}
    bad["conv1.weight"] = np.zeros((4, 3, 7, 7))  # an ImageNet stem into a CIFAR one
    with pytest.raises(StateDictError) as e:
        import_torchvision(model, bad)
    assert "conv1.weight: expected shape (4, 3, 3, 3), got (4, 3, 7, 7)" in str(e.value)

    for k, v in model.store.state_dict().items():  # no partial load happened
        np.testing.assert_array_equal(v, before[k], err_msg=k)


def test_import_rejects_wrong_shaped_buffers_and_loads_nothing():
    model = ResNet("resnet18", stem="cifar", width=4, num_classes=10, dtype=np.float64)
    before = model.store.state_dict()
    sd = {k: v + 1 if v.dtype.kind == "f" else v + 3 for k, v in export_torchvision(model).items()}
    sd["layer1.0.bn1.running_mean"] = np.zeros(1)          # would broadcast into (4,)
    sd["layer2.0.downsample.1.num_batches_tracked"] = np.array([5])  # would fit into ()
    with pytest.raises(StateDictError) as e:
        import_torchvision(model, sd)
    msg = str(e.value)
    assert "layer1.0.bn1.running_mean: expected shape (4,), got (1,)" in msg
    assert "layer2.0.downsample.1.num_batches_tracked: expected shape (), got (1,)" in msg
    for k, v in model.store.state_dict().items():  # no partial load happened
        np.testing.assert_array_equal(v, before[k], err_msg=k)

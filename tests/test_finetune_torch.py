"""The fine-tuning step against PyTorch autograd, float64 (tests/tolerances.py, INDEPENDENT64).

refimpl's ``finetune.step`` (encoder + pool + FC, softmax cross-entropy of
the global-mean, two SGD optimizers with their own learning rates over the
two parts of one flat buffer, weight decay off for BatchNorm and biases)
against refimpl/oracle/torch_resnet.py's independent ``TorchResNet`` with
``num_classes = C`` (torchvision's names, so the state dicts match key for
key), ``F.cross_entropy`` and ``torch.optim.SGD`` with four parameter groups.
Two steps from the same weights: logits, loss, top-1, every gradient, then
every parameter, BatchNorm buffer and momentum after each update. Also the
frozen protocol: eval-mode BatchNorm, only the FC moves.
"""
import numpy as np
import pytest

from refimpl.finetune.model import FineTuneNet
from refimpl.finetune.step import forward_backward, optimizers, update
from refimpl.oracle import check_tensor
from refimpl.parallel.comm import SelfComm
from test_resnet_torch import randomize_bn, torch_model_like
from tolerances import INDEPENDENT64

pytestmark = pytest.mark.torch
C, B, LR_ENCODER, LR_FC, MU, WD = 5, 8, 0.05, 0.2, 0.9, 5e-4


def pair(torch, stem="cifar", arch="resnet18", width=4):
    """refimpl's FineTuneNet and PyTorch's ResNet with fc, the same float64 weights."""
    from refimpl.oracle.torch_resnet import TorchResNet
    net = FineTuneNet(arch, stem, width, num_classes=C, dtype=np.float64, seed=3)
    randomize_bn(net.store, 4)  # non-trivial gammas, betas and running statistics
    tnet = torch_model_like(torch, net.store.state_dict(), TorchResNet(arch, stem, width, C))
    assert list(tnet.state_dict()) == list(net.store.state_dict())  # torchvision's keys, order
    return net, tnet


def torch_sgd(torch, tnet, frozen=False):
    """torch.optim.SGD with refimpl's groups: encoder and FC learning rates, no decay on
    BatchNorm parameters and biases (1-d parameters)."""
    groups = []
    for fc in (False, True):
        for decay in (True, False):
            params = [p for n, p in tnet.named_parameters()
                      if n.startswith("fc.") == fc and (p.ndim > 1) == decay]
            if fc or not frozen:
                groups.append({"params": params, "lr": LR_FC if fc else LR_ENCODER,
                               "weight_decay": WD if decay else 0.0})
    return torch.optim.SGD(groups, momentum=MU)


@pytest.mark.parametrize("frozen", [False, True], ids=["encoder+fc", "frozen"])
def test_two_finetune_steps_match_torch(frozen):
    torch = pytest.importorskip("torch")
    net, tnet = pair(torch)
    if frozen:
        tnet.eval()  # BatchNorm with its running statistics, never updated
        for n, p in tnet.named_parameters():
            p.requires_grad_(n.startswith("fc."))
    else:
        tnet.train()
    encoder_opt, fc_opt = optimizers(net, LR_ENCODER, LR_FC, MU, WD, frozen=frozen)
    assert (encoder_opt is None) == frozen
    topt = torch_sgd(torch, tnet, frozen)
    comm = SelfComm()
    g = np.random.default_rng(0)
    start = net.store.state_dict()
    for step in range(2):
        x = g.standard_normal((B, 3, 16, 16))
        y = g.integers(0, C, size=B)
        out = forward_backward(net, x, y, comm, frozen=frozen)
        tlogits = tnet(torch.from_numpy(x))
        tloss = torch.nn.functional.cross_entropy(tlogits, torch.from_numpy(y))
        topt.zero_grad()
        tloss.backward()
        check_tensor(f"step {step} logits", out.logits, tlogits.detach().numpy(), INDEPENDENT64)
        check_tensor(f"step {step} loss", np.float64(out.loss), tloss.item(), INDEPENDENT64)
        top1 = float(np.mean(tlogits.detach().numpy().argmax(1) == y))
        assert out.acc[1] == top1 and out.acc[5] == 1.0  # C = 5: every label in the top 5
        for name, p in tnet.named_parameters():
            if p.grad is None:
                assert frozen and not np.any(net.store.grads[name]), name
                continue
            check_tensor(f"step {step} grad {name}", net.store.grads[name], p.grad.numpy(),
                         INDEPENDENT64)
        update(net, comm, encoder_opt, fc_opt, LR_ENCODER, LR_FC)
        topt.step()
        ours, ref = net.store.state_dict(), tnet.state_dict()
        for name, t in ref.items():
            if name.endswith("num_batches_tracked"):
                assert int(ours[name]) == int(t) == (0 if frozen else step + 1), name
            else:
                check_tensor(f"after step {step}: {name}", ours[name], t.numpy(), INDEPENDENT64)
        for opt in (encoder_opt, fc_opt):
            if opt is None:
                continue
            lo = 0 if opt is encoder_opt else net.encoder_size
            for name, p in tnet.named_parameters():
                a, b = net.store.offsets[name]
                if (a >= net.encoder_size) == (opt is fc_opt):
                    check_tensor(f"after step {step}: momentum {name}",
                                 opt.momentum_buffer[a - lo:b - lo].reshape(p.shape),
                                 topt.state[p]["momentum_buffer"].numpy(), INDEPENDENT64)
    if frozen:  # the encoder, its BatchNorm statistics included, did not move by one bit
        for name, v in net.store.state_dict().items():
            if not name.startswith("fc."):
                np.testing.assert_array_equal(v, start[name], err_msg=name)


def test_bottleneck_imagenet_stem_step_matches_torch():
    """ResNet-50's Bottleneck and the ImageNet stem (max pool), one step's gradients."""
    torch = pytest.importorskip("torch")
    net, tnet = pair(torch, stem="imagenet", arch="resnet50", width=2)
    tnet.train()
    g = np.random.default_rng(1)
    x, y = g.standard_normal((4, 3, 32, 32)), g.integers(0, C, size=4)
    out = forward_backward(net, x, y, SelfComm())
    tloss = torch.nn.functional.cross_entropy(tnet(torch.from_numpy(x)), torch.from_numpy(y))
    tloss.backward()
    check_tensor("loss", np.float64(out.loss), tloss.item(), INDEPENDENT64)
    for name, p in tnet.named_parameters():
        check_tensor(f"grad {name}", net.store.grads[name], p.grad.numpy(), INDEPENDENT64)

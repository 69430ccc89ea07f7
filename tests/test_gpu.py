"""The same layers and model on the GPU (CuPy) and on the CPU (NumPy).

Every test is marked ``gpu``: skipped without CuPy and a CUDA device, run with
``pytest -m gpu`` (benchmarks/gpu_check.sh). Each test builds its inputs once
on the host in float64, casts them to the dtype under test, runs the code once
on NumPy arrays and once on CuPy copies of the same arrays
(``backend.asarray(x, device="gpu")``), and compares with ``check_tensor``
(max |gpu - cpu| / max |cpu|, per tensor):

    float64: within 1e-10 (parity: the same equations, only the summation
             order of the BLAS/reductions differs; tolerances.INDEPENDENT64)
    float32: within 1e-4 (tolerances.INDEPENDENT32)

Outputs and every gradient are compared, and each result must keep the
dtype it was given and stay on its device. The CPU side names
``device="cpu"`` everywhere, so the file is correct under REFIMPL_DEVICE=gpu.

Then the whole model: ResNet-18 (CIFAR stem, width 8) + MLP head built with
the same seed on both devices, forward, loss, backward and two SGD steps on
identical batches; the embedding, loss, dx and gradients of the first step,
and after the two steps every parameter, every BN buffer and the momentum.
"""
import numpy as np
import pytest

from refimpl.oracle import check_tensor, scaled_error
from refimpl.backend import asarray, device_of
from refimpl.layers.batchnorm import batchnorm_backward, batchnorm_forward
from refimpl.layers.conv import conv2d_backward, conv2d_forward
from refimpl.layers.linear import linear_backward, linear_forward
from refimpl.layers.loss import softmax_cross_entropy_backward, softmax_cross_entropy_forward
from refimpl.layers.normalize import l2_normalize_backward, l2_normalize_forward
from refimpl.layers.pool import (global_avgpool_backward, global_avgpool_forward,
                                 maxpool2d_backward, maxpool2d_forward)
from refimpl.layers.relu import relu_backward, relu_forward
from refimpl.models import build_model
from refimpl.optim.sgd import SGD
from tolerances import INDEPENDENT32, INDEPENDENT64, LAYER64

pytestmark = pytest.mark.gpu

# another device's kernels and reduction orders: two independent implementations
TOL = {np.float64: INDEPENDENT64, np.float32: INDEPENDENT32}
DTYPES = pytest.mark.parametrize("dtype", [np.float64, np.float32], ids=["float64", "float32"])


def _check_device(x, device):
    """x lives on ``device`` ('cpu' or 'gpu')."""
    assert device_of(x) == device, f"expected a {device} array, got {type(x)}"


def on(device, host_inputs, dtype):
    """The host inputs on ``device``: floats cast to ``dtype``, ints kept as they are."""
    out = []
    for a in host_inputs:
        a = np.asarray(a)
        if a.dtype.kind == "f":
            a = a.astype(dtype)
        out.append(asarray(a, device=device))
    return out


def compare(label, fn, host_inputs, dtype):
    """Run ``fn(*inputs)`` on both devices and compare every returned array.

    fn returns a dict {name: array} (outputs and gradients).
    """
    cpu = fn(*on("cpu", host_inputs, dtype))
    gpu = fn(*on("gpu", host_inputs, dtype))
    assert list(gpu) == list(cpu)
    for name in cpu:
        c, g = cpu[name], gpu[name]
        _check_device(c, "cpu")
        _check_device(g, "gpu")
        assert c.dtype == dtype, f"{label} {name}: cpu dtype {c.dtype}"
        assert g.dtype == dtype, f"{label} {name}: gpu dtype {g.dtype}"
        assert g.shape == c.shape, f"{label} {name}: {g.shape} != {c.shape}"
        check_tensor(f"{label} {name} ({np.dtype(dtype).name})", g, c, TOL[dtype])


# ------------------------------------------------------------------ layers

CONV_CASES = [  # (label, x shape, w shape, stride, pad)
    ("3x3 s1", (2, 4, 7, 7), (5, 4, 3, 3), 1, 1),
    ("3x3 s1 F<=C (dx as conv)", (2, 6, 6, 6), (4, 6, 3, 3), 1, 1),
    ("3x3 s2", (2, 3, 8, 8), (4, 3, 3, 3), 2, 1),
    ("1x1 s1", (2, 4, 5, 5), (6, 4, 1, 1), 1, 0),
    ("1x1 s2", (2, 4, 7, 7), (6, 4, 1, 1), 2, 0),
    ("7x7 s2 stem", (2, 3, 16, 16), (4, 3, 7, 7), 2, 3),
]


@DTYPES
@pytest.mark.parametrize("label,xs,ws,stride,pad", CONV_CASES, ids=[c[0] for c in CONV_CASES])
def test_conv2d(label, xs, ws, stride, pad, dtype):
    g = np.random.default_rng(0)
    x, w = g.standard_normal(xs), g.standard_normal(ws)
    N, _, H, W = xs
    Ho, Wo = (H + 2 * pad - ws[2]) // stride + 1, (W + 2 * pad - ws[3]) // stride + 1
    dout = g.standard_normal((N, ws[0], Ho, Wo))

    def fn(x, w, dout):
        out, cache = conv2d_forward(x, w, stride, pad)
        dx, dw = conv2d_backward(dout, cache)
        return {"out": out, "dx": dx, "dw": dw}

    compare(f"conv {label}", fn, [x, w, dout], dtype)


@DTYPES
def test_conv2d_non_contiguous_input(dtype):
    g = np.random.default_rng(1)
    x = g.standard_normal((2, 4, 6, 6))
    w = g.standard_normal((5, 4, 3, 3))
    dout = g.standard_normal((2, 5, 6, 6))

    def fn(x, w, dout):
        xt = x.transpose(0, 1, 3, 2)  # a non-contiguous view
        out, cache = conv2d_forward(xt, w, 1, 1)
        dx, dw = conv2d_backward(dout, cache)
        return {"out": out, "dx": dx, "dw": dw}

    compare("conv non-contiguous", fn, [x, w, dout], dtype)


@DTYPES
@pytest.mark.parametrize("kernel,stride,pad", [(3, 2, 1), (2, 2, 0)])
def test_maxpool2d(kernel, stride, pad, dtype):
    g = np.random.default_rng(2)
    # a permutation: no ties in any window, in float32 as in float64
    x = g.permutation(2 * 3 * 9 * 9).reshape(2, 3, 9, 9) / 100.0
    Ho = (9 + 2 * pad - kernel) // stride + 1
    dout = g.standard_normal((2, 3, Ho, Ho))

    def fn(x, dout):
        out, cache = maxpool2d_forward(x, kernel, stride, pad)
        return {"out": out, "dx": maxpool2d_backward(dout, cache)}

    compare(f"maxpool {kernel}/{stride}", fn, [x, dout], dtype)


@DTYPES
def test_global_avgpool(dtype):
    g = np.random.default_rng(3)
    x, dout = g.standard_normal((3, 4, 5, 5)), g.standard_normal((3, 4))

    def fn(x, dout):
        out, cache = global_avgpool_forward(x)
        return {"out": out, "dx": global_avgpool_backward(dout, cache)}

    compare("global avgpool", fn, [x, dout], dtype)


@DTYPES
@pytest.mark.parametrize("train", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("shape", [(6, 5), (3, 5, 4, 4)], ids=["2d", "4d"])
def test_batchnorm(shape, train, dtype):
    g = np.random.default_rng(4)
    C = shape[1]
    x = 2.0 + 3.0 * g.standard_normal(shape)  # mean and scale away from (0, 1)
    gamma = 1.0 + 0.3 * g.standard_normal(C)
    beta = 0.3 * g.standard_normal(C)
    running_mean = 0.5 * g.standard_normal(C)
    running_var = g.uniform(0.5, 2.0, C)
    dout = g.standard_normal(shape)

    def fn(x, gamma, beta, running_mean, running_var, dout):
        out, cache, new_mean, new_var = batchnorm_forward(
            x, gamma, beta, running_mean, running_var, train=train, momentum=0.1, eps=1e-5)
        dx, dgamma, dbeta = batchnorm_backward(dout, cache)
        return {"out": out, "running_mean": new_mean, "running_var": new_var,
                "dx": dx, "dgamma": dgamma, "dbeta": dbeta}

    mode = "train" if train else "eval"
    compare(f"batchnorm {len(shape)}-D {mode}", fn,
            [x, gamma, beta, running_mean, running_var, dout], dtype)


@DTYPES
def test_relu(dtype):
    g = np.random.default_rng(5)
    x = g.standard_normal((4, 3, 5, 5))
    x += np.where(x >= 0, 0.1, -0.1)  # away from the kink
    dout = g.standard_normal(x.shape)

    def fn(x, dout):
        out, cache = relu_forward(x)
        return {"out": out, "dx": relu_backward(dout, cache)}

    compare("relu", fn, [x, dout], dtype)


@DTYPES
@pytest.mark.parametrize("bias", [True, False], ids=["bias", "no_bias"])
def test_linear(bias, dtype):
    g = np.random.default_rng(6)
    x, w, b = g.standard_normal((5, 7)), g.standard_normal((3, 7)), g.standard_normal(3)
    dout = g.standard_normal((5, 3))

    def fn(x, w, b, dout):
        out, cache = linear_forward(x, w, b if bias else None)
        dx, dw, db = linear_backward(dout, cache)
        assert (db is None) == (not bias)
        res = {"out": out, "dx": dx, "dw": dw}
        if bias:
            res["db"] = db
        return res

    compare("linear" + ("" if bias else " no bias"), fn, [x, w, b, dout], dtype)


@DTYPES
def test_l2_normalize(dtype):
    g = np.random.default_rng(7)
    x, dout = g.standard_normal((6, 8)), g.standard_normal((6, 8))

    def fn(x, dout):
        out, cache = l2_normalize_forward(x)
        return {"out": out, "dx": l2_normalize_backward(dout, cache)}

    compare("l2_normalize", fn, [x, dout], dtype)


@DTYPES
@pytest.mark.parametrize("soft", [False, True], ids=["int", "soft"])
def test_softmax_cross_entropy(soft, dtype):
    g = np.random.default_rng(8)
    B, C = 6, 10
    logits = 3.0 * g.standard_normal((B, C))
    if soft:
        target = g.uniform(0.0, 1.0, (B, C))
        target /= target.sum(axis=1, keepdims=True)
    else:
        target = g.integers(0, C, size=B)  # int64, moved to the device as is
    dout = np.array(0.7)

    def fn(logits, target, dout):
        # dout: a 0-d array of the dtype on the same device as the logits
        loss, cache = softmax_cross_entropy_forward(logits, target)
        assert loss.shape == ()
        return {"loss": loss.reshape(1), "dlogits": softmax_cross_entropy_backward(dout, cache)}

    compare("cross-entropy " + ("soft" if soft else "int"), fn, [logits, target, dout], dtype)


# ------------------------------------------------------------------ model

def _train_two_steps(device, dtype, batches):
    """ResNet-18 (CIFAR stem, width 8) + head on ``device``: two SGD steps.

    Returns the model, the optimizer and {name: array} of the first step's
    embedding, loss, dx and flat gradient.
    """
    net = build_model("resnet18", stem="cifar", width=8, dtype=dtype, device=device, seed=0)
    opt = SGD(net.store.data, net.store.grad, lr=0.1, momentum=0.9, weight_decay=5e-4)
    first = {}
    for step, (x_host, y_host) in enumerate(batches):
        x = asarray(x_host.astype(dtype), device=device)
        y = asarray(y_host, device=device)
        z = net.forward(x, train=True)
        loss, cache = softmax_cross_entropy_forward(z, y)
        net.store.zero_grad()
        dx = net.backward(softmax_cross_entropy_backward(1.0, cache))
        if step == 0:
            first = {"z": z, "loss": loss.reshape(1), "dx": dx, "grad": net.store.grad.copy()}
        opt.step()
    return net, opt, first


@DTYPES
def test_resnet18_two_sgd_steps(dtype):
    """float64: GPU = CPU within 1e-10. float32: a whole network amplifies
    rounding (on the CPU alone, float32 dx is 3.5e-3 from float64 here, and
    small BN biases 9% after two steps), so there the GPU must be as close to
    the float64 truth as the CPU is: error(gpu32, cpu64) <= 4 error(cpu32,
    cpu64) + 1e-4, per tensor. A real GPU bug is an O(1) error either way."""
    g = np.random.default_rng(9)
    batches = [(g.standard_normal((8, 3, 16, 16)), g.integers(0, 128, size=8)) for _ in range(2)]
    name = np.dtype(dtype).name
    cpu, cpu_opt, cpu_first = _train_two_steps("cpu", dtype, batches)
    gpu, gpu_opt, gpu_first = _train_two_steps("gpu", dtype, batches)
    truth = truth_opt = truth_first = None
    if dtype == np.float32:
        truth, truth_opt, truth_first = _train_two_steps("cpu", np.float64, batches)

    def check(label, ours, cpu_value, truth_value):
        if truth_value is None:
            check_tensor(label, ours, cpu_value, TOL[dtype])
        else:
            # as close to float64 as the CPU's float32 (x 4), or within INDEPENDENT32
            check_tensor(label + " vs float64", ours, truth_value,
                         4 * scaled_error(cpu_value, truth_value) + INDEPENDENT32)

    for store, device in ((cpu.store, "cpu"), (gpu.store, "gpu")):
        for arr in (store.data, store.grad, store.buffer_data):
            _check_device(arr, device)
            assert arr.dtype == dtype

    # First step: embedding, loss, input gradient, all parameter gradients at
    # once (max |diff| over max |grad| of the whole buffer: the bias before the
    # head's BN has gradient ~0, pure rounding noise on both sides).
    for key in ("z", "loss", "dx", "grad"):
        _check_device(gpu_first[key], "gpu")
        assert gpu_first[key].dtype == dtype, key
        check(f"step 0 {key} ({name})", gpu_first[key], cpu_first[key],
              truth_first and truth_first[key])

    # After two steps: every parameter, BN buffer and the momentum, per tensor.
    gpu_sd, cpu_sd = gpu.store.state_dict(), cpu.store.state_dict()
    truth_sd = truth and truth.store.state_dict()
    assert list(gpu_sd) == list(cpu_sd)
    for key, ref in cpu_sd.items():
        if key.endswith("num_batches_tracked"):
            assert int(gpu_sd[key]) == int(ref) == 2, key
        else:
            assert gpu_sd[key].dtype == dtype, key
            check(f"{key} ({name})", gpu_sd[key], ref, truth_sd and truth_sd[key])
    check(f"momentum ({name})", gpu_opt.momentum_buffer, cpu_opt.momentum_buffer,
          truth_opt and truth_opt.momentum_buffer)


@DTYPES
@pytest.mark.parametrize("alpha", [0.0, 0.2], ids=["onehot", "smoothed"])
def test_cosine_softmax_classifier(alpha, dtype):
    """The sharded classifier's forward/backward (size-1 communicator), with top-k."""
    from refimpl.method.targets import target_entries
    from refimpl.parallel import SelfComm, cosine_softmax_backward, cosine_softmax_forward
    r = np.random.default_rng(5)
    N, D, B = 300, 16, 24
    w = r.standard_normal((N, D))
    labels = r.integers(0, N, B)
    z = w[labels] + 0.5 * r.standard_normal((B, D))
    nb = np.stack([r.choice(np.delete(np.arange(N), i), 4, replace=False) for i in range(N)])
    targets = target_entries(labels, N, nb, alpha)
    res = {}
    for device in ("cpu", "gpu"):
        zd, wd = on(device, [z, w], dtype)
        # block 64: several blocks on both devices, the same split
        loss, acc, cache = cosine_softmax_forward(zd, labels, wd, SelfComm(), N, 0.15,
                                                  targets, topk=(1, 5), block=64)
        dz, dw = cosine_softmax_backward(1.0, cache)
        for t in (loss, dz, dw):
            _check_device(t, device)
            assert t.dtype == dtype
        res[device] = (loss, dz, dw, acc)
    for name, i in (("loss", 0), ("dz", 1), ("dW", 2)):
        check_tensor(name, res["gpu"][i], res["cpu"][i], TOL[dtype])
    assert res["gpu"][3] == res["cpu"][3]  # exact: the closest rival logit is 0.4 away


def test_sgd_flat_buffer_matches_cpu():
    """SGD (one whole-buffer block on the GPU, 64K blocks on the CPU)."""
    r = np.random.default_rng(6)
    p0, g = r.standard_normal(200_001), r.standard_normal(200_001)
    out = {}
    for device in ("cpu", "gpu"):
        p, gd = on(device, [p0, g], np.float64)
        opt = SGD(p, gd, lr=0.1, momentum=0.9, weight_decay=1e-3, nesterov=True)
        opt.step()
        opt.step(lr=0.05)
        out[device] = (p, opt.momentum_buffer)
    # 2 elementwise steps of <= 6 roundings (the GPU may fuse them into FMAs): 2 gamma_12
    check_tensor("params", out["gpu"][0], out["cpu"][0], LAYER64)
    check_tensor("momentum", out["gpu"][1], out["cpu"][1], LAYER64)

"""ParamStore: flat buffers, views, gradient accumulation, state dicts."""
import numpy as np
import pytest

from refimpl.params import ParamStore, StateDictError, is_bn_or_bias


def make_store(dtype=np.float64):
    s = ParamStore(dtype=dtype)
    s.add_param("conv1.weight", np.arange(24.0).reshape(2, 3, 2, 2))
    s.add_param("bn1.weight", np.ones(2))
    s.add_param("bn1.bias", np.zeros(2))
    s.add_buffer("bn1.running_mean", np.full(2, 0.5))
    s.add_buffer("bn1.running_var", np.ones(2))
    s.add_buffer("bn1.num_batches_tracked", np.array(0, dtype=np.int64))
    s.add_param("fc.weight", np.full((3, 2), 2.0))
    return s.finalize()


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_layout_views_share_memory_and_dtype(dtype):
    s = make_store(dtype)
    assert s.data.shape == (24 + 2 + 2 + 6,) and s.grad.shape == s.data.shape
    assert s.data.dtype == dtype and s.grad.dtype == dtype
    assert s.buffer_data.dtype == dtype and s.buffer_data.shape == (4,)
    assert s.buffers["bn1.num_batches_tracked"].dtype == np.int64
    for name, view in s.named_params():
        assert view.dtype == dtype
        assert np.shares_memory(view, s.data)
        assert np.shares_memory(s.grads[name], s.grad)
    # Registration order is the layout order.
    np.testing.assert_array_equal(s.data[:24], np.arange(24.0))
    np.testing.assert_array_equal(s.data[-6:], 2.0)
    # Writing a view writes the flat buffer, and the other way round.
    s.params["bn1.bias"][...] = 7
    assert np.all(s.data[26:28] == 7)
    s.data[-1] = -1
    assert s.params["fc.weight"][2, 1] == -1
    s.buffers["bn1.running_var"][...] = 3
    assert np.all(s.buffer_data[2:] == 3)


def test_grads_accumulate_and_zero_grad():
    s = make_store()
    g = s.grads["fc.weight"]
    g += 1.5
    s.grads["fc.weight"] += np.arange(6.0).reshape(3, 2)
    np.testing.assert_array_equal(s.grad[-6:], 1.5 + np.arange(6.0))
    s.grads["conv1.weight"] += 1
    s.zero_grad()
    assert not s.grad.any()
    assert np.shares_memory(g, s.grad)  # views survive zero_grad
    g += 2
    assert np.all(s.grad[-6:] == 2)


def test_decay_mask():
    s = make_store()
    np.testing.assert_array_equal(s.decay_mask(), np.ones(34))
    mask = s.decay_mask(exclude=is_bn_or_bias)
    expected = np.r_[np.ones(24), np.zeros(4), np.ones(6)]
    np.testing.assert_array_equal(mask, expected)


def test_flat_dict_and_load_flat_roundtrip():
    """A (P,) buffer laid out like data (the optimizer's momentum) by name and back."""
    s = make_store()
    flat = np.arange(34.0)
    named = s.flat_dict(flat, "momentum/")
    assert list(named) == ["momentum/conv1.weight", "momentum/bn1.weight", "momentum/bn1.bias",
                           "momentum/fc.weight"]
    assert named["momentum/fc.weight"].shape == (3, 2)
    np.testing.assert_array_equal(named["momentum/fc.weight"].ravel(), np.arange(28.0, 34.0))
    named["momentum/conv1.weight"][...] = -1  # a copy: the buffer keeps its values
    assert flat[0] == 0
    back = np.zeros(34)
    s.load_flat(back, s.flat_dict(flat, "momentum/"), "momentum/")
    np.testing.assert_array_equal(back, flat)
    partial = {"momentum/bn1.bias": np.array([5.0, 6.0])}
    with pytest.raises(StateDictError, match=r"no momentum/conv1.weight \(3 of 4 momentum/\* "):
        s.load_flat(back, partial, "momentum/")
    np.testing.assert_array_equal(back, flat)  # strict: nothing written
    s.load_flat(back, partial, "momentum/", strict=False)
    np.testing.assert_array_equal(back, np.r_[flat[:26], 5.0, 6.0, flat[28:]])


def test_state_dict_roundtrip_order_and_copy():
    s = make_store()
    sd = s.state_dict()
    assert list(sd) == ["conv1.weight", "bn1.weight", "bn1.bias", "bn1.running_mean",
                        "bn1.running_var", "bn1.num_batches_tracked", "fc.weight"]
    assert sd["bn1.num_batches_tracked"].dtype == np.int64
    assert sd["bn1.num_batches_tracked"].shape == ()
    sd["fc.weight"][...] = 0  # a copy: the store does not change
    assert np.all(s.params["fc.weight"] == 2)

    t = make_store(np.float32)
    new = {k: (v + 1 if v.dtype.kind == "f" else v + 5) for k, v in sd.items()}
    assert t.load_state_dict(new) == ([], [])
    for k, v in new.items():
        np.testing.assert_array_equal(t.state_dict()[k], v)
    assert t.params["conv1.weight"].dtype == np.float32
    assert int(t.buffers["bn1.num_batches_tracked"]) == 5
    assert np.shares_memory(t.params["conv1.weight"], t.data)


def test_load_errors_name_every_problem_and_load_nothing():
    s = make_store()
    before = s.state_dict()
    bad = dict(before)
    del bad["bn1.bias"]
    bad["fc.bias"] = np.zeros(3)
    bad["conv1.weight"] = np.zeros((2, 3, 3, 3))
    bad["fc.weight"] = before["fc.weight"] + 1
    with pytest.raises(StateDictError) as e:
        s.load_state_dict(bad)
    msg = str(e.value)
    assert "missing keys: bn1.bias" in msg
    assert "unexpected keys: fc.bias" in msg
    assert "conv1.weight: expected shape (2, 3, 2, 2), got (2, 3, 3, 3)" in msg
    for k, v in s.state_dict().items():  # nothing was written
        np.testing.assert_array_equal(v, before[k])

    # strict=False tolerates missing/unexpected keys (and reports them) ...
    ok = {k: v for k, v in before.items() if k != "bn1.bias"}
    ok["extra"] = np.zeros(1)
    assert s.load_state_dict(ok, strict=False) == (["bn1.bias"], ["extra"])
    # ... but never a wrong shape.
    with pytest.raises(StateDictError, match="shape mismatches"):
        s.load_state_dict({"fc.weight": np.zeros((2, 3))}, strict=False)


def test_registration_errors():
    s = ParamStore()
    s.add_param("a", np.zeros(2))
    with pytest.raises(ValueError, match="registered twice"):
        s.add_param("a", np.zeros(2))
    with pytest.raises(RuntimeError, match="finalize"):
        s.zero_grad()
    s.finalize()
    with pytest.raises(RuntimeError, match="after finalize"):
        s.add_param("b", np.zeros(2))
    assert s.data.dtype == np.float32  # the default dtype


@pytest.mark.parametrize("strict", [True, False], ids=["strict", "non_strict"])
@pytest.mark.parametrize("name,bad", [
    ("bn1.running_mean", np.array([3.0])),          # (1,) would broadcast into (2,)
    ("bn1.running_var", np.full((2, 1), 3.0)),
    ("bn1.num_batches_tracked", np.array([7])),     # (1,) would fit into the 0-d counter
], ids=["running_mean", "running_var", "num_batches_tracked"])
def test_load_rejects_wrong_shaped_buffers_and_loads_nothing(name, bad, strict):
    s = make_store()
    before = s.state_dict()
    new = {k: (v + 1 if v.dtype.kind == "f" else v + 5) for k, v in before.items()}
    new[name] = bad
    with pytest.raises(StateDictError) as e:
        s.load_state_dict(new, strict=strict)
    assert f"{name}: expected shape {s.shapes[name]}, got {bad.shape}" in str(e.value)
    for k, v in s.state_dict().items():  # not even the good keys were written
        np.testing.assert_array_equal(v, before[k], err_msg=k)

"""Array backend: NumPy on the CPU or CuPy on a GPU, chosen once.

This is the only module that imports ``cupy``. Every other module follows the
CuPy/Chainer idiom

    xp = get_array_module(x)

at the top of a function and then uses only ``xp.*``, so the same code runs on
either device. Every place where NumPy and CuPy differ is wrapped here, once:

- ``scatter_add``: ``np.add.at`` vs ``cupy.add.at`` (``cupyx.scatter_add`` before CuPy 13);
- ``to_numpy`` / ``asarray``: host <-> device copies;
- ``ascontiguous``: contiguity before a buffer goes to MPI or a BLAS call;
- ``synchronize``: the current CUDA stream must be finished before MPI reads a
  device buffer;
- ``scalar``: a 0-d reduction becomes a Python float (on CuPy this syncs).

Device: ``REFIMPL_DEVICE=cpu|gpu`` in the environment sets the default; a
``device=`` argument overrides it where arrays are created.

Dtype policy: float32 is the default for speed; float64 is used for the
correctness oracle and for every gradient check. Layers never change the dtype
of what they are given.

Randomness: every random draw in refimpl comes from a NumPy
``np.random.Generator`` seeded explicitly by a named stream (see ``rng``), on the host, and is
then moved to the device. A CPU run and a GPU run with the same seed therefore
see the same initial weights and the same augmentations.

Threads: ``refimpl.threads`` (the intra-op thread pool and BLAS limits).
"""
import os
import sys
import zlib

import numpy as np

DEVICES = ("cpu", "gpu")
DEFAULT_DTYPE = np.float32

_cupy = None  # the cupy module, imported on first use of the GPU


def _import_cupy():
    global _cupy
    if _cupy is None:
        try:
            import cupy
        except ImportError as e:  # pragma: no cover - depends on the machine
            raise RuntimeError(
                "device 'gpu' needs CuPy: pip install 'refimpl[gpu]' "
                "(or the cupy-cudaXXx wheel that matches your CUDA)") from e
        _cupy = cupy
    return _cupy


def check_device(device):
    """Return ``device`` if it is 'cpu' or 'gpu', else raise ValueError."""
    if device not in DEVICES:
        raise ValueError(f"device must be one of {DEVICES}, got {device!r}")
    return device


def default_device():
    """The device named by REFIMPL_DEVICE (default 'cpu')."""
    return check_device(os.environ.get("REFIMPL_DEVICE", "cpu"))


def gpu_available():
    """True when CuPy imports and sees at least one CUDA device."""
    try:
        cp = _import_cupy()
        return cp.cuda.runtime.getDeviceCount() > 0
    except Exception:
        return False


def xp_for(device=None):
    """The array module (numpy or cupy) for ``device`` (default: REFIMPL_DEVICE)."""
    device = default_device() if device is None else check_device(device)
    return _import_cupy() if device == "gpu" else np


def get_array_module(*arrays):
    """numpy or cupy, whichever owns the arrays (numpy for plain Python values).

    CuPy arrays can only exist once some code has imported cupy; that import
    (by refimpl or by the caller) is what makes this look for them.
    """
    if _cupy is None and "cupy" in sys.modules:
        _import_cupy()
    if _cupy is not None:
        return _cupy.get_array_module(*arrays)
    return np


def device_of(x):
    """'gpu' for a CuPy array, 'cpu' otherwise."""
    return "cpu" if get_array_module(x) is np else "gpu"


def resolve_dtype(dtype=None):
    """np.float32 (default) or np.float64; anything else is an error."""
    dtype = np.dtype(DEFAULT_DTYPE if dtype is None else dtype)
    if dtype not in (np.float32, np.float64):
        raise ValueError(f"dtype must be float32 or float64, got {dtype}")
    return dtype.type


def asarray(x, device=None, dtype=None):
    """Copy/convert ``x`` onto ``device`` (a no-op when it is already there)."""
    xp = xp_for(device)
    if xp is not np and get_array_module(x) is np:
        return xp.asarray(x, dtype=dtype)
    if xp is np and get_array_module(x) is not np:
        x = x.get()
    return xp.asarray(x, dtype=dtype)


def to_numpy(x):
    """A NumPy array with the values of ``x`` (copies from the GPU if needed)."""
    if get_array_module(x) is not np:
        return _cupy.asnumpy(x)
    return np.asarray(x)


def scalar(x):
    """A Python float from a 0-d array (a device sync on CuPy)."""
    return float(to_numpy(x))


def ascontiguous(x):
    """``x`` itself if C-contiguous, else a C-contiguous copy."""
    xp = get_array_module(x)
    return x if x.flags.c_contiguous else xp.ascontiguousarray(x)


def scatter_add(a, indices, values):
    """In place: ``a[indices] += values``, with repeated indices accumulated.

    ``a[idx] += v`` silently drops repeats; this is ``np.add.at`` on NumPy,
    ``cupy.add.at`` on CuPy >= 13 and ``cupyx.scatter_add`` on older CuPy.
    """
    xp = get_array_module(a)
    if xp is np:
        np.add.at(a, indices, values)
    elif hasattr(xp.add, "at"):  # pragma: no cover - GPU only (CuPy >= 13)
        xp.add.at(a, indices, values)
    else:  # pragma: no cover - older CuPy
        import cupyx
        cupyx.scatter_add(a, indices, values)
    return a


def synchronize(x=None):
    """Wait for the current CUDA stream (before MPI touches a device buffer)."""
    on_device = _cupy is not None if x is None else get_array_module(x) is not np
    if on_device:
        _cupy.cuda.get_current_stream().synchronize()


def use_gpu(index):
    """Make GPU ``index % (number of GPUs)`` CuPy's current device; return its index."""
    cp = _import_cupy()
    count = cp.cuda.runtime.getDeviceCount()
    if count < 1:
        raise RuntimeError("use_gpu: CuPy sees no CUDA device")
    device = int(index) % count
    cp.cuda.Device(device).use()
    return device


def rng(seed, stream, *keys):
    """A NumPy Generator for one named random stream: ``(seed, stream, *keys)``.

    stream: a short name of what the numbers are for ("init", "sampler",
    "augment", ...). keys: non-negative integers, e.g. (epoch, instance_id):
    ``rng(seed, "augment", epoch, i)`` gives every (epoch, instance) its own
    stream, independent of which rank draws it.

    Why the name and the length: NumPy's SeedSequence pads its entropy with
    zeros, so ``[seed, 3]`` and ``[seed, 3, 0]`` would give the same stream.
    The entropy here is ``[seed, crc32(stream), *keys, len(keys)]``; the final
    length makes every (stream, keys) distinct, and the name keeps e.g. the
    epoch-0 sampler permutation apart from the weight initialization.
    """
    if not isinstance(stream, str) or not stream:
        raise ValueError(f"stream must be a non-empty name, got {stream!r}")
    keys = [int(k) for k in keys]
    if int(seed) < 0 or any(k < 0 for k in keys):
        raise ValueError(f"seed and keys must be non-negative, got {seed!r}, {keys}")
    tag = zlib.crc32(stream.encode())
    return np.random.default_rng([int(seed), tag, *keys, len(keys)])

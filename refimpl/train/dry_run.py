"""refimpl-train --dry-run: what a run costs on each rank, before it runs.

Contract. ``cost(cfg, N, P, rank)`` returns the memory of each part of the
run on one rank, in bytes, and the bytes one training step moves, from
docs/design.md's step table (f = bytes per float, b = B / P, N_r = this rank's
rows, G = replicated parameters, Q = BatchNorm buffer elements):

    replicated   G f (parameters) + G f (gradients) + G f (momentum) + Q f
    classifier   N_r D f (weight, gradient, momentum: 3x) + B N_r f (logits)
    activations  measured: a forward + backward at two small batch sizes,
                 extrapolated linearly to b images. CPU: tracemalloc sees
                 every NumPy allocation. GPU: measured on the device, the
                 bytes CuPy's memory pool holds after a forward + backward
                 from an emptied pool (the pool keeps what it allocated,
                 so this is the reservation at the peak, what must fit)
    neighbours   N K 8 (the table, on every rank), when it is used; host
                 memory on either device
    neighbour search, GPU only (a formula, transient: before each epoch)
                 2 N_r D f (own rows, normalized) + 2 N_s D f (the
                 travelling shard and the next, P > 1) + R C (f + 9) (one
                 tile of similarities, its mask, the candidates' index scan)

    all_gather z_hat, labels   sent b D f + 8 b      received B D f + 8 B
    all_reduce MAX             B f
    all_reduce SUM             2 B f (+ B f with smoothed targets: the label
                               logit for top-k), + B f top-k counts, + B f
                               the labels' logit guesses for top-k
    reduce_scatter dZ          sent B D f            received b D f
    all_reduce gradients       G f
    bcast BN buffers ("local") Q f (rank 0 sends, the others receive)
    all_reduce BN sums ("sync") (Q + L) f forward + Q f backward, L = BatchNorm
                               layers (each sends [sum d, sum d^2, count] and
                               [sum dout, sum dout xhat] of its C channels)

``dry_run(cfg, comm)`` prints it (rank 0) with the size of one checkpoint
on disk (``checkpoint.checkpoint_bytes``) and the memory this machine has
free (MemAvailable / ranks on the node; a GPU's free memory / the ranks
that share that GPU), and says whether the run fits.
"""
import tracemalloc

import numpy as np

from refimpl.backend import synchronize, xp_for
from refimpl.checkpoint import checkpoint_bytes
from refimpl.method.neighbours import TILE
from refimpl.parallel.sharding import shard_range
from refimpl.sysinfo import available_bytes

# Batches at which activations are measured, then extrapolated: tracemalloc
# is exact at any size; CuPy's pool rounds every block up (512 bytes), so a
# GPU measures at larger batches.
MEASURE_BATCHES = {"cpu": (2, 4), "gpu": (8, 16)}


def _mib(nbytes):
    return f"{nbytes / 2**20:,.1f} MiB"


def activation_bytes(cfg, image_size, local_batch):
    """Peak bytes of one forward + backward of the network at ``local_batch`` images.

    Measured on cfg.device at two batches (``MEASURE_BATCHES``), then
    extrapolated linearly: on the CPU with tracemalloc, on a GPU as the bytes
    CuPy's memory pool holds after the pass (``device_pass_bytes``).
    """
    from refimpl.models.network import build_model
    net = build_model(cfg.arch, cfg.stem, cfg.width, cfg.head_hidden or None, cfg.dim,
                      cfg.dtype, cfg.device, cfg.seed)
    small, large = MEASURE_BATCHES[cfg.device]
    peaks = []
    for b in (small, large):
        if cfg.device == "gpu":
            peaks.append(device_pass_bytes(net, b, image_size))
            continue
        x = np.zeros((b, 3, image_size, image_size), dtype=net.store.dtype)
        tracemalloc.start()
        z = net.forward(x, train=True)
        net.backward(np.ones_like(z))
        peaks.append(tracemalloc.get_traced_memory()[1])
        tracemalloc.stop()
    per_image = (peaks[1] - peaks[0]) / (large - small)
    return int(max(peaks[0] + per_image * (local_batch - small), 0)), net


def device_pass_bytes(net, batch, image_size):
    """Bytes CuPy's memory pool holds for one forward + backward of ``batch`` images.

    The pool is emptied of unused blocks first; what it holds after the pass
    beyond what it held before is the pass's peak reservation (the pool
    keeps every block it allocated until told to free them).
    """
    xp = xp_for("gpu")
    pool = xp.get_default_memory_pool()
    net.drop_caches()
    pool.free_all_blocks()
    before = pool.total_bytes()
    x = xp.zeros((batch, 3, image_size, image_size), dtype=net.store.dtype)
    z = net.forward(x, train=True)
    net.backward(xp.ones_like(z), need_dx=False)
    synchronize(z)
    held = pool.total_bytes() - before
    del x, z
    net.drop_caches()
    pool.free_all_blocks()
    return int(held)


def neighbour_search_bytes(num_instances, world_size, rank, dim, itemsize):
    """Device bytes of the neighbour search on one rank (a formula, module docstring)."""
    N, P = num_instances, world_size
    lo, hi = shard_range(N, P, rank)
    others = max((shard_range(N, P, q)[1] - shard_range(N, P, q)[0] for q in range(P)))
    R, C = TILE["gpu"]
    R, C = min(R, hi - lo), min(C, others)
    travelling = 2 * others * dim * itemsize if P > 1 else 0
    return 2 * (hi - lo) * dim * itemsize + travelling + R * C * (itemsize + 9)


def cost(cfg, num_instances, world_size, rank=0, image_size=32):
    """{part: bytes} of memory on one rank and {collective: (sent, received)} per step."""
    f = np.dtype(cfg.dtype).itemsize
    N, P, B, D = num_instances, world_size, cfg.batch_size, cfg.dim
    b = B // P
    lo, hi = shard_range(N, P, rank)
    act, net = activation_bytes(cfg, image_size, b)
    G, Q = net.store.data.size, net.store.buffer_data.size
    momentum = 1 if cfg.momentum > 0 else 0
    uses_table = cfg.alpha > 0 or cfg.agreement
    gpu = cfg.device == "gpu"
    memory = {
        "replicated parameters, gradients, momenta, BN buffers": (2 + momentum) * G * f + Q * f,
        f"classifier shard: {hi - lo} rows x {D} (weight, gradient, momentum)":
            (2 + momentum) * (hi - lo) * D * f,
        f"exp buffer E = exp(logits - block max), B x N_r = {B} x {hi - lo}": B * (hi - lo) * f,
        f"activations of {b} images ({image_size}x{image_size})"
        + (", measured on the GPU" if gpu else ""): act,
    }
    table = {f"neighbour table {N} x {cfg.k}" + (" (host memory)" if gpu else ""):
             N * cfg.k * 8 if uses_table else 0}
    if gpu:  # the table lives on the host; the search's tiles on the device
        if uses_table:
            memory["neighbour search, before each epoch (formula: rows, one tile)"] = \
                neighbour_search_bytes(N, P, rank, D, f)
    else:
        memory.update(table)
    smoothed = cfg.alpha > 0
    comm = {
        "all_gather z_hat, labels": (b * D * f + 8 * b, B * D * f + 8 * B),
        "all_reduce MAX": (B * f, B * f),
        "all_reduce SUM (exp sums, target logits, top-k)":
            ((4 + smoothed) * B * f, (4 + smoothed) * B * f),
        "reduce_scatter dZ": (B * D * f, b * D * f),
        "all_reduce gradients": (G * f, G * f),
    }
    if cfg.bn == "local":
        comm["bcast BN buffers"] = (Q * f if rank == 0 else 0, 0 if rank == 0 else Q * f)
    else:  # Q = 2 sum_l C_l (running mean and var): each layer sends 2 C + 1, then 2 C
        L = sum(n.endswith(".running_mean") for n in net.store.buffer_names())
        comm[f"all_reduce sync BN sums ({L} layers)"] = ((2 * Q + L) * f, (2 * Q + L) * f)
    disk = checkpoint_bytes(N, D, cfg.dtype, G + Q + momentum * G, momentum > 0,
                            cfg.k if uses_table else 0)
    return memory, comm, {"G": int(G), "Q": int(Q), "host": table if gpu else {},
                          "checkpoint": int(disk)}


def dry_run(cfg, comm):
    """Print the cost table of every rank's part (rank 0 prints); exit status 0."""
    from refimpl.parallel.agreement import raise_together
    from refimpl.train.config import ConfigError, validate
    from refimpl.train.loop import PeerFailed, image_side, open_split
    error, ds = None, None
    try:  # a dataset missing on one node: every rank stops, that one says why
        ds = open_split("train", cfg.train)
        validate(cfg, len(ds), comm.size)
    except ConfigError as e:
        error = e
    raise_together(comm, error, lambda q: PeerFailed(f"rank {q} could not start (its message "
                                                     f"is above)"))
    N, P = len(ds), comm.size
    S = image_side(cfg, ds)
    sharing = comm.local_size
    if cfg.device == "gpu":
        from refimpl.parallel.launch import select_gpu
        device = select_gpu(comm)
        gpus = xp_for("gpu").cuda.runtime.getDeviceCount()
        sharing = sum(1 for q in range(comm.local_size) if q % gpus == device)
    memory, moved, sizes = cost(cfg, N, P, comm.rank, S)
    total = sum(memory.values())
    free = available_bytes(cfg.device, sharing)
    table = comm.all_gather(np.array([[total, free or -1]], dtype=np.float64))
    if comm.rank == 0:
        print(f"dry run: N = {N} instances, P = {P} ranks, B = {cfg.batch_size} (b = "
              f"{cfg.batch_size // P} per rank), D = {cfg.dim}, {cfg.dtype}, "
              f"{cfg.arch} width {cfg.width} at {S}x{S}: G = {sizes['G']:,} replicated "
              f"parameters, Q = {sizes['Q']:,} BN buffer elements")
        where = " (on its GPU)" if cfg.device == "gpu" else ""
        print(f"memory on rank 0{where}:")
        for name, nbytes in memory.items():
            print(f"  {name:62s} {_mib(nbytes):>14s}")
        print(f"  {'total':62s} {_mib(total):>14s}")
        for name, nbytes in sizes["host"].items():
            print(f"  {name:62s} {_mib(nbytes):>14s}")
        print("bytes per step on rank 0 (docs/design.md's step table; they do not grow with N):")
        for name, (sent, received) in moved.items():
            print(f"  {name:50s} sent {sent:>12,d}  received {received:>12,d}")
        print(f"  {'total':50s} sent {sum(s for s, _ in moved.values()):>12,d}  received "
              f"{sum(r for _, r in moved.values()):>12,d}")
        print(f"checkpoint on disk: {_mib(sizes['checkpoint'])} each, keep = {cfg.keep} "
              f"(a save checks that the disk has room for one)")
        worst = int(np.argmax(table[:, 0]))
        need, have = table[worst]
        if have < 0:
            print(f"largest rank ({worst}) needs {_mib(need)}; free memory unknown here")
        else:
            verdict = "fits" if need <= have else "does NOT fit"
            print(f"largest rank ({worst}) needs {_mib(need)}, {_mib(have)} free for it: "
                  f"{verdict}")
    return 0

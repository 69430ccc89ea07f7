"""refimpl: a from-scratch NumPy/CuPy + mpi4py reference implementation of
large-scale parametric instance classification (Liu et al., AAAI 2021).

The packages, lowest first. A module imports from its own package and from
those listed before it, never from one listed after it (tests/test_layout.py
checks every import, function-level ones too):

    checks, backend, threads,   argument checks; arrays on the CPU or a GPU; threads;
    fileio, rundir, sysinfo,    checksums and atomic publishing; a run directory's checks and lock;
    params, deps                memory; the flat parameter store; what each command needs installed
    data/       datasets, the world-size-invariant sampler, augmentations
    layers/     forward/backward function pairs
    models/     the ResNet encoder + MLP head in one flat parameter store; state files
    parallel/   communicators, launching, the sharded cosine classifier, data parallelism
    method/     the contrastive prior, the hardest-class neighbours, the targets
    optim/      SGD and the learning-rate schedule
    checkpoint  world-size-independent checkpoints (refimpl-export)
    evaluate/   kNN, linear probe, label agreement (refimpl-eval)
    train/      one hybrid step, the config, the training loop (refimpl-train)
    oracle/     compare, gradcheck, traces, replay (refimpl-oracle)

The programs, each package's ``__main__.py`` (refimpl-train, refimpl-eval,
refimpl-oracle), stand above every package: they may import any of them
(refimpl-train --trace records with ``oracle.recorder``), never another
program. Nothing here imports data_tools/, tests/ or benchmarks/.

A training step reads in this order too, but for optim/ (the update, after
train.step's forward and backward) and checkpoint and evaluate (around the
steps, in train.loop). Nothing here uses autograd; docs/design.md is the
specification.
"""
__version__ = "0.1.0"

"""refimpl: a from-scratch NumPy/CuPy + mpi4py reference implementation of
large-scale parametric instance classification (Liu et al., AAAI 2021).

Read it in the order a training step runs (README, "Layout"):

    backend, threads, checks   arrays on the CPU or a GPU, threads, argument checks
    data/       datasets, the world-size-invariant sampler, augmentations
    layers/     forward/backward function pairs
    models/     the ResNet encoder + MLP head in one flat parameter store
    parallel/   communicators, the sharded cosine classifier, data parallelism
    method/     the contrastive prior, the hardest-class neighbours, the targets
    train/      one hybrid step, the config, the training program (refimpl-train)
    optim/      SGD and the learning-rate schedule
    evaluate/   kNN, linear probe, label agreement (refimpl-eval)
    checkpoint  world-size-independent checkpoints (refimpl-export)
    oracle/     compare, gradcheck, traces, replay (refimpl-oracle)

Nothing here uses autograd; docs/design.md is the specification.
"""
__version__ = "0.1.0"

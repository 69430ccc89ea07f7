"""Optimization: the update rule and the learning rate of each step.

    sgd.py        SGD with momentum, weight decay (with a decay mask) and
                  Nesterov, PyTorch's convention, on one flat buffer in blocks
    schedule.py   linear warm-up, then cosine decay, indexed by step
"""
from refimpl.optim.schedule import warmup_cosine
from refimpl.optim.sgd import SGD

__all__ = ["SGD", "warmup_cosine"]

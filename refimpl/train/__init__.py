"""Training: one hybrid-parallel step, and the program that runs the method.

In reading order:

    step.py      forward_backward (docs/design.md's rows 1-9), update (rows 10-11),
                 train_step: one step on this rank
    config.py    Config: every setting of a run; TOML + key=value overrides,
                 validated up front on every rank
    loop.py      Trainer: evaluation before training, the contrastive prior,
                 the epochs (neighbours, steps, schedule, monitor, metrics,
                 plot, checkpoints), signals
    dry_run.py   the memory and bytes per rank of a run, before it runs
    __main__.py  refimpl-train (python -m refimpl.train), alone or under mpirun
"""
from refimpl.train.step import StepOutputs, forward_backward, train_step, update

__all__ = ["StepOutputs", "forward_backward", "train_step", "update"]

"""Training: one hybrid-parallel step (``step.py``), in the order of DESIGN.md's table.

    step.py   forward_backward (rows 1-9), update (rows 10-11), train_step
"""
from refimpl.train.step import StepOutputs, forward_backward, train_step, update

__all__ = ["StepOutputs", "forward_backward", "train_step", "update"]

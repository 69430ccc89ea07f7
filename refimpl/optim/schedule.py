"""Learning-rate schedule: linear warm-up, then cosine decay (step-indexed).

Contract. ``warmup_cosine(step, ...)`` gives the learning rate of optimizer
step ``step`` (0-based: the first update uses ``step=0``), with W =
``warmup_steps`` and T = ``total_steps``:

    0 <= s < W:   lr(s) = start + (base - start) * s / W
    W <= s <= T:  lr(s) = final + (base - final) * (1 + cos(pi * (s - W) / (T - W))) / 2
    s > T:        lr(s) = final

so lr(0) = start (``warmup_start_lr``, default 0: the first step then does not
move the weights; pass a small start to avoid that), lr(W) = base, and lr(T) =
final (``final_lr``, default 0), reached one step after the last of T steps
s = 0..T-1. The warm-up is ``torch.optim.lr_scheduler.LinearLR(start_factor=
start/base, total_iters=W)`` and the decay is ``CosineAnnealingLR(T_max=T-W,
eta_min=final)`` started at step W (their closed forms; the tests compare).
W = 0 means no warm-up.
"""
import math


def warmup_cosine(step, base_lr, total_steps, warmup_steps=0, warmup_start_lr=0.0,
                  final_lr=0.0):
    """The learning rate at 0-based optimizer step ``step`` (see the module docstring)."""
    if step < 0:
        raise ValueError(f"warmup_cosine: step must be >= 0, got {step}")
    if not 0 <= warmup_steps < total_steps:
        raise ValueError(f"warmup_cosine: need 0 <= warmup_steps < total_steps, got "
                         f"{warmup_steps} and {total_steps}")
    if step < warmup_steps:
        return warmup_start_lr + (base_lr - warmup_start_lr) * step / warmup_steps
    if step >= total_steps:
        return final_lr
    progress = (step - warmup_steps) / (total_steps - warmup_steps)  # in [0, 1)
    return final_lr + (base_lr - final_lr) * (1 + math.cos(math.pi * progress)) / 2

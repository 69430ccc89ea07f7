"""Phase 2 of the method: the pretrained encoder fine-tuned (or probed) on labeled classes.

The paper's second phase: the encoder of phase 1, its MLP head and N-way
instance classifier dropped, then pool + FC over the C semantic classes,
trained with softmax cross-entropy on all or a fraction of the labels
(semi-supervised), or on another dataset (transfer), against the same
fine-tune from random initialization (docs/finetune.md). In reading order:

    labels.py    label_subset: the seeded, class-balanced labeled subset
                 (the same ids for every P and rerun)
    sampler.py   batch_of_step: the global batch of a step, a stream of
                 passes over the labeled ids, independent of P
    model.py     FineTuneNet: encoder + FC in one flat store (torchvision's
                 ResNet with num_classes = C)
    init.py      the encoder's start: a refimpl-train run, a .pt/.npz, scratch
    step.py      forward_backward (cross-entropy, one gradient all-reduce),
                 update (two learning rates): one data-parallel step
    config.py    FineTuneConfig: TOML + key=value, validated up front
    checkpoint.py  fine-tuning checkpoints (refimpl's format, kind "finetune")
    loop.py      FineTuner: the epochs, test top-1/top-5, metrics, plot,
                 checkpoints, signals
    __main__.py  refimpl-finetune (python -m refimpl.finetune)
"""
from refimpl.finetune.labels import label_subset
from refimpl.finetune.model import FineTuneNet
from refimpl.finetune.sampler import batch_of_step
from refimpl.finetune.step import StepOutputs, forward_backward, update

__all__ = ["FineTuneNet", "StepOutputs", "batch_of_step", "forward_backward", "label_subset",
           "update"]

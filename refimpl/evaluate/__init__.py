"""Evaluation: how much a representation knows about labels it never saw.

Self-supervised training uses no labels; these functions use the labels of a
train and a test split afterwards (or as a monitor during training) to
measure how well the features separate the classes. Every measurement takes
feature arrays (or images, whose pixels are the trivial features) and
labels, and returns plain numbers, so a learned encoder, a random one and the
identity (raw pixels) are measured by the same code. In reading order:

    features.py      extract_features: the whole dataset through the network
                     (eval-mode BatchNorm), each rank its contiguous share,
                     one all_gather_v per kind -> pooled (N, F) and head
                     (N, dim) host arrays on every rank
    knn.py           weighted cosine kNN (InstDisc/PIC: k = 20, 200,
                     exp(sim / 0.07) votes) and the plain majority vote; both
                     also on raw pixels
    linear_probe.py  multinomial logistic regression on frozen, standardized
                     features (scikit-learn's L-BFGS, fixed C), one process
    agreement.py     neighbour label agreement: the fraction of the hardest-
                     class neighbours NK(i) that share instance i's label
    __main__.py      refimpl-eval: kNN and a linear probe of a checkpoint
"""
from refimpl.evaluate.agreement import neighbour_label_agreement
from refimpl.evaluate.features import extract_features
from refimpl.evaluate.knn import (knn_majority_accuracy, raw_pixel_knn_accuracy,
                                  raw_pixel_weighted_knn_accuracy, weighted_knn_accuracy,
                                  weighted_knn_predict)
from refimpl.evaluate.linear_probe import linear_probe, linear_probe_accuracy

__all__ = ["extract_features", "knn_majority_accuracy", "linear_probe",
           "linear_probe_accuracy", "neighbour_label_agreement", "raw_pixel_knn_accuracy",
           "raw_pixel_weighted_knn_accuracy", "weighted_knn_accuracy", "weighted_knn_predict"]

"""Evaluation: how much a representation knows about labels it never saw.

Self-supervised training uses no labels; these functions use the labels of a
train and a test split afterwards (or as a monitor during training) to
measure how well the features separate the classes. Every function takes
feature arrays (or images, whose pixels are the trivial features) and
labels, and returns plain numbers, so a learned encoder and the identity
(raw pixels) are measured by the same code.

    knn.py  k-nearest-neighbour accuracy on features (raw pixels for now)
"""

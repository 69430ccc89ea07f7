"""Which training images keep their label: a seeded, class-balanced subset.

Contract. ``label_subset(labels, fraction, seed)`` returns the sorted int64
ids of the training images whose labels a semi-supervised fine-tune may
use. It is a pure function of (labels, fraction, seed): every rank computes
it alone and gets the same ids, for every P and every rerun, so "1% of the
labels" means the same images everywhere (the run directory keeps them,
``write_subset``).

    T = max(C, round(fraction * N))        images in the subset
    quota_c: T split as evenly as possible over the C classes, none above
             the class's size n_c (water-filling: the classes in order of
             (n_c, c), each taking floor(remaining / classes left), capped
             at n_c; what a small class cannot take goes to the larger ones)
    class c: the first quota_c ids of rng(seed, "labels", c)'s permutation
             of the class's ids

so every class has at least one image, ``fraction = 1`` is the whole
training set, and for one seed the subset of a smaller fraction lies inside
that of a larger one (prefixes of the same permutations).
"""
import json
from pathlib import Path

import numpy as np

from refimpl.backend import rng

SUBSET_FILE = "label_subset.json"


def class_quotas(counts, total):
    """(C,) int64: ``total`` images split evenly over classes of sizes ``counts``.

    counts: (C,) images per class, each >= 1; total: C <= total <= sum(counts).
    """
    counts = np.asarray(counts, dtype=np.int64)
    C = counts.shape[0]
    quota = np.zeros(C, dtype=np.int64)
    remaining = int(total)
    order = np.lexsort((np.arange(C), counts))  # smallest classes first, then by class id
    for left, c in zip(range(C, 0, -1), order):
        quota[c] = min(int(counts[c]), remaining // left)
        remaining -= int(quota[c])
    return quota


def label_subset(labels, fraction, seed):
    """Sorted int64 ids of the labeled subset (module docstring).

    labels: int (N,) in [0, C), every class present; fraction in (0, 1];
    seed >= 0. Raises ValueError for anything else.
    """
    labels = np.asarray(labels)
    if labels.ndim != 1 or labels.size == 0 or labels.dtype.kind not in "iu":
        raise ValueError(f"labels must be a non-empty 1-d integer array, got {labels.dtype} "
                         f"{labels.shape}")
    if not 0 < fraction <= 1:
        raise ValueError(f"the labeled fraction must lie in (0, 1], got {fraction}")
    if labels.min() < 0:
        raise ValueError(f"{int(np.sum(labels < 0))} images have no label (-1)")
    C = int(labels.max()) + 1
    counts = np.bincount(labels, minlength=C)                       # (C,)
    if np.any(counts == 0):
        raise ValueError(f"class {int(np.argmax(counts == 0))} has no training image "
                         f"(classes 0..{C - 1} must all be present)")
    N = labels.shape[0]
    total = min(N, max(C, int(round(fraction * N))))
    quota = class_quotas(counts, total)
    chosen = []
    for c in range(C):
        members = np.flatnonzero(labels == c)                       # (n_c,) ascending
        chosen.append(members[rng(seed, "labels", c).permutation(members.size)[:quota[c]]])
    return np.sort(np.concatenate(chosen)).astype(np.int64)


def subset_record(ids, labels, fraction, seed):
    """The JSON-able description of a subset that the run directory keeps."""
    labels = np.asarray(labels)
    C = int(labels.max()) + 1
    per_class = np.bincount(labels[ids], minlength=C)
    return {"fraction": fraction, "seed": seed, "num_labeled": int(ids.size),
            "num_train": int(labels.size), "per_class": per_class.tolist(),
            "ids": ids.tolist()}


def write_subset(run_dir, record):
    """Write ``label_subset.json`` into ``run_dir`` (rank 0); returns its path."""
    path = Path(run_dir) / SUBSET_FILE
    path.write_text(json.dumps(record) + "\n")
    return path


def read_subset(run_dir):
    """The record of ``label_subset.json`` in ``run_dir``, or None when there is none."""
    path = Path(run_dir) / SUBSET_FILE
    return json.loads(path.read_text()) if path.is_file() else None

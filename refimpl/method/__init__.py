"""The method: what turns an N-way classifier into instance discrimination.

In the order a run uses them:

    prior.py       the contrastive prior: W's rows from random-init features
    neighbours.py  the K hardest classes of every class, across shards (a ring)
    targets.py     smoothed labels of the hardest classes, as sparse entries
"""
from refimpl.method.neighbours import dense_hardest_neighbours, hardest_neighbours
from refimpl.method.prior import contrastive_prior, prior_batches, prior_summary
from refimpl.method.targets import target_entries

__all__ = ["contrastive_prior", "dense_hardest_neighbours", "hardest_neighbours",
           "prior_batches", "prior_summary", "target_entries"]

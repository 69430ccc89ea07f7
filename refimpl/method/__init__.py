"""The method: what turns an N-way classifier into instance discrimination.

    targets.py     smoothed labels of the hardest classes, as sparse entries
"""
from refimpl.method.targets import target_entries

__all__ = ["target_entries"]

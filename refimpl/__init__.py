"""refimpl: a from-scratch NumPy/CuPy + mpi4py reference implementation of
large-scale parametric instance classification (Liu et al., AAAI 2021)."""
__version__ = "0.1.0"

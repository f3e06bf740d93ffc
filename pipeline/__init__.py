"""convpipe: CS231n convolutional networks with Numba kernels, trained data-parallel on Dask.

The layer math (``layers``, ``fast_layers``, ``layer_utils``, ``cnn``, ``optim``, ``solver``)
is pure array code; data code lives in ``pipeline.data``, distributed training in
``pipeline.training`` and the command line in ``pipeline.cli``.
"""

import os

__version__ = "0.1.0"

# Numba's parallel kernels (OpenMP threading layer) alternate with NumPy's OpenBLAS GEMMs on the
# same cores. OpenMP threads spin after each kernel by default, starving the BLAS threads that
# run next: a training step at batch 50 on 2 cores took 93 ms spinning and 54 ms passive.
# Read by the OpenMP runtime when the first parallel kernel starts; a user's setting wins.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

# OpenBLAS's idle threads spin after each GEMM (up to 2**28 cycles by default), slowing the Numba
# kernels that run next on the same cores: a batch-50 epoch on 2 cores ran ~10% faster with the
# shortest spin (2**4). OpenBLAS reads this when NumPy loads it, so it applies when pipeline is
# imported before NumPy (the CLI, the benchmarks); export it yourself otherwise.
os.environ.setdefault("OPENBLAS_THREAD_TIMEOUT", "4")

"""convpipe: CS231n convolutional networks with Numba kernels, trained data-parallel on Dask.

The layer math (``layers``, ``fast_layers``, ``layer_utils``, ``cnn``, ``optim``, ``solver``)
is pure array code; data code lives in ``pipeline.data``, distributed training in
``pipeline.training`` and the command line in ``pipeline.cli``.
"""

from pipeline._kernels import threads

__version__ = "0.1.0"

# Numba's kernels and NumPy's OpenBLAS GEMMs alternate on the same cores: set up their thread
# runtimes (Numba on TBB, short OpenBLAS spin) however the process imported things before us.
# See pipeline/_kernels/threads.py; a user's environment variables win.
_THREAD_SETUP = threads.configure()

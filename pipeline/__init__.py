"""convpipe: CS231n convolutional networks with Numba kernels, trained data-parallel on Dask.

The layer math (``layers``, ``fast_layers``, ``layer_utils``, ``cnn``, ``optim``, ``solver``)
is pure array code; data code lives in ``pipeline.data``, distributed training in
``pipeline.dist`` and the command line in ``pipeline.cli``.
"""

__version__ = "0.1.0"

"""convpipe's Numba kernels, private to the package: the public layers in
:mod:`pipeline.fast_layers`, :mod:`pipeline.optim` and the training tasks call them.

- ``simd``: a SIMD vector type and a few LLVM vector operations for kernels that keep sums in
  registers; ``tile``: the 3 x 4-vector register tile built on them;
- ``conv``, ``pool``, ``norm``, ``affine``: the layers' kernels;
- ``threads``: the thread runtimes (Numba on TBB, OpenBLAS's spin) and ``launch()``, the lock
  every parallel kernel runs under.

Nothing here imports any other part of convpipe.
"""

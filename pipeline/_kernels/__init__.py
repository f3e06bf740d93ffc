"""convpipe's Numba kernels, private to the package: the public layers in
:mod:`pipeline.fast_layers`, :mod:`pipeline.optim` and the training tasks call them.

- ``simd``: a SIMD vector type and a few LLVM vector operations for kernels that keep sums in
  registers; ``tile``: the register tiles built on them (3 x 4 vectors, 6 x 4 on 32 registers);
- ``conv``, ``pool``, ``norm``, ``affine``: the layers' kernels;
- ``threads``: the thread runtimes (Numba on TBB, OpenBLAS's spin) and ``launch()``, the lock
  every parallel kernel runs under.

Nothing here imports any other part of convpipe.
"""

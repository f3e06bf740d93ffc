"""Tests of the layer math, the kernels under it, the model, the optimizers and the solver."""

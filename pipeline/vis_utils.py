"""Tile images into one grid, as cs231n's vis_utils (e.g. to visualize first-layer filters).

numpy only; plot the result with matplotlib's ``imshow`` yourself.
"""

from __future__ import annotations

from math import ceil, sqrt

import numpy as np

__all__ = ["visualize_grid"]


def visualize_grid(Xs, ubound=255.0, padding=1):
    """Reshape a 4-D tensor of image data into a grid for easy visualization.

    Inputs:
    - Xs: data of shape (N, H, W, C)
    - ubound: output grid values lie in [0, ubound]; each image is rescaled on its own so its
      minimum maps to 0 and its maximum to ubound (a constant image maps to 0)
    - padding: number of blank pixels between elements of the grid (>= 0)

    Returns:
    - grid: float array of shape (G*H + (G-1)*padding, G*W + (G-1)*padding, C) with
      G = ceil(sqrt(N)); images fill it row by row, the rest stays 0
    """
    Xs = np.asarray(Xs)
    if Xs.ndim != 4:
        raise ValueError(f"Xs must be a 4-D array (N, H, W, C), got shape {Xs.shape}")
    if isinstance(padding, bool) or int(padding) != padding or padding < 0:
        raise ValueError(f"padding must be an integer >= 0, got {padding!r}")
    padding = int(padding)
    N, H, W, C = Xs.shape
    grid_size = int(ceil(sqrt(N)))
    grid_height = H * grid_size + padding * (grid_size - 1)
    grid_width = W * grid_size + padding * (grid_size - 1)
    grid = np.zeros((max(grid_height, 0), max(grid_width, 0), C))
    for idx in range(N):
        gy, gx = divmod(idx, grid_size)
        y0 = gy * (H + padding)
        x0 = gx * (W + padding)
        img = Xs[idx].astype(np.float64)
        low, high = img.min(), img.max()
        scaled = ubound * (img - low) / (high - low) if high > low else np.zeros_like(img)
        grid[y0 : y0 + H, x0 : x0 + W] = scaled
    return grid

"""The first run after an install compiles the Numba kernels: `convpipe train` says so first.

Each check runs in a fresh process whose NUMBA_CACHE_DIR is an empty folder (a cold cache),
then in another one after the kernels were compiled into it (a warm cache).
"""

from __future__ import annotations

import os
import subprocess
import sys

import numpy as np
import pytest

from pipeline import warmup
from pipeline.warmup import COMPILING_MESSAGE

# In a fresh process: the notice for a 3x3 model (on CIFAR-10's 32 x 32 images, the direct
# kernels), then one training step of that model (16 x 16 images: the same kernels), then the
# notice again.
PROBE = r"""
import sys
import numpy as np
from pipeline.cli.train import say_if_compiling
from pipeline.cnn import ThreeLayerConvNet
from pipeline.training.config import TrainConfig

config = TrainConfig(filter_size=3)
remote = TrainConfig(filter_size=3, scheduler="tcp://127.0.0.1:1")
print("remote", say_if_compiling(remote), file=sys.stderr)
print("before", say_if_compiling(config), file=sys.stderr)
if sys.argv[1] == "step":
    model = ThreeLayerConvNet(
        input_dim=(3, 16, 16), num_filters=4, filter_size=3, hidden_dim=5, seed=0, reg=1e-3
    )
    model.loss(np.zeros((2, 3, 16, 16), np.float32), np.array([0, 1]))
    print("after", say_if_compiling(config), file=sys.stderr)
"""


def _run(cache_dir, *args):
    env = {**os.environ, "NUMBA_CACHE_DIR": str(cache_dir)}
    proc = subprocess.run(
        [sys.executable, "-c", PROBE, *args], env=env, capture_output=True, text=True, timeout=600
    )
    assert proc.returncode == 0, proc.stderr
    return proc.stdout, proc.stderr.splitlines()


@pytest.fixture(scope="module")
def compiled(tmp_path_factory):
    """A cache folder that started empty, and the notice lines of the process that compiled into
    it."""
    cache_dir = tmp_path_factory.mktemp("numba-cache")
    out, err = _run(cache_dir, "step")
    assert out == ""
    return cache_dir, err


def test_cold_cache_prints_the_notice_once_and_warm_cache_does_not(compiled):
    cache_dir, err = compiled
    # cold: the notice on stderr, before anything compiled; never for a remote cluster's workers
    assert err == ["remote False", COMPILING_MESSAGE, "before True", "after False"]
    # a later process finds the kernels in the cache: silent
    assert _run(cache_dir, "check")[1] == ["remote False", "before False"]


def test_notice_follows_dtype_and_model(compiled):
    """Kernels cached for float32 and 3x3 filters: float64, 5x5 (im2col) or a norm still
    compile (with a norm, or on im2col, the separate convolution and pooling passes that the
    plain 3x3 net fuses); 7x7 runs the same direct kernels as 3x3 on CIFAR-10's images."""
    cache_dir, _ = compiled
    code = (
        "import sys; from pipeline.warmup import cold_kernels, model_kernels as m\n"
        "print(cold_kernels(m(3), 'float32'), cold_kernels(m(3), 'float16'),"
        " cold_kernels(m(3), 'float64'), cold_kernels(m(7), 'float32'),"
        " cold_kernels(m(5), 'float32'), cold_kernels(m(3, 'groupnorm'), 'float32'))"
    )
    env = {**os.environ, "NUMBA_CACHE_DIR": str(cache_dir)}
    line = subprocess.run(
        [sys.executable, "-c", code],
        env=env,
        capture_output=True,
        text=True,
        check=True,
        timeout=300,
    ).stdout.strip()
    assert line == (
        "[] [] ['pad_planes', 'direct_forward', 'pooled_dw'] "
        "[] ['im2col', 'bias_to_nchw', 'dout_to_2d', 'pool_forward_2x2', 'pool_backward'] "
        "['direct_dw', 'pool_forward_2x2', 'pool_backward', 'gn_forward', 'gn_backward']"
    )


@pytest.mark.parametrize("filter_size", [3, 5, 7])
@pytest.mark.parametrize("normalization", [None, "spatial_batchnorm", "groupnorm"])
@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_every_listed_kernel_is_one_a_model_compiles(filter_size, normalization, dtype):
    """After warm() (what CI runs first: loads from the cache then), no kernel of any model is
    still cold: the list names only kernels the models really run, so a warm cache is silent."""
    warmup.warm()
    assert warmup.cold_kernels(warmup.model_kernels(filter_size, normalization), dtype) == []


def test_cannot_tell_means_no_notice(monkeypatch, capsys):
    monkeypatch.setattr(warmup, "_has_cached_code", lambda *a: 1 / 0)
    assert warmup.cold_kernels(warmup.model_kernels(), "float32") is None
    assert warmup.say_if_compiling() is False
    assert capsys.readouterr().err == ""


def test_a_kernel_cached_at_a_narrower_width_than_the_process_s_is_warm(monkeypatch):
    # conv dw of 32 filters runs at 32 bytes whatever the CPU's width (the fewest padded
    # values): a cache holding it only there is warm for a 64-byte process. Before, `convpipe
    # train` said "compiling kernels, first run only" before every run on an AVX-512 machine.
    from pipeline._kernels import conv as kc
    from pipeline._kernels import simd

    def widths(key):
        return {a.nbytes for a in key[0] if isinstance(a, simd.WidthType)}

    files = kc.direct_dw._cache._cache_file
    at32 = {k: v for k, v in files._load_index().items() if widths(k) == {32}}
    assert at32, "pipeline.warmup caches direct_dw at 32 bytes"
    monkeypatch.setattr(files, "_load_index", lambda: at32)  # the cache holds only those
    monkeypatch.setattr(simd, "current", lambda: simd.Width(64))
    assert warmup.cold_kernels([kc.direct_dw], "float32") == []
    monkeypatch.setattr(simd, "current", lambda: simd.Width(16))  # none as narrow as 16
    assert warmup.cold_kernels([kc.direct_dw], "float32") == ["direct_dw"]


def test_a_kernel_cached_only_with_another_register_file_s_tile_is_cold(monkeypatch):
    # the few-row dx takes 6 x 4 tiles on 32 registers, 3 x 4 on 16: a cache holding only the
    # 6 x 4 code is warm for a 32-register process and cold for a 16-register one
    from pipeline._kernels import affine as ka
    from pipeline._kernels import simd, tile

    def tiles(key):
        return {(a.rows, a.cols) for a in key[0] if isinstance(a, tile.TileType)}

    from pipeline import fast_layers as fl

    monkeypatch.setattr(fl, "_tile", lambda tall=False: tile.Tile(6, 4))  # cached here if not yet
    fl.affine_dx_fast(np.ones((50, 40), np.float32), np.ones((30, 40), np.float32))
    files = ka.affine_dx_rows._cache._cache_file
    tall = {k: v for k, v in files._load_index().items() if tiles(k) == {(6, 4)}}
    assert tall, "pipeline.warmup caches affine_dx_rows with 6 x 4 tiles"
    monkeypatch.setattr(files, "_load_index", lambda: tall)
    monkeypatch.setattr(simd, "registers", lambda: 32)
    assert warmup.cold_kernels([ka.affine_dx_rows], "float32") == []
    monkeypatch.setattr(simd, "registers", lambda: 16)
    assert warmup.cold_kernels([ka.affine_dx_rows], "float32") == ["affine_dx_rows"]

"""The kernels at every vector width (16, 32 and 64 bytes): each matches the naive layers, and
every width computes the same bits, so workers on CPUs of different widths train the same run.
LLVM lowers a vector wider than the machine's registers, so every width runs on any x86 CPU."""

from __future__ import annotations

import numpy as np
import pytest

from pipeline import fast_layers as fl
from pipeline import layers as L
from pipeline._kernels import simd, tile


@pytest.fixture
def forced_width(monkeypatch):
    """Every kernel at ``simd.current()``'s width, not the narrower one fast_layers picks for
    shapes that would waste lanes (``fl._width_for``), so each width runs every kernel."""
    monkeypatch.setattr(fl, "_width_for", lambda count, dtype, fit=False, cols=4: simd.current())


@pytest.fixture
def forced_tile(monkeypatch):
    """``force(tile)``: every SIMD kernel with that register tile, whatever it measured fastest
    with (``fl._tile``)."""

    def force(t):
        monkeypatch.setattr(fl, "_tile", lambda tall=False: t)

    return force


def _every_simd_path(dtype, seed=0):
    """Outputs of every fast path built on the SIMD kernels, on shapes with remainders (F, C*HH
    and D not multiples of 3, rows shorter and longer than a vector, column counts past a whole
    group) and the notebook's model shapes; affine columns >= 4 vectors of 64 bytes."""
    rng = np.random.default_rng(seed)
    out = {}

    def r(*shape):
        return rng.standard_normal(shape).astype(dtype)

    for N, C, H, W, F, HH, pad in [
        (2, 3, 12, 12, 8, 7, 3),
        (3, 2, 5, 9, 5, 3, 2),
        (1, 2, 20, 40, 4, 7, 6),
        (4, 3, 32, 32, 32, 7, 3),  # the three-layer net's conv
        (2, 4, 9, 17, 64, 7, 3),
        (2, 3, 6, 15, 5, 3, 1),  # 3x3 on rows of 15 and 31 (fl.DIRECT_MIN_W_OUT)
        (1, 4, 5, 31, 7, 3, 1),
        (5, 3, 7, 7, 8, 3, 1),  # 7 x 7 planes, 4 side by side in a row
        (3, 64, 7, 7, 8, 3, 1),  # Winograd (fl.winograd): 4 x 4 tiles
        (2, 64, 3, 3, 5, 3, 1),  # 3 x 3 tiles
        (17, 65, 5, 9, 3, 3, 0),  # more images than a block of 16
    ]:
        WW = 3 if HH == 3 else 7
        x, w, b = r(N, C, H, W), r(F, C, HH, WW), r(F)
        y, cache = fl.conv_relu_forward_fast(x, w, b, {"stride": 1, "pad": pad})
        dx, dw, db = fl.conv_backward_fast(r(*y.shape), cache)
        out[f"conv{N}{C}{H}{W}{F}"] = (y, dx, dw, db)
    pool = {"pool_height": 2, "pool_width": 2, "stride": 2}
    for N, C, H, W, F, HH, pad in [(4, 3, 32, 32, 32, 7, 3), (5, 3, 8, 8, 8, 3, 1)]:
        WW = 3 if HH == 3 else 7  # the three-layer net's (one pass); 3x3 planes 4 side by side
        p, (conv_cache, pool_cache) = fl.conv_relu_pool_forward_fast(
            r(N, C, H, W), r(F, C, HH, WW), r(F), {"pad": pad}, pool
        )
        dw, db = fl.conv_pool_dw_fast(r(*p.shape), conv_cache, pool_cache)
        out[f"pooled{N}{C}{H}{W}{F}"] = (p, pool_cache[2], dw, db)
    G = 4 * 64 // np.dtype(dtype).itemsize  # the widest group of columns
    for N, D, M in [(3, 5, G), (7, 31, G + 1), (9, 144, 3 * G - 5), (50, 300, 500)]:
        x, w, b, da = r(N, D), r(D, M), r(M), r(N, M)
        dw_out = r(D, M)
        out[f"affine{N}{D}{M}"] = (
            fl.affine_relu_forward_fast(x, w, b)[0],
            fl.affine_dw_l2_fast(x, da, w, 0.3),
            fl.affine_dw_l2_fast(x, da, w, 0.3, scale=2.0, out=dw_out, add=True),
            # rows as shards 0 | 1 | the rest, summed as 0 + (1 + rest) (ka.affine_dw_tree)
            fl.affine_dw_sum(
                np.split(x, [1, 2]),
                np.split(da, [1, 2]),
                w,
                [1.0, 2.0, 3.0],
                (0, (1, 2)),
                np.empty((D, M), dtype),
            ),
        )
    for N, D, M in [
        (16, 1, 1),
        (17, 5, 3),
        (31, 49, 16),
        (33, 144, 9),
        (50, 200, 500),
        (63, 9, 65),
    ]:
        dxa, sq = fl.affine_dx_fast(r(N, M), r(D, M), sumsq=True)
        out[f"dx{N}{D}{M}"] = (dxa, np.float64(sq))
    return out


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_every_width_and_tile_computes_the_same_bits(dtype, forced_width, forced_tile):
    results = {}
    for shape in tile.SHAPES:
        forced_tile(tile.Tile(*shape))
        for nbytes in simd.WIDTHS:
            with simd.using(nbytes):
                assert fl.vector_bytes() == nbytes
                results[nbytes, shape] = _every_simd_path(dtype)
    ref = results[simd.WIDTHS[0], tile.SHAPES[0]]
    for (nbytes, shape), got in results.items():
        for name, arrays in got.items():
            for i, (a, b) in enumerate(zip(arrays, ref[name])):
                np.testing.assert_array_equal(
                    a, b, err_msg=f"{name}[{i}] at {nbytes} bytes, tile {shape}"
                )


@pytest.mark.parametrize("shape", tile.SHAPES)
@pytest.mark.parametrize("nbytes", simd.WIDTHS)
def test_each_width_and_tile_matches_the_naive_layers(nbytes, shape, forced_width, forced_tile):
    """The widest and narrowest paths are right, not only equal to each other (float64)."""
    forced_tile(tile.Tile(*shape))
    rng = np.random.default_rng(1)
    x, w, b = rng.standard_normal((2, 3, 9, 13)), rng.standard_normal((5, 3, 7, 7)), np.ones(5)
    cp = {"stride": 1, "pad": 3}
    with simd.using(nbytes):
        y, cache = fl.conv_forward_fast(x, w, b, cp)
        dout = rng.standard_normal(y.shape)
        grads = fl.conv_backward_fast(dout, cache)
        xa, wa, ba, da = (rng.standard_normal(s) for s in ((20, 70), (70, 40), (40,), (20, 40)))
        fwd = fl.affine_relu_forward_fast(xa, wa, ba)[0]
        dxa, sq = fl.affine_dx_fast(da, wa, sumsq=True)
        dwa = fl.affine_dw_l2_fast(xa, da, wa, 0.1)
        xw, ww = rng.standard_normal((3, 64, 5, 7)), rng.standard_normal((4, 64, 3, 3))
        yw, cache_w = fl.conv_forward_fast(xw, ww, np.ones(4), {"stride": 1, "pad": 1})
        dw_out = rng.standard_normal(yw.shape)
        grads_w = fl.conv_backward_fast(dw_out, cache_w)
    yw_n, cache_wn = L.conv_forward_naive(xw, ww, np.ones(4), {"stride": 1, "pad": 1})
    np.testing.assert_allclose(yw, yw_n, rtol=1e-10, atol=1e-12)
    for g, g_n in zip(grads_w, L.conv_backward_naive(dw_out, cache_wn)):
        np.testing.assert_allclose(g, g_n, rtol=1e-9, atol=1e-12)
    y_n, cache_n = L.conv_forward_naive(x, w, b, cp)
    np.testing.assert_allclose(y, y_n, rtol=1e-10)
    for g, g_n in zip(grads, L.conv_backward_naive(dout, cache_n)):
        np.testing.assert_allclose(g, g_n, rtol=1e-9, atol=1e-12)
    np.testing.assert_allclose(fwd, np.maximum(xa @ wa + ba, 0), rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(dxa, da @ wa.T, rtol=1e-12, atol=1e-12)
    assert sq == pytest.approx(float(np.sum(wa**2)), rel=1e-13)
    np.testing.assert_allclose(dwa, xa.T @ da + 0.1 * wa, rtol=1e-12, atol=1e-12)


def test_the_sum_of_squares_folds_lanes_in_64_byte_blocks_at_every_width():
    """float32: lane l of 16 sums squares l, l + 16, ...; pairs (l, l + 8) added, then summed in
    order; the tail in float64. Written out in NumPy and compared bit for bit."""
    rng = np.random.default_rng(2)
    w = rng.standard_normal((1, 16 * 5 + 7)).astype(np.float32)
    row = w[0]
    lanes = np.zeros(16, np.float32)
    for k in range(0, 80, 16):
        for i in range(16):  # fused multiply-add: the exact square rounded once with the sum
            lanes[i] = np.float32(np.float64(row[k + i]) * row[k + i] + lanes[i])
    s = lanes[0] + lanes[8]
    for i in range(1, 8):
        s = np.float32(s + np.float32(lanes[i] + lanes[i + 8]))
    expect = float(s)  # then the tail's squares, rounded in float32, added one by one
    for v in row[80:]:
        expect += float(np.float32(v * v))
    for nbytes in simd.WIDTHS:
        with simd.using(nbytes):
            _, sq = fl.affine_dx_fast(
                rng.standard_normal((20, w.shape[1])).astype(np.float32), w, True
            )
        assert sq == expect, nbytes


def test_width_choice_wastes_the_fewest_lanes_and_never_exceeds_the_process_width():
    f32, f64 = np.dtype(np.float32), np.dtype(np.float64)
    with simd.using(64):
        assert fl._width_for(500, f32, fit=True).nbytes == 64  # 512 computed at every width: widest
        assert fl._width_for(32, f32).nbytes == 32  # the net's 32 filters: one 32-byte group
        assert fl._width_for(25, f32).nbytes == 32  # a 25-image shard's rows: 32, not 64
        # 16-byte vectors cost a 32-byte one's slot: 48 rows at 16 bytes cost 96, 64 at 64 bytes
        assert fl._width_for(48, f32).nbytes == 64
        assert fl._width_for(40, f32, fit=True).nbytes == 32  # 64 columns, not 48 at 16 bytes
        assert fl._width_for(16, f32).nbytes == 32  # 4 vectors at 16 or 32 bytes: the wider
        assert fl._width_for(20, f32, fit=True).nbytes == 16  # the only groups that fit 20
        assert fl._width_for(64, f64).nbytes == 64
    with simd.using(32):
        assert fl._width_for(500, f32, fit=True).nbytes == 32
        assert fl._width_for(64, f32).nbytes == 32
        assert fl._width_for(40, f32, fit=True).nbytes == 32
    with simd.using(16):  # the only width: a 16-byte vector is the machine's own
        assert fl._width_for(500, f32, fit=True).nbytes == 16
        assert fl._width_for(40, f32, fit=True).nbytes == 16


# ---- which width a process uses ----------------------------------------------------------------


@pytest.mark.parametrize(
    "machine, features, nbytes",
    [
        ("x86_64", {"sse4.2", "avx", "avx2", "fma", "avx512f", "avx512bw", "avx512vl"}, 64),
        ("x86_64", {"sse4.2", "avx", "avx2", "fma"}, 32),
        ("x86_64", {"sse4.2", "avx"}, 16),  # AVX without AVX2 and FMA: SSE's width
        ("AMD64", {"avx2"}, 16),  # no FMA: the kernels' fused multiply-add would be a call
        ("aarch64", {"neon", "avx512f"}, 16),  # NEON's width, whatever else is listed
        ("arm64", set(), 16),
    ],
)
def test_native_width_follows_the_cpu(machine, features, nbytes):
    assert simd.native_bytes(features, machine) == nbytes


def test_the_environment_overrides_the_cpu_and_a_bad_value_names_the_variable():
    assert simd.process_bytes({"CONVPIPE_VECTOR_BYTES": "16"}) == 16
    assert simd.process_bytes({"CONVPIPE_VECTOR_BYTES": " 64 "}) == 64
    assert simd.process_bytes({}) == simd.native_bytes()
    for bad in ("48", "avx2", "0"):
        with pytest.raises(ValueError, match=r"CONVPIPE_VECTOR_BYTES: expected one of 16, 32, 64"):
            simd.process_bytes({"CONVPIPE_VECTOR_BYTES": bad})
    with pytest.raises(ValueError, match="vector width: expected one of 16, 32, 64 bytes, got 8"):
        simd.Width(8)


def test_using_sets_the_width_for_a_block_and_restores_it():
    before = fl.vector_bytes()
    with simd.using(16):
        assert fl.vector_bytes() == 16
        with simd.using(64):
            assert fl.vector_bytes() == 64
        assert fl.vector_bytes() == 16
    assert fl.vector_bytes() == before


def test_the_machine_line_names_the_cpu_its_extensions_and_the_width(monkeypatch):
    monkeypatch.setenv("CONVPIPE_VECTOR_BYTES", "16")
    with simd.using(16):
        line = fl.machine_text()
    assert line.startswith(simd.cpu_model())
    assert "kernels at 16-byte vectors (CONVPIPE_VECTOR_BYTES=16)" in line


def test_the_command_line_refuses_a_bad_width_in_one_line(monkeypatch, capsys, tmp_path):
    from pipeline.cli import main

    monkeypatch.setenv("CONVPIPE_VECTOR_BYTES", "40")
    assert main(["status", "--root", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert (
        err
        == "convpipe: error: CONVPIPE_VECTOR_BYTES: expected one of 16, 32, 64 (bytes), got '40'\n"
    )


# ---- which register tiles a process uses ---------------------------------------------------------


@pytest.mark.parametrize(
    "machine, features, regs",
    [
        ("x86_64", {"avx2", "fma", "avx512f", "avx512vl"}, 32),
        ("x86_64", {"avx2", "fma"}, 16),
        ("aarch64", {"neon"}, 32),
    ],
)
def test_the_register_count_follows_the_cpu(machine, features, regs):
    assert simd.native_registers(features, machine) == regs


def test_the_tile_follows_the_register_count_and_the_environment_overrides_it():
    assert tile.tile_for(tall=True, regs=32) == tile.Tile(6, 4)
    assert tile.tile_for(tall=True, regs=16) == tile.Tile(3, 4)  # 24 sums would spill on AVX2
    assert tile.tile_for(tall=False, regs=32) == tile.Tile(3, 4)
    assert simd.process_registers({"CONVPIPE_VECTOR_REGISTERS": "16"}) == 16
    assert simd.process_registers({}) == simd.native_registers()
    for bad in ("8", "64", "avx512"):
        with pytest.raises(ValueError, match=r"CONVPIPE_VECTOR_REGISTERS: expected 16 or 32"):
            simd.process_registers({"CONVPIPE_VECTOR_REGISTERS": bad})
    with pytest.raises(ValueError, match="register tile: expected one of 3x4, 6x4, got 3x8"):
        tile.Tile(3, 8)


def test_the_machine_line_names_the_register_count_and_why(monkeypatch):
    monkeypatch.delenv("CONVPIPE_VECTOR_REGISTERS", raising=False)
    line = fl.machine_text()
    assert f"register tiles for {simd.registers()} vector registers (the CPU's)" in line
    monkeypatch.setenv("CONVPIPE_VECTOR_REGISTERS", "16")
    assert "(CONVPIPE_VECTOR_REGISTERS=16)" in fl.machine_text()


def test_the_command_line_refuses_a_bad_register_count_in_one_line(monkeypatch, capsys, tmp_path):
    from pipeline.cli import main

    monkeypatch.setenv("CONVPIPE_VECTOR_REGISTERS", "24")
    assert main(["status", "--root", str(tmp_path)]) == 2
    assert capsys.readouterr().err == (
        "convpipe: error: CONVPIPE_VECTOR_REGISTERS: expected 16 or 32 (vector registers), "
        "got '24'\n"
    )

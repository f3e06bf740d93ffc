"""Checkpoints: atomic, pickle-free, and a damaged file is refused, never half-loaded."""

import os

import numpy as np
import pytest

from pipeline.checkpoint import CheckpointError, load_checkpoint, save_checkpoint


def test_round_trip_keeps_arrays_dtypes_and_meta(tmp_path):
    arrays = {
        "params/W1": np.arange(12, dtype=np.float32).reshape(3, 4),
        "adam/W1/m": np.ones(3),
        "step": np.int64(7),
    }
    path = save_checkpoint(tmp_path / "ck.npz", arrays, {"step": 7, "note": "x"})
    got, meta = load_checkpoint(path)
    assert set(got) == set(arrays)
    for k, v in arrays.items():
        np.testing.assert_array_equal(got[k], v)
        assert got[k].dtype == np.asarray(v).dtype
    assert meta["step"] == 7 and meta["note"] == "x"
    # loadable by anyone with pickles disabled
    with np.load(path, allow_pickle=False) as z:
        assert "params/W1" in z.files


def test_overwrite_is_atomic_and_leaves_no_temporary_files(tmp_path):
    path = tmp_path / "ck.npz"
    save_checkpoint(path, {"a": np.zeros(3)}, {"step": 1})
    save_checkpoint(path, {"a": np.ones(3)}, {"step": 2})
    arrays, meta = load_checkpoint(path)
    assert meta["step"] == 2 and arrays["a"].sum() == 3
    assert os.listdir(tmp_path) == ["ck.npz"]


@pytest.mark.parametrize("cut", [0.3, 0.6, 0.95])
def test_torn_checkpoint_is_refused(tmp_path, cut):
    path = save_checkpoint(
        tmp_path / "ck.npz", {"a": np.random.default_rng(0).standard_normal(10_000)}, {"step": 3}
    )
    data = path.read_bytes()
    torn = tmp_path / "torn.npz"
    torn.write_bytes(data[: int(len(data) * cut)])
    with pytest.raises(CheckpointError, match="torn.npz"):
        load_checkpoint(torn)


def test_flipped_byte_is_refused(tmp_path):
    path = save_checkpoint(tmp_path / "ck.npz", {"a": np.zeros(10_000)}, {"step": 3})
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match="damaged"):
        load_checkpoint(path)


def test_plain_npz_without_metadata_is_not_a_checkpoint(tmp_path):
    np.savez(tmp_path / "other.npz", a=np.zeros(2))
    with pytest.raises(CheckpointError, match="no convpipe metadata"):
        load_checkpoint(tmp_path / "other.npz")
    with pytest.raises(CheckpointError, match="does not exist"):
        load_checkpoint(tmp_path / "missing.npz")


def test_pickled_object_arrays_are_refused(tmp_path):
    path = tmp_path / "evil.npz"
    np.savez(
        path,
        __meta__=np.frombuffer(b'{"format": "convpipe-checkpoint/1"}', np.uint8),
        a=np.array([object()], dtype=object),
    )
    with pytest.raises(CheckpointError, match="evil.npz"):
        load_checkpoint(path)


def test_npy_headers_are_parsed_under_one_lock(tmp_path, monkeypatch):
    """NumPy parses every array header with ast.literal_eval, which CPython 3.11 cannot run in
    two threads at once (python/cpython#106905): checkpoints and run parameters are read
    holding pipeline.checkpoint.NPY_READ_LOCK."""
    import ast

    from pipeline.checkpoint import NPY_READ_LOCK
    from pipeline.training.rundir import RunDir

    held = []
    parse = ast.literal_eval

    def checked(node_or_string):
        held.append(NPY_READ_LOCK.locked())
        return parse(node_or_string)

    save_checkpoint(tmp_path / "c.npz", {"w": np.ones(3, np.float32)}, {"step": 1})
    run = RunDir(tmp_path / "run")
    run.path.mkdir()
    np.savez(run.params_path, W1=np.zeros(2, np.float32))
    monkeypatch.setattr(ast, "literal_eval", checked)
    arrays, _ = load_checkpoint(tmp_path / "c.npz")
    params, _ = run.read_params()
    assert arrays["w"].tolist() == [1, 1, 1] and params["W1"].tolist() == [0, 0]
    assert len(held) >= 3 and all(held), held  # every header (the metadata's too) under the lock
    assert not NPY_READ_LOCK.locked()

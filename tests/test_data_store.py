"""The store reader: open_store, read (dtype, mean subtraction, shuffled indices), errors."""

import json
import pickle

import numpy as np
import pytest

from pipeline.data import open_store
from pipeline.data.store import clear_cache, store_state
from pipeline.errors import DataError
from tests.data_fixtures import make_store


@pytest.fixture(scope="module")
def store_truth(tmp_path_factory):
    path = tmp_path_factory.mktemp("store") / "s.zarr"
    truth = make_store(path, {"train": 250, "val": 30, "test": 60}, chunk=100)
    return path, truth


def test_metadata(store_truth):
    path, truth = store_truth
    s = open_store(path)
    assert s.splits == {"train": 250, "val": 30, "test": 60}
    assert s.class_names[0] == "airplane" and len(s.class_names) == 10
    assert s.mean_image.dtype == np.float32 and s.mean_image.shape == (3, 32, 32)
    np.testing.assert_array_equal(s.mean_image, truth["mean"])
    assert s.attrs["complete"] is True and s.chunks["train"] == 100
    assert store_state(path) == "complete"


@pytest.mark.parametrize("cache", [True, False])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_read_shuffled_repeated(store_truth, cache, dtype):
    path, truth = store_truth
    s = open_store(path)
    rng = np.random.default_rng(1)
    for split in ("train", "val", "test"):
        X0, y0 = truth[split]
        idx = rng.integers(0, len(y0), 64)  # shuffled, with repeats, across chunks
        X, y = s.read(split, idx, dtype=dtype, cache=cache)
        assert X.dtype == dtype and X.shape == (64, 3, 32, 32)
        assert y.dtype == np.int64
        np.testing.assert_array_equal(y, y0[idx])
        np.testing.assert_array_equal(X, X0[idx].astype(dtype) - truth["mean"].astype(dtype))
        raw, _ = s.read_uint8(split, idx, cache=cache)
        np.testing.assert_array_equal(raw, X0[idx])


def test_read_edge_cases(store_truth):
    path, truth = store_truth
    s = open_store(path)
    X, y = s.read("train", np.array([], dtype=np.int64))
    assert X.shape == (0, 3, 32, 32) and y.shape == (0,)
    X, y = s.read("train", [-1])
    np.testing.assert_array_equal(y, truth["train"][1][-1:])
    with pytest.raises(IndexError, match="out of range"):
        s.read("train", [250])
    with pytest.raises(ValueError, match="integers"):
        s.read("train", [0.5])
    with pytest.raises(ValueError, match="floating"):
        s.read("train", [0], dtype=np.int32)
    with pytest.raises(DataError, match="no split 'dev'"):
        s.read("dev", [0])
    np.testing.assert_array_equal(s.labels("val"), truth["val"][1])


def test_pickles_as_path_and_reuses_cache(store_truth):
    path, truth = store_truth
    s = open_store(path)
    s.read("train", np.arange(250))
    blob = pickle.dumps(s)
    assert len(blob) < 500  # the path, not the data
    s2 = pickle.loads(blob)
    assert s2.path == s.path and s2.splits == s.splits
    np.testing.assert_array_equal(s2.read("val", [3, 1])[1], truth["val"][1][[3, 1]])


def test_missing_and_incompatible(tmp_path):
    with pytest.raises(DataError, match="no data store here") as e:
        open_store(tmp_path / "nope.zarr")
    assert str(tmp_path / "nope.zarr") in str(e.value)
    (tmp_path / "plain").mkdir()
    with pytest.raises(DataError, match="not a convpipe CIFAR store"):
        open_store(tmp_path / "plain")
    p = tmp_path / "s.zarr"
    make_store(p, {"train": 20, "val": 5, "test": 5}, chunk=10)
    meta = json.loads((p / "zarr.json").read_text())
    meta["attributes"]["format_version"] = 99
    (p / "zarr.json").write_text(json.dumps(meta))
    clear_cache()
    with pytest.raises(DataError, match="format version 99"):
        open_store(p)
    del meta["attributes"]["complete"]
    meta["attributes"]["format_version"] = 1
    (p / "zarr.json").write_text(json.dumps(meta))
    with pytest.raises(DataError, match="incomplete store"):
        open_store(p)
    assert store_state(p) == "incomplete"


def test_reopen_after_replacement(tmp_path):
    p = tmp_path / "s.zarr"
    make_store(p, {"train": 20, "val": 5, "test": 5}, chunk=10, seed=1)
    a = open_store(p).read("train", [0, 1])[1]
    import shutil
    shutil.rmtree(p)
    t2 = make_store(p, {"train": 30, "val": 5, "test": 5}, chunk=10, seed=2)
    s = open_store(p)
    assert s.splits["train"] == 30
    np.testing.assert_array_equal(s.read("train", [0, 1])[1], t2["train"][1][:2])
    assert a.shape == (2,)


def test_concurrent_reads_fill_cache_once(tmp_path):
    """Worker threads reading at once from a cold cache all get exact batches."""
    from concurrent.futures import ThreadPoolExecutor
    p = tmp_path / "s.zarr"
    truth = make_store(p, {"train": 400, "val": 10, "test": 10}, chunk=32, seed=3)
    clear_cache()
    s = open_store(p)
    rng = np.random.default_rng(0)
    batches = [rng.integers(0, 400, 50) for _ in range(16)]
    with ThreadPoolExecutor(4) as pool:
        results = list(pool.map(lambda idx: s.read("train", idx), batches))
    for idx, (X, y) in zip(batches, results):
        np.testing.assert_array_equal(y, truth["train"][1][idx])
        np.testing.assert_array_equal(X, truth["train"][0][idx].astype(np.float32) - truth["mean"])

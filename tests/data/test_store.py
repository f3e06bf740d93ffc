"""The store reader: open_store, read (dtype, mean subtraction, shuffled indices), errors,
checksums (damaged chunks, verify_store) and stores of format version 1."""

import json
import pickle

import numpy as np
import pytest

from pipeline.data import open_store
from pipeline.data.store import clear_cache, store_state, verify_store
from pipeline.errors import DataError
from tests.helpers.data import damage_chunk, make_store


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
    np.testing.assert_array_equal(s.read_uint8("val")[1], truth["val"][1])
    assert not hasattr(s, "labels")  # read_uint8 gives the labels


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


# ------------------------------------------------------------------------ checksums


def _one_line(exc) -> str:
    text = str(exc.value)
    assert "\n" not in text
    return text


@pytest.mark.parametrize("cache", [True, False])
def test_damaged_chunk_is_one_error_naming_split_and_chunk(tmp_path, cache):
    """64 bytes changed in the middle of a chunk file: a DataError naming the store, the split
    and the chunk, never the wrong pixels (Blosc alone decodes such a chunk without a word)."""
    p = tmp_path / "s.zarr"
    truth = make_store(p, {"train": 250, "val": 30, "test": 60}, chunk=100)
    f = damage_chunk(p, "train", 1)
    clear_cache()
    s = open_store(p)
    assert s.protected
    X, _ = s.read_uint8("train", [0, 5, 210], cache=cache)  # chunks 0 and 2 are fine
    np.testing.assert_array_equal(X, truth["train"][0][[0, 5, 210]])
    with pytest.raises(DataError) as e:
        s.read("train", [3, 150], cache=cache)
    msg = _one_line(e)
    assert msg.startswith(
        f"{s.path}: damaged chunk: split 'train', images chunk 1 (rows 100-199, "
        f"file {f.relative_to(p)}): crc32c checksum mismatch"
    )
    assert "convpipe data prepare --force" in msg
    np.testing.assert_array_equal(s.read_uint8("val")[0], truth["val"][0])  # other splits read


def test_damaged_labels_and_mean_are_named(tmp_path):
    p = tmp_path / "s.zarr"
    make_store(p, {"train": 50, "val": 20, "test": 20}, chunk=10)
    damage_chunk(p, "test", 1, array="labels", nbytes=2)
    clear_cache()
    with pytest.raises(
        DataError,
        match=r"split 'test', labels chunk 1 \(rows 10-19, file "
        r"test/labels/c/1\): crc32c checksum mismatch",
    ):
        open_store(p).read("test", [0])
    mean_file = p / "mean_image" / "c" / "0" / "0" / "0"
    data = bytearray(mean_file.read_bytes())
    data[100] ^= 1
    mean_file.write_bytes(bytes(data))
    clear_cache()
    with pytest.raises(
        DataError, match=r"damaged chunk: mean_image \(file mean_image/c/0/0/0\): crc32c"
    ):
        open_store(p)


def test_missing_chunk_file_is_damage_not_zeros(tmp_path):
    """Zarr reads a missing chunk as zeros; every chunk of a protected store is written
    (zeros too), so a missing one is named as damage."""
    p = tmp_path / "s.zarr"
    make_store(p, {"train": 30, "val": 10, "test": 10}, chunk=10)
    (p / "val" / "images" / "c" / "0" / "0" / "0" / "0").unlink()
    clear_cache()
    for cache in (True, False):
        with pytest.raises(
            DataError, match=r"split 'val', images chunk 0 \(rows 0-9, .*\): chunk file missing"
        ):
            open_store(p).read("val", [4], cache=cache)


def test_chunks_of_zeros_are_written(tmp_path):
    from pipeline.data.store import create_layout, write_block

    p = tmp_path / "z.zarr"
    create_layout(p, {"train": 20}, 10, 10)
    write_block(p, "train", 0, np.zeros((20, 3, 32, 32), np.uint8), np.zeros(20, np.int64))
    assert sorted(f.name for f in (p / "train" / "images" / "c").iterdir()) == ["0", "1"]
    assert sorted(f.name for f in (p / "train" / "labels" / "c").iterdir()) == ["0", "1"]


def test_verify_store(tmp_path):
    p = tmp_path / "s.zarr"
    make_store(p, {"train": 250, "val": 30, "test": 60}, chunk=100)
    r = verify_store(p)
    # images + labels: train 3 + 3, val 1 + 1, test 1 + 1; mean 1
    assert (r.ok, r.protected, r.n_chunks, r.version) == (True, True, 11, 2)
    damage_chunk(p, "train", 2)
    damage_chunk(p, "test", 0, array="labels", nbytes=1)
    r = verify_store(p)
    assert not r.ok and r.n_chunks == 11
    assert [(d.split, d.array, d.index, d.rows) for d in r.damaged] == [
        ("train", "images", 2, (200, 250)),
        ("test", "labels", 0, (0, 60)),
    ]
    assert all("crc32c checksum mismatch" in d.reason for d in r.damaged)
    assert type(r).from_dict(r.to_dict()) == r


def test_old_format_store_still_loads_and_is_unprotected(tmp_path):
    """A store written by format version 1 (no checksums, no shuffle) opens and reads exactly;
    it says it is unprotected."""
    p = tmp_path / "old.zarr"
    truth = make_store(p, {"train": 40, "val": 10, "test": 20}, chunk=10, old_format=True)
    assert "crc32c" not in (p / "train" / "images" / "zarr.json").read_text()
    clear_cache()
    s = open_store(p)
    assert s.attrs["format_version"] == 1 and not s.protected
    for split in ("train", "val", "test"):
        for cache in (True, False):
            X, y = s.read_uint8(split, None, cache=cache)
            np.testing.assert_array_equal(X, truth[split][0])
            np.testing.assert_array_equal(y, truth[split][1])
    r = verify_store(p)
    # images + labels: train 4 + 4, val 1 + 1, test 2 + 2; mean 1
    assert (r.ok, r.protected, r.version, r.n_chunks) == (True, False, 1, 15)

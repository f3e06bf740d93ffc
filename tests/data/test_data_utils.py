"""cs231n-style helpers: get_CIFAR10_data from a store, load_CIFAR10 from batches."""

import numpy as np
import pytest

from pipeline.data_utils import get_CIFAR10_data, load_CIFAR10
from pipeline.errors import DataError
from tests.helpers.data import make_store, write_batches_dir


def test_get_cifar10_data(tmp_path):
    p = tmp_path / "s.zarr"
    truth = make_store(p, {"train": 120, "val": 20, "test": 40}, chunk=50)
    d = get_CIFAR10_data(num_training=100, num_validation=10, num_test=30, store=p)
    assert set(d) == {"X_train", "y_train", "X_val", "y_val", "X_test", "y_test"}
    assert d["X_train"].shape == (100, 3, 32, 32) and d["X_val"].shape == (10, 3, 32, 32)
    assert d["X_test"].shape == (30, 3, 32, 32) and d["X_train"].dtype == np.float32
    assert d["y_train"].dtype == np.int64
    mean = truth["train"][0][:100].mean(axis=0, dtype=np.float64).astype(np.float32)
    np.testing.assert_array_equal(d["X_val"], truth["val"][0][:10].astype(np.float32) - mean)
    np.testing.assert_array_equal(d["y_test"], truth["test"][1][:30])
    raw = get_CIFAR10_data(
        num_training=5, num_validation=1, num_test=1, subtract_mean=False, store=p, dtype=np.float64
    )
    np.testing.assert_array_equal(raw["X_train"], truth["train"][0][:5].astype(np.float64))
    with pytest.raises(DataError, match="asked for 21 val images, the store has 20"):
        get_CIFAR10_data(num_training=10, num_validation=21, store=p)
    with pytest.raises(DataError, match="num_test must be an integer"):
        get_CIFAR10_data(num_training=10, num_validation=1, num_test=-1, store=p)


def test_load_cifar10(tmp_path):
    d, truth = write_batches_dir(tmp_path, per_batch=5, n_test=4)
    Xtr, Ytr, Xte, Yte = load_CIFAR10(d)
    assert Xtr.shape == (25, 32, 32, 3) and Xtr.dtype == np.float64
    np.testing.assert_array_equal(Xtr, truth["train_X"].transpose(0, 2, 3, 1))
    np.testing.assert_array_equal(Yte, truth["test_y"])
    (d / "data_batch_5").unlink()
    with pytest.raises(DataError, match="missing batch data_batch_5"):
        load_CIFAR10(d)


def test_get_cifar10_data_finds_the_store_from_convpipe_data(tmp_path, monkeypatch):
    """$CONVPIPE_DATA is the data root holding cifar10.zarr, wherever the caller runs."""
    root = tmp_path / "shared"
    truth = make_store(root / "cifar10.zarr", {"train": 30, "val": 5, "test": 10}, chunk=10)
    elsewhere = tmp_path / "notebooks"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    monkeypatch.setenv("CONVPIPE_DATA", str(root))
    d = get_CIFAR10_data(num_training=20, num_validation=5, num_test=10, subtract_mean=False)
    np.testing.assert_array_equal(d["y_test"], truth["test"][1])
    monkeypatch.setenv("CONVPIPE_DATA", str(tmp_path / "empty"))
    with pytest.raises(DataError) as e:
        get_CIFAR10_data()
    msg = str(e.value)
    assert "\n" not in msg
    assert f"looked for {tmp_path / 'empty' / 'cifar10.zarr'}" in msg
    assert f"$CONVPIPE_DATA={tmp_path / 'empty'}" in msg
    assert "`convpipe data prepare --source PATH`" in msg and "`convpipe data prepare`" in msg


def test_get_cifar10_data_default_search(tmp_path, monkeypatch):
    """Without $CONVPIPE_DATA: ./data/cifar10.zarr, then data/cifar10.zarr of the checkout."""
    from pipeline.data import paths

    monkeypatch.delenv("CONVPIPE_DATA", raising=False)
    checkout = tmp_path / "checkout"
    (checkout / "pipeline").mkdir(parents=True)
    (checkout / "pyproject.toml").write_text("")
    monkeypatch.setattr(paths, "_checkout_root", lambda: checkout)
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    monkeypatch.chdir(cwd)
    with pytest.raises(
        DataError,
        match=r"looked for data/cifar10.zarr, .*checkout/data/cifar10.zarr; "
        r"\$CONVPIPE_DATA is not set",
    ):
        get_CIFAR10_data()
    t1 = make_store(
        checkout / "data" / "cifar10.zarr", {"train": 20, "val": 5, "test": 5}, chunk=10, seed=1
    )
    d = get_CIFAR10_data(num_training=20, num_validation=5, num_test=5, subtract_mean=False)
    np.testing.assert_array_equal(d["y_train"], t1["train"][1])
    t2 = make_store(
        cwd / "data" / "cifar10.zarr", {"train": 20, "val": 5, "test": 5}, chunk=10, seed=2
    )
    d = get_CIFAR10_data(num_training=20, num_validation=5, num_test=5, subtract_mean=False)
    np.testing.assert_array_equal(d["y_train"], t2["train"][1])  # ./data comes first


def test_get_cifar10_data_damaged_chunk(tmp_path):
    from tests.helpers.data import damage_chunk

    p = tmp_path / "s.zarr"
    make_store(p, {"train": 40, "val": 10, "test": 10}, chunk=10)
    damage_chunk(p, "train", 2)
    with pytest.raises(
        DataError, match=r"s.zarr: damaged chunk: split 'train', images chunk 2 \(rows 20-29"
    ):
        get_CIFAR10_data(num_training=40, num_validation=10, num_test=10, store=p)


def test_get_cifar10_data_from_an_old_unshuffled_store_warns(tmp_path):
    p = tmp_path / "old.zarr"
    truth = make_store(p, {"train": 20, "val": 5, "test": 5}, chunk=10, old_format=True)
    with pytest.warns(UserWarning, match="keeps its source's order.*--force` rebuilds it shuffled"):
        d = get_CIFAR10_data(num_training=20, num_validation=5, num_test=5, store=p)
    np.testing.assert_array_equal(d["y_val"], truth["val"][1])

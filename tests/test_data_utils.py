"""cs231n-style helpers: get_CIFAR10_data from a store, load_CIFAR10 from batches."""

import numpy as np
import pytest

from pipeline.data_utils import get_CIFAR10_data, load_CIFAR10
from pipeline.errors import DataError
from tests.data_fixtures import make_store, write_batches_dir


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
    raw = get_CIFAR10_data(num_training=5, num_validation=1, num_test=1, subtract_mean=False,
                           store=p, dtype=np.float64)
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

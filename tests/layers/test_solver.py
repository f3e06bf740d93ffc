"""Solver: cs231n options, histories, pickle-free checkpoints that resume exactly."""

import numpy as np
import pytest

from pipeline.checkpoint import CheckpointError
from pipeline.cnn import ThreeLayerConvNet
from pipeline.solver import Solver
from tests.helpers.cifar_sample import cifar_sample


def small_model(**kw):
    return ThreeLayerConvNet(
        num_filters=4, filter_size=3, hidden_dim=16, weight_scale=1e-2, seed=0, **kw
    )


def make_solver(model, **kw):
    opts = dict(
        update_rule="adam",
        optim_config={"learning_rate": 1e-3},
        batch_size=20,
        num_train_samples=40,
        num_val_samples=40,
        verbose=False,
    )
    opts.update(kw)
    return Solver(model, cifar_sample(100, 100), **opts)


def test_histories_and_lr_decay():
    np.random.seed(0)
    solver = make_solver(small_model(), num_epochs=2, lr_decay=0.5)
    solver.train()
    assert len(solver.loss_history) == 2 * 5
    assert (
        len(solver.train_acc_history) == len(solver.val_acc_history) == 3
    )  # first step + 2 epochs
    assert solver.epoch == 2
    assert all(
        c["learning_rate"] == pytest.approx(1e-3 * 0.25) for c in solver.optim_configs.values()
    )


def test_checkpoint_resume_is_bit_identical(tmp_path):
    np.random.seed(5)
    full = make_solver(small_model(normalization="spatial_batchnorm"), num_epochs=3)
    full.train()

    np.random.seed(5)
    first = make_solver(
        small_model(normalization="spatial_batchnorm"),
        num_epochs=1,
        checkpoint_name=str(tmp_path / "run"),
    )
    first.train()
    np.random.seed(999)  # whatever happens in between does not matter
    resumed = make_solver(small_model(normalization="spatial_batchnorm"), num_epochs=3)
    resumed.load_checkpoint(tmp_path / "run_epoch_1.npz")
    resumed.train()

    assert resumed.loss_history == full.loss_history
    assert resumed.val_acc_history == full.val_acc_history
    for k in full.model.params:
        np.testing.assert_array_equal(resumed.model.params[k], full.model.params[k])
    np.testing.assert_array_equal(
        resumed.model.get_state()["running_var"], full.model.get_state()["running_var"]
    )
    with np.load(tmp_path / "run_epoch_1.npz", allow_pickle=False) as z:
        assert "params/W1" in z.files


def test_checkpoint_of_another_architecture_is_refused(tmp_path):
    np.random.seed(1)
    make_solver(small_model(), num_epochs=1, checkpoint_name=str(tmp_path / "a")).train()
    other = make_solver(
        ThreeLayerConvNet(num_filters=8, filter_size=3, hidden_dim=16), num_epochs=1
    )
    with pytest.raises(CheckpointError, match="W1 has shape"):
        other.load_checkpoint(tmp_path / "a_epoch_1.npz")


def test_bad_options_are_named():
    with pytest.raises(ValueError, match="Unrecognized arguments 'epochs'"):
        make_solver(small_model(), epochs=3)
    with pytest.raises(ValueError, match='Invalid update_rule "adamw"'):
        make_solver(small_model(), update_rule="adamw")

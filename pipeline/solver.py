"""Single-process training loop (cs231n's Solver) with pickle-free checkpoints.

Example (as in cs231n)::

    solver = Solver(model, data, update_rule="adam", optim_config={"learning_rate": 1e-3},
                    lr_decay=0.95, num_epochs=1, batch_size=50, print_every=100)
    solver.train()

``data`` holds X_train (N_train, C, H, W), y_train (N_train,), X_val, y_val. After train(),
``model.params`` are the parameters of the best validation accuracy, and ``loss_history``,
``train_acc_history`` and ``val_acc_history`` tell how training went.

Checkpoints (``checkpoint_name`` set) are ``{checkpoint_name}_epoch_{epoch}.npz`` written by
:mod:`pipeline.checkpoint`: loading one cannot run code. :meth:`Solver.load_checkpoint`
restores the model's parameters and BN statistics, the optimizer state, the epoch and the
histories, so :meth:`train` resumes where the checkpoint was taken.
"""

from __future__ import annotations

import numpy as np

from pipeline import optim
from pipeline.checkpoint import CheckpointError, load_checkpoint, save_checkpoint

#: update rules that the Solver applies in place on the parameters it owns (same results)
_INPLACE_RULES = {"adam": optim.adam_inplace}


class Solver:
    """Trains a model with minibatch gradient descent; see the module docstring.

    Optional keyword arguments (cs231n's):
    - update_rule: name of a rule in pipeline.optim (default "sgd").
    - optim_config: hyperparameters given to the update rule (e.g. learning_rate).
    - lr_decay: learning rate multiplier applied after each epoch.
    - batch_size: minibatch size (100). num_epochs: epochs to train (10).
    - num_train_samples / num_val_samples: images used for the accuracy checks (1000 / all).
    - checkpoint_name: prefix of the per-epoch checkpoint files (None: no checkpoints).
    - print_every: iterations between loss printouts (10). verbose: print at all (True).
    """

    def __init__(self, model, data, **kwargs):
        self.model = model
        self.X_train, self.y_train = data["X_train"], data["y_train"]
        self.X_val, self.y_val = data["X_val"], data["y_val"]

        self.update_rule_name = kwargs.pop("update_rule", "sgd")
        self.optim_config = kwargs.pop("optim_config", {})
        self.lr_decay = kwargs.pop("lr_decay", 1.0)
        self.batch_size = kwargs.pop("batch_size", 100)
        self.num_epochs = kwargs.pop("num_epochs", 10)
        self.num_train_samples = kwargs.pop("num_train_samples", 1000)
        self.num_val_samples = kwargs.pop("num_val_samples", None)
        self.checkpoint_name = kwargs.pop("checkpoint_name", None)
        self.print_every = kwargs.pop("print_every", 10)
        self.verbose = kwargs.pop("verbose", True)
        if kwargs:
            raise ValueError(f"Unrecognized arguments {', '.join(repr(k) for k in kwargs)}")
        rule = self.update_rule_name
        if (
            not isinstance(rule, str)
            or rule.startswith("_")
            or not callable(getattr(optim, rule, None))
        ):
            raise ValueError(
                f'Invalid update_rule "{rule}": expected one of sgd, sgd_momentum, rmsprop, adam'
            )
        self.update_rule = _INPLACE_RULES.get(rule, getattr(optim, rule))
        if int(self.batch_size) < 1:
            raise ValueError(f"batch_size must be >= 1, got {self.batch_size!r}")
        self._reset()

    def _reset(self):
        self.epoch = 0
        self.best_val_acc = 0
        self.best_params = {}
        self.loss_history = []
        self.train_acc_history = []
        self.val_acc_history = []
        self.optim_configs = {p: dict(self.optim_config) for p in self.model.params}

    def _step(self):
        """One gradient update on a minibatch drawn (with replacement) from the training data."""
        batch_mask = np.random.choice(self.X_train.shape[0], self.batch_size)
        loss, grads = self.model.loss(self.X_train[batch_mask], self.y_train[batch_mask])
        self.loss_history.append(float(loss))
        for p, w in self.model.params.items():
            next_w, self.optim_configs[p] = self.update_rule(w, grads[p], self.optim_configs[p])
            self.model.params[p] = next_w

    def check_accuracy(self, X, y, num_samples=None, batch_size=100):
        """Fraction of X (N, C, H, W) classified as y (N,); on a random subset of num_samples."""
        N = X.shape[0]
        if num_samples is not None and N > num_samples:
            mask = np.random.choice(N, num_samples)
            N, X, y = num_samples, X[mask], y[mask]
        y_pred = [
            np.argmax(self.model.loss(X[i : i + batch_size]), axis=1)
            for i in range(0, N, batch_size)
        ]
        return float(np.mean(np.hstack(y_pred) == y))

    def train(self):
        """Run optimisation for num_epochs (from the current epoch when resumed)."""
        num_train = self.X_train.shape[0]
        iterations_per_epoch = max(num_train // self.batch_size, 1)
        num_iterations = self.num_epochs * iterations_per_epoch
        for t in range(self.epoch * iterations_per_epoch, num_iterations):
            self._step()
            if self.verbose and t % self.print_every == 0:
                print(f"(Iteration {t + 1} / {num_iterations}) loss: {self.loss_history[-1]:f}")

            epoch_end = (t + 1) % iterations_per_epoch == 0
            if epoch_end:
                self.epoch += 1
                for config in self.optim_configs.values():
                    config["learning_rate"] *= self.lr_decay

            if t == 0 or t == num_iterations - 1 or epoch_end:
                train_acc = self.check_accuracy(
                    self.X_train, self.y_train, num_samples=self.num_train_samples
                )
                val_acc = self.check_accuracy(
                    self.X_val, self.y_val, num_samples=self.num_val_samples
                )
                self.train_acc_history.append(train_acc)
                self.val_acc_history.append(val_acc)
                self._save_checkpoint()
                if self.verbose:
                    print(
                        f"(Epoch {self.epoch} / {self.num_epochs}) train acc: {train_acc:f}; "
                        f"val_acc: {val_acc:f}"
                    )
                if val_acc > self.best_val_acc:
                    self.best_val_acc = val_acc
                    self.best_params = {k: v.copy() for k, v in self.model.params.items()}
        if self.best_params:
            self.model.params = self.best_params

    # -- checkpoints ---------------------------------------------------------------------------
    def _save_checkpoint(self):
        if self.checkpoint_name is None:
            return None
        arrays = {f"params/{k}": v for k, v in self.model.params.items()}
        arrays.update({f"state/{k}": v for k, v in _model_state(self.model).items()})
        scalars = {}
        for p, config in self.optim_configs.items():
            for key, value in config.items():
                if isinstance(value, np.ndarray):
                    arrays[f"optim/{p}/{key}"] = value
                else:
                    scalars.setdefault(p, {})[key] = value
        arrays.update({f"best/{k}": v for k, v in self.best_params.items()})
        rng_kind, rng_keys, rng_pos, rng_has_gauss, rng_gauss = np.random.get_state()
        arrays["rng/keys"] = rng_keys
        arrays["loss_history"] = np.asarray(self.loss_history, dtype=np.float64)
        arrays["train_acc_history"] = np.asarray(self.train_acc_history, dtype=np.float64)
        arrays["val_acc_history"] = np.asarray(self.val_acc_history, dtype=np.float64)
        meta = {
            "kind": "solver",
            "update_rule": self.update_rule_name,
            "lr_decay": self.lr_decay,
            "optim_config": _jsonable(self.optim_config),
            "optim_scalars": _jsonable(scalars),
            "batch_size": self.batch_size,
            "num_train_samples": self.num_train_samples,
            "num_val_samples": self.num_val_samples,
            "epoch": self.epoch,
            "best_val_acc": self.best_val_acc,
            "rng": [rng_kind, int(rng_pos), int(rng_has_gauss), float(rng_gauss)],
        }
        return save_checkpoint(f"{self.checkpoint_name}_epoch_{self.epoch}.npz", arrays, meta)

    def load_checkpoint(self, path):
        """Restore parameters, BN statistics, optimizer state, epoch, histories, best parameters
        and NumPy's global random state, so that train() continues exactly as if never stopped."""
        arrays, meta = load_checkpoint(path)
        if meta.get("kind") != "solver":
            raise CheckpointError(f"checkpoint {path} was not written by a Solver")
        params = {k.split("/", 1)[1]: v for k, v in arrays.items() if k.startswith("params/")}
        if set(params) != set(self.model.params):
            raise CheckpointError(
                f"checkpoint {path} holds parameters {sorted(params)}, the model has "
                f"{sorted(self.model.params)}"
            )
        for k, v in params.items():
            if v.shape != self.model.params[k].shape:
                raise CheckpointError(
                    f"checkpoint {path}: {k} has shape {v.shape}, the model expects "
                    f"{self.model.params[k].shape}"
                )
        self.model.params = params
        state = {k.split("/", 1)[1]: v for k, v in arrays.items() if k.startswith("state/")}
        if state and hasattr(self.model, "set_state"):
            self.model.set_state(state)
        self.optim_configs = {p: dict(meta["optim_scalars"].get(p, {})) for p in params}
        for key, value in arrays.items():
            if key.startswith("optim/"):
                _, p, name = key.split("/", 2)
                self.optim_configs[p][name] = value
        self.best_params = {
            k.split("/", 1)[1]: v for k, v in arrays.items() if k.startswith("best/")
        }
        rng_kind, rng_pos, rng_has_gauss, rng_gauss = meta["rng"]
        np.random.set_state((rng_kind, arrays["rng/keys"], rng_pos, rng_has_gauss, rng_gauss))
        self.epoch = int(meta["epoch"])
        self.best_val_acc = meta["best_val_acc"]
        self.loss_history = arrays["loss_history"].tolist()
        self.train_acc_history = arrays["train_acc_history"].tolist()
        self.val_acc_history = arrays["val_acc_history"].tolist()


def _model_state(model) -> dict:
    return model.get_state() if hasattr(model, "get_state") else {}


def _jsonable(obj):
    if isinstance(obj, dict):
        return {str(k): _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (np.floating, np.integer)):
        return obj.item()
    return obj

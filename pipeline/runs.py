"""A trained run's network: ``load_model(RUN_DIR)`` for a ``convpipe train`` run, a job's, a
sweep trial's, or a sweep's (its best trial).

Loading lives with the runs, not with the model: :mod:`pipeline.cnn` knows nothing of run
directories, settings files or sweeps.
"""

from __future__ import annotations

from pipeline.cnn import ModelSpec, ThreeLayerConvNet
from pipeline.convnet import ConvNet
from pipeline.errors import TrainingError
from pipeline.jobs.sweep import trained_run_dir
from pipeline.netspec import NetSpec
from pipeline.training.config import TrainConfig
from pipeline.training.rundir import RunDir


def load_model(run_dir) -> ThreeLayerConvNet | ConvNet:
    """The trained network of a run directory (``convpipe train``'s, a sweep trial's, a sweep's
    best): a :class:`ThreeLayerConvNet`, or the :class:`ConvNet` of the run's ``model`` spec,
    with the run's final parameters (``params.npz``) and BN running statistics, in the run's
    dtype, ready for ``loss(X)`` (scores (N, num_classes)) or
    :meth:`pipeline.solver.Solver.check_accuracy`. ``X`` is preprocessed as training saw it
    (the store's loader: float images minus the train mean). A sweep's run directory gives its
    best trial. Raises :class:`~pipeline.errors.TrainingError` naming the file when the run has
    no parameters yet or they do not fit the run's settings.
    """
    run = RunDir(trained_run_dir(run_dir)).require_existing()
    config = TrainConfig.load(run.config_path)
    params, bn = run.read_params()
    # the number of classes: the size of the last layer's bias (b3 of the three-layer net)
    last = _last_bias(config)
    if last not in params:
        raise TrainingError(
            f"{run.params_path}: no {last} (not the parameters of the run's network)"
        )
    spec = ModelSpec.of(config, int(params[last].shape[0]))
    model = spec.build(weight_scale=config.weight_scale, reg=config.reg, seed=0)
    for name, value in model.params.items():
        if name not in params or params[name].shape != value.shape:
            got = params[name].shape if name in params else "nothing"
            raise TrainingError(
                f"{run.params_path}: {name} should have shape {value.shape} for the run's "
                f"settings, got {got}"
            )
        model.params[name] = params[name].astype(value.dtype, copy=False)
    if spec.bn_channels:
        if not bn:
            raise TrainingError(
                f"{run.params_path}: no BN running statistics for a spatial-batchnorm model"
            )
        model.set_state(
            {"running_mean": bn["bn_running_mean"], "running_var": bn["bn_running_var"]}
        )
    return model


def _last_bias(config: TrainConfig) -> str:
    if config.model is None:
        return "b3"
    return [own["b"] for own in NetSpec.from_text(config.model).names() if "b" in own][-1]

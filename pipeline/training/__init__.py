"""Data-parallel training on Dask: settings, shard tasks, the coordinator, evaluation.

Public API::

    from pipeline.training import TrainConfig, train, evaluate, resume_config
    summary = train(TrainConfig(data="data/cifar10.zarr", epochs=1))
    result = evaluate(summary["run_dir"], split="test")
"""

from pipeline.training.config import TrainConfig

__all__ = ["TrainConfig", "train", "evaluate", "resume_config"]


def __getattr__(name):  # lazy: importing the settings (TrainConfig) must not start Numba or Dask
    if name in ("train", "resume_config"):
        from pipeline.training import coordinator  # noqa: PLC0415 (lazy: see __getattr__)

        return getattr(coordinator, name)
    if name == "evaluate":
        from pipeline.training import evaluation  # noqa: PLC0415 (lazy: see __getattr__)

        return evaluation.evaluate
    raise AttributeError(f"module 'pipeline.training' has no attribute {name!r}")

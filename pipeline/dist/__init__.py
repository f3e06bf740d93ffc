"""Data-parallel training on Dask: settings, shard tasks, the coordinator, evaluation.

Public API::

    from pipeline.dist import TrainConfig, train, evaluate, resume_config
    summary = train(TrainConfig(data="data/cifar10.zarr", epochs=1))
    result = evaluate(summary["run_dir"], split="test")
"""

from pipeline.dist.config import TrainConfig
from pipeline.dist.evaluate import evaluate  # the function; eager, so the submodule cannot shadow it

__all__ = ["TrainConfig", "train", "evaluate", "resume_config"]


def __getattr__(name):  # lazy: importing the settings must not start Numba or Dask
    if name in ("train", "resume_config"):
        from pipeline.dist import coordinator

        return getattr(coordinator, name)
    raise AttributeError(f"module 'pipeline.dist' has no attribute {name!r}")

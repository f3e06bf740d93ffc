"""Tests of pipeline.training: the trainer on Dask, its run directory, checkpoints, faults."""

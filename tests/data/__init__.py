"""Tests of pipeline.data (sources, conversion, the Zarr store, safe unpickling) and data_utils."""

"""Tests of the convpipe page on the scheduler's dashboard, its data, curves and SVG."""

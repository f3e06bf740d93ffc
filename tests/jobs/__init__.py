"""Tests of pipeline.jobs: specs, the runner, the job client, interrupts, and sweeps."""

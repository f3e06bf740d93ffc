"""Tests of pipeline.cluster (settings, TLS) and the docker-compose cluster."""

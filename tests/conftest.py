"""Markers of the test suite, and the fixtures its areas share: the in-process Dask clusters.

The suite's other shared pieces are plain functions in tests/helpers/: ``local_cluster`` (the one
place a LocalCluster is built: a test that needs a cluster of its own calls it) and ProcessCluster
in tests.helpers.cluster, and ``wait_until`` in tests.helpers.wait (the one polling loop, on the
monotonic clock). The data tests' HTTP server and the jobs tests' ``count`` kind are fixtures of
tests/data/conftest.py and tests/jobs/conftest.py.
"""

import logging

import pytest
from distributed import Client

from tests.helpers.cluster import local_cluster


def pytest_configure(config):
    config.addinivalue_line(
        "markers",
        "compose: builds and runs the real docker-compose cluster (needs a Docker engine; "
        "skipped without one, required in CI: CONVPIPE_COMPOSE_TESTS=required)",
    )


@pytest.fixture(scope="module")
def cluster():
    """Two in-process workers of one thread each, with a dashboard on a free port: one cluster for
    a module's jobs (submitted through the job client or the CLI at its scheduler_address)."""
    with local_cluster(2) as c:
        yield c


@pytest.fixture
def client(cluster):
    """A client of the module's ``cluster``, closed after the test."""
    with Client(cluster) as c:
        yield c


@pytest.fixture(scope="module")
def training_client():
    """A client of two in-process workers of one thread each, without a dashboard: one for a
    module's training runs and sweeps (``train(config, client=...)``)."""
    with (
        local_cluster(2, dashboard_address=None, silence_logs=logging.WARNING) as c,
        Client(c) as client,
    ):
        yield client

"""Markers of the test suite."""


def pytest_configure(config):
    config.addinivalue_line(
        "markers", "compose: builds and runs the real docker-compose cluster (needs a Docker engine; "
                   "skipped without one, required in CI: CONVPIPE_COMPOSE_TESTS=required)")

"""The web tests' fixtures: a data root, and the page on an embedded in-process cluster."""

from __future__ import annotations

import pytest


@pytest.fixture
def root(tmp_path, monkeypatch):
    """A data root ($CONVPIPE_DATA) and a working directory with a runs/ folder."""
    data = tmp_path / "data"
    (data / "jobs").mkdir(parents=True)
    work = tmp_path / "work"
    (work / "runs").mkdir(parents=True)
    monkeypatch.setenv("CONVPIPE_DATA", str(data))
    monkeypatch.chdir(work)
    return data


@pytest.fixture
def page(root):
    """(client, URL of /convpipe) of an embedded in-process cluster (pipeline.cluster.connect)."""
    from pipeline.cluster import connect

    with connect(workers=1, processes=False, dashboard_address="127.0.0.1:0") as client:
        port = client.cluster.scheduler.http_server.port
        yield client, f"http://127.0.0.1:{port}/convpipe"

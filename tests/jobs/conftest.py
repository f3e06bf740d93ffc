"""Fixtures of the jobs tests."""

import pytest

from pipeline.jobs.kinds import KINDS
from tests.helpers.jobs import Count


@pytest.fixture
def count_kind(monkeypatch):
    """The trivial job kind ``count`` (tests.helpers.jobs.Count) in the job kinds for one test,
    removed after it. The clusters of these tests run their workers in this process
    (``processes=False``), so their coordinators find it in the same registry."""
    monkeypatch.setitem(KINDS, Count.name, Count)
    return Count

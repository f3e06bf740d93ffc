"""The page's epoch axis comes from what the run wrote (its step lines say how many steps an
epoch has), never from the store its config.json names: the page opens no store."""

from __future__ import annotations

import json

import pytest

import pipeline.curves
import pipeline.data.store
from pipeline.dashboard.data import RunReader
from pipeline.dashboard.files import Folders
from pipeline.training import train
from tests.helpers.training import make_store, tiny_config


def refuse_stores(monkeypatch) -> list[str]:
    """Every store opened from now on, refused and recorded."""
    opened = []

    def refuse(path, *args, **kwargs):
        opened.append(str(path))
        raise AssertionError(f"the page opened the store {path}")

    monkeypatch.setattr(pipeline.curves, "open_store", refuse)
    monkeypatch.setattr(pipeline.data.store, "open_store", refuse)
    return opened


@pytest.fixture
def no_store(monkeypatch):
    return refuse_stores(monkeypatch)


def write(run, config: dict, lines: list[dict]):
    run.mkdir(parents=True)
    (run / "config.json").write_text(json.dumps(config))
    (run / "metrics.jsonl").write_text("".join(json.dumps(m) + "\n" for m in lines))
    return run


def step(s: int, **kw) -> dict:
    return {"kind": "step", "step": s, "epoch": 1, "loss": 2.0, "n": 64, "seconds": 0.1, **kw}


def test_the_page_takes_steps_per_epoch_from_the_lines_not_the_store(tmp_path, no_store):
    """Three steps into the first epoch, no eval line: only the lines' field tells the epoch."""
    config = {"data": str(tmp_path / "any" / "store"), "batch_size": 64, "epochs": 3}
    run = write(tmp_path / "run", config, [step(s, steps_per_epoch=16) for s in (1, 2, 3)])
    view = RunReader(Folders([tmp_path])).read(run)
    assert (view.curves.steps_per_epoch, view.curves.x_label) == (16, "epoch")
    assert (view.step, view.total_steps) == (3, 48)
    assert no_store == []


def test_without_the_field_the_page_uses_train_limit_or_the_steps(tmp_path, no_store):
    """Lines written before step lines carried ``steps_per_epoch``: the train_limit, else steps
    on the x axis until the lines tell the epoch; still no store."""
    reader = RunReader(Folders([tmp_path]))
    config = {"data": str(tmp_path / "store"), "batch_size": 64, "epochs": 2}
    limited = write(tmp_path / "limited", {**config, "train_limit": 640}, [step(1), step(2)])
    view = reader.read(limited)
    assert (view.curves.steps_per_epoch, view.total_steps) == (10, 20)
    view = reader.read(write(tmp_path / "plain", config, [step(1), step(2)]))
    assert (view.curves.steps_per_epoch, view.curves.x_label, view.total_steps) == (
        None,
        "step",
        None,
    )
    assert no_store == []


def test_a_runs_step_lines_carry_steps_per_epoch(tmp_path, training_client, monkeypatch):
    """A real run: 200 images in batches of 64 are 4 steps an epoch; it stops after 3 steps
    (no eval line, one epoch line), and the page draws epochs from its step lines alone."""
    store = make_store(tmp_path / "tiny.zarr", n_train=200, n_val=48, n_test=40)
    run = tmp_path / "run"
    train(tiny_config(store, run, steps=3, eval_every=100), client=training_client)
    lines = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert [m["steps_per_epoch"] for m in lines if m["kind"] == "step"] == [4, 4, 4]
    opened = refuse_stores(monkeypatch)
    view = RunReader(Folders([tmp_path])).read(run)
    assert (view.curves.steps_per_epoch, view.step, view.total_steps) == (4, 3, 3)
    assert opened == []

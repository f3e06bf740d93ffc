"""Files that must survive crashes and concurrency: atomic writes honour the umask without
changing it, config.json is replaced atomically, and a run directory has exactly one owner."""

from __future__ import annotations

import os
import threading

import pytest

from pipeline import atomic
from pipeline.atomic import atomic_write_text
from pipeline.errors import TrainingError
from pipeline.training.rundir import RunDir


@pytest.fixture
def umask_027():
    set_umask = os.umask  # the test replaces os.umask
    old = set_umask(0o027)
    yield
    set_umask(old)


def test_atomic_writes_read_the_umask_without_setting_it(tmp_path, monkeypatch, umask_027):
    """os.umask can only be read by setting it: a thread creating a file meanwhile would get
    none."""

    def forbidden(*args):
        raise AssertionError(
            "os.umask called while writing: that changes the umask of every thread"
        )

    monkeypatch.setattr(os, "umask", forbidden)
    path = atomic_write_text(tmp_path / "f.txt", "x")
    assert path.stat().st_mode & 0o777 == 0o640
    assert atomic._umask() == 0o027


def test_without_proc_the_umask_of_import_time_is_used(monkeypatch):
    monkeypatch.setattr(atomic, "_proc_umask", lambda: None)
    assert atomic._umask() == atomic._IMPORT_UMASK


def test_two_runs_racing_for_one_directory_exactly_one_gets_it(tmp_path):
    out = tmp_path / "runs" / "same"
    for _ in range(20):
        barrier = threading.Barrier(2)
        results: list = [None, None]

        def claim(i):
            barrier.wait()
            try:
                results[i] = RunDir(out).create()
            except TrainingError as exc:
                results[i] = exc

        threads = [threading.Thread(target=claim, args=(i,)) for i in range(2)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        won = [r for r in results if isinstance(r, RunDir)]
        lost = [r for r in results if isinstance(r, TrainingError)]
        assert len(won) == 1 and len(lost) == 1, results
        assert str(lost[0]) == (
            f"{out} already holds a run (or another run is starting there): continue it with "
            f"--resume {out} or choose another --out"
        )
        (out / "checkpoints").rmdir()


def test_an_empty_directory_can_be_a_run_directory_once(tmp_path):
    (tmp_path / "out").mkdir()
    assert RunDir(tmp_path / "out").create().checkpoint_dir.is_dir()
    with pytest.raises(TrainingError, match="already holds a run"):
        RunDir(tmp_path / "out").create()


def test_config_json_is_replaced_atomically(tmp_path, monkeypatch):
    """A resume rewrites config.json: a failure while writing leaves the old one whole."""
    from pipeline.training.config import TrainConfig

    path = tmp_path / "config.json"
    TrainConfig(steps=7).save(path)
    before, inode = path.read_text(), path.stat().st_ino

    def disk_full(fd):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(atomic.os, "fsync", disk_full)
    with pytest.raises(OSError, match="No space left"):
        TrainConfig(steps=9).save(path)
    assert path.read_text() == before and TrainConfig.load(path).steps == 7
    assert [p.name for p in tmp_path.iterdir()] == ["config.json"]  # no temporary file left
    monkeypatch.undo()
    TrainConfig(steps=9).save(path)
    assert (
        TrainConfig.load(path).steps == 9 and path.stat().st_ino != inode
    )  # a new file renamed over the old


def test_every_checkpoint_follows_an_fsync_of_the_metrics_lines_it_counts(
    tmp_path, monkeypatch, training_client
):
    """A checkpoint records how many metrics lines came before it (resume truncates to them):
    those lines are fsync'ed before the checkpoint is written, so a power cut cannot leave a
    checkpoint counting lines the file lost."""
    from pipeline.training import train
    from tests.helpers.training import make_store, tiny_config

    store = make_store(tmp_path / "s.zarr", n_train=128, n_val=16, n_test=0)
    synced = []  # (file name, lines in it) at each fsync
    real_fsync = os.fsync

    def fsync(fd):
        name = os.readlink(f"/proc/self/fd/{fd}")
        lines = None
        if name.endswith("metrics.jsonl"):
            with open(name) as f:
                lines = sum(1 for _ in f)
        synced.append((os.path.basename(name), lines))
        return real_fsync(fd)

    monkeypatch.setattr(os, "fsync", fsync)
    run = tmp_path / "run"
    train(tiny_config(store, run, steps=4, checkpoint_every=2), client=training_client)
    checkpoints = [i for i, (name, _) in enumerate(synced) if name.startswith(".step-")]
    assert checkpoints, synced  # the checkpoint's temporary file, fsync'ed before its rename
    for i in checkpoints:
        before = [lines for name, lines in synced[:i] if name == "metrics.jsonl"]
        assert before and before[-1] >= 1, synced[: i + 1]

"""Real disk faults under a training run, on a small tmpfs: filled mid-run, the run stops with the
error naming the file it could not write, keeps every checkpoint written before, and resumes
(once there is space) to the bits of an undisturbed run; remounted read-only, a resume is
refused in one line and nothing in the run directory changes."""

from __future__ import annotations

import errno
import subprocess

import pytest

from pipeline.checkpoint import load_checkpoint
from pipeline.training import train
from tests.helpers.training import assert_same_params, final_params, make_store, tiny_config


@pytest.fixture
def small_disk(tmp_path):
    """A 4 MiB tmpfs (mounting needs root with CAP_SYS_ADMIN, as in CI's containers)."""
    disk = tmp_path / "disk"
    disk.mkdir()
    r = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=4m", "tmpfs", str(disk)],
        capture_output=True,
        text=True,
    )
    if r.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {r.stderr.strip() or r.returncode}")
    try:
        yield disk
    finally:
        subprocess.run(["umount", "-l", str(disk)], check=False)


def _fill(path):
    with open(path, "wb") as f:
        try:
            while True:
                f.write(bytes(1 << 16))
        except OSError as exc:
            assert exc.errno == errno.ENOSPC


def test_a_full_disk_mid_run_keeps_the_checkpoints_and_resume_continues(
    small_disk, tmp_path, training_client
):
    store = make_store(tmp_path / "s.zarr", n_train=256, n_val=32, n_test=0)
    settings = dict(steps=12, checkpoint_every=2)
    run = small_disk / "run"

    def fill_after_step_4(event):
        if event["event"] == "checkpoint" and event["step"] == 4:
            _fill(small_disk / "filler")

    with pytest.raises(OSError) as err:
        train(
            tiny_config(store, run, **settings), client=training_client, progress=fill_after_step_4
        )
    assert err.value.errno == errno.ENOSPC
    assert err.value.filename and err.value.filename.startswith(str(run)), err.value
    kept = sorted(p.name for p in (run / "checkpoints").glob("step-*.npz"))
    assert kept[-1] == "step-00000004.npz", kept
    for name in kept:  # each one whole
        load_checkpoint(run / "checkpoints" / name)
    (small_disk / "filler").unlink()
    train(tiny_config(store, run, resume=str(run), **settings), client=training_client)
    train(tiny_config(store, tmp_path / "calm", **settings), client=training_client)
    assert_same_params(final_params(run), final_params(tmp_path / "calm"))


def test_a_read_only_run_directory_is_refused_in_one_line_and_left_as_it_was(
    small_disk, tmp_path, training_client
):
    from pipeline.errors import TrainingError

    store = make_store(tmp_path / "s.zarr", n_train=128, n_val=16, n_test=0)
    run = small_disk / "run"
    train(tiny_config(store, run, steps=4, checkpoint_every=2), client=training_client)
    before = {p: p.read_bytes() for p in run.rglob("*") if p.is_file()}
    subprocess.run(["mount", "-o", "remount,ro", str(small_disk)], check=True)
    with pytest.raises(TrainingError) as err:
        train(tiny_config(store, run, steps=8, resume=str(run)), client=training_client)
    message = str(err.value)
    assert "\n" not in message and str(run) in message and "Read-only file system" in message
    assert {p: p.read_bytes() for p in run.rglob("*") if p.is_file()} == before
